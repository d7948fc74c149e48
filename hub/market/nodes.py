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

from .. import timeutil
from ..db.marketplace_models import (
    RAY_OFFLINE_REASONS,
    Cluster,
    HeartbeatRollup,
    Node,
    NodeChallenge,
    Provider,
)
from ..settings import Settings
from .placement import normalize_model

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

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeRules:
        """The rules the portal's settings configure (``GPUPORTAL_HEARTBEAT_*`` and so on)."""
        return cls(
            heartbeat_seconds=settings.heartbeat_seconds,
            heartbeat_missed=settings.heartbeat_missed,
            verification_interval_seconds=settings.verification_interval_seconds,
            challenge_deadline_seconds=settings.challenge_deadline_seconds,
            clock_skew_seconds=settings.node_clock_skew_seconds,
            reliability_start=settings.reliability_start,
        )


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
#
# The portal times every challenge itself: from ``issued_at`` to the moment the
# answer's body has arrived. The deadline is what the claimed GPUs need
# (``workload.deadline_seconds``); a demo node, which claims no real GPU, gets the
# small CPU chain and ``challenge_deadline_seconds``. What the node reports about
# its device and its timing is never read.

_random = secrets.SystemRandom()


def challenge_spec(ch: NodeChallenge) -> workload.Spec:
    return workload.spec_for(ch.demo)


def challenge_public(ch: NodeChallenge) -> dict[str, Any]:
    """What the node is told: never the sampled groups."""
    spec = challenge_spec(ch)
    return {
        "nonce": ch.nonce,
        "seed": ch.seed,
        "rows": spec.rows,
        "size": spec.size,
        "steps": spec.steps,
        "group": workload.GROUP,
        "deadline": ch.deadline.isoformat(),
        "demo": ch.demo,
    }


def challenge_seconds(node: Node, spec: workload.Spec, rules: NodeRules) -> float:
    """The time the node's claimed GPUs get (the demo chain: the configured deadline)."""
    if spec.demo:
        return float(rules.challenge_deadline_seconds)
    return workload.deadline_seconds([g.model for g in node.gpus], spec)


def issue_challenge(session: Session, node: Node, rules: NodeRules) -> NodeChallenge:
    """A fresh challenge (earlier pending ones of the node lapse), sized to its claim."""
    now = timeutil.utcnow()
    session.execute(
        update(NodeChallenge)
        .where(NodeChallenge.node_id == node.id, NodeChallenge.status == "pending")
        .values(status="expired", completed_at=now)
    )
    spec = workload.spec_for(node.demo)
    sample = {
        g.uuid: sorted(_random.sample(range(spec.groups), workload.SAMPLED_GROUPS))
        for g in node.gpus
    }
    ch = NodeChallenge(
        node_id=node.id,
        nonce=secrets.token_hex(16),
        seed=secrets.randbits(62),
        size=spec.size,
        steps=spec.steps,
        sample=sample,
        status="pending",
        issued_at=now,
        deadline=now + timedelta(seconds=challenge_seconds(node, spec, rules)),
        demo=node.demo,
    )
    session.add(ch)
    session.flush()
    log.info("challenge issued to node %s (deadline %s)", node.node_id, ch.deadline.isoformat())
    return ch


def lapse(session: Session, node: Node, rules: NodeRules, now: datetime) -> bool:
    """Pending challenges of ``node`` past their deadline: expired; a verified node
    that did not answer fails (off offer). Returns whether any lapsed."""
    late = session.scalars(
        select(NodeChallenge).where(
            NodeChallenge.node_id == node.id,
            NodeChallenge.status == "pending",
            NodeChallenge.deadline <= now,
        )
    ).all()
    for ch in late:
        ch.status, ch.completed_at = "expired", now
        ch.detail = "no answer before the deadline"
    if late and node.verification == "verified":
        node.verification = "failed"
        node.failed_verifications += 1
        node.reliability = score(node, None, rules.reliability_start)
        log.warning("node %s did not answer its challenge in time: not verified", node.node_id)
    session.flush()
    return bool(late)


