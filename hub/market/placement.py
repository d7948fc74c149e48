"""The placement engine: which node gets a GPU request. Pure logic, no I/O.

Rules, in order (the issue's contract, and what customers expect from a
marketplace):

1. Only schedulable nodes: listed provider, online, verified, not blocked,
   reliability at or above the delisting threshold. Unverified capacity is a
   claim, never a placement.
2. The request's filters: GPU model, minimum VRAM, region, maximum price,
   minimum reliability, and enough *free* GPUs on one node.
3. Among the fits: cheapest price per GPU-hour first, then higher reliability,
   then the best fit (fewest GPUs left over, so big nodes stay whole for big
   requests), then the node id so the choice is deterministic.

:class:`PlacementIndex` keeps candidates bucketed by GPU model, and each
bucket split again by region and by free-GPU class, every list sorted by price,
so a decision over 100k nodes reads, cheapest first, only the lists that can
fit the request (its model or all models, its region or all regions, classes
with enough free GPUs), each only up to the first price above the best fit;
:func:`choose` is the plain scan it must always agree with. The live index, kept consistent
with the DB, is :mod:`gpuportal.hub.market.capacity`.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass, field

from gpuportal.provider.money import format_credits


def normalize_model(name: str) -> str:
    """Model names compare without case, spaces or underscores (``A100 80GB`` = ``a100-80gb``)."""
    return "-".join(name.replace("_", " ").replace("-", " ").split()).upper()


@dataclass(frozen=True)
class Candidate:
    """One node's GPUs of one model, as placement sees them."""

    node_pk: int
    node_id: str
    model: str
    vram_mib: int
    region: str
    price: int  # micro-credits per GPU-hour
    reliability: float
    total_gpus: int
    free_indices: tuple[int, ...]
    demo: bool = False
    provider: str = ""
    cluster_id: int = 0
    jobs_url: str = ""
    schedulable: bool = True  # listed, online, verified, not blocked (decided by the caller)
    #: The node hosts one customer at a time (it cannot give each an OS account).
    exclusive: bool = False

    @property
    def free_gpus(self) -> int:
        return len(self.free_indices)


@dataclass(frozen=True)
class Request:
    """What a reservation asks for. ``min_vram_mib`` 0 and None filters mean "any"."""

    gpu_count: int
    gpu_model: str | None = None
    min_vram_mib: int = 0
    region: str | None = None
    max_price: int | None = None
    min_reliability: float = 0.0

    def matches(
        self,
        c: Candidate,
        *,
        ignore_region: bool = False,
        ignore_price: bool = False,
        ignore_count: bool = False,
    ) -> bool:
        """Does ``c`` satisfy every filter (except those ignored) and have the GPUs free?"""
        return (
            c.schedulable
            and (ignore_count or c.free_gpus >= self.gpu_count)
            and (
                self.gpu_model is None
                or normalize_model(c.model) == normalize_model(self.gpu_model)
            )
            and c.vram_mib >= self.min_vram_mib
            and (ignore_region or self.region is None or c.region == self.region)
            and (ignore_price or self.max_price is None or c.price <= self.max_price)
            and c.reliability >= self.min_reliability
        )


def rank(request: Request, c: Candidate) -> tuple[int, float, int, str]:
    """Sort key: cheapest, then most reliable, then least leftover, then node id."""
    return (c.price, -c.reliability, c.free_gpus - request.gpu_count, c.node_id)


def choose(request: Request, candidates: Iterable[Candidate]) -> Candidate | None:
    """The best fitting candidate, or None. A plain scan: the reference behaviour."""
    best: Candidate | None = None
    best_key: tuple[int, float, int, str] | None = None
    for c in candidates:
        if not request.matches(c):
            continue
        key = rank(request, c)
        if best_key is None or key < best_key:
            best, best_key = c, key
    return best


def best(request: Request, candidates: Iterable[Candidate], k: int) -> list[Candidate]:
    """The ``k`` best fitting candidates, best first (``best(r, cs, 1)`` is ``choose``)."""
    fits = [c for c in candidates if request.matches(c)]
    return sorted(fits, key=lambda c: rank(request, c))[: max(1, k)]


