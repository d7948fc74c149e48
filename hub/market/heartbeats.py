"""Heartbeats at fleet scale: accepted in memory, written to the DB in periodic batches.

With ``GPUPORTAL_HEARTBEAT_BATCH_SECONDS`` set (and Redis configured), a routine
heartbeat — from an online, verified node that reports the GPUs it verified and
has no challenge due — runs no SQL at all. Its signature is verified against
the node's key held in memory (:class:`NodeFacts`), its counter is advanced
atomically in Redis (replay protection shared by every portal process and kept
across restarts), its last-seen time goes into a Redis sorted set, and its
metrics are added to this process's :class:`HeartbeatBatch`. Every batch
interval :func:`flush` writes the batch in one transaction: the nodes'
``last_heartbeat_at`` and ``heartbeat_counter`` (never lowered) and the
per-minute rollups (added to, through an upsert).

Any heartbeat that changes something — a pending or offline node coming
online, GPUs other than the verified ones, a challenge due or pending, a node
this process has not seen yet — takes the direct path (``nodes.record_heartbeat``,
one commit), so a status change is never held in memory. What a lost batch
(a portal killed before its flush) loses is at most one interval of
utilisation rollups and last-seen times; the flush is one transaction, so a
batch is written whole or not at all, and counted once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..db.marketplace_models import Gpu, HeartbeatRollup, Node, NodeChallenge
from .nodes import _num, minute_of


@dataclass(frozen=True)
class NodeFacts:
    """What the fast path needs to know about a node, read from the DB by this process.

    ``routine`` is True when the node is online, verified and has no pending
    challenge: only then may a heartbeat skip the DB. The facts are read again
    at every flush, so they are at most one batch interval old.
    """

    pk: int
    node_id: str
    public_key: str
    uuids: tuple[str, ...]
    status: str
    verification: str
    due_at: datetime | None
    routine: bool

    def fast(self, uuids: Iterable[str], now: datetime) -> bool:
        """May a heartbeat reporting ``uuids`` at ``now`` skip the DB?"""
        return (
            self.routine
            and (self.due_at is None or self.due_at > now)
            and tuple(sorted(uuids)) == self.uuids
        )


def facts_of(session: Session, node: Node, verification_interval: int) -> NodeFacts | None:
    """The facts of one loaded node (None for a node with no key)."""
    if node.public_key is None:
        return None
    pending = session.scalar(
        select(NodeChallenge.id).where(
            NodeChallenge.node_id == node.id, NodeChallenge.status == "pending"
        )
    )
    return _facts(
        node.id,
        node.node_id,
        node.public_key,
        tuple(sorted(g.uuid for g in node.gpus)),
        node.status,
        node.verification,
        node.next_challenge_at,
        node.verified_at,
        pending is not None,
        verification_interval,
    )


def _facts(
    pk: int,
    node_id: str,
    public_key: str,
    uuids: tuple[str, ...],
    status: str,
    verification: str,
    next_challenge_at: datetime | None,
    verified_at: datetime | None,
    pending: bool,
    verification_interval: int,
) -> NodeFacts:
    due = next_challenge_at
    if due is None and verified_at is not None:
        due = verified_at + timedelta(seconds=verification_interval)
    routine = status == "online" and verification == "verified" and not pending and due is not None
    return NodeFacts(pk, node_id, public_key, uuids, status, verification, due, routine)


def online_counters(session: Session) -> dict[int, int]:
    """Every online node with a key: its signed-request counter in the DB."""
    rows = session.execute(
        select(Node.id, Node.heartbeat_counter).where(
            Node.status == "online", Node.public_key.is_not(None)
        )
    )
    return {pk: counter or 0 for pk, counter in rows}


def read_facts(
    session: Session, node_pks: Iterable[int], verification_interval: int
) -> dict[int, NodeFacts]:
    """The facts of many nodes in three queries (what a flush reads back)."""
    pks = list(set(node_pks))
    out: dict[int, NodeFacts] = {}
    for start in range(0, len(pks), 5000):
        chunk = pks[start : start + 5000]
        uuids: dict[int, list[str]] = {}
        for node_pk, uuid in session.execute(
            select(Gpu.node_id, Gpu.uuid).where(Gpu.node_id.in_(chunk))
        ):
            uuids.setdefault(node_pk, []).append(uuid)
        pending = set(
            session.scalars(
                select(NodeChallenge.node_id).where(
                    NodeChallenge.node_id.in_(chunk), NodeChallenge.status == "pending"
                )
            )
        )
        for row in session.execute(
            select(
                Node.id,
                Node.node_id,
                Node.public_key,
                Node.status,
                Node.verification,
                Node.next_challenge_at,
                Node.verified_at,
            ).where(Node.id.in_(chunk), Node.public_key.is_not(None))
        ):
            out[row.id] = _facts(
                row.id,
                row.node_id,
                row.public_key,
                tuple(sorted(uuids.get(row.id, []))),
                row.status,
                row.verification,
                row.next_challenge_at,
                row.verified_at,
                row.id in pending,
                verification_interval,
            )
    return out


@dataclass
class Rollup:
    heartbeats: int = 0
    gpu_util_sum: float = 0.0
    gpu_samples: int = 0
    memory_used_mib_max: int = 0
    temperature_c_max: int = 0
    power_w_sum: float = 0.0

    def add(self, gpus: list[dict[str, Any]]) -> None:
        """The same arithmetic as ``nodes.record_heartbeat``."""
        self.heartbeats += 1
        for g in gpus:
            self.gpu_samples += 1
            self.gpu_util_sum += _num(g.get("utilization_pct"))
            self.power_w_sum += _num(g.get("power_w"))
            self.memory_used_mib_max = max(
                self.memory_used_mib_max, int(_num(g.get("memory_used_mib")))
            )
            self.temperature_c_max = max(self.temperature_c_max, int(_num(g.get("temperature_c"))))


@dataclass
class Batch:
    """One interval's accepted heartbeats: last seen and counter per node, rollups."""

    seen: dict[int, tuple[datetime, int]] = field(default_factory=dict)
    rollups: dict[tuple[int, datetime], Rollup] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seen)


