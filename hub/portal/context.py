"""The ``Portal`` context: everything a request handler may need, built once per process.

The DB engine and sessions, the cache, the hub API client, the placement index, and
the service's own background work on them (hub sync, marketplace housekeeping, the
Ray cross-check). The app factory (``portal.app``), authentication (``portal.auth``)
and the routes (``portal.api``) import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from contextlib import suppress
from functools import cached_property
from typing import Any

import httpx
from jupyterhub.services.auth import HubOAuth
from redis.exceptions import RedisError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from .. import db, egress
from ..billing import deposits, payouts
from ..db import accounts
from ..db.marketplace_models import Cluster
from ..market import marketplace, nodes, raystatus
from ..market.capacity import CapacityIndex
from ..market.marketplace import OFFERS_CACHE_KEY, SUMMARY_CACHE_KEY, rules_of
from ..settings import Settings
from ..timeutil import utcnow
from .cache import Cache, make_cache
from .hubapi import HubAPI, HubUnavailable

log = logging.getLogger(__name__)

#: Seconds one Ray dashboard may take to list its nodes, and how many are asked at once.
RAY_CHECK_TIMEOUT = 5.0
RAY_CHECK_CONCURRENCY = 16


class Portal:
    """Everything a request handler may need, built once per process."""

    def __init__(
        self,
        settings: Settings,
        cache: Cache | None = None,
        hub: HubAPI | None = None,
        chain: Any | None = None,
    ) -> None:
        self.settings = settings
        self._house_ray_token: str | None = None
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.session_factory(self.engine)
        self.cache: Cache = cache or make_cache(settings.redis_url)
        self.hub = hub or HubAPI(settings.hub_api_url, settings.api_token.get_secret_value())
        #: The Solana chain deposits are verified on (hub.billing.deposits); made on first use.
        self.chain = chain
        #: The payout treasury (hub.billing.treasury), loaded on first use; never logged.
        self.treasury: Any | None = None
        #: This process's placement index, following every commit made through
        #: ``sessions``; loaded by ``start`` (see hub.market.capacity).
        self.capacity = CapacityIndex(rules_of(settings))
        self.capacity.attach(self.sessions)
        self.capacity.on_change(self._capacity_changed)
        #: Unanswered Ray dashboard checks in a row, per cluster pk.
        self.ray_misses: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Once the schema is migrated: load the placement index."""
        self._loop = asyncio.get_running_loop()
        await run_in_threadpool(self.capacity.load)

    def _capacity_changed(self) -> None:
        """From the committing thread: drop the cached offers, for every portal process
        sharing the cache (this one already ignores entries older than the change)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._drop_offers)

    def _drop_offers(self) -> None:
        task = asyncio.get_running_loop().create_task(self._delete_offers())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_offers(self) -> None:
        try:
            for key in (OFFERS_CACHE_KEY, SUMMARY_CACHE_KEY):
                await self.cache.delete(key)
        except (RedisError, OSError) as exc:
            log.warning("could not drop the cached offers: %s", exc)

    @property
    def house_ray_token(self) -> str | None:
        """The house cluster's Ray token, read from its file once it exists (health
        asks on every call; the file does not change while the stack runs)."""
        if self._house_ray_token is None:
            path = self.settings.ray_token_path
            if path.is_file():
                self._house_ray_token = path.read_text().strip() or None
        return self._house_ray_token

    def payout_side(self) -> tuple[Any, Any, str | None]:
        """The chain, the treasury and the USDC mint payouts use (made on first use;
        blocking: call it in a thread)."""
        if self.chain is None:
            self.chain = deposits.make_chain(self.settings)
        if self.treasury is None:
            self.treasury = payouts.prepare(self.settings, self.chain)
        return self.chain, self.treasury, payouts.payout_mint(self.settings, self.chain)

    @cached_property
    def oauth(self) -> HubOAuth:
        return HubOAuth(
            api_url=self.settings.hub_api_url,
            api_token=self.settings.api_token.get_secret_value(),
            base_url=self.settings.service_prefix,
            cache_max_age=0,
        )

    async def sync_from_hub(self) -> dict[str, int]:
        users, groups = await self.hub.users(), await self.hub.groups()

        def write() -> dict[str, int]:
            with db.transaction(self.sessions) as session:
                return accounts.sync(session, users, groups)

        counts = await run_in_threadpool(write)
        if any(counts.values()):
            log.info("synced from hub: %s", counts)
        return counts

    async def sync_loop(self) -> None:
        """Sync at start, then every ``hub_sync_seconds`` with jitter; never dies."""
        interval = self.settings.hub_sync_seconds
        while True:
            try:
                await asyncio.wait_for(self.sync_from_hub(), timeout=max(10.0, interval))
            except (HubUnavailable, TimeoutError) as exc:
                log.warning("hub sync skipped: %s", exc)
            except Exception:
                log.exception("hub sync failed")
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311

    async def marketplace_loop(self) -> None:
        """Marketplace housekeeping every heartbeat interval (at most 30 s), with jitter;
        never dies."""
        interval = float(min(30, self.settings.heartbeat_seconds))
        while True:
            await self.marketplace_housekeeping()
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311

    async def marketplace_housekeeping(self) -> None:
        """One round: expire held reservations (their GPUs go back), mark nodes that
        missed heartbeats offline, refresh reliability scores, cross-check Ray's
        own node state, and rebuild the placement index from SQL when due. Each
        step is guarded, so one failing never skips the others."""
        rules = nodes.NodeRules.from_settings(self.settings)

        def housekeeping() -> None:
            with db.transaction(self.sessions) as session:
                now = utcnow()
                marketplace.expire_held(session, now)
                nodes.mark_offline(session, rules, now)
                nodes.lapse_challenges(session, rules, now)
                nodes.refresh_reliability(session, rules, now)

        try:
            await run_in_threadpool(housekeeping)
        except Exception:
            log.exception("marketplace housekeeping failed")
        try:
            await self.check_ray()
        except Exception:
            log.exception("Ray cross-check failed")
        if self.capacity.rebuild_due():
            try:
                await run_in_threadpool(self.capacity.load)
            except Exception:
                log.exception("placement index rebuild failed")

    async def check_ray(self) -> list[str]:
        """Ask each cluster's dashboard which marketplace nodes its Ray runs, and take
        offline those it does not (``nodes.apply_ray_view``). Every call is bounded
        by ``RAY_CHECK_TIMEOUT``; a dashboard that does not answer is logged and
        counts as a missed check. Returns the node ids whose status changed."""
        rules = nodes.NodeRules.from_settings(self.settings)

        def targets() -> tuple[dict[int, tuple[str, list[str]]], dict[int, str | None], set[int]]:
            with db.transaction(self.sessions) as session:
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
        allowed = egress.parse_networks(self.settings.provider_networks_allowed)

        async def ask(client: httpx.AsyncClient, pk: int, url: str) -> dict[str, str] | None:
            async with gate:
                # A provider's URL is fetched only on an allowed network (hub.egress).
                refused = (
                    None if pk in house else await run_in_threadpool(egress.refusal, url, allowed)
                )
                if refused:
                    log.warning("Ray dashboard of cluster %d not fetched: %s", pk, refused)
                    return None
                try:
                    return await raystatus.node_states(
                        client, url, RAY_CHECK_TIMEOUT, tokens.get(pk)
                    )
                except raystatus.RayUnreachable as exc:
                    log.debug("Ray dashboard %s: %s", _host(url), exc)
                    return None

        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(
                *(ask(client, pk, url) for pk, (url, _) in clusters.items())
            )
        views: dict[int, tuple[dict[str, str] | None, int]] = {}
        for pk, states in zip(clusters, answers, strict=True):
            if states is None:
                misses = self.ray_misses[pk] = self.ray_misses.get(pk, 0) + 1
                log.warning(
                    "Ray dashboard of cluster %d at %s did not answer (%d missed checks in a row)",
                    pk,
                    _host(clusters[pk][0]),
                    misses,
                )
            else:
                self.ray_misses.pop(pk, None)
                misses = 0
            views[pk] = (states, misses)

        def apply() -> list[str]:
            changed: list[str] = []
            with db.transaction(self.sessions) as session:
                now = utcnow()
                for pk, (states, misses) in views.items():
                    changed += nodes.apply_ray_view(session, pk, states, misses, rules, now)
            return changed

        return await run_in_threadpool(apply)

    async def close(self) -> None:
        if self._tasks:  # offers invalidations still in flight: let them finish (bounded)
            await asyncio.wait(set(self._tasks), timeout=5)
        await self.hub.close()
        await self.cache.close()
        self.engine.dispose()


def _host(url: str) -> str:
    """Host and port of a URL, for logs (never its credentials or path)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "?"
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host
