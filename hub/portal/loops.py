"""The portal's metering loop: tick the meter, then have the hub stop what it made due.

The charging itself is pure billing (``billing.metering.tick``); this module is the
service's side of it: it runs the tick in a thread, asks JupyterHub to stop the servers
the meter ended, and keeps going whatever one tick raises.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from .. import timeutil
from ..billing import allocations, ledger, metering, payouts
from ..db import transaction
from ..db.ledger_models import Allocation
from .context import Portal
from .hubapi import HubUnavailable

log = logging.getLogger(__name__)


async def run_once(portal: Portal, now: datetime | None = None) -> metering.TickResult:
    """One tick, then ask the hub to stop the servers it made due."""
    result = await run_in_threadpool(metering.tick, portal.sessions, portal.settings, now)
    await stop_due_servers(portal)
    return result


async def stop_due_servers(portal: Portal) -> list[int]:
    """Ask the hub to stop every server the meter ended; retried each tick until done."""

    def due() -> list[tuple[int, str, str]]:
        with transaction(portal.sessions) as session:
            rows = session.execute(
                select(Allocation.id, Allocation.user_name, Allocation.server_name).where(
                    Allocation.status == "stop_due"
                )
            )
            return [(r[0], r[1], r[2]) for r in rows]

    stopped = []
    for alloc_id, user, server in await run_in_threadpool(due):
        try:
            await asyncio.wait_for(portal.hub.stop_server(user, server), timeout=15)
        except (HubUnavailable, TimeoutError) as exc:
            log.warning("could not stop %s/%s yet: %s", user, server, exc)
            continue
        log.info("stopped %s/%s (allocation %s) through the hub", user, server, alloc_id)
        stopped.append(alloc_id)
    if stopped:
        await run_in_threadpool(
            ledger.with_retry, portal.sessions, lambda s: allocations.mark_stopped(s, stopped)
        )
    return stopped


async def meter_loop(portal: Portal) -> None:
    """Tick every ``meter_interval_seconds``; an error is logged and never ends the loop."""
    while True:
        try:
            await run_once(portal)
        except Exception:
            log.exception("meter tick failed; retrying next interval")
        await asyncio.sleep(portal.settings.meter_interval_seconds)


async def payout_loop(portal: Portal) -> None:
    """Payouts in the background: every meter interval, resume the open ones (a restart
    picks each up from its persisted state); every ``payout_schedule_seconds`` (daily by
    default), run a full round. An error is logged and never ends the loop."""
    settings = portal.settings
    last_round: datetime | None = None

    def once(full: bool) -> None:
        chain, treasury, mint = portal.payout_side()
        if full:
            result = payouts.run(portal.sessions, settings, chain, treasury, mint=mint)
            if result.created or result.errors:
                log.info("payout round: %d made, errors %s", len(result.created), result.errors)
        else:
            payouts.resume(portal.sessions, settings, chain, treasury, mint=mint)

    while True:
        now = timeutil.utcnow()
        every = settings.payout_schedule_seconds
        full = every > 0 and (last_round is None or (now - last_round).total_seconds() >= every)
        try:
            await run_in_threadpool(once, full)
            if full:
                last_round = now
        except ledger.LedgerError as exc:  # e.g. no treasury configured: one line, no trace
            log.warning("payouts wait: %s", exc)
        except Exception:
            log.exception("payout round failed; retrying next interval")
        await asyncio.sleep(settings.meter_interval_seconds)
