"""The ``Portal`` context: everything a request handler may need, built once per process.

The DB engine and sessions, the cache, the hub API client and the placement index
(kept current by every commit); the service's background work on them lives in
``portal.loops``. The app factory (``portal.app``), authentication (``portal.auth``),
the loops and the routes (``portal.api``) import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from functools import cached_property
from typing import Any

from jupyterhub.services.auth import HubOAuth
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from .. import db
from ..billing import deposits, payouts
from ..errors import ConfigError
from ..market.capacity import CapacityIndex
from ..market.marketplace import OFFERS_CACHE_KEY, SUMMARY_CACHE_KEY, rules_of
from ..settings import Settings
from .cache import Cache, make_cache
from .heartbeats import Heartbeats, Liveness
from .hubapi import HubAPI

log = logging.getLogger(__name__)


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
        #: Batched heartbeats (``GPUPORTAL_HEARTBEAT_BATCH_SECONDS``), or None: every
        #: heartbeat commits at once (see hub.market.heartbeats).
        self.heartbeats: Heartbeats | None = None
        if settings.heartbeat_batch_seconds > 0:
            if not settings.redis_url:
                raise ConfigError(
                    "GPUPORTAL_HEARTBEAT_BATCH_SECONDS needs GPUPORTAL_REDIS_URL: the replay "
                    "check of batched heartbeats must survive a restart and be shared by "
                    "every portal process."
                )
            self.heartbeats = Heartbeats(settings, self.sessions, Liveness(settings.redis_url))
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

    async def close(self) -> None:
        if self.heartbeats is not None:
            try:  # a clean stop writes the last batch
                await self.heartbeats.flush()
            except Exception:
                log.exception("the last heartbeat batch could not be written")
            await self.heartbeats.liveness.close()
        if self._tasks:  # offers invalidations still in flight: let them finish (bounded)
            await asyncio.wait(set(self._tasks), timeout=5)
        await self.hub.close()
        await self.cache.close()
        self.engine.dispose()
