"""The portal's side of batched heartbeats (see ``hub.market.heartbeats``): Redis
liveness, the fast path of a routine heartbeat, and the flush.

Redis holds what must be shared by every portal process and survive a
restart of any of them:

- ``node:<id>:counter``, the highest signed-request counter accepted from the
  node, advanced by an atomic compare-and-set (a Lua script), so a replayed
  request is refused by any process, before or after a restart;
- ``nodes:seen``, a sorted set of node ids scored by their last heartbeat
  (Unix seconds), holding only the nodes online on the fast path. The offline
  detector pops the members older than the cutoff (one atomic script): it
  reads O(nodes going offline), never the whole fleet. A node that is not in
  the set (it went offline, or this is its first heartbeat) takes the direct
  path, which puts it back once it is online.

Redis down is a 503 with a sentence on the fast path: a heartbeat is never
accepted without its replay check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from gpuportal.provider import signing

from .. import timeutil
from ..db import transaction
from ..market import heartbeats as batching
from ..market import nodes
from ..market.heartbeats import HeartbeatBatch, NodeFacts
from ..settings import Settings

log = logging.getLogger(__name__)

#: Advance a node's counter if ``counter`` is above it, refresh its last-seen score
#: only if it is already in the set (``XX``, never lowered) and then store its latest metrics (the
#: admin's node list shows them). Returns {advanced, in set}.
_ACCEPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or ARGV[3])
local counter = tonumber(ARGV[1])
if counter <= current then return {0, 0} end
redis.call('SET', KEYS[1], ARGV[1])
if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then return {1, 0} end
redis.call('ZADD', KEYS[2], 'XX', 'GT', ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6]) end
return {1, 1}
"""

#: Pop every member of the last-seen set older than the cutoff.
_POP_STALE = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1]) end
return stale
"""


#: Seconds between scans of the DB for silent nodes that the last-seen set misses.
SAFETY_SCAN_SECONDS = 300.0


class RedisUnavailable(Exception):
    """Redis did not answer: the heartbeat is refused with a 503, never half accepted."""


class Liveness:
    """Counters and the last-seen set in Redis."""

    def __init__(self, url: str, prefix: str = "gpuportal:") -> None:
        self._client = aioredis.from_url(url, decode_responses=True, socket_timeout=5)
        self.prefix = prefix
        self.seen_key = prefix + "nodes:seen"
        self._accept = self._client.register_script(_ACCEPT)
        self._pop = self._client.register_script(_POP_STALE)
        self._sync = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self._accept_sync = self._sync.register_script(_ACCEPT)

    def counter_key(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}:counter"

    async def accept(
        self, node_id: str, counter: int, floor: int, at: float, state: str, ttl: float
    ) -> tuple[bool, bool]:
        """(counter advanced, node in the last-seen set). ``floor`` is the DB's counter,
        used when Redis has none for the node; ``state`` is the node's cached metrics."""
        try:
            advanced, present = await self._accept(
                keys=[
                    self.counter_key(node_id),
                    self.seen_key,
                    self.prefix + nodes.cache_key(node_id),
                ],
                args=[counter, at, floor, node_id, state, int(ttl * 1000)],
            )
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(str(exc)) from None
        return bool(advanced), bool(present)

    def advance(self, node_id: str, counter: int) -> bool:
        """Advance the counter only, blocking (a signed request on the direct path, inside
        its DB transaction, after its signature verified): False for a replay. Only the
        score of a node already in the last-seen set would change, and it gets none."""
        try:
            advanced, _ = self._accept_sync(
                keys=[self.counter_key(node_id), self.prefix + "nodes:none", self.prefix + "none"],
                args=[counter, 0, 0, node_id, "", 0],
            )
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(str(exc)) from None
        return bool(advanced)

    async def seen(self, node_id: str, at: float) -> None:
        try:
            await self._client.zadd(self.seen_key, {node_id: at})
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(str(exc)) from None

    async def forget(self, node_ids: list[str]) -> None:
        if node_ids:
            await self._client.zrem(self.seen_key, *node_ids)

    async def pop_stale(self, cutoff: float) -> list[str]:
        return [str(n) for n in await self._pop(keys=[self.seen_key], args=[cutoff])]

    async def close(self) -> None:
        await self._client.aclose()
        self._sync.close()


