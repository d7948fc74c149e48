"""The hub's side of warm pools: one pool job per provider node, claimed at spawn.

A spawn that finds a ready pool on its reserved node claims a slot there
(``provider/warmpool.py``): no Ray job, no new Ray worker, no imports; the
server is up in the time a process takes to switch user and bind a port. A
node without a ready pool is started cold as before, and gets a pool in the
background for the next spawn.

The registry (one per hub process, as the Jobs API clients are) keeps, per
(cluster, node): the pool's Ray job id, its address and its state. Its
requests are signed with the pool's own key (``provider/warmclaim.py``), derived
from ``RaySpawner.warm_secret`` and the pool's job id, so after a hub restart
the same secret reaches the same pools: a restarted hub adopts a running pool
(found by its job's metadata) rather than start a second one.

The pool's job holds no GPU and a sliver of the node's ``gpuportal/node:<id>``
resource: warm slots are idle capacity, never a reservation. A claimed server
sees exactly the GPU indices the marketplace reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from jupyterhub.apihandlers import APIHandler, default_handlers
from tornado import web

from gpuportal.provider import warmclaim
from gpuportal.provider.warmpool import ENV_IP, ENV_KEY, ENV_POOL, ENV_SLOTS, LISTENING

from .loopclient import LoopClient
from .naming import escape
from .rayjobs import JobNotFound, RayJobs, RayUnavailable

log = logging.getLogger(__name__)

#: The pool job's metadata key naming its marketplace node.
POOL_METADATA = "gpuportal_warmpool"
#: How long after a pool failed (a node that cannot run warm slots) before trying again, seconds.
RETRY_AFTER = 300.0
#: How long a new pool may take to say where it listens, seconds.
LISTEN_TIMEOUT = 180.0
HANDLER_PATH = r"/api/gpuportal/warm"
_PORT = re.compile(re.escape(LISTENING) + r"(\d{1,5})")


class WarmUnavailable(Exception):
    """The pool did not answer, or refused; the spawn goes cold."""


@dataclass
class PoolRef:
    """One node's pool as the hub knows it."""

    jobs_url: str
    node_id: str
    job_id: str = ""
    address: str = ""  # http://host:port once it listens
    ray_node_id: str = ""
    state: str = "starting"  # starting → ready; failed (retry later)
    failed_at: float = 0.0
    why: str = ""  # why it failed, for the admin view


