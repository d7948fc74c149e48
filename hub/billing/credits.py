"""Admin grants and promo credits: outside money into a wallet or a team budget.

A grant is an ordinary ledger transaction from the ``external:grants`` (or
``external:promo``) account, so it is idempotent like every other: an admin
who retries with the same key gets the first grant back, not a second one.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .. import timeutil
from ..db.ledger_models import LedgerAccount, LedgerTransaction, Posting
from ..settings import Settings
from . import ledger
from .allocations import account_named, team_named
from .ledger import LedgerError

log = logging.getLogger(__name__)

SOURCES = ("grants", "promo")


def grant(
    session: Session,
    *,
    user: str | None,
    team: str | None,
    amount: int,
    source: str,
    key: str | None,
    by: str,
    memo: str = "",
) -> tuple[LedgerTransaction, bool]:
    """Credit ``amount`` micro-credits to a user's wallet or a team's budget."""
    ledger.positive_amount(amount)
    if (user is None) == (team is None):
        raise LedgerError("name exactly one of user or team to credit.")
    if source not in SOURCES:
        raise LedgerError(f"source must be one of {', '.join(SOURCES)}.")
    if user is not None:
        target = ledger.wallet(session, account_named(session, user).id)
    else:
        target = ledger.team_budget(session, team_named(session, str(team)).id)
    origin = ledger.external(session, source)
    return ledger.post(
        session,
        key or f"grant:{secrets.token_hex(12)}",
        source.rstrip("s") or source,
        [ledger.Leg(target.id, amount), ledger.Leg(origin.id, -amount)],
        memo=memo or f"{source} by {by}",
        created_by=by,
        extra={"target": target.key},
    )


def signup_policy(settings: Settings) -> str:
    """The effective sign-up credit policy: ``approved`` or ``identity``.

    ``auto`` (the default) means ``approved`` under open sign-up (anyone can
    make an account by logging in with a new name) and ``identity`` when the
    authenticator is an identity provider (OAuth) that vouches for each person.
    """
    policy = settings.signup_credit_policy
    if policy != "auto":
        return policy
    name = settings.authenticator.strip().lower()
    return "approved" if any(word in name for word in OPEN_SIGNUP_AUTHENTICATORS) else "identity"


#: Authenticators that create an account for any new name (lower case, substrings).
OPEN_SIGNUP_AUTHENTICATORS = ("firstuse", "nativeauthenticator", "dummy")


def _day_reference(now: datetime) -> str:
    return f"signup:{now.date().isoformat()}"


def welcome(
    session: Session,
    settings: Settings,
    account_id: int,
    *,
    approved_by: str | None = None,
) -> int:
    """Grant the sign-up credit (``GPUPORTAL_SIGNUP_CREDITS``) once per vouched-for account.

    Returns the micro-credits credited now (0: not vouched for, already
    welcomed, or today's budget is spent). Idempotent by its key, so every
    place that meets a new account may call it.

    Who is vouched for (``GPUPORTAL_SIGNUP_CREDIT_POLICY``): under ``approved``
    only an account an admin approved (``approved_by``); under ``identity``
    every account, because the identity provider vouches for it. Either way,
    all sign-up credit of one UTC day together stays within
    ``GPUPORTAL_SIGNUP_CREDIT_DAILY_BUDGET``, so a script that signs up a
    thousand names gets at most that budget. The budget is counted under a
    lock on the sign-up ledger account, so concurrent sign-ups cannot both
    take its last share.
    """
    amount = settings.signup_credits
    if amount <= 0 or amount > settings.signup_credit_daily_budget:
        return 0
    if approved_by is None and signup_policy(settings) != "identity":
        return 0
    key = f"signup:{account_id}"
    if session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key)):
        return 0  # already welcomed (perhaps with another amount, before a change)
    origin = ledger.external(session, "signup")
    # A no-op write takes the row lock (PostgreSQL) or the write lock (SQLite)
    # before the budget is read: sign-ups are counted one at a time.
    session.execute(
        update(LedgerAccount).where(LedgerAccount.id == origin.id).values(kind=LedgerAccount.kind)
    )
    now = timeutil.utcnow()
    day = _day_reference(now)
    given = session.scalar(
        select(func.coalesce(func.sum(Posting.amount), 0))
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .where(Posting.ledger_account_id == origin.id, LedgerTransaction.reference == day)
    )
    if -int(given or 0) + amount > settings.signup_credit_daily_budget:
        log.warning(
            "sign-up credit for account %s withheld: today's budget of %d micro-credits is spent",
            account_id,
            settings.signup_credit_daily_budget,
        )
        return 0
    target = ledger.wallet(session, account_id)
    ledger.post(
        session,
        key,
        "promo",
        [ledger.Leg(target.id, amount), ledger.Leg(origin.id, -amount)],
        memo="sign-up credit" + (f", approved by {approved_by}" if approved_by else ""),
        reference=day,
        created_by=approved_by or "gpuportal",
        extra={"target": target.key},
    )
    return amount
