"""The double-entry ledger: every movement of money, exactly once.

Rules this module keeps (and the database enforces where it can):

* Amounts are signed integers of micro-credits (1 credit = 1,000,000 micro);
  a positive posting raises that account's balance. Every transaction's
  postings sum to zero, so the whole ledger sums to zero.
* Postings and transactions are append-only (database triggers, migration
  0003). A mistake is corrected by a new, reversing transaction.
* Every transaction carries a unique idempotency key. The same key with the
  same parameters returns the first transaction; the same key with different
  parameters raises :class:`IdempotencyConflict` (HTTP 409), never a merge.
* A balance is the sum of the account's postings. The database keeps that sum
  in ``ledger_balances`` (a trigger on every posting insert, same transaction,
  migration 0007), so reading a balance is one primary-key lookup;
  :func:`posted_balance` sums the postings themselves, for audits and tests.

Callers run these functions inside one database transaction
(:func:`gpuportal.hub.db.transaction`). A concurrent writer that wins the race
for a key or a ledger account surfaces as ``IntegrityError`` at commit or
flush; :func:`with_retry` runs the whole unit of work again, and the second run
then finds the winner's row.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.provider.money import format_credits

from ..db import transaction
from ..db.ledger_models import LedgerAccount, LedgerBalance, LedgerTransaction, Posting

# --- bounds: no sum of amounts can overflow a 64-bit integer (2**63 - 1 ~ 9.2e18) ---------
#: The largest single amount the ledger moves: 10**15 micro-credits, one billion credits.
#: Grants, deposits and every posting are refused above it (a 4xx, never a 500).
MAX_AMOUNT = 10**15
#: The largest balance a customer wallet or team budget may reach (one billion credits).
MAX_WALLET_BALANCE = 10**15
#: The largest magnitude any ledger account's balance may reach (the external sources,
#: which sum every grant or deposit ever made): 10**18, a ninth of the 64-bit range.
MAX_ACCOUNT_BALANCE = 10**18
#: The largest price per GPU-hour anything may lock, micro-credits (a million credits/h).
MAX_PRICE = 10**12
#: Kinds of ledger account that hold customers' money.
CUSTOMER_KINDS = ("customer_wallet", "team_budget")

T = TypeVar("T")


class LedgerError(Exception):
    """A request the ledger refuses; ``status`` is the HTTP status to answer with."""

    status = 400


class InvalidAmount(LedgerError):
    status = 400


class UnknownAccount(LedgerError):
    status = 404


class IdempotencyConflict(LedgerError):
    status = 409


@dataclass(frozen=True)
class Leg:
    """One intended posting: ``amount`` micro-credits onto ledger account ``account``."""

    account: int
    amount: int


def positive_amount(amount: Any, what: str = "amount", most: int = MAX_AMOUNT) -> int:
    """Validate a whole amount above zero and at most ``most`` (default :data:`MAX_AMOUNT`)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"{what} must be a whole number of micro-credits.")
    if amount <= 0:
        raise InvalidAmount(f"{what} must be more than zero (got {amount}).")
    if amount > most:
        raise InvalidAmount(f"{what} must be at most {most} (got {amount}).")
    return amount


# --- ledger accounts -------------------------------------------------------------


def ledger_account(
    session: Session,
    key: str,
    kind: str,
    *,
    account_id: int | None = None,
    team_id: int | None = None,
) -> LedgerAccount:
    """Get or create the ledger account named ``key``."""
    found = session.scalar(select(LedgerAccount).where(LedgerAccount.key == key))
    if found is not None:
        return found
    created = LedgerAccount(key=key, kind=kind, account_id=account_id, team_id=team_id)
    session.add(created)
    session.flush()
    return created