def lapse_challenges(session: Session, rules: NodeRules, now: datetime) -> list[str]:
    """Every node whose pending challenge passed its deadline unanswered (housekeeping)."""
    node_pks = session.scalars(
        select(NodeChallenge.node_id)
        .where(NodeChallenge.status == "pending", NodeChallenge.deadline <= now)
        .distinct()
    ).all()
    lapsed = []
    for pk in node_pks:
        node = session.get(Node, pk)
        if node is not None and lapse(session, node, rules, now):
            lapsed.append(node.node_id)
    return lapsed


def due_challenge(session: Session, node: Node, rules: NodeRules) -> NodeChallenge | None:
    """The challenge a node should answer now, if any: pending, or newly due.

    A verified node is challenged again at a random moment (``next_challenge_at``,
    drawn at each pass), so it cannot prepare for it.
    """
    now = timeutil.utcnow()
    lapse(session, node, rules, now)
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
    due = node.next_challenge_at
    if due is None and node.verified_at is not None:
        due = node.verified_at + timedelta(seconds=rules.verification_interval_seconds)
    if node.verification != "verified" or due is None or due <= now:
        return issue_challenge(session, node, rules)
    return None


def received_in_time(ch: NodeChallenge, received_at: datetime) -> str | None:
    """Why an answer that arrived at ``received_at`` is too late, or None."""
    if received_at <= ch.deadline:
        return None
    took = (received_at - ch.issued_at).total_seconds()
    allowed = (ch.deadline - ch.issued_at).total_seconds()
    return (
        f"the answer arrived {took:.1f}s after the challenge was issued; "
        f"the claimed GPUs answer within {allowed:.1f}s"
    )


def check_inventory(node: Node, inventory: list[dict[str, Any]]) -> str | None:
    """Why the node's NVML inventory differs from its registered claim, or None."""
    claimed = {g.index: g for g in node.gpus}
    seen = {}
    for item in inventory:
        try:
            seen[int(item["index"])] = (
                str(item["uuid"]),
                str(item["model"]),
                int(item["memory_total_mib"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError):
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
    return None


def check_results(
    node: Node,
    ch: NodeChallenge,
    results: list[dict[str, Any]],
    expected: dict[str, dict[int, bytes]],
) -> str | None:
    """Why the per-GPU answers (keyed by registered UUID) are wrong, or None.

    ``expected`` holds the portal's own fingerprints of the sampled groups
    (``workload.expected_groups``). Any other field of a result is ignored.
    """
    by_uuid: dict[str, str] = {}
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("uuid"), str):
            return "the results are malformed: each needs a GPU uuid and its rows"
        rows = r.get("rows")
        by_uuid[r["uuid"]] = rows if isinstance(rows, str) else ""
    for gpu in node.gpus:
        if gpu.uuid not in by_uuid:
            return f"GPU {gpu.index}: no workload result for {gpu.uuid}"
        spec = challenge_spec(ch)
        prints = workload.decode(by_uuid[gpu.uuid], spec)
        if prints is None:
            return f"GPU {gpu.index}: the result is not {spec.groups} group fingerprints"
        width = workload.FINGERPRINT_BYTES
        for group, want in expected.get(gpu.uuid, {}).items():
            if prints[group * width : (group + 1) * width] != want:
                return f"GPU {gpu.index}: the workload result is wrong"
    return None


def record_verification(
    session: Session,
    node: Node,
    ch: NodeChallenge,
    failure: str | None,
    rules: NodeRules,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    now = timeutil.utcnow()
    took = None if received_at is None else (received_at - ch.issued_at).total_seconds()
    ch.completed_at = now
    ch.result = {"passed": failure is None, "seconds": took}
    ch.detail = None if failure is None else failure[:500]
    if failure is None:
        ch.status = "passed"
        node.verification, node.verified_at = "verified", now
        # The next check comes at a random moment within the interval.
        interval = rules.verification_interval_seconds
        node.next_challenge_at = now + timedelta(seconds=interval * _random.uniform(0.25, 1.0))
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


#: Heartbeat metrics are clamped to this (they are information; a huge one must not
#: overflow a column).
MAX_METRIC = 1_000_000_000.0


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return min(MAX_METRIC, number) if number > 0 else 0.0


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


def house_clusters(session: Session) -> set[int]:
    """Clusters of the house provider: the control plane's own, fetched on loopback."""
    return set(
        session.scalars(
            select(Cluster.id)
            .join(Provider, Cluster.provider_id == Provider.id)
            .where(Provider.house.is_(True))
        )
    )


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
