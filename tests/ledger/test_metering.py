"""The meter on SQLite and PostgreSQL, with time travel: exact charges, exactly once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import allocations, ledger, metering, quotas, reservation_billing
from gpuportal.hub.db.ledger_models import LedgerTransaction
from gpuportal.hub.db.marketplace_models import Reservation
from gpuportal.hub.settings import Settings

from .conftest import (
    CREDIT,
    T0,
    Clock,
    add_account,
    add_node,
    add_team,
    allocation,
    balance_of,
    free_gpus,
    grant,
    open_alloc,
    reserve,
    total,
)


def tick(sessions: sessionmaker[Session], settings: Settings, clock: Clock) -> metering.TickResult:
    return metering.tick(sessions, settings, clock.now)


def close(
    sessions: sessionmaker[Session], settings: Settings, alloc_id: int, clock: Clock, ended_at=None
):
    with portal_db.transaction(sessions) as session:
        alloc = allocations.close_allocation(session, settings, alloc_id, ended_at, clock.now)
        session.expunge(alloc)
        return alloc


def usage_keys(sessions: sessionmaker[Session]) -> list[str]:
    with portal_db.transaction(sessions) as session:
        return list(
            session.scalars(
                select(LedgerTransaction.idempotency_key)
                .where(LedgerTransaction.kind == "usage")
                .order_by(LedgerTransaction.period_end)
            )
        )


def test_per_second_billing(sessions, settings, clock, ann) -> None:
    """Grant 10 credits, run a 2-GPU server at a known price for 60 s, stop."""
    admin = add_account(sessions, "admin", "admin")  # the house provider
    grant(sessions, ann, 10 * CREDIT, "g")
    price = 1_234_567  # micro-credits per GPU-hour: nothing divides evenly
    alloc_id = open_alloc(sessions, settings, "ann", gpus=2, price=price, fee_bps=1500)
    clock.advance(30)
    tick(sessions, settings, clock)
    clock.advance(30)
    closed = close(sessions, settings, alloc_id, clock)
    assert closed.ended_at == T0 + timedelta(seconds=60)
    charge = 2 * price * 60 // 3600  # documented rule: floor of the cumulative charge
    fee = charge * 1500 // 10_000
    assert charge == 41_152
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT - charge
    assert balance_of(sessions, f"earnings:{admin}") == charge - fee
    assert balance_of(sessions, "platform:revenue") == fee
    assert total(sessions) == 0
    # Nothing more after the stop, however long the meter runs.
    clock.advance(3600)
    tick(sessions, settings, clock)
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT - charge
    assert usage_keys(sessions) == [
        metering.usage_key(alloc_id, T0 + timedelta(seconds=s)) for s in (30, 60)
    ]


def test_no_charge_before_ready(sessions, settings, clock, ann) -> None:
    grant(sessions, ann, 10 * CREDIT, "g")
    ready = T0 + timedelta(seconds=100)  # the spawner opens at ready; the clock is later
    clock.now = ready + timedelta(seconds=40)
    alloc_id = open_alloc(sessions, settings, "ann", started_at=ready, now=clock.now)
    tick(sessions, settings, clock)
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT - 30_000
    assert allocation(sessions, alloc_id).last_charged_at == ready + timedelta(seconds=30)
    with pytest.raises(ledger.LedgerError, match="in the future"):
        open_alloc(
            sessions,
            settings,
            "ann",
            server="gpu",
            started_at=clock.now + timedelta(minutes=5),
            now=clock.now,
        )


def test_restart_resumes_without_double_or_missed_seconds(
    sessions,
    settings,
    clock,
    ann,
    db,
) -> None:
    grant(sessions, ann, 10 * CREDIT, "g")
    alloc_id = open_alloc(sessions, settings, "ann")
    clock.advance(95)
    tick(sessions, settings, clock)  # charges 0-30, 30-60, 60-90
    # The portal dies here; a new process gets a fresh engine and sessions.
    fresh = portal_db.session_factory(portal_db.make_engine(db.url))
    clock.advance(200)  # down for a while: 90-285 is still owed
    tick(fresh, settings, clock)
    tick(fresh, settings, clock)  # a second pass right after finds nothing new
    clock.advance(5)
    close(fresh, settings, alloc_id, clock)  # ends at 300
    assert balance_of(fresh, f"wallet:{ann}") == 10 * CREDIT - 300 * 1000
    assert usage_keys(fresh) == [
        metering.usage_key(alloc_id, T0 + timedelta(seconds=s)) for s in range(30, 301, 30)
    ]


def test_concurrent_meters_charge_once(sessions, settings, clock, ann) -> None:
    grant(sessions, ann, 100 * CREDIT, "g")
    ids = [open_alloc(sessions, settings, "ann", server=f"s{i}") for i in range(6)]
    clock.advance(300)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            metering.tick(sessions, settings, clock.now, batch=2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert balance_of(sessions, f"wallet:{ann}") == 100 * CREDIT - 6 * 300 * 1000
    with portal_db.transaction(sessions) as session:
        count = session.scalar(
            select(func.count())
            .select_from(LedgerTransaction)
            .where(LedgerTransaction.kind == "usage")
        )
    assert count == 6 * 10
    assert all(allocation(sessions, i).last_charged_at == clock.now for i in ids)


def test_close_at_a_dead_node_reverses_what_was_charged_after(
    sessions,
    settings,
    clock,
    ann,
) -> None:
    grant(sessions, ann, 10 * CREDIT, "g")
    alloc_id = open_alloc(sessions, settings, "ann", fee_bps=1000)
    clock.advance(120)
    tick(sessions, settings, clock)  # charged to 120
    # The spawner learns the node died at 45 s.
    closed = close(sessions, settings, alloc_id, clock, ended_at=T0 + timedelta(seconds=45))
    assert closed.ended_at == T0 + timedelta(seconds=45)
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT - 45_000
    assert balance_of(sessions, "platform:revenue") == 4_500
    assert total(sessions) == 0
    # Closing again is harmless and keeps the first end.
    again = close(sessions, settings, alloc_id, clock, ended_at=T0 + timedelta(seconds=100))
    assert again.ended_at == T0 + timedelta(seconds=45)
    assert balance_of(sessions, f"wallet:{ann}") == 10 * CREDIT - 45_000


def test_close_refuses_impossible_times(sessions, settings, clock, ann) -> None:
    alloc_id = open_alloc(sessions, settings, "ann", started_at=T0, now=T0)
    clock.advance(60)
    for bad, why in (
        (T0 - timedelta(seconds=1), "before the server"),
        (clock.now + timedelta(hours=1), "in the future"),
    ):
        with pytest.raises(ledger.LedgerError, match=why):
            close(sessions, settings, alloc_id, clock, ended_at=bad)


def test_team_pays_when_named(sessions, settings, clock, ann) -> None:
    team = add_team(sessions, "ml", [ann])
    with portal_db.transaction(sessions) as session:
        ledger.post(
            session,
            "tg",
            "grant",
            [
                ledger.Leg(ledger.team_budget(session, team).id, CREDIT),
                ledger.Leg(ledger.external(session, "grants").id, -CREDIT),
            ],
        )
    alloc_id = open_alloc(sessions, settings, "ann", team="ml")
    clock.advance(60)
    close(sessions, settings, alloc_id, clock)
    assert balance_of(sessions, f"team:{team}") == CREDIT - 60_000
    assert balance_of(sessions, f"wallet:{ann}") == 0
    add_account(sessions, "bob")
    with pytest.raises(allocations.Forbidden, match="not a member"):
        open_alloc(sessions, settings, "bob", team="ml")


# --- runway ---------------------------------------------------------------------------------


def runway_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"runway_warning_seconds": 600, "grace_seconds": 120, "meter_interval_seconds": 30}
    )


def test_runway_at_spawn(sessions, settings, clock, ann) -> None:
    """Credit for 5 min with a 15 min minimum: refused, with the reason."""
    grant(sessions, ann, 300_000, "g")  # 5 min at 3.6 credits/hour
    with (
        pytest.raises(quotas.PaymentRequired) as refused,
        portal_db.transaction(sessions) as session,
    ):
        quotas.authorize_launch(
            session,
            settings,
            user="ann",
            gpu_count=1,
            price_per_gpu_hour=3_600_000,
            team=None,
            now=clock.now,
        )
    assert str(refused.value).startswith(
        "Your available balance of 0.30 credits covers 5 min of this server at 3.60 "
        "credits/hour; a launch needs credit for at least 15 min (0.90 credits)."
    )
    grant(sessions, ann, 600_000, "g2")
    with portal_db.transaction(sessions) as session:
        ok = quotas.authorize_launch(
            session,
            settings,
            user="ann",
            gpu_count=1,
            price_per_gpu_hour=3_600_000,
            team=None,
            now=clock.now,
        )
    assert ok.runway_seconds == 900.0


def test_runway_during_the_session(sessions, settings, clock, ann) -> None:
    """Warn 10 min before the stop; schedule the stop while the credit left still pays
    the 2 min grace period; nothing is charged after, and the balance stays positive."""
    s = runway_settings(settings)
    grant(sessions, ann, 1_020_000, "g")  # 17 minutes at 1000 micro per second
    alloc_id = open_alloc(sessions, s, "ann", fee_bps=0)
    clock.advance(150)
    result = tick(sessions, s, clock)  # 870 s left: the stop is 750 s away, more than 10 min
    assert result.warned == []
    clock.advance(180)
    result = tick(sessions, s, clock)  # 690 s left: the stop is 570 s away
    assert result.warned == [alloc_id]
    assert allocation(sessions, alloc_id).runway_warned_at == clock.now
    clock.advance(510)  # t = 840: 180 s left, more than grace + one interval
    assert tick(sessions, s, clock).stopping == []
    clock.advance(30)  # t = 870: 150 s left: the last tick before the grace would not be paid
    result = tick(sessions, s, clock)
    assert result.stopping == [alloc_id]
    stopping = allocation(sessions, alloc_id)
    assert (stopping.status, stopping.stop_reason) == ("stopping", "out_of_credit")
    assert stopping.stopping_at == T0 + timedelta(seconds=990)
    clock.advance(125)  # the meter runs a little after the end of the grace period
    result = tick(sessions, s, clock)
    assert result.stops_due == [alloc_id]
    stopped = allocation(sessions, alloc_id)
    assert (stopped.status, stopped.ended_at) == ("stop_due", T0 + timedelta(seconds=990))
    # Charged exactly to the stop: 990 s; 30 s of credit are left, never a debt.
    assert balance_of(sessions, f"wallet:{ann}") == 1_020_000 - 990_000
    clock.advance(600)
    tick(sessions, s, clock)
    assert balance_of(sessions, f"wallet:{ann}") == 30_000
    # The spawner's later close changes nothing.
    assert close(sessions, s, alloc_id, clock).ended_at == T0 + timedelta(seconds=990)
    assert balance_of(sessions, f"wallet:{ann}") == 30_000


@pytest.mark.parametrize("credit", [25 * CREDIT, 25 * CREDIT + 7, 26 * CREDIT + 4_321_987])
def test_a_balance_driven_to_zero_at_a_high_price_never_goes_below_zero(
    sessions, settings, clock, ann, credit: int
) -> None:
    """At 100 credits/h a server stopped for lack of credit left its user at -4.05 credits
    (issue 9): the grace period was charged after the balance reached zero. The user
    starts with at least the minimum billable period (15 min: 25 credits), as a launch
    needs."""
    s = runway_settings(settings)
    grant(sessions, ann, credit, "g")
    alloc_id = open_alloc(sessions, s, "ann", price=100 * CREDIT, fee_bps=0)
    for _ in range(200):
        clock.advance(s.meter_interval_seconds)
        tick(sessions, s, clock)
        assert balance_of(sessions, f"wallet:{ann}") >= 0
        if allocation(sessions, alloc_id).status == "stop_due":
            break
    else:
        raise AssertionError("the server was never stopped")
    left = balance_of(sessions, f"wallet:{ann}")
    assert left >= 0
    assert total(sessions) == 0


def test_one_poisoned_account_never_stops_the_meter_for_everyone_else(
    sessions, settings, clock, ann, monkeypatch
) -> None:
    """An account whose runway check fails (issue 9: a balance that overflowed) is logged
    and skipped; everyone else is still charged, warned and stopped."""
    s = runway_settings(settings)
    bob = add_account(sessions, "bob")
    eve = add_account(sessions, "eve")
    grant(sessions, ann, 100 * CREDIT, "g-ann")
    grant(sessions, bob, 60_000, "g-bob")  # one minute: warned and stopped at once
    grant(sessions, eve, 100 * CREDIT, "g-eve")
    ann_alloc = open_alloc(sessions, s, "ann", fee_bps=0)
    bob_alloc = open_alloc(sessions, s, "bob", fee_bps=0)
    eve_alloc = open_alloc(sessions, s, "eve", fee_bps=0)
    # A quota, however large, makes eve a payer the runway check reads on every backend
    # (PostgreSQL reads only the payers whose state could change: test_runway_payers.py).
    with portal_db.transaction(sessions) as session:
        quotas.set_quota(
            session, user="eve", team=None, window="day", gpu_hours=24, spend_cap_per_hour=None
        )
    real_payer_state = metering.payer_state
    real_split = metering.split

    def poisoned_state(session, payer, group, now, **kw):
        if any(a.user_name == "eve" for a in group):
            raise OverflowError("integer overflow")
        return real_payer_state(session, payer, group, now, **kw)

    def poisoned_split(alloc, a, b):
        if alloc.user_name == "eve":
            raise OverflowError("integer overflow")
        return real_split(alloc, a, b)

    real_sql = metering._charge_in_sql

    def poisoned_sql(session, keys, *args, **kw):
        # PostgreSQL charges in one statement, without ``split``: it fails there instead.
        # ``keys``: the batch's allocation ids, each with its payer and earnings keys.
        if eve_alloc in keys:
            raise OverflowError("integer overflow")
        return real_sql(session, keys, *args, **kw)

    monkeypatch.setattr(metering, "payer_state", poisoned_state)
    monkeypatch.setattr(metering, "split", poisoned_split)
    monkeypatch.setattr(metering, "_charge_in_sql", poisoned_sql)
    clock.advance(30)
    result = tick(sessions, s, clock)
    assert result.failed == [eve_alloc]
    assert result.failed_payers == [("account", eve)]
    assert result.warned == [bob_alloc] and result.stopping == [bob_alloc]
    assert balance_of(sessions, f"wallet:{ann}") == 100 * CREDIT - 30_000
    assert balance_of(sessions, f"wallet:{bob}") == 30_000
    assert balance_of(sessions, f"wallet:{eve}") == 100 * CREDIT  # skipped, not lost
    clock.advance(30)
    result = tick(sessions, s, clock)
    assert result.stops_due == [bob_alloc]
    assert 0 <= balance_of(sessions, f"wallet:{bob}") <= 1
    assert allocation(sessions, ann_alloc).status == "running"
    # Mended, the skipped account is charged for all its time: nothing is lost.
    monkeypatch.setattr(metering, "payer_state", real_payer_state)
    monkeypatch.setattr(metering, "split", real_split)
    monkeypatch.setattr(metering, "_charge_in_sql", real_sql)
    tick(sessions, s, clock)
    assert balance_of(sessions, f"wallet:{eve}") == 100 * CREDIT - 60_000
    assert total(sessions) == 0


def test_an_out_of_credit_stop_releases_the_reservation_in_the_same_step(
    sessions, settings, clock, ann
) -> None:
    """The meter closed allocations but their reservations stayed active: 0 GPUs on offer."""
    s = runway_settings(settings)
    add_node(sessions, gpus=2)
    grant(sessions, ann, 60_000, "g")  # 30 s of two GPUs
    rid = reserve(sessions, "ann", gpus=2, fee_bps=0)
    with portal_db.transaction(sessions) as session:
        reservation_billing.open_for_reservation(session, s, rid, None, clock.now)
    assert free_gpus(sessions) == 0
    clock.advance(30)
    tick(sessions, s, clock)  # out of credit: the stop is scheduled at zero, i.e. now
    clock.advance(30)
    result = tick(sessions, s, clock)
    assert len(result.stops_due) == 1
    assert free_gpus(sessions) == 2
    with portal_db.transaction(sessions) as session:
        assert session.get(Reservation, rid).status == "released"  # type: ignore[union-attr]
    assert balance_of(sessions, f"wallet:{ann}") >= 0


def test_closing_a_bill_releases_its_reservation(sessions, settings, clock, ann) -> None:
    """A close (a dead node, an idle cull through the hub) gives the GPUs back with it."""
    add_node(sessions, gpus=1)
    grant(sessions, ann, 10 * CREDIT, "g")
    rid = reserve(sessions, "ann")
    with portal_db.transaction(sessions) as session:
        alloc, _ = reservation_billing.open_for_reservation(session, settings, rid, None, clock.now)
        alloc_id = alloc.id
    assert free_gpus(sessions) == 0
    clock.advance(60)
    close(sessions, settings, alloc_id, clock)
    assert free_gpus(sessions) == 1


def test_a_top_up_cancels_the_stop(sessions, settings, clock, ann) -> None:
    s = runway_settings(settings)
    grant(sessions, ann, 200_000, "g")  # 200 s: after 60 s the grace period is all that is left
    alloc_id = open_alloc(sessions, s, "ann")
    clock.advance(60)
    tick(sessions, s, clock)
    assert allocation(sessions, alloc_id).status == "stopping"
    grant(sessions, ann, 10 * CREDIT, "top-up")
    clock.advance(30)
    tick(sessions, s, clock)
    after = allocation(sessions, alloc_id)
    assert (after.status, after.stopping_at, after.runway_warned_at) == ("running", None, None)


@pytest.mark.parametrize("spread", [0, 7])
def test_two_servers_near_zero_never_overdraw_past_the_bound(
    sessions,
    settings,
    clock,
    ann,
    spread: int,
) -> None:
    s = runway_settings(settings)
    grant(sessions, ann, 100_000, "g")  # a little credit, two servers burning it
    open_alloc(sessions, s, "ann", server="a", gpus=1)
    open_alloc(
        sessions,
        s,
        "ann",
        server="b",
        gpus=2,
        started_at=T0 + timedelta(seconds=spread),
        now=T0 + timedelta(seconds=spread),
    )
    for _ in range(40):
        clock.advance(s.meter_interval_seconds)
        tick(sessions, s, clock)
    assert balance_of(sessions, f"wallet:{ann}") >= 0, "never below zero"
    with portal_db.transaction(sessions) as session:
        statuses = {a.status for a in session.scalars(select(metering.Allocation))}
    assert statuses == {"stop_due"}
    assert total(sessions) == 0


def test_gpu_hour_quota_refuses_and_stops(sessions, settings, clock, ann) -> None:
    s = runway_settings(settings)
    grant(sessions, ann, 100 * CREDIT, "g")
    with portal_db.transaction(sessions) as session:
        quotas.set_quota(
            session, user="ann", team=None, window="day", gpu_hours=0.5, spend_cap_per_hour=None
        )
    with (
        pytest.raises(quotas.QuotaExceeded, match=r"budget of 0\.5 GPU-h per day"),
        portal_db.transaction(sessions) as session,
    ):
        quotas.authorize_launch(
            session, s, user="ann", gpu_count=4, price_per_gpu_hour=1, team=None, now=clock.now
        )
    alloc_id = open_alloc(sessions, s, "ann", gpus=1)
    clock.advance(1800)  # the whole half hour used
    tick(sessions, s, clock)
    assert allocation(sessions, alloc_id).stop_reason == "quota_exhausted"


def test_spend_cap(sessions, settings, clock, ann) -> None:
    grant(sessions, ann, 100 * CREDIT, "g")
    with portal_db.transaction(sessions) as session:
        quotas.set_quota(
            session,
            user="ann",
            team=None,
            window="week",
            gpu_hours=None,
            spend_cap_per_hour=5 * CREDIT,
        )
    open_alloc(sessions, settings, "ann", price=3 * CREDIT)
    with (
        pytest.raises(quotas.QuotaExceeded, match=r"spend cap of 5\.00 credits/hour"),
        portal_db.transaction(sessions) as session,
    ):
        quotas.authorize_launch(
            session,
            settings,
            user="ann",
            gpu_count=1,
            price_per_gpu_hour=3 * CREDIT,
            team=None,
            now=clock.now,
        )
