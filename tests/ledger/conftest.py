"""Fixtures for the ledger, metering and billing tests.

Time travels through :class:`tests.fakes.Clock`, which patches ``gpuportal.hub.timeutil.utcnow``
(every billing module reads the time through it), so no test sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub import timeutil
from gpuportal.hub.billing import ledger
from gpuportal.hub.billing.allocations import OpenRequest, open_allocation
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account, Team, TeamMembership
from gpuportal.hub.settings import Settings, load_settings
from gpuportal.provider import money

from ..fakes import Clock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CREDIT = money.MICRO


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The shared clock (``tests/conftest.py``), starting at :data:`T0`."""
    the_clock = Clock(T0)
    monkeypatch.setattr(timeutil, "utcnow", the_clock)
    return the_clock


@pytest.fixture
def sessions(db: Engine) -> sessionmaker[Session]:
    return portal_db.session_factory(db)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path,
        db_url=db_url,
        ray_dashboard_url="http://127.0.0.1:9",
        signup_credits=0,  # exact balances: no sign-up credit here
    )


def add_account(sessions: sessionmaker[Session], name: str, role: str = "customer") -> int:
    with portal_db.transaction(sessions) as session:
        account = Account(hub_name=name, role=role)
        session.add(account)
        session.flush()
        return account.id


def add_team(sessions: sessionmaker[Session], name: str, members: list[int]) -> int:
    with portal_db.transaction(sessions) as session:
        team = Team(hub_group=name)
        session.add(team)
        session.flush()
        for account_id in members:
            session.add(TeamMembership(team_id=team.id, account_id=account_id))
        return team.id


def grant(sessions: sessionmaker[Session], account_id: int, micro: int, key: str) -> None:
    with portal_db.transaction(sessions) as session:
        ledger.post(
            session,
            key,
            "grant",
            [
                ledger.Leg(ledger.wallet(session, account_id).id, micro),
                ledger.Leg(ledger.external(session, "grants").id, -micro),
            ],
        )


def open_alloc(
    sessions: sessionmaker[Session],
    settings: Settings,
    user: str,
    *,
    server: str = "",
    gpus: int = 1,
    price: int = 3_600_000,
    fee_bps: int = 1000,
    started_at: datetime = T0,
    now: datetime = T0,
    team: str | None = None,
) -> int:
    req = OpenRequest(
        user=user,
        server=server,
        gpu_count=gpus,
        price_per_gpu_hour=price,
        platform_fee_bps=fee_bps,
        started_at=started_at,
        team=team,
    )
    with portal_db.transaction(sessions) as session:
        alloc, _ = open_allocation(session, settings, req, now)
        return alloc.id


def balance_of(sessions: sessionmaker[Session], key: str) -> int:
    with portal_db.transaction(sessions) as session:
        return ledger.balance_by_key(session, key)


def allocation(sessions: sessionmaker[Session], alloc_id: int) -> Allocation:
    with portal_db.transaction(sessions) as session:
        found = session.get(Allocation, alloc_id)
        assert found is not None
        session.expunge(found)
        return found


def total(sessions: sessionmaker[Session]) -> int:
    with portal_db.transaction(sessions) as session:
        return ledger.ledger_total(session)


@pytest.fixture
def ann(sessions: sessionmaker[Session]) -> Iterator[int]:
    yield add_account(sessions, "ann")


# --- the marketplace side: a node to reserve on, and reservations ---------------------------


def add_node(
    sessions: sessionmaker[Session],
    *,
    provider: str = "prov",
    node_id: str = "node-a",
    gpus: int = 8,
    price: int = 3_600_000,
) -> None:
    """A verified node of ``gpus`` A100s at ``price`` micro-credits per GPU-hour."""
    from gpuportal.hub.db import accounts
    from gpuportal.hub.market.providers import (
        demo_claims,
        register_node,
        upsert_cluster,
        upsert_provider,
    )

    with portal_db.transaction(sessions) as session:
        account = accounts.upsert_account(session, {"name": provider, "groups": ["providers"]})
        p = upsert_provider(session, account.id, display_name=provider, region="local", price=price)
        cluster = upsert_cluster(session, p, name="main", jobs_url="http://127.0.0.1:1")
        register_node(
            session,
            cluster,
            node_id,
            demo_claims(node_id, {"A100-80GB": gpus}),
            demo=True,
            reliability_start=0.9,
            verified=True,
        )


def reserve(
    sessions: sessionmaker[Session],
    user: str,
    *,
    server: str = "",
    gpus: int = 1,
    fee_bps: int = 1000,
) -> str:
    """Hold ``gpus`` GPUs for ``user``'s server (no billing check: the marketplace alone)."""
    from gpuportal.hub.market import marketplace
    from gpuportal.hub.market.capacity import Rules
    from gpuportal.hub.market.placement import Request

    with portal_db.transaction(sessions) as session:
        account_id = marketplace.account_id_for(session, user)
    assert account_id is not None, f"no account {user}"
    answer, _ = marketplace.reserve(
        sessions,
        Request(gpu_count=gpus),
        account_id=account_id,
        user_name=user,
        server_name=server,
        rules=Rules(hold_seconds=600, platform_fee_bps=fee_bps),
    )
    return str(answer["id"])


def free_gpus(sessions: sessionmaker[Session]) -> int:
    from gpuportal.hub.market import marketplace
    from gpuportal.hub.market.capacity import Rules

    with portal_db.transaction(sessions) as session:
        return sum(o["free_gpus"] for o in marketplace.offers(session, Rules()))
