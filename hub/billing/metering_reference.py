"""The previous meter, one ORM object per row: the reference the set-based meter must match.

:mod:`.metering` charges a tick with a few set-based statements. This module
keeps the meter it replaced, unchanged in behaviour: allocations loaded as ORM
objects, one ``LedgerTransaction`` with three ``Posting`` objects built per
interval and flushed by the unit of work, the runway check on ORM objects.
It is not used by the service. It exists for two reasons, as the reference
scan does for placement: the property test (tests/ledger/test_meter_sets.py)
proves both meters write identical ledgers, and ``benchmarks/metering.py``
measures the set-based meter against it in the same run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .. import timeutil
from ..db import transaction
from ..db.ledger_models import OPEN_STATES, Allocation, Quota
from ..settings import Settings
from . import ledger
from .metering import (
    TickResult,
    _chunks,
    _merge,
    earnings_account_key,
    payer_account_key,
    payer_key,
    payer_state,
    periods_due,
    release_reservation,
    seconds_to_zero_us,
    split,
    stop_threshold_seconds,
    usage_key,
    warning_threshold_seconds,
)

log = logging.getLogger(__name__)


def charge_allocations(
    session: Session, ids: Iterable[int], now: datetime, interval: timedelta, result: TickResult
) -> None:
    """Charge every due period of these allocations, in the caller's DB transaction."""
    query = select(Allocation).where(Allocation.id.in_(list(ids))).order_by(Allocation.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    allocs = list(session.scalars(query))
    wanted: dict[str, tuple[str, int | None, int | None]] = {
        "platform:revenue": ("platform_revenue", None, None)
    }
    for alloc in allocs:
        wanted.update([payer_account_key(alloc), earnings_account_key(alloc)])
    with session.no_autoflush:
        accounts = ledger.ledger_accounts(session, wanted)
    platform = accounts["platform:revenue"]
    for alloc in allocs:
        if (
            alloc.status == "stopping"
            and alloc.stopping_at is not None
            and alloc.stopping_at <= now
        ):
            # Out of credit and past the grace period: charges end exactly here.
            alloc.ended_at, alloc.status = alloc.stopping_at, "stop_due"
            # The GPUs go back on offer in this same step; the hub stops the server next.
            release_reservation(session, alloc.reservation_id)
            result.stops_due.append(alloc.id)
            log.warning(
                "allocation %s of %s/%s stops now (%s)",
                alloc.id,
                alloc.user_name,
                alloc.server_name,
                alloc.stop_reason,
            )
        due = periods_due(alloc.started_at, alloc.last_charged_at, now, interval, alloc.ended_at)
        if not due:
            continue
        payer = accounts[payer_account_key(alloc)[0]]
        earnings = accounts[earnings_account_key(alloc)[0]]
        for a, b in due:
            part = split(alloc, a, b)
            session.add(
                ledger.build(
                    usage_key(alloc.id, b),
                    "usage",
                    [
                        ledger.Leg(payer, -part.charge),
                        ledger.Leg(earnings, part.provider),
                        ledger.Leg(platform, part.fee),
                    ],
                    allocation_id=alloc.id,
                    period_start=a,
                    period_end=b,
                    memo=f"{alloc.user_name}/{alloc.server_name}: {alloc.gpu_count} GPU",
                    created_by="meter",
                )
            )
            result.intervals += 1
            result.charged += part.charge
        alloc.last_charged_at = due[-1][1]
        result.payers.add(payer)
    session.flush()


def tick(
    sessions: sessionmaker[Session],
    settings: Settings,
    now: datetime | None = None,
    batch: int = 200,
) -> TickResult:
    """One pass of the meter: charge what is due, then check every payer's runway.

    Allocations are charged ``batch`` at a time, one database transaction per
    batch; when a batch loses a race (a concurrent meter), each of its
    allocations is retried alone and finds its periods already charged.
    """
    now = now or timeutil.utcnow()
    interval = timedelta(seconds=settings.meter_interval_seconds)
    result = TickResult()
    with transaction(sessions) as session:
        ids = list(
            session.scalars(
                select(Allocation.id)
                .where(
                    or_(
                        Allocation.status.in_(OPEN_STATES),
                        (Allocation.ended_at.is_not(None))
                        & (Allocation.last_charged_at < Allocation.ended_at),
                    )
                )
                .order_by(Allocation.id)
            )
        )
    for chunk in _chunks(ids, batch):
        try:
            part = TickResult()
            with transaction(sessions) as session:
                charge_allocations(session, chunk, now, interval, part)
            _merge(result, part)
        except Exception as exc:
            if isinstance(exc, (IntegrityError, OperationalError)):
                log.info("meter: batch of %d lost a race; charging one by one", len(chunk))
            else:
                log.warning("meter: batch of %d failed (%s); charging one by one", len(chunk), exc)
            for alloc_id in chunk:
                _charge_one(sessions, alloc_id, now, interval, result)
    _check_every_payer(sessions, settings, now, result)
    if result.intervals:
        log.info("meter: charged %d intervals, %d micro-credits", result.intervals, result.charged)
    return result


def _charge_one(
    sessions: sessionmaker[Session],
    alloc_id: int,
    now: datetime,
    interval: timedelta,
    result: TickResult,
) -> None:
    """Charge one allocation alone; a failure is logged and skipped until the next tick.

    One bad allocation (or its payer's bad account) never stops the meter from
    charging, warning and stopping everyone else.
    """
    part = TickResult()

    def one(session: Session) -> None:
        charge_allocations(session, [alloc_id], now, interval, part)

    try:
        ledger.with_retry(sessions, one)
    except Exception as exc:
        log.warning("meter: allocation %s skipped this tick: %s", alloc_id, exc)
        log.debug("meter: allocation %s failed", alloc_id, exc_info=True)
        result.failed.append(alloc_id)
        return
    _merge(result, part)


def _check_every_payer(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, result: TickResult
) -> None:
    """The runway check of every payer: all in one transaction, else payer by payer."""
    part = TickResult()
    try:
        ledger.with_retry(sessions, lambda s: check_runway(s, settings, now, part))
        _merge(result, part)
        return
    except Exception as exc:
        log.warning("meter: the runway check failed (%s); checking payer by payer", exc)
    with transaction(sessions) as session:
        keys = sorted(
            {
                payer_key(a)
                for a in session.scalars(
                    select(Allocation).where(Allocation.status.in_(OPEN_STATES))
                )
            }
        )
    for key in keys:
        part = TickResult()

        def one(session: Session, key: tuple[str, int] = key, part: TickResult = part) -> None:
            check_runway(session, settings, now, part, only=key)

        try:
            ledger.with_retry(sessions, one)
        except Exception as exc:
            log.warning("meter: payer %s:%s skipped this tick: %s", key[0], key[1], exc)
            log.debug("meter: payer %s failed", key, exc_info=True)
            result.failed_payers.append(key)
            continue
        _merge(result, part)


def check_runway(
    session: Session,
    settings: Settings,
    now: datetime,
    result: TickResult,
    only: tuple[str, int] | None = None,
) -> None:
    """Warn before the stop; schedule the stop so the grace period ends at zero at the latest.

    The thresholds count the spend rate through the runway (seconds left at
    the current rate): a payer is warned ``runway_warning_seconds`` before its
    servers stop, and the stop is scheduled when the runway falls to the grace
    period (plus one meter interval), at ``now + min(grace, runway)``, so the
    balance is never driven below zero by the meter. A payer whose runway
    recovers (a top-up, a raised quota) before the stop gets its servers back
    to ``running``. ``only``: check this one payer (``payer_key``) alone.
    """
    allocs = list(
        session.scalars(
            select(Allocation).where(Allocation.status.in_(OPEN_STATES)).order_by(Allocation.id)
        )
    )
    groups: dict[tuple[str, int], list[Allocation]] = {}
    for alloc in allocs:
        key = payer_key(alloc)
        if only is None or key == only:
            groups.setdefault(key, []).append(alloc)
    grace = timedelta(seconds=settings.grace_seconds)
    with session.no_autoflush:
        payer_ids = ledger.ledger_accounts(
            session, dict(payer_account_key(g[0]) for g in groups.values())
        )
    money = ledger.balances(session, list(payer_ids.values()))
    limits: dict[tuple[str, int], Quota] = {}
    for quota in session.scalars(select(Quota)):
        if quota.account_id is not None:
            limits[("account", quota.account_id)] = quota
        elif quota.team_id is not None:
            limits[("team", quota.team_id)] = quota
    stop_at_or_below = stop_threshold_seconds(settings)
    warn_below = warning_threshold_seconds(settings)
    for group in groups.values():
        payer = payer_ids[payer_account_key(group[0])[0]]
        state = payer_state(session, payer, group, now, known_balance=money[payer], quotas=limits)
        runway = state.runway
        if state.reason == "out_of_credit":
            left = timedelta(
                microseconds=seconds_to_zero_us(state.available, state.rate_per_hour, len(group))
            )
        else:
            left = timedelta(seconds=runway or 0.0)
        for alloc in group:
            if runway is not None and runway <= stop_at_or_below:
                if alloc.status == "running":
                    alloc.status, alloc.stopping_at = "stopping", now + min(grace, left)
                    alloc.stop_reason = state.reason
                    result.stopping.append(alloc.id)
                    log.warning(
                        "allocation %s of %s/%s: %s, stopping at %s",
                        alloc.id,
                        alloc.user_name,
                        alloc.server_name,
                        state.reason,
                        alloc.stopping_at.isoformat(),
                    )
            elif alloc.status == "stopping" and alloc.stop_reason in (
                "out_of_credit",
                "quota_exhausted",
            ):
                alloc.status, alloc.stopping_at, alloc.stop_reason = "running", None, None
                alloc.runway_warned_at = None
                log.info(
                    "allocation %s of %s/%s: runway restored, stop cancelled",
                    alloc.id,
                    alloc.user_name,
                    alloc.server_name,
                )
            if runway is not None and runway < warn_below:
                if alloc.runway_warned_at is None:
                    alloc.runway_warned_at = now
                    result.warned.append(alloc.id)
                    log.warning(
                        "allocation %s of %s/%s: runway %.0f s (%s)",
                        alloc.id,
                        alloc.user_name,
                        alloc.server_name,
                        runway,
                        state.reason,
                    )
            elif alloc.runway_warned_at is not None and alloc.status == "running":
                alloc.runway_warned_at = None
    session.flush()
