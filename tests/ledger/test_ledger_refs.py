"""The ledger's references hold on both backends, however they are checked.

SQLite checks them with foreign keys. PostgreSQL checks the three hot ones
(postings -> accounts, postings -> transactions, transactions -> allocations)
once per INSERT statement with triggers over the inserted rows (migration
0013, for the meter's bulk writes), and refuses to delete, truncate or
renumber the rows they point at. Each test here runs on both: a dangling
reference is refused, a bulk statement with one bad row writes nothing, and
a referenced row cannot be taken away.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger, metering
from gpuportal.hub.db.ledger_models import LedgerTransaction, Posting
from gpuportal.hub.settings import Settings

from .conftest import CREDIT, grant, open_alloc

MISSING = 987_654


def _ids(sessions: sessionmaker[Session], ann: int) -> tuple[int, int, int]:
    """A granted wallet: (wallet ledger id, the grant's transaction id, external ledger id)."""
    grant(sessions, ann, 10 * CREDIT, "g1")
    with portal_db.transaction(sessions) as session:
        wallet = ledger.wallet(session, ann).id
        external = ledger.external(session, "grants").id
        txn = session.scalars(select(LedgerTransaction.id)).one()
    return wallet, txn, external


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with portal_db.transaction(sessions) as session:
        return (
            session.scalar(select(func.count()).select_from(LedgerTransaction)) or 0,
            session.scalar(select(func.count()).select_from(Posting)) or 0,
        )


def _new_txn(session: Session, key: str, allocation_id: int | None = None) -> int:
    return session.execute(
        insert(LedgerTransaction).returning(LedgerTransaction.id),
        {
            "idempotency_key": key,
            "params_hash": "x",
            "kind": "usage" if allocation_id else "grant",
            "memo": "",
            "allocation_id": allocation_id,
            "created_by": "test",
        },
    ).scalar_one()


def _post(session: Session, legs: list[tuple[int, int, int]]) -> None:
    """Postings ``(transaction, ledger account, amount)``, in one INSERT statement."""
    session.execute(
        insert(Posting),
        [{"transaction_id": t, "ledger_account_id": a, "amount": m} for t, a, m in legs],
    )


def test_a_posting_to_a_missing_account_is_refused(
    sessions: sessionmaker[Session], ann: int
) -> None:
    wallet, _, external = _ids(sessions, ann)
    before = _counts(sessions)
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        txn = _new_txn(session, "bad-account")
        # One bulk statement, two good legs and one dangling: nothing of it is written.
        _post(session, [(txn, wallet, 5), (txn, external, -3), (txn, MISSING, -2)])
    assert _counts(sessions) == before
    with portal_db.transaction(sessions) as session:
        assert ledger.balance(session, wallet) == 10 * CREDIT


def test_a_posting_to_a_missing_transaction_is_refused(
    sessions: sessionmaker[Session], ann: int
) -> None:
    wallet, txn, external = _ids(sessions, ann)
    before = _counts(sessions)
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        _post(session, [(txn, wallet, 1), (MISSING, external, -1)])
    assert _counts(sessions) == before


def test_a_charge_for_a_missing_allocation_is_refused(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    alloc = open_alloc(sessions, settings, "ann")
    with portal_db.transaction(sessions) as session:
        _new_txn(session, "good", allocation_id=alloc)
    before = _counts(sessions)
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        _new_txn(session, "dangling", allocation_id=MISSING)
    assert _counts(sessions) == before


def test_a_null_allocation_is_no_reference(sessions: sessionmaker[Session], ann: int) -> None:
    _ids(sessions, ann)
    with portal_db.transaction(sessions) as session:
        _new_txn(session, "no-allocation", allocation_id=None)
    assert _counts(sessions)[0] == 2


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM ledger_accounts",
        "UPDATE ledger_accounts SET id = id + 1000",
        "DELETE FROM allocations",
        "UPDATE allocations SET id = id + 1000",
    ],
)
def test_referenced_rows_cannot_be_taken_away(
    sessions: sessionmaker[Session], settings: Settings, ann: int, clock, statement: str
) -> None:
    grant(sessions, ann, 10 * CREDIT, "g1")
    alloc = open_alloc(sessions, settings, "ann")
    clock.advance(seconds=3 * settings.meter_interval_seconds)
    metering.tick(sessions, settings)
    with portal_db.transaction(sessions) as session:
        charged = session.scalar(
            select(func.count())
            .select_from(LedgerTransaction)
            .where(LedgerTransaction.allocation_id == alloc)
        )
    assert charged == 3
    before = _counts(sessions)
    with pytest.raises(DatabaseError), portal_db.transaction(sessions) as session:
        session.execute(text(statement))
    assert _counts(sessions) == before
    with portal_db.transaction(sessions) as session:
        dangling = session.execute(
            text(
                "SELECT count(*) FROM ledger_postings AS p "
                "LEFT JOIN ledger_accounts AS a ON a.id = p.ledger_account_id "
                "LEFT JOIN ledger_transactions AS t ON t.id = p.transaction_id "
                "LEFT JOIN allocations AS al ON al.id = t.allocation_id "
                "WHERE a.id IS NULL OR t.id IS NULL "
                "OR (t.allocation_id IS NOT NULL AND al.id IS NULL)"
            )
        ).scalar()
    assert dangling == 0


def test_each_backend_checks_the_references_its_own_way(
    sessions: sessionmaker[Session], db_url: str
) -> None:
    """PostgreSQL: per-statement triggers, no row-by-row keys, no TRUNCATE; SQLite: keys."""
    if not db_url.startswith("postgresql"):
        with portal_db.transaction(sessions) as session:
            keys = {
                (table, row[2], row[3])
                for table in ("ledger_postings", "ledger_transactions")
                for row in session.execute(text(f"PRAGMA foreign_key_list({table})"))
            }
        assert {
            ("ledger_postings", "ledger_accounts", "ledger_account_id"),
            ("ledger_postings", "ledger_transactions", "transaction_id"),
            ("ledger_transactions", "allocations", "allocation_id"),
        } <= keys
        return
    with portal_db.transaction(sessions) as session:
        triggers = set(
            session.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars()
        )
        fks = set(
            session.execute(text("SELECT conname FROM pg_constraint WHERE contype = 'f'")).scalars()
        )
    assert {"ledger_postings_refs", "ledger_transactions_refs"} <= triggers
    assert not fks & portal_db.STATEMENT_CHECKED_FKS
    for table in ("allocations", "ledger_accounts"):
        with (
            pytest.raises(DatabaseError, match="refused"),
            portal_db.transaction(sessions) as session,
        ):
            session.execute(text(f"TRUNCATE {table} CASCADE"))