def among(session: Session, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN values``, as one array parameter on PostgreSQL.

    psycopg parses every query text it has not cached; an ``IN`` list of
    thousands of placeholders costs more to parse than to run. ``= ANY(array)``
    is one short query whatever the number of values.
    """
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    result: ColumnElement[bool] = column.in_(list(values))
    return result


def ledger_accounts(
    session: Session, wanted: dict[str, tuple[str, int | None, int | None]]
) -> dict[str, int]:
    """Get or create many ledger accounts at once: ``{key: (kind, account_id, team_id)}``.

    One query and at most one flush, so a batch of charges stays a batch.
    """
    found: dict[str, int] = {
        key: account_id
        for key, account_id in session.execute(
            select(LedgerAccount.key, LedgerAccount.id).where(
                among(session, LedgerAccount.key, list(wanted))
            )
        )
    }
    missing = [
        LedgerAccount(key=key, kind=kind, account_id=account_id, team_id=team_id)
        for key, (kind, account_id, team_id) in wanted.items()
        if key not in found
    ]
    if missing:
        session.add_all(missing)
        session.flush()
        found.update({row.key: row.id for row in missing})
    return found


def balances(session: Session, ledger_account_ids: list[int]) -> dict[int, int]:
    """Balances of many ledger accounts in one query (absent accounts are 0)."""
    rows = session.execute(
        select(LedgerBalance.ledger_account_id, LedgerBalance.balance).where(
            LedgerBalance.ledger_account_id.in_(ledger_account_ids)
        )
    )
    out = dict.fromkeys(ledger_account_ids, 0)
    out.update({account: int(total or 0) for account, total in rows})
    return out


def wallet(session: Session, account_id: int) -> LedgerAccount:
    return ledger_account(session, f"wallet:{account_id}", "customer_wallet", account_id=account_id)


def team_budget(session: Session, team_id: int) -> LedgerAccount:
    return ledger_account(session, f"team:{team_id}", "team_budget", team_id=team_id)


def provider_earnings(session: Session, account_id: int | None) -> LedgerAccount:
    """A provider's earnings; ``None`` is the house provider (the platform's own GPUs)."""
    if account_id is None:
        return ledger_account(session, "earnings:house", "provider_earnings")
    return ledger_account(
        session, f"earnings:{account_id}", "provider_earnings", account_id=account_id
    )


def platform_revenue(session: Session) -> LedgerAccount:
    return ledger_account(session, "platform:revenue", "platform_revenue")


def external(session: Session, source: str) -> LedgerAccount:
    """Where outside money comes from: ``grants``, ``promo``, ``solana``."""
    return ledger_account(session, f"external:{source}", "external")


# --- transactions ----------------------------------------------------------------


def params_hash(kind: str, legs: Sequence[Leg], extra: dict[str, Any] | None = None) -> str:
    """A fingerprint of what a transaction does, independent of leg order."""
    body = {
        "kind": kind,
        "legs": sorted([leg.account, leg.amount] for leg in legs),
        "extra": {k: _jsonable(v) for k, v in sorted((extra or {}).items())},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def charge_params_hash(
    kind: str,
    legs: Sequence[tuple[int, int]],
    allocation_id: int,
    period_start: datetime,
    period_end: datetime,
) -> str:
    """:func:`params_hash` of a charge built by :func:`build` with no reference or extra.

    The same digest (a test holds them equal), without a dict and a JSON
    encoder per call: the meter fingerprints tens of thousands of charges a tick.
    ``legs`` are ``(account, amount)`` pairs; ``kind`` is a plain word.
    """
    pairs = ", ".join(f"[{account}, {amount}]" for account, amount in sorted(legs))
    body = (
        f'{{"extra": {{"allocation_id": {int(allocation_id)}, '
        f'"period_end": "{period_end.isoformat()}", '
        f'"period_start": "{period_start.isoformat()}", "reference": null}}, '
        f'"kind": "{kind}", "legs": [{pairs}]}}'
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def validate_legs(legs: Sequence[Leg]) -> None:
    if len(legs) < 2:
        raise LedgerError("a transaction needs at least two postings.")
    for leg in legs:
        if isinstance(leg.amount, bool) or not isinstance(leg.amount, int):
            raise InvalidAmount("posting amounts are whole numbers of micro-credits.")
        if abs(leg.amount) > MAX_AMOUNT:
            raise InvalidAmount(
                f"a posting of {leg.amount} micro-credits is larger than the most the ledger "
                f"moves at once ({MAX_AMOUNT}, one billion credits)."
            )
    if sum(leg.amount for leg in legs) != 0:
        raise LedgerError("postings of a transaction must sum to zero.")


def build(
    key: str,
    kind: str,
    legs: Sequence[Leg],
    *,
    memo: str = "",
    reference: str | None = None,
    allocation_id: int | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    created_by: str = "",
    extra: dict[str, Any] | None = None,
) -> LedgerTransaction:
    """A new, balanced transaction object (not yet added to a session).

    The meter uses this directly, in batches, because the allocation row it
    moves in the same database transaction already proves the key is new; a
    concurrent duplicate still fails on the unique key.
    """
    if not key:
        raise LedgerError("a transaction needs an idempotency key.")
    validate_legs(legs)
    fingerprint = params_hash(
        kind,
        legs,
        {
            "allocation_id": allocation_id,
            "period_start": period_start,
            "period_end": period_end,
            "reference": reference,
            **(extra or {}),
        },
    )
    txn = LedgerTransaction(
        idempotency_key=key,
        params_hash=fingerprint,
        kind=kind,
        memo=memo[:500],
        reference=reference,
        allocation_id=allocation_id,
        period_start=period_start,
        period_end=period_end,
        created_by=created_by,
    )
    txn.postings = [Posting(ledger_account_id=leg.account, amount=leg.amount) for leg in legs]
    return txn


def post(
    session: Session, key: str, kind: str, legs: Sequence[Leg], **fields: Any
) -> tuple[LedgerTransaction, bool]:
    """Record a transaction once. Returns ``(transaction, created)``.

    A replay (same key, same parameters) returns the first transaction with
    ``created=False``; the same key with other parameters raises
    :class:`IdempotencyConflict`.
    """
    txn = build(key, kind, legs, **fields)
    existing = session.scalar(
        select(LedgerTransaction).where(LedgerTransaction.idempotency_key == key)
    )
    if existing is not None:
        if existing.params_hash != txn.params_hash:
            raise IdempotencyConflict(
                f"the idempotency key {key!r} was already used for a different request; "
                "use a new key for a new request."
            )
        return existing, False
    check_bounds(session, legs)
    session.add(txn)
    session.flush()
    return txn, True


def check_bounds(session: Session, legs: Sequence[Leg]) -> None:
    """Refuse a transaction that would take a balance past its bound (see the constants).

    So no balance, and no sum over one account, can overflow 64 bits on SQLite
    or PostgreSQL. The meter's charges only move money that a wallet already
    holds, so it builds its transactions without this check.
    """
    ids = [leg.account for leg in legs]
    now = balances(session, ids)
    kinds = {
        account_id: kind
        for account_id, kind in session.execute(
            select(LedgerAccount.id, LedgerAccount.kind).where(LedgerAccount.id.in_(ids))
        )
    }
    for leg in legs:
        after = now[leg.account] + leg.amount
        if (
            kinds.get(leg.account) in CUSTOMER_KINDS
            and leg.amount > 0
            and after > MAX_WALLET_BALANCE
        ):
            raise InvalidAmount(
                f"this would take the balance to {format_credits(after, 'credits')}, above the "
                f"most one wallet or team budget may hold "
                f"({format_credits(MAX_WALLET_BALANCE, 'credits')})."
            )
        if abs(after) > MAX_ACCOUNT_BALANCE:
            raise InvalidAmount(
                "this would take a ledger account past the largest balance the ledger keeps "
                f"({MAX_ACCOUNT_BALANCE} micro-credits); ask the operator."
            )


def balance(session: Session, ledger_account_id: int) -> int:
    """The balance of one ledger account, as the database maintains it with each posting."""
    total = session.scalar(
        select(LedgerBalance.balance).where(LedgerBalance.ledger_account_id == ledger_account_id)
    )
    return int(total or 0)


def posted_balance(session: Session, ledger_account_id: int) -> int:
    """The balance of one ledger account summed from its postings: what ``balance`` must equal."""
    total = session.scalar(
        select(func.coalesce(func.sum(Posting.amount), 0)).where(
            Posting.ledger_account_id == ledger_account_id
        )
    )
    return int(total or 0)


def balance_by_key(session: Session, key: str) -> int:
    account_id = session.scalar(select(LedgerAccount.id).where(LedgerAccount.key == key))
    return 0 if account_id is None else balance(session, account_id)


def ledger_total(session: Session) -> int:
    """Sum of every posting ever made: zero, always."""
    return int(session.scalar(select(func.coalesce(func.sum(Posting.amount), 0))) or 0)


def with_retry(
    sessions: sessionmaker[Session], work: Callable[[Session], T], attempts: int = 5
) -> T:
    """Run ``work`` in a fresh database transaction, again if a concurrent writer won.

    A lost race for a unique key (``IntegrityError``) or a busy SQLite file
    (``OperationalError``) rolls the whole unit back; the next attempt reads
    the winner's rows. Domain errors (:class:`LedgerError`) are not retried.
    """
    for attempt in range(attempts):
        try:
            with transaction(sessions) as session:
                return work(session)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover
