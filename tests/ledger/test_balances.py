"""The maintained balance always equals the sum of the postings (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import allocations, ledger, metering
from gpuportal.hub.db.ledger_models import LedgerAccount, LedgerBalance, Posting

from .conftest import CREDIT, T0, add_account, grant, open_alloc

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(0, 2), st.integers(1, 10 * CREDIT)),
        st.tuples(st.just("move"), st.integers(0, 2), st.integers(0, 2), st.integers(1, CREDIT)),
        st.tuples(st.just("open"), st.integers(0, 2), st.integers(1, 4)),
        st.tuples(st.just("tick"), st.integers(1, 300)),
        st.tuples(st.just("close"), st.integers(0, 7), st.integers(0, 90)),
    ),
    min_size=1,
    max_size=8,
)
RUN = iter(range(10**9))


def assert_balances_are_sums(sessions) -> None:
    with portal_db.transaction(sessions) as session:
        summed = dict(
            session.execute(
                select(Posting.ledger_account_id, func.sum(Posting.amount)).group_by(
                    Posting.ledger_account_id
                )
            ).all()
        )
        maintained = dict(
            session.execute(select(LedgerBalance.ledger_account_id, LedgerBalance.balance)).all()
        )
        assert maintained == {k: int(v) for k, v in summed.items()}
        for account_id in session.scalars(select(LedgerAccount.id)):
            assert ledger.balance(session, account_id) == ledger.posted_balance(session, account_id)


@hsettings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_the_maintained_balance_always_equals_the_sum_of_the_postings(
    sessions, settings, ops
) -> None:
    run = next(RUN)
    names = [f"r{run}u{i}" for i in range(3)]
    users = [add_account(sessions, name) for name in names]
    now = T0 + timedelta(days=run)
    opened: list[int] = []
    for n, op in enumerate(ops):
        if op[0] == "grant":
            grant(sessions, users[op[1]], op[2], f"r{run}g{n}")
        elif op[0] == "move" and op[1] != op[2]:
            with portal_db.transaction(sessions) as session:
                ledger.post(
                    session,
                    f"r{run}m{n}",
                    "transfer",
                    [
                        ledger.Leg(ledger.wallet(session, users[op[1]]).id, -op[3]),
                        ledger.Leg(ledger.wallet(session, users[op[2]]).id, op[3]),
                    ],
                )
        elif op[0] == "open":
            opened.append(
                open_alloc(
                    sessions,
                    settings,
                    names[op[1]],
                    server=f"o{n}",
                    gpus=op[2],
                    now=now,
                    started_at=now,
                )
            )
        elif op[0] == "tick":
            now += timedelta(seconds=op[1])
            metering.tick(sessions, settings, now)
        elif op[0] == "close" and opened:
            with (
                contextlib.suppress(ledger.LedgerError),  # an end before the start: refused
                portal_db.transaction(sessions) as session,
            ):
                allocations.close_allocation(
                    session,
                    settings,
                    opened[op[1] % len(opened)],
                    now - timedelta(seconds=op[2]),
                    now,
                )
        assert_balances_are_sums(sessions)
    for alloc_id in opened:
        with portal_db.transaction(sessions) as session:
            allocations.close_allocation(session, settings, alloc_id, now, now)
    assert_balances_are_sums(sessions)


def test_a_failed_insert_moves_no_balance(sessions, ann) -> None:
    """The balance moves in the posting's own transaction: a rollback takes both back."""
    grant(sessions, ann, 5 * CREDIT, "g")
    with pytest.raises(DBAPIError), portal_db.transaction(sessions) as session:
        wallet = ledger.wallet(session, ann).id
        ledger.post(
            session,
            "doomed",
            "grant",
            [
                ledger.Leg(wallet, CREDIT),
                ledger.Leg(ledger.external(session, "grants").id, -CREDIT),
            ],
        )
        assert ledger.balance(session, wallet) == 6 * CREDIT  # seen inside the transaction
        session.execute(text("SELECT * FROM no_such_table"))
    with portal_db.transaction(sessions) as session:
        assert ledger.balance(session, ledger.wallet(session, ann).id) == 5 * CREDIT
    assert_balances_are_sums(sessions)


def test_the_migration_sums_in_the_postings_made_before_it(db, sessions, ann) -> None:
    """A portal upgraded from before maintained balances starts with every balance
    equal to its postings' sum (the migration's backfill), and the trigger it adds
    keeps them so afterwards."""
    grant(sessions, ann, 7 * CREDIT, "before-1")
    grant(sessions, ann, 3 * CREDIT, "before-2")
    # Back to the schema before maintained balances (the table and trigger go), then up.
    portal_db.downgrade(db, "0008_admin_audit")
    portal_db.upgrade(db)
    assert_balances_are_sums(sessions)
    with portal_db.transaction(sessions) as session:
        assert ledger.balance(session, ledger.wallet(session, ann).id) == 10 * CREDIT
    grant(sessions, ann, 2 * CREDIT, "after")
    with portal_db.transaction(sessions) as session:
        assert ledger.balance(session, ledger.wallet(session, ann).id) == 12 * CREDIT
    assert_balances_are_sums(sessions)