class Heartbeats:
    """One portal process's batched heartbeat path: facts, batch, liveness, flush."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], liveness: Liveness
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.liveness = liveness
        self.rules = nodes.NodeRules.from_settings(settings)
        self.batch = HeartbeatBatch()
        self.facts: dict[str, NodeFacts] = {}
        #: DB counter of each node when its facts were read: the floor for Redis.
        self.floors: dict[str, int] = {}
        self.flushes = 0
        self._scanned_at = 0.0

    # --- the fast path ---------------------------------------------------------------

    async def try_fast(
        self, node_id: str, headers: Mapping[str, str], method: str, path: str, body: bytes
    ) -> dict[str, Any] | None:
        """The reply to a routine heartbeat, accepted without SQL; None when it must take
        the direct path. Raises ``nodes.NodeAuthError`` for a bad signature or a replay,
        :class:`RedisUnavailable` when Redis does not answer."""
        facts = self.facts.get(node_id)
        if facts is None:
            return None
        now = timeutil.utcnow()
        try:
            signer, timestamp, counter, signature = signing.read_headers(headers)
        except signing.BadSignature as exc:
            raise nodes.NodeAuthError("unsigned", str(exc)) from None
        if signer != node_id:
            return None  # the direct path says why, in its words
        skew = self.settings.node_clock_skew_seconds
        if abs(now.timestamp() - timestamp) > skew:
            raise nodes.NodeAuthError(
                "stale", f"timestamp {timestamp} is more than {skew}s from now"
            )
        try:
            signing.verify(
                facts.public_key, method, path, node_id, timestamp, counter, body, signature
            )
        except signing.BadSignature:
            raise nodes.NodeAuthError(
                "forged", "the signature does not verify with the node's key"
            ) from None
        gpus = _gpus(body)
        if gpus is None or not facts.fast((str(g.get("uuid", "")) for g in gpus), now):
            return None
        state = nodes.cache_value(
            {"node_id": node_id, "received_at": now.isoformat(), "gpus": gpus}
        )
        advanced, present = await self.liveness.accept(
            node_id,
            counter,
            self.floors.get(node_id, 0),
            now.timestamp(),
            state,
            self.rules.heartbeat_seconds * self.rules.heartbeat_missed * 2,
        )
        if not advanced:
            raise nodes.NodeAuthError("replayed", f"counter {counter} was already used")
        if not present:
            # Not on the fast path any more (went offline): the direct path decides,
            # with its counter already advanced here.
            return {"direct": True}
        self.batch.add(facts.pk, counter, now, gpus)
        return {
            "status": facts.status,
            "verification": facts.verification,
            "heartbeat_seconds": self.rules.heartbeat_seconds,
            "challenge": None,
        }

    async def after_direct(self, node_id: str, facts: NodeFacts | None, counter: int) -> None:
        """After the direct path committed: remember the node, and put it in the
        last-seen set once it is online."""
        if facts is None:
            self.facts.pop(node_id, None)
            return
        self.facts[node_id] = facts
        self.floors[node_id] = max(self.floors.get(node_id, 0), counter)
        if facts.status == "online":
            await self.liveness.seen(node_id, timeutil.utcnow().timestamp())

    # --- the flush --------------------------------------------------------------------

    async def flush(self) -> int:
        """Write this process's batch (one transaction), then read back the facts of its
        nodes: a node no longer routine leaves the fast path. Returns the nodes written."""
        batch = self.batch.take()
        if not batch:
            return 0
        interval = self.rules.verification_interval_seconds

        def write() -> dict[int, NodeFacts]:
            with transaction(self.sessions) as session:
                batching.flush(session, batch)
            with transaction(self.sessions) as session:
                return batching.read_facts(session, batch.seen, interval)

        fresh = await run_in_threadpool(write)
        self.flushes += 1
        gone = []
        for pk, (_, counter) in batch.seen.items():
            facts = fresh.get(pk)
            if facts is None:
                continue
            self.facts[facts.node_id] = facts
            self.floors[facts.node_id] = max(self.floors.get(facts.node_id, 0), counter)
            if facts.status != "online":
                gone.append(facts.node_id)
        try:
            await self.liveness.forget(gone)
        except (RedisError, OSError) as exc:
            log.warning("could not drop offline nodes from the last-seen set: %s", exc)
        return len(batch)

    async def warm(self) -> int:
        """Read the facts and DB counters of every online node (a few queries), so a
        process that has just started (a restart, another worker) answers routine
        heartbeats without SQL at once, instead of sending each node's first one down
        the direct path. Facts already learnt are kept. Returns the nodes read."""
        interval = self.rules.verification_interval_seconds

        def read() -> tuple[dict[int, NodeFacts], dict[int, int]]:
            with transaction(self.sessions) as session:
                counters = batching.online_counters(session)
                return batching.read_facts(session, counters, interval), counters

        facts, counters = await run_in_threadpool(read)
        for pk, found in facts.items():
            self.facts.setdefault(found.node_id, found)
            self.floors[found.node_id] = max(self.floors.get(found.node_id, 0), counters[pk])
        return len(facts)

    async def flush_loop(self) -> None:
        """Read the online nodes' facts (:meth:`warm`), then flush every
        ``heartbeat_batch_seconds``; an error is logged, the batch is lost (at most one
        interval of utilisation) and the loop goes on."""
        try:
            log.info("heartbeats: facts of %d online nodes read", await self.warm())
        except Exception:
            log.exception("heartbeats: could not read the online nodes' facts; learning them")
        every = self.settings.heartbeat_batch_seconds
        while True:
            await asyncio.sleep(every)
            try:
                await self.flush()
            except Exception:
                log.exception("heartbeat flush failed; this interval's rollups are lost")

    # --- the offline detector ---------------------------------------------------------

    def safety_scan_due(self) -> bool:
        """Is the DB scan for silent nodes due (every ``SAFETY_SCAN_SECONDS``)?"""
        now = time.monotonic()
        if now - self._scanned_at < SAFETY_SCAN_SECONDS:
            return False
        self._scanned_at = now
        return True

    def lagging_rules(self) -> nodes.NodeRules:
        """The rules for the DB scan: its last-seen times are up to a batch behind."""
        extra = math.ceil(self.settings.heartbeat_batch_seconds / self.rules.heartbeat_seconds)
        return dataclasses.replace(self.rules, heartbeat_missed=self.rules.heartbeat_missed + extra)

    async def mark_offline(self, now: datetime) -> list[str]:
        """Nodes whose last heartbeat is older than K intervals become offline: read from
        the last-seen set, O(nodes going offline)."""
        cutoff = now.timestamp() - self.rules.heartbeat_seconds * self.rules.heartbeat_missed
        stale = await self.liveness.pop_stale(cutoff)
        if not stale:
            return []

        def write() -> list[str]:
            with transaction(self.sessions) as session:
                return batching.mark_offline_ids(session, stale)

        changed = await run_in_threadpool(write)
        for node_id in stale:
            self.facts.pop(node_id, None)
        for node_id in changed:
            log.warning(
                "node %s missed %d heartbeats: offline", node_id, self.rules.heartbeat_missed
            )
        return changed


def _gpus(body: bytes) -> list[dict[str, Any]] | None:
    """The GPUs of a heartbeat body, or None when it is not the plain shape (the direct
    path validates it and says what is wrong)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list) or len(gpus) > 64:
        return None
    if not all(isinstance(g, dict) for g in gpus):
        return None
    return gpus
