"""The set-based meter writes exactly the ledger the one-by-one ORM meter wrote.

Two databases on the same backend (SQLite, then PostgreSQL) get the same random
story: accounts, grants, allocations (some paid by a team), meter ticks, two
meters racing to charge, closes (some earlier than what was charged), top-ups. One is metered by
:mod:`metering` (set-based), the other by :mod:`metering_reference` (the meter it
replaced). After every step both ledgers, every allocation's state and every
maintained balance must be identical, and each maintained balance must equal the
sum of its postings.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import allocations, ledger, metering, metering_reference
from gpuportal.hub.db.ledger_models import (
    Allocation,
    LedgerBalance,
    LedgerTransaction,
    Posting,
)
from gpuportal.hub.settings import Settings, load_settings

from ..conftest import PG_ADMIN_URL
from .conftest import CREDIT, T0, add_account, add_team, grant, open_alloc


@pytest.fixture
def reference_sessions(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A second, empty portal DB on the same backend as ``db``, for the reference meter."""
    name = None
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'reference.sqlite'}"
    else:
        name = f"gpuportal_ref_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(db_url).set(database=name).render_as_string(hide_password=False)
    engine = portal_db.make_engine(load_settings(db_url=url, data_dir=tmp_path).database_url)
    portal_db.upgrade(engine)
    yield portal_db.session_factory(engine)
    engine.dispose()
    if name is not None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def snapshot(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """Everything the meters write, without surrogate ids of ledger rows or wall-clock stamps."""
    with portal_db.transaction(sessions) as session:
        txns = sorted(
            session.execute(
                select(
                    LedgerTransaction.idempotency_key,
                    LedgerTransaction.params_hash,
                    LedgerTransaction.kind,
                    LedgerTransaction.memo,
                    LedgerTransaction.reference,
                    LedgerTransaction.allocation_id,
                    LedgerTransaction.period_start,
                    LedgerTransaction.period_end,
                    LedgerTransaction.created_by,
                )
            ).all()
        )
        postings = sorted(
            session.execute(
                select(
                    LedgerTransaction.idempotency_key, Posting.ledger_account_id, Posting.amount
                ).join(LedgerTransaction, Posting.transaction_id == LedgerTransaction.id)
            ).all()
        )
        allocs = session.execute(
            select(
                Allocation.id,
                Allocation.status,
                Allocation.last_charged_at,
                Allocation.ended_at,
                Allocation.runway_warned_at,
                Allocation.stopping_at,
                Allocation.stop_reason,
            ).order_by(Allocation.id)
        ).all()
        maintained = dict(
            session.execute(select(LedgerBalance.ledger_account_id, LedgerBalance.balance)).all()
        )
        summed = dict(
            session.execute(
                select(Posting.ledger_account_id, func.sum(Posting.amount)).group_by(
                    Posting.ledger_account_id
                )
            ).all()
        )
    assert maintained == {k: int(v) for k, v in summed.items()}, "maintained balance drifted"
    return {"txns": txns, "postings": postings, "allocs": allocs, "balances": maintained}


def outcome(result: metering.TickResult) -> tuple[Any, ...]:
    return (
        result.intervals,
        result.charged,
        sorted(result.warned),
        sorted(result.stopping),
        sorted(result.stops_due),
        result.failed,
        result.failed_payers,
    )


PRICES = st.sampled_from([0, 1, 999_999, 3_600_000, 7_777_777, 50 * CREDIT])
ALLOCS = st.lists(
    st.tuples(
        st.integers(0, 2),  # user
        st.integers(1, 4),  # GPUs
        PRICES,
        st.integers(0, 10_000),  # fee, basis points
        st.integers(0, 45),  # started this many seconds after the story's start
        st.booleans(),  # the team pays
    ),
    min_size=1,
    max_size=5,
)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(1, 400)),
        st.tuples(st.just("race"), st.integers(1, 400)),
        st.tuples(st.just("close"), st.integers(0, 4), st.integers(0, 120)),
        st.tuples(st.just("topup"), st.integers(0, 2), st.integers(1, 2 * CREDIT)),
    ),
    min_size=1,
    max_size=8,
)
STORY = itertools.count()


