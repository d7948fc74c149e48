"""Provider nodes as the portal sees them: signed requests, heartbeats, verification,
liveness and reliability.

Everything a node says is a claim. A node's signed request is accepted only when
its signature verifies with the public key stored at registration, its
timestamp is fresh, and its counter is above every counter accepted before (a
conditional UPDATE, so two copies of one request cannot both pass). Heartbeat
metrics are information: they show, warn and can lower reliability; they never
make a node schedulable. Only a passed challenge does that.

Reliability, 0..1, per node:

- a new node starts at ``GPUPORTAL_RELIABILITY_START`` (default 0.9) until it has
  an hour of history;
- then it is its uptime over the last 30 days (minutes with a heartbeat divided
  by minutes it existed in that window);
- minus 0.05 per failed start and 0.1 per failed verification;
- below ``GPUPORTAL_RELIABILITY_DELIST`` (default 0.5) the node is not placed.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gpuportal.provider import signing, workload
from gpuportal.provider.nvml import marketplace_model

from .marketplace_models import RAY_OFFLINE_REASONS, Cluster, HeartbeatRollup, Node, NodeChallenge
from .placement import normalize_model
from .timeutil import utcnow

log = logging.getLogger(__name__)

FAILED_START_PENALTY = 0.05
FAILED_VERIFICATION_PENALTY = 0.1
HISTORY_MINUTES = 60
WINDOW = timedelta(days=30)


class NodeAuthError(Exception):
    """A node request that must be answered 401 (and logged): unsigned, unknown,
    wrong node, stale, forged or replayed. ``reason`` is one of those words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class NodeRules:
    heartbeat_seconds: int = 10
    heartbeat_missed: int = 3
    verification_interval_seconds: int = 3600
    challenge_deadline_seconds: int = 300
    clock_skew_seconds: int = 60
    reliability_start: float = 0.9


def authenticate(
    session: Session,
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    node_in_path: str,
    now: datetime,
    skew: int,
) -> Node:
    """The node that signed this request, or :class:`NodeAuthError`.

    Accepting it advances the node's counter in the same transaction.
    """
    try:
        node_id, timestamp, counter, signature = signing.read_headers(headers)
    except signing.BadSignature as exc:
        raise NodeAuthError("unsigned", str(exc)) from None
    if node_id != node_in_path:
        raise NodeAuthError(
            "wrong-node", f"signed by node {node_id[:64]!r} for node {node_in_path[:64]!r}"
        )
    node = session.scalar(select(Node).where(Node.node_id == node_id))
    if node is None or node.public_key is None:
        raise NodeAuthError("unknown", f"no registered node {node_id[:64]!r}")
    if abs(now.timestamp() - timestamp) > skew:
        raise NodeAuthError("stale", f"timestamp {timestamp} is more than {skew}s from now")
    try:
        signing.verify(node.public_key, method, path, node_id, timestamp, counter, body, signature)
    except signing.BadSignature:
        raise NodeAuthError("forged", "the signature does not verify with the node's key") from None
    advanced = session.execute(
        update(Node)
        .where(Node.id == node.id, Node.heartbeat_counter < counter)
        .values(heartbeat_counter=counter)
        .execution_options(synchronize_session=False)
    )
    if not getattr(advanced, "rowcount", 0):
        raise NodeAuthError("replayed", f"counter {counter} was already used")
    session.refresh(node)
    return node


# --- challenges ---------------------------------------------------------------------


def challenge_public(ch: NodeChallenge) -> dict[str, Any]:
    repeats = workload.DEMO_REPEATS if ch.demo else workload.GPU_REPEATS
    return {
        "nonce": ch.nonce,
        "seed": ch.seed,
        "size": ch.size,
        "repeats": repeats,
        "deadline": ch.deadline.isoformat(),
        "demo": ch.demo,
    }