class HeartbeatBatch:
    """The heartbeats this process accepted since its last flush (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch = Batch()
        self.accepted = 0

    def add(self, node_pk: int, counter: int, now: datetime, gpus: list[dict[str, Any]]) -> None:
        with self._lock:
            seen = self._batch.seen.get(node_pk)
            if seen is None or seen[1] < counter:
                self._batch.seen[node_pk] = (now, counter)
            key = (node_pk, minute_of(now))
            rollup = self._batch.rollups.get(key)
            if rollup is None:
                rollup = self._batch.rollups[key] = Rollup()
            rollup.add(gpus)
            self.accepted += 1

    def take(self) -> Batch:
        """The batch so far; the next heartbeats go into a new one."""
        with self._lock:
            batch, self._batch = self._batch, Batch()
            return batch


def _upsert(session: Session) -> Any:
    """``INSERT .. ON CONFLICT DO UPDATE`` adding to a rollup, on either backend."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(HeartbeatRollup)
    table = HeartbeatRollup.__table__
    return stmt.on_conflict_do_update(
        index_elements=[table.c.node_id, table.c.minute],
        set_={
            "heartbeats": table.c.heartbeats + stmt.excluded.heartbeats,
            "gpu_util_sum": table.c.gpu_util_sum + stmt.excluded.gpu_util_sum,
            "gpu_samples": table.c.gpu_samples + stmt.excluded.gpu_samples,
            "power_w_sum": table.c.power_w_sum + stmt.excluded.power_w_sum,
            "memory_used_mib_max": case(
                (
                    stmt.excluded.memory_used_mib_max > table.c.memory_used_mib_max,
                    stmt.excluded.memory_used_mib_max,
                ),
                else_=table.c.memory_used_mib_max,
            ),
            "temperature_c_max": case(
                (
                    stmt.excluded.temperature_c_max > table.c.temperature_c_max,
                    stmt.excluded.temperature_c_max,
                ),
                else_=table.c.temperature_c_max,
            ),
        },
    )


def flush(session: Session, batch: Batch) -> None:
    """Write one batch in the caller's transaction: last seen, counters, rollups.

    Batched statements only (executemany). A counter is never lowered and a
    last-seen time never moved back, so a batch that is older than what the
    direct path wrote meanwhile changes neither.
    """
    if not batch.seen:
        return
    table = cast(Table, Node.__table__)
    counter = bindparam("counter", type_=table.c.heartbeat_counter.type)
    seen = bindparam("seen", type_=table.c.last_heartbeat_at.type)
    session.execute(
        update(table)
        .where(table.c.id == bindparam("pk"))
        .values(
            heartbeat_counter=case(
                (table.c.heartbeat_counter < counter, counter), else_=table.c.heartbeat_counter
            ),
            last_heartbeat_at=case(
                (table.c.last_heartbeat_at.is_(None), seen),
                (table.c.last_heartbeat_at < seen, seen),
                else_=table.c.last_heartbeat_at,
            ),
        ),
        [
            {"pk": pk, "counter": counter, "seen": seen}
            for pk, (seen, counter) in sorted(batch.seen.items())
        ],
    )
    session.execute(
        _upsert(session),
        [
            {
                "node_id": pk,
                "minute": minute,
                "heartbeats": r.heartbeats,
                "gpu_util_sum": r.gpu_util_sum,
                "gpu_samples": r.gpu_samples,
                "memory_used_mib_max": r.memory_used_mib_max,
                "temperature_c_max": r.temperature_c_max,
                "power_w_sum": r.power_w_sum,
            }
            for (pk, minute), r in sorted(batch.rollups.items())
        ],
    )


def mark_offline_ids(session: Session, node_ids: list[str]) -> list[str]:
    """Take these nodes offline ("heartbeats") if they are still online: the nodes the
    Redis last-seen set found silent. Returns those that changed."""
    if not node_ids:
        return []
    changed = []
    for node in session.scalars(
        select(Node).where(Node.node_id.in_(node_ids), Node.status == "online")
    ):
        node.status, node.offline_reason = "offline", "heartbeats"
        changed.append(node.node_id)
    session.flush()
    return changed
