"""Schedulable capacity: read from SQL, and held in memory for placement.

A reservation must pick a node in well under a millisecond with 100k nodes; a
SQL scan of every node per request cannot. So each portal process holds one
:class:`CapacityIndex`, a cache of the DB that placement reads, kept
consistent with it:

- it is loaded from SQL when the portal starts, and rebuilt from SQL by the
  marketplace housekeeping loop every :data:`REBUILD_SECONDS` (a safety net
  for changes this process did not make: another portal process, a CLI);
- after every commit that changes capacity, the nodes that commit touched are
  read again from SQL and replaced in the index. Sessions record what they
  touched themselves (ORM changes to the fields placement reads, plus
  :func:`touch` next to bulk statements), so no caller has to remember to;
- the re-reads run one at a time (a lock around read-and-apply), so the last
  one applied is also the newest read: once commits stop, the index equals
  the DB.

The DB stays the authority. A reservation re-reads the node it picked inside
its own transaction and commits GPU allocation rows whose primary key is the
GPU, so a stale pick is refused and retried with fresh data, and "nothing
fits" is confirmed by a scan of the DB before a customer hears it
(``marketplace.reserve``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, and_, event, inspect, or_, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from ..db.marketplace_models import Cluster, Gpu, GpuAllocation, Node, Provider, Reservation
from .placement import Candidate, PlacementIndex, Request, normalize_model

log = logging.getLogger(__name__)

#: Seconds between full rebuilds of the index from SQL by the housekeeping loop.
REBUILD_SECONDS = 300.0

_TOUCHED = "gpuportal.capacity.touched"
_COMMITTED = "gpuportal.capacity.committed"
#: The fields placement reads; a change to any of them is a capacity change.
_NODE_FIELDS = ("status", "verification", "blocked", "reliability", "cluster_id", "demo")
_PROVIDER_FIELDS = ("status", "price_per_gpu_hour", "region", "display_name")
_CLUSTER_FIELDS = ("jobs_url", "provider_id")


@dataclass(frozen=True)
class Rules:
    """Marketplace settings that decide schedulability and pricing."""

    delist_below: float = 0.5
    hold_seconds: int = 600
    platform_fee_bps: int = 1000


# --- reading capacity from SQL ----------------------------------------------------------


def schedulable(rules: Rules) -> ColumnElement[bool]:
    """The one rule of what placement may use: a listed provider's online, verified,
    unblocked node at or above the delisting reliability.

    Written once, as SQL: the full read filters on it, and a narrowed re-read
    (which must also see nodes that just stopped being schedulable) selects it
    as a column.
    """
    return and_(
        Provider.status == "listed",
        Node.status == "online",
        Node.verification == "verified",
        Node.blocked.is_(False),
        Node.reliability >= rules.delist_below,
    )


def capacity_query(
    rules: Rules,
    *,
    schedulable_only: bool,
    node_pks: Iterable[int] | None = None,
    provider_pks: Iterable[int] | None = None,
    cluster_pks: Iterable[int] | None = None,
) -> Select[*tuple[Any, ...]]:
    """One row per GPU of each node, with its node, provider, cluster and allocation."""
    query = (
        select(
            Node.id.label("node_pk"),
            Node.node_id,
            Node.demo,
            Node.reliability,
            Node.isolation,
            Provider.price_per_gpu_hour.label("price"),
            Provider.region,
            Provider.display_name.label("provider"),
            Cluster.id.label("cluster_id"),
            Cluster.jobs_url,
            Gpu.index,
            Gpu.model,
            Gpu.vram_mib,
            GpuAllocation.gpu_id.label("allocated"),
            schedulable(rules).label("schedulable"),
        )
        .join(Cluster, Node.cluster_id == Cluster.id)
        .join(Provider, Cluster.provider_id == Provider.id)
        .join(Gpu, Gpu.node_id == Node.id)
        .outerjoin(GpuAllocation, GpuAllocation.gpu_id == Gpu.id)
    )
    narrow = []
    if node_pks is not None:
        narrow.append(Node.id.in_(list(node_pks)))
    if provider_pks is not None:
        narrow.append(Provider.id.in_(list(provider_pks)))
    if cluster_pks is not None:
        narrow.append(Cluster.id.in_(list(cluster_pks)))
    if narrow:
        query = query.where(or_(*narrow))
    if schedulable_only:
        query = query.where(schedulable(rules))
    return query


def group_candidates(rows: Iterable[Row[Any]]) -> list[Candidate]:
    """Fold GPU rows into one candidate per (node, GPU model), with its free GPU indices.

    An exclusive node (it cannot give customers accounts of their own) that
    hosts a customer now offers nothing until that customer leaves.
    """
    groups: dict[tuple[int, str], dict[str, Any]] = {}
    occupied: set[int] = set()
    for row in rows:
        g = groups.setdefault(
            (row.node_pk, row.model),
            {
                "node_pk": row.node_pk,
                "node_id": row.node_id,
                "model": row.model,
                "vram_mib": row.vram_mib,
                "region": row.region,
                "price": row.price,
                "reliability": row.reliability,
                "total_gpus": 0,
                "free": [],
                "demo": row.demo,
                "provider": row.provider,
                "cluster_id": row.cluster_id,
                "jobs_url": row.jobs_url,
                "exclusive": row.isolation == "exclusive",
                "schedulable": bool(row.schedulable),
            },
        )
        g["total_gpus"] += 1
        g["vram_mib"] = min(g["vram_mib"], row.vram_mib)
        if row.allocated is None:
            g["free"].append(row.index)
        elif row.isolation == "exclusive":
            occupied.add(row.node_pk)
    candidates = []
    for g in groups.values():
        free = g.pop("free")
        g["free_indices"] = () if g["node_pk"] in occupied else tuple(sorted(free))
        candidates.append(Candidate(**g))
    return candidates


def load_candidates(
    session: Session,
    rules: Rules,
    gpu_model: str | None = None,
    *,
    schedulable_only: bool = True,
    node_pks: Iterable[int] | None = None,
    provider_pks: Iterable[int] | None = None,
    cluster_pks: Iterable[int] | None = None,
) -> list[Candidate]:
    """Every (node, GPU model) pair with its free GPU indices, read in one query.

    ``node_pks``/``provider_pks``/``cluster_pks`` (any that are given, OR-ed)
    narrow the read to some nodes: what the index re-reads after a commit.
    """
    query = capacity_query(
        rules,
        schedulable_only=schedulable_only,
        node_pks=node_pks,
        provider_pks=provider_pks,
        cluster_pks=cluster_pks,
    )
    candidates = group_candidates(session.execute(query))
    if gpu_model is None:
        return candidates
    wanted = normalize_model(gpu_model)
    return [c for c in candidates if normalize_model(c.model) == wanted]


# --- what a session changed --------------------------------------------------------------


@dataclass
class Touched:
    """Nodes, providers and clusters whose capacity a transaction changed."""

    nodes: set[int]
    providers: set[int]
    clusters: set[int]

    def __bool__(self) -> bool:
        return bool(self.nodes or self.providers or self.clusters)

    def update(self, other: Touched) -> None:
        self.nodes |= other.nodes
        self.providers |= other.providers
        self.clusters |= other.clusters


def _touched(session: Session, key: str = _TOUCHED) -> Touched:
    found = session.info.get(key)
    if found is None:
        found = session.info[key] = Touched(set(), set(), set())
    return found


def touch(
    session: Session,
    nodes: Iterable[int | None] = (),
    providers: Iterable[int | None] = (),
    clusters: Iterable[int | None] = (),
) -> None:
    """Record that this transaction changes the capacity of these rows (by primary key).

    Needed only next to bulk statements (``update()``/``delete()``), which the
    ORM cannot see; attribute changes on loaded objects are recorded by
    themselves. Harmless when no index is attached.
    """
    t = _touched(session)
    t.nodes.update(pk for pk in nodes if pk is not None)
    t.providers.update(pk for pk in providers if pk is not None)
    t.clusters.update(pk for pk in clusters if pk is not None)


def _changed(obj: Any, fields: tuple[str, ...]) -> bool:
    attrs = inspect(obj).attrs
    return any(attrs[name].history.has_changes() for name in fields)


def _after_flush(session: Session, _context: Any) -> None:
    """Collect the rows whose capacity this flush changed (pre-flush state is still visible)."""
    t = _touched(session)
    for obj in chain(session.new, session.dirty, session.deleted):
        whole = obj in session.new or obj in session.deleted
        if isinstance(obj, Node):
            if whole or _changed(obj, _NODE_FIELDS):
                t.nodes.add(obj.id)
        elif isinstance(obj, Gpu):
            t.nodes.add(obj.node_id)
        elif isinstance(obj, Reservation):
            if whole or _changed(obj, ("status",)):
                t.nodes.add(obj.node_id)
        elif isinstance(obj, Provider):
            if whole or _changed(obj, _PROVIDER_FIELDS):
                t.providers.add(obj.id)
        elif isinstance(obj, Cluster) and (whole or _changed(obj, _CLUSTER_FIELDS)):
            t.clusters.add(obj.id)
    t.nodes.discard(None)


# --- the live index ---------------------------------------------------------------------


class CapacityIndex:
    """The placement index of one portal process, kept consistent with the DB.

    ``attach`` it to the session factory the portal writes with; ``load`` it
    once the schema is migrated. Until it is loaded (or after a re-read failed)
    ``ready`` is False and placement scans SQL instead.
    """

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.ready = False
        #: Bumped on every applied change; with ``changed_at`` (wall clock, seconds)
        #: it tells cached offers whether they predate a capacity change.
        self.version = 0
        self.changed_at = 0.0
        self.rebuilt_at = 0.0
        self._index = PlacementIndex()
        self._sessions: sessionmaker[Session] | None = None
        self._lock = threading.Lock()  # guards self._index
        self._reload = threading.Lock()  # one read-and-apply at a time
        self._listeners: list[Callable[[], None]] = []

    # wiring

    def attach(self, sessions: sessionmaker[Session]) -> None:
        """Follow every commit made through ``sessions``."""
        self._sessions = sessions
        event.listen(sessions, "after_flush", _after_flush)
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._after_rollback)
        event.listen(sessions, "after_transaction_end", self._after_transaction_end)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the committing thread) after each capacity change."""
        self._listeners.append(callback)

    @staticmethod
    def _after_commit(session: Session) -> None:
        # The connection is still checked out here; the re-read waits for
        # after_transaction_end, so it never needs a second pooled connection.
        touched = session.info.pop(_TOUCHED, None)
        if touched:
            _touched(session, _COMMITTED).update(touched)

    @staticmethod
    def _after_rollback(session: Session) -> None:
        session.info.pop(_TOUCHED, None)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is not None:
            return
        committed = session.info.pop(_COMMITTED, None)
        if committed:
            self.changed(committed)

    # reading

    def choose(self, request: Request) -> Candidate | None:
        with self._lock:
            return self._index.choose(request)

    def best(self, request: Request, k: int) -> list[Candidate]:
        with self._lock:
            return self._index.best(request, k)

    def candidates(self, gpu_model: str | None = None) -> list[Candidate]:
        with self._lock:
            return self._index.candidates(gpu_model)

    # writing

    def load(self) -> int:
        """Rebuild the whole index from SQL; returns how many candidates differed."""
        assert self._sessions is not None, "attach() the index first"
        with self._reload:
            with self._sessions() as session:
                fresh = load_candidates(session, self.rules)
            index = PlacementIndex.build(fresh)
            with self._lock:
                before = set(self._index.candidates())
                self._index = index
                drift = len(before.symmetric_difference(fresh)) if self.ready else 0
                self.ready = True
                self.rebuilt_at = time.monotonic()
        log.info(
            "placement index loaded: %d nodes, %d candidates%s",
            len(index),
            len(fresh),
            f", {drift} differed from the DB" if drift else "",
        )
        return drift

    def rebuild_due(self) -> bool:
        return not self.ready or time.monotonic() - self.rebuilt_at >= REBUILD_SECONDS

    def changed(self, touched: Touched) -> None:
        """Re-read the touched nodes from SQL and replace them in the index.

        Never raises: the commit it follows has happened. On failure the index
        is marked not ready (placement scans SQL) until the next rebuild.
        """
        self.changed_at = time.time()
        self.version += 1
        for callback in self._listeners:
            try:
                callback()
            except Exception:
                log.exception("capacity change listener failed")
        if not self.ready or self._sessions is None:
            return
        try:
            with self._reload:
                with self._sessions() as session:
                    rows = load_candidates(
                        session,
                        self.rules,
                        schedulable_only=False,
                        node_pks=touched.nodes or None,
                        provider_pks=touched.providers or None,
                        cluster_pks=touched.clusters or None,
                    )
                with self._lock:
                    self._index.replace(touched.nodes | {c.node_pk for c in rows}, rows)
        except Exception:
            self.ready = False
            log.exception("placement index update failed; scanning SQL until it is rebuilt")

    def refresh_nodes(self, node_pks: Iterable[int]) -> None:
        """Re-read some nodes now (a pick turned out stale)."""
        pks = set(node_pks)
        if pks:
            self.changed(Touched(pks, set(), set()))