def issue_challenge(session: Session, node: Node, rules: NodeRules) -> NodeChallenge:
    """A fresh challenge (earlier pending ones of the node lapse)."""
    now = utcnow()
    session.execute(
        update(NodeChallenge)
        .where(NodeChallenge.node_id == node.id, NodeChallenge.status == "pending")
        .values(status="expired", completed_at=now)
    )
    ch = NodeChallenge(
        node_id=node.id,
        nonce=secrets.token_hex(16),
        seed=secrets.randbits(62),
        size=workload.DEMO_SIZE if node.demo else workload.GPU_SIZE,
        status="pending",
        issued_at=now,
        deadline=now + timedelta(seconds=rules.challenge_deadline_seconds),
        demo=node.demo,
    )
    session.add(ch)
    session.flush()
    log.info("challenge issued to node %s (deadline %s)", node.node_id, ch.deadline.isoformat())
    return ch


def due_challenge(session: Session, node: Node, rules: NodeRules) -> NodeChallenge | None:
    """The challenge a node should answer now, if any: pending, or newly due."""
    now = utcnow()
    pending = session.scalar(
        select(NodeChallenge)
        .where(
            NodeChallenge.node_id == node.id,
            NodeChallenge.status == "pending",
            NodeChallenge.deadline > now,
        )
        .order_by(NodeChallenge.id.desc())
    )
    if pending is not None:
        return pending
    stale = node.verified_at is None or node.verified_at < now - timedelta(
        seconds=rules.verification_interval_seconds
    )
    if node.verification != "verified" or stale:
        return issue_challenge(session, node, rules)
    return None


