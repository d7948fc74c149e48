"""The runway check reads only the payers that need a look, and misses none (PostgreSQL).

On PostgreSQL a tick's runway check first asks the database which payers could
change at all (``metering._PAYERS_TO_CHECK_SQL``: a bound on what each could owe),
then checks only those. Here random payers (wallets and team budgets, balances
from empty to plenty, some right at the warning and stop thresholds, quotas,
spend caps, allocations already warned or stopping, time not yet charged) are
checked both ways in the same database state, each inside a savepoint that is
rolled back: the warnings, the stops and every allocation's new state must be
the same. SQLite always checks every payer, so this runs on PostgreSQL only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger, metering
from gpuportal.hub.db.ledger_models import Allocation, Quota
from gpuportal.hub.db.models import Account, Team
from gpuportal.hub.settings import Settings, load_settings

from .conftest import T0

pytestmark = pytest.mark.postgres

INTERVAL = 60
GRACE = 120
WARNING = 600
_serial = itertools.count()


@pytest.fixture(scope="module")
def pg(pg_url: str) -> Iterator[Engine]:
    engine = portal_db.make_engine(load_settings(db_url=pg_url).database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    portal_db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Settings:
    return load_settings(
        data_dir=Path(tmp_path_factory.mktemp("runway")),
        db_url=pg_url,
        meter_interval_seconds=INTERVAL,
        grace_seconds=GRACE,
        runway_warning_seconds=WARNING,
    )


allocation_st = st.fixed_dictionaries(
    {
        "gpus": st.integers(1, 4),
        "price": st.sampled_from([0, 1, 999, 3_600_000, 7_200_001]),
        "behind": st.integers(0, 5 * INTERVAL),  # seconds since the last charge
        "state": st.sampled_from(["running", "running", "warned", "stopping", "stopping_unwarned"]),
        "user": st.integers(0, 1),  # which of the payer's two users runs it
    }
)
payer_st = st.fixed_dictionaries(
    {
        "team": st.booleans(),
        # Balances around the thresholds are drawn as runway seconds at the payer's rate.
        "runway": st.one_of(
            st.integers(0, 3 * WARNING),
            # Just above the warning threshold: only the time not yet charged tips it.
            st.integers(WARNING + GRACE - 5, WARNING + GRACE + 5 * INTERVAL + 5),
            st.sampled_from([GRACE + INTERVAL, WARNING + GRACE, WARNING + GRACE + 1]),
            st.just(10**6),
        ),
        "quota": st.sampled_from([None, None, "gpu_seconds", "spend_cap", "empty"]),
        "allocations": st.lists(allocation_st, min_size=1, max_size=3),
    }
)


def _build(session: Session, payers: list[dict[str, Any]]) -> None:
    now = T0
    for payer in payers:
        tag = next(_serial)
        users = [Account(hub_name=f"u{tag}-{i}", role="customer") for i in range(2)]
        session.add_all(users)
        team = Team(hub_group=f"team{tag}") if payer["team"] else None
        if team is not None:
            session.add(team)
        session.flush()
        rate = sum(a["gpus"] * a["price"] for a in payer["allocations"])
        balance = payer["runway"] * rate // 3600
        to = ledger.team_budget(session, team.id) if team else ledger.wallet(session, users[0].id)
        if balance:
            ledger.post(
                session,
                f"grant-{tag}",
                "grant",
                [
                    ledger.Leg(to.id, balance),
                    ledger.Leg(ledger.external(session, "grants").id, -balance),
                ],
            )
        for a in payer["allocations"]:
            state = a["state"]
            stops = "out_of_credit" if state.startswith("stopping") else None
            session.execute(
                insert(Allocation),
                {
                    "account_id": users[a["user"] if team else 0].id,
                    "team_id": team.id if team else None,
                    "user_name": f"u{tag}",
                    "server_name": "",
                    "gpu_count": a["gpus"],
                    "price_per_gpu_hour": a["price"],
                    "platform_fee_bps": 1000,
                    "status": "running" if state in ("running", "warned") else "stopping",
                    "started_at": now - timedelta(hours=1),
                    "last_charged_at": now - timedelta(seconds=a["behind"]),
                    "runway_warned_at": now if state in ("warned", "stopping") else None,
                    "stopping_at": None if stops is None else now + timedelta(seconds=GRACE),
                    "stop_reason": stops,
                },
            )
        if payer["quota"]:
            owner = {"team_id": team.id} if team else {"account_id": users[0].id}
            limits = {
                "gpu_seconds": {"gpu_seconds": 300},
                "spend_cap": {"spend_cap_per_hour": max(0, rate - 1)},
                "empty": {},
            }[payer["quota"]]
            session.execute(insert(Quota), {**owner, "rolling_window": "day", **limits})
    session.flush()


def _check(session: Session, settings: Settings, every_payer: bool) -> tuple[Any, ...]:
    """One runway check in a savepoint, rolled back: what it decided and wrote."""
    nested = session.begin_nested()
    result = metering.TickResult()
    metering.check_runway(session, settings, T0, result, every_payer=every_payer)
    rows = session.execute(
        select(
            Allocation.id,
            Allocation.status,
            Allocation.stopping_at,
            Allocation.stop_reason,
            Allocation.runway_warned_at,
        ).order_by(Allocation.id)
    ).all()
    nested.rollback()
    return sorted(result.warned), sorted(result.stopping), rows


@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payers=st.lists(payer_st, min_size=1, max_size=6))
def test_the_payers_left_out_are_the_ones_nothing_changes_for(
    pg: Engine, settings: Settings, payers: list[dict[str, Any]]
) -> None:
    with portal_db.session_factory(pg)() as session, session.begin():
        _build(session, payers)
        everyone = _check(session, settings, every_payer=True)
        chosen = _check(session, settings, every_payer=False)
        assert chosen == everyone
        session.rollback()


def test_a_well_funded_payer_is_not_read(pg: Engine, settings: Settings) -> None:
    """The bound does leave payers out: plenty of money, no quota, nothing pending."""
    rich = {"team": False, "runway": 10**6, "quota": None, "allocations": []}
    running = {"gpus": 1, "price": 3_600_000, "behind": 30, "state": "running", "user": 0}
    poor = {**rich, "runway": GRACE, "allocations": [running]}
    with portal_db.session_factory(pg)() as session, session.begin():
        _build(session, [{**rich, "allocations": [running]}, poor])
        payers = metering._payers_to_check(session, settings, T0)
        assert payers is not None and len(payers) == 1
        (poor_id,) = session.scalars(
            select(Allocation.account_id).order_by(Allocation.id.desc()).limit(1)
        )
        assert payers == [f"wallet:{poor_id}"]
        session.rollback()


def test_time_not_yet_charged_counts_against_the_runway(pg: Engine, settings: Settings) -> None:
    """800 s of money, 200 s of it already used but not yet charged: under the warning
    threshold (720 s), so the payer is read and warned, in both ways of checking."""
    behind = {"gpus": 1, "price": 3_600_000, "behind": 200, "state": "running", "user": 0}
    payer = {"team": False, "runway": 800, "quota": None, "allocations": [behind]}
    with portal_db.session_factory(pg)() as session, session.begin():
        _build(session, [payer])
        (account,) = session.scalars(select(Allocation.account_id))
        assert metering._payers_to_check(session, settings, T0) == [f"wallet:{account}"]
        warned, stopping, _rows = _check(session, settings, every_payer=False)
        assert (len(warned), stopping) == (1, [])
        assert _check(session, settings, every_payer=True)[:2] == (warned, stopping)
        session.rollback()