def race(sessions: sessionmaker[Session], settings: Settings, now: Any, ids: list[int]) -> None:
    """Two set-based meters charge the same allocations at once, then one tick follows.

    Each racer charges in its own transactions (retried as the meter retries a
    lost race); whoever loses finds nothing left, so the ledger must be the one a
    single meter writes. The tick after them charges nothing more and runs the
    runway check, so the story stays comparable with the reference's one tick.
    """
    errors: list[BaseException] = []
    interval = timedelta(seconds=settings.meter_interval_seconds)

    def charge(session: Session) -> None:
        metering.charge_allocations(session, ids, now, interval, metering.TickResult())

    def run() -> None:
        try:
            ledger.with_retry(sessions, charge, attempts=50)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert metering.tick(sessions, settings, now).intervals == 0


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    interval=st.sampled_from([7, 30]),
    grants=st.lists(st.integers(0, 2 * CREDIT), min_size=4, max_size=4),
    allocs=ALLOCS,
    steps=STEPS,
)
def test_the_set_based_meter_writes_the_ledger_the_one_by_one_meter_wrote(
    sessions, reference_sessions, settings, interval, grants, allocs, steps
) -> None:
    story = next(STORY)
    s = settings.model_copy(
        update={
            "meter_interval_seconds": interval,
            "runway_warning_seconds": 300,
            "grace_seconds": 60,
        }
    )
    start = T0 + timedelta(days=story)
    both = (sessions, reference_sessions)
    names = [f"s{story}u{i}" for i in range(3)]
    team = f"s{story}team"
    ids: list[list[int]] = [[], []]
    for side, db in enumerate(both):
        users = [add_account(db, name) for name in names]
        team_id = add_team(db, team, users)
        for user, amount in zip(users, grants, strict=False):
            if amount:
                grant(db, user, amount, f"s{story}g{user}")
        if grants[3]:
            with portal_db.transaction(db) as session:
                ledger.post(
                    session,
                    f"s{story}team",
                    "grant",
                    [
                        ledger.Leg(ledger.team_budget(session, team_id).id, grants[3]),
                        ledger.Leg(ledger.external(session, "grants").id, -grants[3]),
                    ],
                )
        for j, (user, gpus, price, fee, offset, by_team) in enumerate(allocs):
            ids[side].append(
                open_alloc(
                    db,
                    s,
                    names[user],
                    server=f"x{j}",
                    gpus=gpus,
                    price=price,
                    fee_bps=fee,
                    started_at=start + timedelta(seconds=offset),
                    now=start + timedelta(seconds=60),
                    team=team if by_team else None,
                )
            )
    assert ids[0] == ids[1]
    now = start + timedelta(seconds=60)
    for step in steps:
        if step[0] in ("tick", "race"):
            now += timedelta(seconds=step[1])
            reference = metering_reference.tick(reference_sessions, s, now)
            if step[0] == "race":
                race(sessions, s, now, ids[0])
            else:
                assert outcome(metering.tick(sessions, s, now)) == outcome(reference)
        elif step[0] == "close":
            alloc_id = ids[0][step[1] % len(ids[0])]
            ended_at = now - timedelta(seconds=step[2])
            answers = []
            for db, charge in (
                (sessions, metering.charge_allocations),
                (reference_sessions, metering_reference.charge_allocations),
            ):
                with mock.patch.object(metering, "charge_allocations", charge):
                    try:
                        with portal_db.transaction(db) as session:
                            alloc = allocations.close_allocation(
                                session, s, alloc_id, ended_at, now
                            )
                            answers.append((alloc.status, alloc.ended_at, alloc.last_charged_at))
                    except ledger.LedgerError as exc:
                        answers.append(str(exc))
            assert answers[0] == answers[1]
        else:
            for db in both:
                with portal_db.transaction(db) as session:
                    account = ledger.wallet(session, add_id(session, names[step[1]])).id
                    ledger.post(
                        session,
                        f"s{story}top{now.isoformat()}{step[1]}{step[2]}",
                        "grant",
                        [
                            ledger.Leg(account, step[2]),
                            ledger.Leg(ledger.external(session, "grants").id, -step[2]),
                        ],
                    )
        ours, theirs = snapshot(sessions), snapshot(reference_sessions)
        assert ours == theirs, step
    # The story ends: every allocation is closed, so the next story starts clean.
    for db, charge in (
        (sessions, metering.charge_allocations),
        (reference_sessions, metering_reference.charge_allocations),
    ):
        with mock.patch.object(metering, "charge_allocations", charge):
            for alloc_id in ids[0]:
                with portal_db.transaction(db) as session:
                    allocations.close_allocation(session, s, alloc_id, now, now)
    assert snapshot(sessions) == snapshot(reference_sessions)


def add_id(session: Session, name: str) -> int:
    from gpuportal.hub.db.models import Account

    account_id = session.scalar(select(Account.id).where(Account.hub_name == name))
    assert account_id is not None
    return account_id


@hsettings(max_examples=200, deadline=None)
@given(
    legs=st.lists(
        st.tuples(st.integers(1, 10**6), st.integers(-(10**15), 10**15)), min_size=2, max_size=4
    ),
    alloc_id=st.integers(1, 2**31),
    start=st.integers(0, 10**9),
    length=st.integers(1, 10**6),
)
def test_the_fast_charge_fingerprint_is_the_ledgers_fingerprint(
    legs, alloc_id, start, length
) -> None:
    a = T0 + timedelta(microseconds=start)
    b = a + timedelta(microseconds=length)
    fast = ledger.charge_params_hash("usage", legs, alloc_id, a, b)
    slow = ledger.params_hash(
        "usage",
        [ledger.Leg(account, amount) for account, amount in legs],
        {"allocation_id": alloc_id, "period_start": a, "period_end": b, "reference": None},
    )
    assert fast == slow
