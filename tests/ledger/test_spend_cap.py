"""The per-hour spend cap is enforced during the session, not only at launch.

A cap lowered below what a payer's running servers cost stops the newest servers
(after the grace period, with the stop reason ``spend_cap``) until the rest fit;
servers within the cap, and other payers, run on. SQLite and PostgreSQL.

Mutants checked by hand (each fails a test here): the cap check compares with
``<`` instead of ``<=`` (a payer exactly at the cap is stopped); the oldest server
stops first instead of the newest.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub.billing import metering
from gpuportal.hub.settings import Settings

from .conftest import T0, add_account, add_team, allocation, grant, open_alloc
from .test_money_mutants import PRICE, fund_team, set_quota

CREDIT = 1_000_000


def tick(
    sessions: sessionmaker[Session], settings: Settings, seconds: float
) -> metering.TickResult:
    return metering.tick(sessions, settings, T0 + timedelta(seconds=seconds))


def test_a_lowered_spend_cap_stops_the_newest_servers_until_the_rest_fit(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    grant(sessions, ann, 1000 * CREDIT, "g-ann")
    old = open_alloc(sessions, settings, "ann", server="old", started_at=T0, now=T0)
    mid = open_alloc(
        sessions, settings, "ann", server="mid", started_at=T0 + timedelta(seconds=1), now=T0
    )
    new = open_alloc(
        sessions, settings, "ann", server="new", started_at=T0 + timedelta(seconds=2), now=T0
    )
    # Exactly the cost of two servers: one (the newest) must stop, not two.
    set_quota(sessions, user="ann", spend_cap_per_hour=2 * PRICE)
    result = tick(sessions, settings, 60)
    assert result.stopping == [new]
    stopped = allocation(sessions, new)
    assert (stopped.status, stopped.stop_reason) == ("stopping", "spend_cap")
    assert stopped.stopping_at == T0 + timedelta(seconds=60 + settings.grace_seconds)
    assert [allocation(sessions, a).status for a in (old, mid)] == ["running", "running"]
    # After the grace period the meter ends it; the hub is asked to stop it.
    later = tick(sessions, settings, 60 + settings.grace_seconds + settings.meter_interval_seconds)
    assert later.stops_due == [new]
    assert allocation(sessions, new).status == "stop_due"
    assert [allocation(sessions, a).status for a in (old, mid)] == ["running", "running"]


def test_a_team_over_its_cap_stops_only_the_team_paid_servers(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    bob = add_account(sessions, "bob")
    team = add_team(sessions, "ml", [ann, bob])
    fund_team(sessions, team, 1000 * CREDIT)
    grant(sessions, ann, 1000 * CREDIT, "g-ann")
    own = open_alloc(sessions, settings, "ann", server="own", gpus=4)
    paid = [
        open_alloc(
            sessions,
            settings,
            user,
            server="t",
            team="ml",
            started_at=T0 + timedelta(seconds=n),
            now=T0,
        )
        for n, user in enumerate(("ann", "bob"))
    ]
    set_quota(sessions, team="ml", spend_cap_per_hour=PRICE)
    assert tick(sessions, settings, 30).stopping == [paid[1]]
    assert allocation(sessions, paid[0]).status == "running"
    assert allocation(sessions, own).status == "running", "ann's own server is not the team's"