class WarmPools:
    """Every warm pool this hub started or adopted, by (Jobs API URL, node id)."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], PoolRef] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: One watcher per ready pool: it takes a dead pool out within the bound.
        self._watchers: dict[tuple[str, str], tuple[PoolRef, asyncio.Task[None]]] = {}
        self._http = LoopClient(timeout=5.0)
        #: The spawners' warm_secret, for the admin view's status requests.
        self.secret = ""

    async def snapshot(self) -> list[dict[str, Any]]:
        """What the admin API shows: each node's pool and its slots (no key, no token).

        The ready pools are asked at once, each bounded by 3 s, so the view never takes
        much longer than one pool's bound (the portal's health reads it)."""
        pools = list(self.pools.values())
        rows = await asyncio.gather(*(self._row(pool) for pool in pools))
        return list(rows)

    async def _row(self, pool: PoolRef) -> dict[str, Any]:
        row: dict[str, Any] = {"node_id": pool.node_id, "job_id": pool.job_id}
        row["state"] = pool.state
        if pool.state == "failed":
            row["why"] = pool.why
        if pool.state == "ready" and self.secret:
            try:
                answer = await self.request(
                    pool.address, pool.job_id, self.secret, "status", timeout=3.0
                )
                row.update({k: answer.get(k) for k in ("ready", "starting", "claimed")})
            except WarmUnavailable:
                row["state"] = "not answering"
        return row

    def ready(self, jobs_url: str, node_id: str) -> PoolRef | None:
        pool = self.pools.get((jobs_url, node_id))
        return pool if pool is not None and pool.state == "ready" else None

    def ensure(self, jobs: RayJobs, node_id: str, *, secret: str, **how: Any) -> None:
        """Start (or adopt) the node's pool in the background unless it is there or
        being started; a failed pool is tried again after :data:`RETRY_AFTER`."""
        self.secret = secret
        key = (jobs.jobs_url, node_id)
        pool = self.pools.get(key)
        task = self._tasks.get(key)
        if task is not None and not task.done():
            return
        if pool is not None and pool.state == "ready":
            return
        if (
            pool is not None
            and pool.state == "failed"
            and time.monotonic() - pool.failed_at < RETRY_AFTER
        ):
            return
        pool = self.pools[key] = PoolRef(jobs.jobs_url, node_id)
        self._tasks[key] = asyncio.get_running_loop().create_task(
            self._bring_up(jobs, pool, secret, **how)
        )

    def remember(
        self,
        jobs_url: str,
        node_id: str,
        job_id: str,
        address: str,
        secret: str,
        ray_node_id: str = "",
        bound: float = 30.0,
    ) -> None:
        """A pool known from a warm server's state after a hub restart: ready for
        claims again, and watched (a pool that is gone since is out within ``bound``,
        or at the first claim)."""
        if not (jobs_url and node_id and job_id and address):
            return
        self.secret = self.secret or secret
        known = self.pools.get((jobs_url, node_id))
        if known is None or known.state != "ready":
            known = self.pools[(jobs_url, node_id)] = PoolRef(
                jobs_url, node_id, job_id, address, ray_node_id, state="ready"
            )
        if known.job_id == job_id:
            self.watch(known, None, bound)

    def forget(self, pool: PoolRef, why: str) -> None:
        """The pool is gone (its job ended or its node died): no more claims there."""
        if pool.state != "failed":
            log.warning("warm pool %s on node %s is out: %s", pool.job_id, pool.node_id, why)
            pool.why = why[:300]
        pool.state, pool.failed_at = "failed", time.monotonic()

    def watch(self, pool: PoolRef, jobs: RayJobs | None, bound: float) -> None:
        """Follow a ready pool until it is gone (idempotent; needs a running loop).

        Every ``bound / 3`` seconds the pool is asked for its status; a pool that
        does not answer is out as soon as Ray says its job or node is gone, and in
        any case once it has not answered for the rest of ``bound`` (the spawner's
        ``dead_after``). So a dead node's slots stop being offered within the same
        bound in which its claimed servers are found gone by ``poll()``."""
        key = (pool.jobs_url, pool.node_id)
        watched, task = self._watchers.get(key) or (None, None)
        if watched is pool and task is not None and not task.done():
            return  # (a watcher of an older pool there ends by itself)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (state loaded early): the next poll or claim starts it
        self._watchers[key] = (pool, loop.create_task(self._watch(pool, jobs, bound)))

    async def _watch(self, pool: PoolRef, jobs: RayJobs | None, bound: float) -> None:
        key = (pool.jobs_url, pool.node_id)
        interval = max(1.0, bound / 3)
        check = min(3.0, interval)
        grace = max(1.0, bound - interval - check)
        silent_since: float | None = None
        while pool.state == "ready" and self.pools.get(key) is pool:
            await asyncio.sleep(interval)
            if pool.state != "ready":
                return
            try:
                await self.request(pool.address, pool.job_id, self.secret, "status", timeout=check)
                silent_since = None
                continue
            except WarmUnavailable as exc:
                why = str(exc)
            except Exception as exc:  # a watcher must outlive any one bad answer
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
            if jobs is not None and not await self.pool_alive(jobs, pool.job_id):
                self.forget(pool, f"its job or node is gone ({why})")
                return
            now = time.monotonic()
            silent_since = now if silent_since is None else silent_since
            if now - silent_since >= grace:
                self.forget(pool, f"it has not answered for {bound:.0f}s ({why})")
                return

    async def _bring_up(
        self,
        jobs: RayJobs,
        pool: PoolRef,
        secret: str,
        *,
        host: Callable[[str], Awaitable[str]],
        node_resource: str,
        slots: Callable[[], Awaitable[int]],
        ip: str,
        entrypoint: str,
        bound: float = 30.0,
    ) -> None:
        try:
            pool.job_id = await self._adopt(jobs, pool.node_id) or await self._submit(
                jobs, pool.node_id, secret, node_resource, await slots(), ip, entrypoint
            )
            port = await self._listening(jobs, pool.job_id)
            state = await jobs.state(pool.job_id)
            pool.ray_node_id = state.node_id
            address = await host(state.node_id)
            bracketed = f"[{address}]" if ":" in address else address
            pool.address = f"http://{bracketed}:{port}"
            pool.state = "ready"
            log.info("warm pool %s on node %s is ready", pool.job_id, pool.node_id)
            self.watch(pool, jobs, bound)
        except Exception as exc:  # a failed pool only means cold starts there
            self.forget(pool, f"{type(exc).__name__}: {str(exc)[:200]}")

    async def _adopt(self, jobs: RayJobs, node_id: str) -> str | None:
        """A running pool for the node, started by this hub before a restart."""
        for job in await jobs.list_jobs():
            metadata = job.get("metadata") or {}
            if metadata.get(POOL_METADATA) == node_id and job.get("status") in (
                "PENDING",
                "RUNNING",
            ):
                return str(job["submission_id"])
        return None

    async def _submit(
        self,
        jobs: RayJobs,
        node_id: str,
        secret: str,
        node_resource: str,
        slots: int,
        ip: str,
        entrypoint: str,
    ) -> str:
        job_id = f"gpuportal-warmpool--{escape(node_id)[:40]}--{secrets.token_hex(4)}"
        await jobs.submit(
            submission_id=job_id,
            entrypoint=entrypoint,
            num_cpus=0.0,
            num_gpus=0.0,
            resources={node_resource: 0.001},
            env_vars={
                ENV_POOL: job_id,
                ENV_KEY: warmclaim.pool_key(secret, job_id),
                ENV_SLOTS: str(slots),
                ENV_IP: ip,
            },
            metadata={POOL_METADATA: node_id},
        )
        log.info("submitted warm pool %s (%s slots) to node %s", job_id, slots, node_id)
        return job_id

    async def _listening(self, jobs: RayJobs, job_id: str) -> int:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while time.monotonic() < deadline:
            state = await jobs.state(job_id)
            if state.terminal:
                tail = await jobs.logs_tail(job_id, chars=600)
                raise WarmUnavailable(f"the pool job ended {state.status}: {tail.strip()[-300:]}")
            if state.status == "RUNNING":
                found = _PORT.search(await jobs.logs_tail(job_id, chars=20000))
                if found:
                    return int(found.group(1))
            await asyncio.sleep(0.5)
        raise WarmUnavailable("the pool did not say where it listens")

    async def request(
        self,
        address: str,
        job_id: str,
        secret: str,
        op: str,
        fields: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """A signed request to a pool; WarmUnavailable when it does not answer 200."""
        body, headers = warmclaim.make_request(
            warmclaim.pool_key(secret, job_id), job_id, op, fields
        )
        try:
            reply = await self._http.client().post(
                f"{address}/{op}", content=body, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise WarmUnavailable(f"{type(exc).__name__} from the pool") from None
        if reply.status_code != 200:
            message = ""
            with contextlib.suppress(ValueError, AttributeError):
                message = str(reply.json().get("message", ""))[:200]
            raise WarmUnavailable(f"the pool answered {reply.status_code}: {message}")
        answer = reply.json()
        if not isinstance(answer, dict):
            raise WarmUnavailable("the pool's answer is not an object")
        return answer

    async def pool_alive(self, jobs: RayJobs, job_id: str) -> bool:
        """Is the pool's job still running on a live node (False once it is not)?"""
        try:
            state = await jobs.state(job_id)
        except JobNotFound:
            return False
        except RayUnavailable:
            return True  # not known to be gone; a cold start will say what is wrong
        if state.terminal:
            return False
        if state.node_id:
            try:
                return await jobs.node_alive(state.node_id)
            except RayUnavailable:
                return True  # not known to be dead
        return True


