"""The ledger in the database, on SQLite and PostgreSQL: append-only, idempotent, balanced."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import credits, ledger
from gpuportal.hub.db.ledger_models import LedgerTransaction, Posting

from .conftest import CREDIT, add_account, balance_of, grant, total


def test_grant_moves_money_from_outside(sessions: sessionmaker[Session], ann: int) -> None:
    grant(sessions, ann, 10 * CREDIT, "g1")
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT
    assert balance_of(sessions, "external:grants") == -10 * CREDIT
    assert total(sessions) == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_postings SET amount = amount + 1",
        "DELETE FROM ledger_postings",
        "UPDATE ledger_transactions SET kind = 'gift'",
        "DELETE FROM ledger_transactions",
    ],
)
def test_the_database_refuses_edits(
    sessions: sessionmaker[Session], ann: int, statement: str
) -> None:
    grant(sessions, ann, 10 * CREDIT, "g1")
    with (
        pytest.raises(DatabaseError, match="append-only"),
        portal_db.transaction(sessions) as session,
    ):
        session.execute(text(statement))
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT


def test_the_orm_cannot_edit_either(sessions: sessionmaker[Session], ann: int) -> None:
    grant(sessions, ann, 10 * CREDIT, "g1")
    with pytest.raises(DatabaseError), portal_db.transaction(sessions) as session:
        session.execute(update(Posting).values(amount=0))
    with pytest.raises(DatabaseError), portal_db.transaction(sessions) as session:
        session.execute(delete(LedgerTransaction))
    with pytest.raises(DatabaseError), portal_db.transaction(sessions) as session:
        posting = session.scalars(select(Posting)).first()
        assert posting is not None
        session.delete(posting)


def test_same_key_same_request_returns_the_first(sessions: sessionmaker[Session], ann: int) -> None:
    with portal_db.transaction(sessions) as session:
        first, created = credits.grant(
            session, user="ann", team=None, amount=5, source="grants", key="k", by="admin"
        )
        first_id = first.id
    assert created
    with portal_db.transaction(sessions) as session:
        again, created = credits.grant(
            session, user="ann", team=None, amount=5, source="grants", key="k", by="other"
        )
        assert (again.id, created) == (first_id, False)
    assert balance_of(sessions, f"wallet:{ann}") == 5


def test_same_key_other_request_is_a_conflict(sessions: sessionmaker[Session], ann: int) -> None:
    add_account(sessions, "bob")
    with portal_db.transaction(sessions) as session:
        credits.grant(session, user="ann", team=None, amount=5, source="grants", key="k", by="a")
    for kwargs in ({"user": "ann", "amount": 6}, {"user": "bob", "amount": 5}):
        with pytest.raises(ledger.IdempotencyConflict), portal_db.transaction(sessions) as session:
            credits.grant(session, team=None, source="grants", key="k", by="a", **kwargs)
    assert balance_of(sessions, f"wallet:{ann}") == 5
    assert balance_of(sessions, f"wallet:{add_account(sessions, 'cy')}") == 0


def test_keys_are_unique_in_the_database(sessions: sessionmaker[Session], ann: int) -> None:
    grant(sessions, ann, 1, "dup")
    with portal_db.transaction(sessions) as session:
        wallet = ledger.wallet(session, ann).id
        grants = ledger.external(session, "grants").id
    with pytest.raises(DatabaseError), portal_db.transaction(sessions) as session:
        # Past the Python check, straight into the table: the unique key holds.
        session.add(ledger.build("dup", "grant", [ledger.Leg(wallet, 2), ledger.Leg(grants, -2)]))
    assert balance_of(sessions, f"wallet:{ann}") == 1


@pytest.mark.parametrize("amount", [0, -5])
def test_grants_must_be_positive(sessions: sessionmaker[Session], ann: int, amount: int) -> None:
    with pytest.raises(ledger.InvalidAmount), portal_db.transaction(sessions) as session:
        credits.grant(
            session, user="ann", team=None, amount=amount, source="grants", key=None, by="a"
        )


def test_unknown_account(sessions: sessionmaker[Session]) -> None:
    with (
        pytest.raises(ledger.UnknownAccount, match="no portal account named 'zed'"),
        portal_db.transaction(sessions) as session,
    ):
        credits.grant(session, user="zed", team=None, amount=5, source="grants", key=None, by="a")
