"""Admin grants and promo credits: outside money into a wallet or a team budget.

A grant is an ordinary ledger transaction from the ``external:grants`` (or
``external:promo``) account, so it is idempotent like every other: an admin
who retries with the same key gets the first grant back, not a second one.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import ledger
from .allocations import account_named, team_named
from .ledger import LedgerError
from .ledger_models import LedgerTransaction

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


def welcome(session: Session, amount: int, account_id: int) -> None:
    """Grant the sign-up credit (``GPUPORTAL_SIGNUP_CREDITS``) once per account.

    Idempotent by its key, so every place that meets a new account may call it:
    the first call credits, later calls find the same transaction.
    """
    if amount <= 0:
        return
    key = f"signup:{account_id}"
    if session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key)):
        return  # already welcomed (perhaps with another amount, before a change)
    target = ledger.wallet(session, account_id)
    origin = ledger.external(session, "promo")
    ledger.post(
        session,
        key,
        "promo",
        [ledger.Leg(target.id, amount), ledger.Leg(origin.id, -amount)],
        memo="sign-up credit",
        created_by="gpuportal",
        extra={"target": target.key},
    )