def pick_indices(c: Candidate, count: int) -> list[int]:
    """Which GPUs of the chosen node to hold: the lowest free indices."""
    return sorted(c.free_indices)[:count]


def explain_no_fit(request: Request, candidates: Iterable[Candidate]) -> str:
    """One sentence for a customer whose request fits nowhere, with the nearest alternative.

    E.g. ``no A100-80GB free in eu-west under 2.00/h; 3 free in us-east``.
    """
    what = request.gpu_model or "GPU"
    count = f"{request.gpu_count} " if request.gpu_count > 1 else ""
    where = f" in {request.region}" if request.region else ""
    under = f" under {format_credits(request.max_price)}/h" if request.max_price is not None else ""
    sentence = f"no {count}{what} free{where}{under}"
    pool = [c for c in candidates if c.schedulable]
    # The nearest miss: same GPU elsewhere or pricier, so the customer can adjust.
    elsewhere: dict[str, int] = {}
    pricier: list[int] = []
    for c in pool:
        if (
            request.matches(c, ignore_region=True)
            and request.region is not None
            and c.region != request.region
        ):
            elsewhere[c.region] = elsewhere.get(c.region, 0) + c.free_gpus
        elif request.matches(c, ignore_price=True) and request.max_price is not None:
            pricier.append(c.price)
    if elsewhere:
        region, free = max(elsewhere.items(), key=lambda kv: (kv[1], kv[0]))
        return f"{sentence}; {free} free in {region}"
    if pricier:
        return f"{sentence}; some free from {format_credits(min(pricier))}/h"
    if request.gpu_count > 1:
        best = max((c.free_gpus for c in pool if request.matches(c, ignore_count=True)), default=0)
        if best:
            return f"{sentence}; at most {best} free on one node"
    return sentence


def _order(c: Candidate) -> tuple[int, float, str, str]:
    """Bucket order: price first (``choose`` stops at the first dearer one), then a
    unique tail so one candidate can be found again by bisection."""
    return (c.price, -c.reliability, c.node_id, c.model)


#: Free-GPU classes: a candidate with ``n`` free GPUs is in class ``min(n, TOP_CLASS)``.
TOP_CLASS = 8

SubKey = tuple[str, int]  # (region, free-GPU class)


def free_class(c: Candidate) -> int:
    return min(c.free_gpus, TOP_CLASS)


def _remove(bucket: list[Candidate], c: Candidate) -> None:
    at = bisect_left(bucket, _order(c), key=_order)
    while bucket[at] is not c:
        at += 1
    del bucket[at]