#: The one registry of the hub process.
POOLS = WarmPools()


#: The read-only custom scope that lets a hub service (the portal's own token, role
#: ``portal-service``) read the warm-pool view without ``admin:servers``. JupyterHub
#: knows it only once the config defines it (``c.JupyterHub.custom_scopes =
#: CUSTOM_SCOPES``), after this module is imported: ``needs_scope`` checks names at
#: import, so :class:`WarmPoolsHandler` checks the scope itself.
READ_SCOPE = "custom:gpuportal-warm:read"
CUSTOM_SCOPES = {
    READ_SCOPE: {
        "description": "Read each node's warm pool: its state and how many slots wait, "
        "start or are claimed (no user, token, key or claim).",
    },
}
#: Scopes that may read the view: admins' own, or the read-only custom scope.
READ_SCOPES = frozenset({"admin:servers", READ_SCOPE})


def may_read(expanded_scopes: Any) -> bool:
    """Whether a caller's expanded scopes let it read the view: the unfiltered
    ``admin:servers`` or :data:`READ_SCOPE` (a scope filtered to one user or group
    does not cover every node)."""
    return bool(READ_SCOPES.intersection(expanded_scopes or ()))


def warm_configured(config: Any, spawner_class: Any) -> bool:
    """Whether the hub's config turns warm pools on for its spawner class
    (``warm_pools`` and a ``warm_secret``), read from the config as traitlets
    would, without making a spawner."""
    traits = getattr(spawner_class, "class_traits", None)
    if config is None or traits is None or "warm_pools" not in traits():
        return False
    found: dict[str, Any] = {}
    for section in spawner_class.section_names():
        if config._has_section(section):
            found.update(
                {k: v for k, v in config[section].items() if k in ("warm_pools", "warm_secret")}
            )
    return bool(found.get("warm_pools")) and bool(found.get("warm_secret"))


class WarmPoolsHandler(APIHandler):
    """``GET /hub/api/gpuportal/warm``: each node's warm pool and its slots, and whether
    this hub runs warm pools at all (``enabled``). Admins (``admin:servers``) and
    holders of :data:`READ_SCOPE` (the portal's health) may read it."""

    async def get(self) -> None:
        if self.current_user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if not may_read(getattr(self, "expanded_scopes", None)):
            raise web.HTTPError(
                403,
                f"Reading the warm pools needs the admin:servers or {READ_SCOPE} scope.",
            )
        enabled = warm_configured(self.config, self.settings.get("spawner_class"))
        self.finish({"enabled": enabled, "pools": await POOLS.snapshot()})


def register() -> None:
    """Add the admin view to the hub's API handlers once (idempotent)."""
    if not any(entry[0] == HANDLER_PATH for entry in default_handlers):
        default_handlers.append((HANDLER_PATH, WarmPoolsHandler))