def check_results(
    node: Node,
    ch: NodeChallenge,
    inventory: list[dict[str, Any]],
    results: list[dict[str, Any]],
    expected: str,
) -> str | None:
    """Why the node fails the challenge, or None when it passes."""
    claimed = {g.index: g for g in node.gpus}
    seen = {}
    for item in inventory:
        try:
            seen[int(item["index"])] = (
                str(item["uuid"]),
                str(item["model"]),
                int(item["memory_total_mib"]),
            )
        except (KeyError, TypeError, ValueError):
            return "the inventory is malformed"
    if set(seen) != set(claimed):
        return f"the node reports GPUs {sorted(seen)} but registered {sorted(claimed)}"
    for index, gpu in claimed.items():
        uuid, model, vram = seen[index]
        if uuid != gpu.uuid:
            return f"GPU {index}: UUID {uuid[:64]} differs from the registered {gpu.uuid}"
        if normalize_model(marketplace_model(model)) != normalize_model(gpu.model):
            return f"GPU {index}: model {model[:64]!r} differs from the registered {gpu.model!r}"
        if abs(vram - gpu.vram_mib) > max(256, gpu.vram_mib // 50):
            return f"GPU {index}: {vram} MiB differs from the registered {gpu.vram_mib} MiB"
    by_index = {}
    for r in results:
        try:
            by_index[int(r["index"])] = (str(r["digest"]), float(r["seconds"]), str(r["device"]))
        except (KeyError, TypeError, ValueError):
            return "the results are malformed"
    repeats = workload.DEMO_REPEATS if ch.demo else workload.GPU_REPEATS
    for index, gpu in claimed.items():
        if index not in by_index:
            return f"GPU {index}: no workload result"
        digest, seconds, device = by_index[index]
        if digest != expected:
            return f"GPU {index}: the workload result is wrong"
        if ch.demo:
            continue
        if not device.startswith("cuda"):
            return f"GPU {index}: the workload ran on {device[:32]!r}, not a GPU"
        window = workload.timing_range(gpu.model, ch.size, repeats)
        if window is not None and not window[0] <= seconds <= window[1]:
            return (
                f"GPU {index}: {seconds:.4f}s is outside the {window[0]:.4f}s.."
                f"{window[1]:.4f}s a {gpu.model} takes"
            )
    return None


def record_verification(
    session: Session,
    node: Node,
    ch: NodeChallenge,
    failure: str | None,
    results: list[dict[str, Any]],
    rules: NodeRules,
) -> dict[str, Any]:
    now = utcnow()
    ch.completed_at = now
    ch.result = {"results": results[:64], "passed": failure is None}
    ch.detail = None if failure is None else failure[:500]
    if failure is None:
        ch.status = "passed"
        node.verification, node.verified_at = "verified", now
        if node.status == "pending":
            node.status = "online"
        log.info("node %s passed verification%s", node.node_id, " (demo, CPU)" if ch.demo else "")
    else:
        ch.status = "failed"
        node.verification = "failed"
        node.failed_verifications += 1
        log.warning("node %s failed verification: %s", node.node_id, failure)
    node.reliability = score(node, None, rules.reliability_start)
    session.flush()
    return {
        "passed": failure is None,
        "detail": failure or "verified",
        "verification": node.verification,
        "demo": ch.demo,
    }


# --- heartbeats ---------------------------------------------------------------------


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def record_heartbeat(
    session: Session, node: Node, gpus: list[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """Liveness, the per-minute rollup, and a GPU-change check. Returns the cache value."""
    node.last_heartbeat_at = now
    if node.status == "offline" and node.offline_reason in RAY_OFFLINE_REASONS:
        pass  # only the Ray cross-check brings it back (see check_ray)
    elif node.status in ("pending", "offline"):
        if node.status == "offline":
            log.info("node %s is back online", node.node_id)
        node.status, node.offline_reason = "online", None
    uuids = sorted(str(g.get("uuid", "")) for g in gpus)
    if node.verification == "verified" and uuids != sorted(g.uuid for g in node.gpus):
        node.verification = "changed"
        log.warning(
            "node %s reports other GPUs than it verified; unschedulable until it passes again",
            node.node_id,
        )
    minute = minute_of(now)
    rollup = session.get(HeartbeatRollup, (node.id, minute))
    if rollup is None:
        rollup = HeartbeatRollup(
            node_id=node.id,
            minute=minute,
            heartbeats=0,
            gpu_util_sum=0.0,
            gpu_samples=0,
            memory_used_mib_max=0,
            temperature_c_max=0,
            power_w_sum=0.0,
        )
        session.add(rollup)
    rollup.heartbeats += 1
    for g in gpus:
        rollup.gpu_samples += 1
        rollup.gpu_util_sum += _num(g.get("utilization_pct"))
        rollup.power_w_sum += _num(g.get("power_w"))
        rollup.memory_used_mib_max = max(
            rollup.memory_used_mib_max, int(_num(g.get("memory_used_mib")))
        )
        rollup.temperature_c_max = max(rollup.temperature_c_max, int(_num(g.get("temperature_c"))))
    session.flush()
    return {"node_id": node.node_id, "received_at": now.isoformat(), "gpus": gpus}


def _num(value: Any) -> float:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 0.0


def cache_key(node_id: str) -> str:
    return f"node:{node_id}:heartbeat"


def cache_value(state: dict[str, Any]) -> str:
    return json.dumps(state, default=str)


# --- liveness and reliability -------------------------------------------------------


def mark_offline(session: Session, rules: NodeRules, now: datetime) -> list[str]:
    """Nodes whose last heartbeat is older than K intervals become offline."""
    cutoff = now - timedelta(seconds=rules.heartbeat_seconds * rules.heartbeat_missed)
    stale = session.scalars(
        select(Node).where(
            Node.status == "online",
            Node.public_key.is_not(None),
            (Node.last_heartbeat_at.is_(None)) | (Node.last_heartbeat_at < cutoff),
        )
    ).all()
    for node in stale:
        node.status, node.offline_reason = "offline", "heartbeats"
        log.warning("node %s missed %d heartbeats: offline", node.node_id, rules.heartbeat_missed)
    session.flush()
    return [n.node_id for n in stale]


def score(node: Node, uptime: float | None, start: float) -> float:
    """The documented reliability formula (see the module docstring)."""
    base = start if uptime is None else uptime
    value = (
        base
        - FAILED_START_PENALTY * node.failed_starts
        - FAILED_VERIFICATION_PENALTY * node.failed_verifications
    )
    return round(min(1.0, max(0.0, value)), 4)


def uptime(session: Session, node: Node, now: datetime) -> float | None:
    """Share of minutes with a heartbeat over the last 30 days; None with under an hour."""
    since = max(node.created_at, now - WINDOW)
    minutes = int((now - since).total_seconds() // 60)
    if minutes < HISTORY_MINUTES:
        return None
    alive = (
        session.scalar(
            select(func.count())
            .select_from(HeartbeatRollup)
            .where(HeartbeatRollup.node_id == node.id, HeartbeatRollup.minute >= since)
        )
        or 0
    )
    return min(1.0, alive / minutes)


def refresh_reliability(session: Session, rules: NodeRules, now: datetime) -> None:
    for node in session.scalars(select(Node).where(Node.status != "left")):
        value = score(node, uptime(session, node, now), rules.reliability_start)
        if value != node.reliability:
            node.reliability = value
    session.flush()


# --- Ray's own view -------------------------------------------------------------------

#: A node's state in its Ray cluster: one of its Ray nodes declaring
#: ``gpuportal/node:<id>`` is ALIVE; all such Ray nodes are DEAD; none declares it.
RAY_ALIVE, RAY_DEAD, RAY_MISSING = "ALIVE", "DEAD", "MISSING"


def clusters_to_check(session: Session) -> dict[int, tuple[str, list[str]]]:
    """Clusters with nodes Ray should be asked about: ``{cluster pk: (jobs_url, node ids)}``.

    Online nodes (is Ray still running them?) and nodes the cross-check itself
    took offline (has Ray brought them back?).
    """
    rows = session.execute(
        select(Cluster.id, Cluster.jobs_url, Node.node_id)
        .join(Node, Node.cluster_id == Cluster.id)
        .where(
            (Node.status == "online")
            | ((Node.status == "offline") & Node.offline_reason.in_(RAY_OFFLINE_REASONS))
        )
        .order_by(Cluster.id, Node.node_id)
    )
    out: dict[int, tuple[str, list[str]]] = {}
    for cluster_pk, jobs_url, node_id in rows:
        out.setdefault(cluster_pk, (jobs_url, []))[1].append(node_id)
    return out


def apply_ray_view(
    session: Session,
    cluster_pk: int,
    states: dict[str, str] | None,
    misses: int,
    rules: NodeRules,
    now: datetime,
) -> list[str]:
    """Reconcile one cluster's nodes with what its Ray dashboard says.

    ``states`` maps node ids to :data:`RAY_ALIVE` or :data:`RAY_DEAD` (absent:
    missing), or is None when the dashboard did not answer; ``misses`` counts
    such unanswered checks in a row. A node Ray does not run is taken offline
    even if its agent still sends heartbeats (a spawn there would fail); after
    ``heartbeat_missed`` unanswered checks the cluster's nodes go offline too,
    as the spawner could not reach its Jobs API either. A node Ray reports alive
    again is online once its heartbeats are fresh. Returns the node ids whose
    status changed.
    """
    cutoff = now - timedelta(seconds=rules.heartbeat_seconds * rules.heartbeat_missed)
    changed = []
    for node in session.scalars(
        select(Node).where(Node.cluster_id == cluster_pk, Node.status.in_(("online", "offline")))
    ):
        ray_held = node.status == "offline" and node.offline_reason in RAY_OFFLINE_REASONS
        if node.status != "online" and not ray_held:
            continue
        if states is None:
            if node.status == "online" and misses >= rules.heartbeat_missed:
                node.status, node.offline_reason = "offline", "ray-unreachable"
                changed.append(node.node_id)
                log.warning(
                    "node %s: its Ray dashboard missed %d checks in a row; offline",
                    node.node_id,
                    misses,
                )
            continue
        state = states.get(node.node_id, RAY_MISSING)
        if state == RAY_ALIVE:
            if ray_held:
                node.offline_reason = None
                fresh = node.last_heartbeat_at is not None and node.last_heartbeat_at >= cutoff
                if fresh:
                    node.status = "online"
                else:
                    node.offline_reason = "heartbeats"
                changed.append(node.node_id)
                log.info(
                    "node %s: Ray reports it alive again; %s",
                    node.node_id,
                    "online" if fresh else "offline until it sends heartbeats",
                )
        elif node.status == "online" or node.offline_reason == "ray-unreachable":
            beating = node.last_heartbeat_at is not None and node.last_heartbeat_at >= cutoff
            node.status, node.offline_reason = "offline", "ray"
            changed.append(node.node_id)
            log.warning(
                "node %s: Ray reports its resource %s %s%s; offline",
                node.node_id,
                node.resource,
                "on a DEAD Ray node" if state == RAY_DEAD else "missing from its cluster",
                " although heartbeats still arrive" if beating else "",
            )
    session.flush()
    return changed
