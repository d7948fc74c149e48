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


def test_a_lowered_spend_cap_stops_the_newest_servers_of_that_payer_until_the_rest_fit(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Ann pays three servers herself; team ml (bob and dan) pays two; bob also pays one
    of his own. Ann's cap is exactly two servers, the team's exactly one."""
    grant(sessions, ann, 1000 * CREDIT, "g-ann")
    old, mid, new = (
        open_alloc(sessions, settings, "ann", server=name, started_at=T0 + timedelta(seconds=n))
        for n, name in enumerate(("old", "mid", "new"))
    )
    bob, dan = add_account(sessions, "bob"), add_account(sessions, "dan")
    team = add_team(sessions, "ml", [bob, dan])
    fund_team(sessions, team, 1000 * CREDIT)
    grant(sessions, bob, 1000 * CREDIT, "g-bob")
    own = open_alloc(sessions, settings, "bob", server="own", gpus=4)
    paid = [
        open_alloc(
            sessions, settings, user, server="t", team="ml", started_at=T0 + timedelta(seconds=n)
        )
        for n, user in enumerate(("bob", "dan"))
    ]
    set_quota(sessions, user="ann", spend_cap_per_hour=2 * PRICE)
    set_quota(sessions, team="ml", spend_cap_per_hour=PRICE)
    result = tick(sessions, settings, 60)
    assert sorted(result.stopping) == sorted([new, paid[1]])
    stopped = allocation(sessions, new)
    assert (stopped.status, stopped.stop_reason) == ("stopping", "spend_cap")
    assert stopped.stopping_at == T0 + timedelta(seconds=60 + settings.grace_seconds)
    running = (old, mid, paid[0], own)
    assert [allocation(sessions, a).status for a in running] == ["running"] * 4
    # After the grace period the meter ends them; the hub is asked to stop them.
    later = tick(sessions, settings, 60 + settings.grace_seconds + settings.meter_interval_seconds)
    assert sorted(later.stops_due) == sorted([new, paid[1]])
    assert allocation(sessions, new).status == "stop_due"
    assert [allocation(sessions, a).status for a in running] == ["running"] * 4
