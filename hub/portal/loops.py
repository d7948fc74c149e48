"""The portal's background work, on its ``Portal`` context: three loops that never die.

* the metering loop: tick the meter, then have the hub stop what it made due. The
  charging itself is pure billing (``billing.metering.tick``); this is the service's
  side of it: it runs the tick in a thread, asks JupyterHub to stop the servers the
  meter ended, and keeps going whatever one tick raises;
* the hub sync loop: accounts and teams from the hub (:func:`sync_from_hub`);
* the marketplace loop: expire holds, mark silent nodes offline, refresh reliability,
  cross-check Ray's own view of the nodes (:func:`check_ray`), rebuild the placement
  index when due.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime

import httpx
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from .. import egress, timeutil
from ..billing import allocations, ledger, metering, payouts
from ..db import accounts, transaction
from ..db.ledger_models import Allocation
from ..db.marketplace_models import Cluster
from ..market import marketplace, nodes, raystatus
from . import sharing
from .context import Portal
from .hubapi import HubUnavailable

log = logging.getLogger(__name__)

#: Seconds one Ray dashboard may take to list its nodes, and how many are asked at once.
RAY_CHECK_TIMEOUT = 5.0
RAY_CHECK_CONCURRENCY = 16


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


async def sync_from_hub(portal: Portal) -> dict[str, int]:
    """Accounts and teams from the hub, now: each round of the sync loop, and an
    admin's ``POST /api/v1/sync``. Returns what changed, by kind."""
    users, groups = await portal.hub.users(), await portal.hub.groups()
    left: list[tuple[str, str]] = []

    def write() -> dict[str, int]:
        left.clear()
        with transaction(portal.sessions) as session:
            return accounts.sync(session, users, groups, left)

    counts = await run_in_threadpool(write)
    # A member removed from a hub group directly loses the shares the team gave.
    members = {g["name"]: list(g.get("users") or ()) for g in groups}
    for team, user in left:
        await sharing.revoke_team_shares(portal, user, members.get(team, []))
    # ...and a revocation the hub missed earlier (it was down then) happens now.
    counts["shares_revoked"] = await sharing.reconcile_shares(portal)
    if any(counts.values()):
        log.info("synced from hub: %s", counts)
    return counts


async def sync_loop(portal: Portal) -> None:
    """Sync at start, then every ``hub_sync_seconds`` with jitter; never dies."""
    interval = portal.settings.hub_sync_seconds
    while True:
        try:
            await asyncio.wait_for(sync_from_hub(portal), timeout=max(10.0, interval))
        except (HubUnavailable, TimeoutError) as exc:
            log.warning("hub sync skipped: %s", exc)
        except Exception:
            log.exception("hub sync failed")
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)


async def marketplace_loop(portal: Portal) -> None:
    """Marketplace housekeeping every heartbeat interval (at most 30 s), with jitter;
    never dies."""
    interval = float(min(30, portal.settings.heartbeat_seconds))
    while True:
        await marketplace_housekeeping(portal)
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)


async def marketplace_housekeeping(portal: Portal) -> None:
    """One round: expire held reservations (their GPUs go back), mark nodes that
    missed heartbeats offline, refresh reliability scores, cross-check Ray's
    own node state, and rebuild the placement index from SQL when due. Each
    step is guarded, so one failing never skips the others."""
    rules = nodes.NodeRules.from_settings(portal.settings)
    batched = portal.heartbeats
    # With batched heartbeats the last-seen set finds silent nodes (O(changes)); the
    # scan of the DB, whose last-seen times lag by up to one batch, is only a safety
    # net for nodes missing from the set, run at the index's rebuild pace.
    scan = batched is None or batched.safety_scan_due()
    scan_rules = rules if batched is None else batched.lagging_rules()

    def housekeeping() -> None:
        with transaction(portal.sessions) as session:
            now = timeutil.utcnow()
            marketplace.expire_held(session, now)
            if scan:
                nodes.mark_offline(session, scan_rules, now)
            nodes.lapse_challenges(session, rules, now)
            nodes.refresh_reliability(session, rules, now)

    if batched is not None:
        try:
            await batched.mark_offline(timeutil.utcnow())
        except Exception:
            log.exception("offline detection from the last-seen set failed")
    try:
        await run_in_threadpool(housekeeping)
    except Exception:
        log.exception("marketplace housekeeping failed")
    try:
        await check_ray(portal)
    except Exception:
        log.exception("Ray cross-check failed")
    if portal.capacity.rebuild_due():
        try:
            await run_in_threadpool(portal.capacity.load)
        except Exception:
            log.exception("placement index rebuild failed")


async def check_ray(portal: Portal) -> list[str]:
    """Ask each cluster's dashboard which marketplace nodes its Ray runs, and take
    offline those it does not (``nodes.apply_ray_view``). Every call is bounded
    by ``RAY_CHECK_TIMEOUT``; a dashboard that does not answer is logged and
    counts as a missed check. Returns the node ids whose status changed."""
    rules = nodes.NodeRules.from_settings(portal.settings)

    def targets() -> tuple[dict[int, tuple[str, list[str]]], dict[int, str | None], set[int]]:
        with transaction(portal.sessions) as session:
            found = nodes.clusters_to_check(session)
            rows = session.execute(
                select(Cluster.id, Cluster.ray_token).where(Cluster.id.in_(list(found)))
            )
            tokens = {pk: token for pk, token in rows}
            return found, tokens, nodes.house_clusters(session)

    clusters, tokens, house = await run_in_threadpool(targets)
    if not clusters:
        return []
    gate = asyncio.Semaphore(RAY_CHECK_CONCURRENCY)
    allowed = egress.parse_networks(portal.settings.provider_networks_allowed)

    async def ask(client: httpx.AsyncClient, pk: int, url: str) -> dict[str, str] | None:
        async with gate:
            # A provider's URL is fetched only on an allowed network (hub.egress).
            refused = None if pk in house else await run_in_threadpool(egress.refusal, url, allowed)
            if refused:
                log.warning("Ray dashboard of cluster %d not fetched: %s", pk, refused)
                return None
            try:
                return await raystatus.node_states(client, url, RAY_CHECK_TIMEOUT, tokens.get(pk))
            except raystatus.RayUnreachable as exc:
                log.debug("Ray dashboard %s: %s", _host(url), exc)
                return None

    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(*(ask(client, pk, url) for pk, (url, _) in clusters.items()))
    views: dict[int, tuple[dict[str, str] | None, int]] = {}
    for pk, states in zip(clusters, answers, strict=True):
        if states is None:
            misses = portal.ray_misses[pk] = portal.ray_misses.get(pk, 0) + 1
            log.warning(
                "Ray dashboard of cluster %d at %s did not answer (%d missed checks in a row)",
                pk,
                _host(clusters[pk][0]),
                misses,
            )
        else:
            portal.ray_misses.pop(pk, None)
            misses = 0
        views[pk] = (states, misses)

    def apply() -> list[str]:
        changed: list[str] = []
        with transaction(portal.sessions) as session:
            now = timeutil.utcnow()
            for pk, (states, misses) in views.items():
                changed += nodes.apply_ray_view(session, pk, states, misses, rules, now)
        return changed

    return await run_in_threadpool(apply)


def _host(url: str) -> str:
    """Host and port of a URL, for logs (never its credentials or path)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "?"
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host


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