@dataclass
class PlacementIndex:
    """Schedulable candidates by normalised GPU model, then by (region, free-GPU class).

    Each list is sorted by price. Not thread-safe by itself: the portal's
    :class:`~gpuportal.hub.market.capacity.CapacityIndex` guards it and keeps it
    consistent with the DB. Replacing one node costs a bisection and a list
    insert per list it is in, so the index follows every reservation without
    being rebuilt.
    """

    buckets: dict[str, list[Candidate]] = field(default_factory=dict)
    subs: dict[str, dict[SubKey, list[Candidate]]] = field(default_factory=dict)
    #: Every model's candidates by (region, free-GPU class): requests with no model
    #: filter read these few lists instead of every model's.
    anys: dict[SubKey, list[Candidate]] = field(default_factory=dict)
    by_node: dict[int, list[Candidate]] = field(default_factory=dict)

    @classmethod
    def build(cls, candidates: Iterable[Candidate]) -> PlacementIndex:
        index = cls()
        for c in candidates:
            if c.schedulable:
                name = normalize_model(c.model)
                index.buckets.setdefault(name, []).append(c)
                index.subs.setdefault(name, {}).setdefault((c.region, free_class(c)), []).append(c)
                index.anys.setdefault((c.region, free_class(c)), []).append(c)
                index.by_node.setdefault(c.node_pk, []).append(c)
        for bucket in index.buckets.values():
            bucket.sort(key=_order)
        for subs in (*index.subs.values(), index.anys):
            for sub in subs.values():
                sub.sort(key=_order)
        return index

    def add(self, c: Candidate) -> None:
        """Insert one candidate (ignored unless schedulable)."""
        if not c.schedulable:
            return
        name = normalize_model(c.model)
        insort(self.buckets.setdefault(name, []), c, key=_order)
        sub = self.subs.setdefault(name, {}).setdefault((c.region, free_class(c)), [])
        insort(sub, c, key=_order)
        insort(self.anys.setdefault((c.region, free_class(c)), []), c, key=_order)
        self.by_node.setdefault(c.node_pk, []).append(c)

    def remove_node(self, node_pk: int) -> None:
        """Drop every candidate of one node (no-op when it has none)."""
        for c in self.by_node.pop(node_pk, []):
            name = normalize_model(c.model)
            bucket = self.buckets[name]
            _remove(bucket, c)
            if not bucket:
                del self.buckets[name]
            subs = self.subs[name]
            key = (c.region, free_class(c))
            _remove(subs[key], c)
            if not subs[key]:
                del subs[key]
            if not subs:
                del self.subs[name]
            _remove(self.anys[key], c)
            if not self.anys[key]:
                del self.anys[key]

    def replace(self, node_pks: Iterable[int], candidates: Iterable[Candidate]) -> None:
        """The nodes ``node_pks`` now have exactly ``candidates`` (schedulable ones kept)."""
        for pk in set(node_pks):
            self.remove_node(pk)
        for c in candidates:
            self.add(c)

    def candidates(self, gpu_model: str | None = None) -> list[Candidate]:
        """Every indexed candidate, or those of one GPU model."""
        if gpu_model is not None:
            return list(self.buckets.get(normalize_model(gpu_model), []))
        return [c for bucket in self.buckets.values() for c in bucket]

    def __len__(self) -> int:
        return len(self.by_node)

    def _lists(self, request: Request) -> list[list[Candidate]]:
        """The sorted lists that can hold a fit: model, region, enough free GPUs."""
        if request.gpu_model is not None:
            found = self.subs.get(normalize_model(request.gpu_model))
            models = [found] if found is not None else []
        else:
            models = [self.anys]
        least = min(request.gpu_count, TOP_CLASS)
        return [
            sub
            for subs in models
            for (region, klass), sub in subs.items()
            if klass >= least and (request.region is None or region == request.region)
        ]

    def choose(self, request: Request) -> Candidate | None:
        """Same answer as :func:`choose`, looking only at the lists that can fit.

        The lists are visited cheapest head first, and each is walked in
        (price, reliability) order only until a candidate dearer or, at the same
        price, less reliable than the best fit found so far (or above the
        request's maximum price): nothing better can follow in it. A request with no
        model filter reads the lists of every model together (one per region and
        class), and the walk ends at the first list whose cheapest is dearer.
        """
        found = self.best(request, 1)
        return found[0] if found else None

    def best(self, request: Request, k: int) -> list[Candidate]:
        """The ``k`` best fits, best first (as :func:`best`), pruned as :meth:`choose`
        is, against the k-th best found so far."""
        k = max(1, k)
        lists = sorted(self._lists(request), key=lambda sub: _order(sub[0]))
        top: list[tuple[tuple[int, float, int, str], Candidate]] = []
        # Past this (price, -reliability) nothing can rank among the k best: every
        # later candidate of a list is at least as dear and no more reliable.
        bound: tuple[float, float] = (
            float("inf") if request.max_price is None else request.max_price,
            float("inf"),
        )
        for sub in lists:
            if (sub[0].price, -sub[0].reliability) > bound:
                break  # the lists are in head order: no later one starts better
            for c in sub:
                if (c.price, -c.reliability) > bound:
                    break
                if not request.matches(c):
                    continue
                insort(top, (rank(request, c), c), key=lambda entry: entry[0])
                if len(top) > k:
                    top.pop()
                if len(top) == k:
                    worst = top[-1][1]
                    bound = (worst.price, -worst.reliability)
        return [c for _, c in top]
