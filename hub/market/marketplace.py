"""Marketplace operations on the portal DB: capacity, offers and reservations.

The HTTP layer (``portal.api.market``) authenticates and validates; this
module decides and writes. Its one hard promise is that capacity is never
double-booked: a reservation inserts one ``gpu_allocations`` row per GPU, whose
primary key is the GPU, inside the same transaction that chose the GPUs. Two
racing requests for the last GPU cannot both commit; the loser retries against
fresh data and then reports no capacity.

On SQLite the first statement of a reservation is a write (releasing expired
holds), which takes SQLite's single write lock at once, so reservations run one
after another there; on PostgreSQL they run concurrently and the unique key
decides.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.provider.money import format_credits

from .. import timeutil
from ..db import accounts, transaction
from ..db.marketplace_models import (
    LIVE_STATUSES,
    Gpu,
    GpuAllocation,
    Node,
    Reservation,
)
from ..db.models import Account
from . import capacity
from .capacity import CapacityIndex, Rules, load_candidates
from .nodes import score, uptime
from .placement import Candidate, Request, best, explain_no_fit, normalize_model
from .placement import pick_indices as _pick

if TYPE_CHECKING:
    from ..settings import Settings


log = logging.getLogger(__name__)

#: How often a reservation is retried after losing a race for the same GPUs.
RESERVE_ATTEMPTS = 8
#: Most best fits a retry after lost races chooses among (see _place).
MAX_SPREAD = 16
#: Longest wait (seconds, times the attempt) after a lost reservation race.
RACE_BACKOFF_SECONDS = 0.005
_RNG = secrets.SystemRandom()
#: Cache keys and lifetime (seconds) of ``GET /offers`` and ``/offers/summary``; a
#: capacity change invalidates them sooner (see ``portal.api.market._cached``).
OFFERS_CACHE_KEY = "marketplace:offers"
SUMMARY_CACHE_KEY = "marketplace:offers-summary"
OFFERS_CACHE_SECONDS = 5.0

#: VRAM of GPU models whose name does not say it, for demo GPUs (MiB).
KNOWN_VRAM_MIB = {
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "H100-80GB": 81920,
    "H100": 81920,
    "H200": 143360,
    "L4": 23034,
    "L40S": 46068,
    "A10G": 23028,
    "T4": 15360,
    "RTX-4090": 24564,
    "RTX-3090": 24576,
    "DEMO-GPU": 16384,
}
_GB = re.compile(r"(\d+)\s*GB", re.IGNORECASE)


class MarketError(Exception):
    """A refusal with a sentence for the caller; ``status`` is the HTTP status."""

    status = 400
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoCapacity(MarketError):
    status = 409
    code = "no_capacity"


class Invalid(MarketError):
    status = 422


class NotFound(MarketError):
    status = 404


class Conflict(MarketError):
    status = 409


def vram_for(model: str) -> int:
    """VRAM in MiB for a (demo) model name: known table, else ``NNGB`` in the name, else 0."""
    known = KNOWN_VRAM_MIB.get(normalize_model(model))
    if known is not None:
        return known
    match = _GB.search(model)
    return int(match.group(1)) * 1024 if match else 0


# --- capacity ---------------------------------------------------------------------


def holds_expired(session: Session, now: datetime) -> bool:
    """Is any held reservation past its expiry (a read: whether :func:`expire_held`
    has anything to do)?"""
    return (
        session.scalar(
            select(Reservation.id)
            .where(Reservation.status == "held", Reservation.expires_at < now)
            .limit(1)
        )
        is not None
    )


def expire_held(session: Session, now: datetime) -> int:
    """Turn held reservations past their expiry into ``expired`` and free their GPUs.

    Runs first in every reservation (see the module docstring for why a write
    comes first) and from the portal's background loop.
    """
    stale = select(Reservation.id).where(Reservation.status == "held", Reservation.expires_at < now)
    session.execute(delete(GpuAllocation).where(GpuAllocation.reservation_id.in_(stale)))
    # Read which nodes get GPUs back only after the write above took the lock.
    capacity.touch(
        session,
        session.scalars(
            select(Reservation.node_id)
            .where(Reservation.status == "held", Reservation.expires_at < now)
            .distinct()
        ),
    )
    result = session.execute(
        update(Reservation)
        .where(Reservation.status == "held", Reservation.expires_at < now)
        .values(status="expired", released_at=now)
        .execution_options(synchronize_session=False)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.info("expired %d held reservation(s)", count)
    return count


def rules_of(settings: Settings) -> Rules:
    """The marketplace rules a portal's settings define."""
    return Rules(
        delist_below=settings.reliability_delist,
        hold_seconds=settings.reservation_hold_seconds,
        platform_fee_bps=settings.platform_fee_bps,
    )


def offers(session: Session, rules: Rules) -> list[dict[str, Any]]:
    """Verified, schedulable capacity per (GPU model, region, provider, price, demo),
    read from SQL: the reference the index's answer (:func:`offers_of`) must equal."""
    expire_held(session, timeutil.utcnow())
    return offers_of(load_candidates(session, rules))


def offers_of(candidates: Iterable[Candidate]) -> list[dict[str, Any]]:
    """The offers of some schedulable candidates (pure: the portal passes its
    in-memory index's, so ``GET /offers`` reads no SQL)."""
    rows: dict[tuple[str, str, str, int, bool, bool], dict[str, Any]] = {}
    for c in candidates:
        key = (c.model, c.region, c.provider, c.price, c.demo, c.exclusive)
        offer = rows.setdefault(
            key,
            {
                "gpu_model": c.model,
                "vram_gb": c.vram_mib // 1024,
                "region": c.region,
                "price_per_gpu_hour": c.price,
                "price_per_gpu_hour_display": format_credits(c.price),
                "free_gpus": 0,
                "largest_free_gpus": 0,
                "total_gpus": 0,
                "reliability": 0.0,
                "demo": c.demo,
                "provider": c.provider,
                "exclusive": c.exclusive,
            },
        )
        offer["free_gpus"] += c.free_gpus
        offer["largest_free_gpus"] = max(offer["largest_free_gpus"], c.free_gpus)
        offer["total_gpus"] += c.total_gpus
        offer["vram_gb"] = min(offer["vram_gb"], c.vram_mib // 1024)
        offer["reliability"] = round(max(offer["reliability"], c.reliability), 3)
    return sorted(
        rows.values(),
        key=lambda o: (
            o["gpu_model"],
            o["region"],
            o["price_per_gpu_hour"],
            o["provider"],
            o["demo"],
            o["exclusive"],
        ),
    )


def summary(session: Session, rules: Rules) -> list[dict[str, Any]]:
    """Availability per GPU model and region: free/total and price min/median/max,
    read from SQL (the reference of :func:`summary_of`)."""
    expire_held(session, timeutil.utcnow())
    return summary_of(load_candidates(session, rules))


def summary_of(candidates: Iterable[Candidate]) -> list[dict[str, Any]]:
    """The summary of some schedulable candidates (pure, like :func:`offers_of`)."""
    by: dict[tuple[str, str], list[Candidate]] = {}
    for c in candidates:
        by.setdefault((c.model, c.region), []).append(c)
    out = []
    for (model, region), cands in sorted(by.items()):
        prices = sorted(c.price for c in cands for _ in range(c.total_gpus))
        median = (
            prices[len(prices) // 2]
            if len(prices) % 2
            else (prices[len(prices) // 2 - 1] + prices[len(prices) // 2]) // 2
        )
        out.append(
            {
                "gpu_model": model,
                "region": region,
                "vram_gb": min(c.vram_mib for c in cands) // 1024,
                "free_gpus": sum(c.free_gpus for c in cands),
                "total_gpus": sum(c.total_gpus for c in cands),
                "price_min": prices[0],
                "price_median": median,
                "price_max": prices[-1],
                "reliability_max": round(max(c.reliability for c in cands), 3),
                "demo": all(c.demo for c in cands),
            }
        )
    return out


# --- reservations -----------------------------------------------------------------


def public(res: Reservation, node: Node | None = None) -> dict[str, Any]:
    """The API shape of a reservation (the contract the spawner relies on)."""
    node = node or res.node
    cluster = node.cluster
    return {
        "id": res.id,
        "status": res.status,
        "user": res.user_name,
        "server_name": res.server_name,
        "node_id": node.node_id,
        "cluster_id": cluster.id,
        "jobs_url": cluster.jobs_url,
        "node_resource": node.resource,
        "gpu_indices": list(res.gpu_indices),
        "gpu_count": res.gpu_count,
        "gpu_model": res.gpu_model,
        "price_per_gpu_hour": res.price_per_gpu_hour,
        "price_per_gpu_hour_display": format_credits(res.price_per_gpu_hour),
        "platform_fee_bps": res.platform_fee_bps,
        "region": cluster.provider.region,
        "demo": node.demo,
        "created_at": res.created_at,
        "expires_at": res.expires_at,
        "activated_at": res.activated_at,
        "released_at": res.released_at,
        "failed_at": res.failed_at,
        "failure_reason": res.failure_reason,
        # For trusted callers only: response models for customers leave it out.
        "ray_token": cluster.ray_token,
    }


def _live_for_server(session: Session, account_id: int, server_name: str) -> Reservation | None:
    return session.scalar(
        select(Reservation).where(
            Reservation.account_id == account_id,
            Reservation.server_name == server_name,
            Reservation.status.in_(LIVE_STATUSES),
        )
    )


def _validate(session: Session, request: Request, candidates: list[Candidate]) -> None:
    """Refuse requests that can never fit (unknown model, more GPUs than any node)."""
    if request.gpu_model is not None:
        known = sorted(set(session.scalars(select(Gpu.model).distinct())))
        if not any(normalize_model(m) == normalize_model(request.gpu_model) for m in known):
            listing = ", ".join(known) if known else "none yet"
            raise Invalid(
                f"unknown GPU model {request.gpu_model!r}; the marketplace has: {listing}."
            )
    largest = max((c.total_gpus for c in candidates), default=0)
    if largest and request.gpu_count > largest:
        raise Invalid(
            f"gpu_count {request.gpu_count} is more than the largest node offers "
            f"({largest} GPUs); ask for at most {largest}."
        )


class _StalePick(Exception):
    """The index picked a node whose fresh row no longer fits: refresh it, try again."""

    def __init__(self, node_pk: int) -> None:
        super().__init__(node_pk)
        self.node_pk = node_pk


def _place(
    session: Session,
    request: Request,
    rules: Rules,
    index: CapacityIndex | None,
    spread: int = 1,
) -> Candidate:
    """The node to reserve on, as fresh as the transaction sees it, or a refusal.

    ``spread`` > 1 (a retry after lost races): one of that many best fits, at
    random, so customers racing for the same cheapest node spread over the next
    ones instead of losing to each other in turn.

    The index decides in microseconds; its pick is then read again from SQL
    inside this transaction, and refused (:class:`_StalePick`) unless it still
    fits with the same price and reliability, so the locked price is always
    the DB's. When the index finds nothing, a SQL scan confirms it: capacity the
    index has not seen yet is still placed, and a refusal is always the DB's.
    """
    if index is not None and index.ready:
        picks = index.best(request, spread)
        pick = _RNG.choice(picks) if picks else None
        if pick is not None:
            fresh = next(
                (
                    c
                    for c in load_candidates(
                        session, rules, schedulable_only=False, node_pks=[pick.node_pk]
                    )
                    if c.model == pick.model
                ),
                None,
            )
            if (
                fresh is None
                or not request.matches(fresh)
                or (fresh.price, fresh.reliability) != (pick.price, pick.reliability)
            ):
                raise _StalePick(pick.node_pk)
            return fresh
    candidates = load_candidates(session, rules, request.gpu_model)
    fits = best(request, candidates, spread)
    chosen = _RNG.choice(fits) if fits else None
    if chosen is None:
        _validate(session, request, candidates)
        everything = candidates if request.gpu_model else load_candidates(session, rules)
        raise NoCapacity(explain_no_fit(request, everything) + ".")
    if index is not None and index.ready:
        log.debug("placement index lacked node %s; the DB scan found it", chosen.node_id)
        capacity.touch(session, [chosen.node_pk])
    return chosen


def _claim_exclusive(session: Session, node_pk: int) -> None:
    """An exclusive node hosts one customer at a time: lock its row, so a racing
    reservation for the same node waits, then make sure nobody holds any of its GPUs."""
    session.execute(select(Node.id).where(Node.id == node_pk).with_for_update())
    taken = session.scalar(
        select(func.count())
        .select_from(GpuAllocation)
        .join(Gpu, Gpu.id == GpuAllocation.gpu_id)
        .where(Gpu.node_id == node_pk)
    )
    if taken:
        raise _StalePick(node_pk)


def reserve(
    sessions: sessionmaker[Session],
    request: Request,
    *,
    account_id: int,
    user_name: str,
    server_name: str,
    rules: Rules,
    index: CapacityIndex | None = None,
) -> tuple[dict[str, Any], bool]:
    """Hold GPUs for ``user_name``'s server. Returns (reservation, created).

    Idempotent per server: a live reservation of the same server is returned
    (``created`` False) when it has the same GPU count, refused otherwise.
    ``index``: the portal's live placement index (see :mod:`.capacity`); without
    it every decision scans SQL.
    """
    spread = 1  # doubled after each lost race: see _place
    for attempt in range(RESERVE_ATTEMPTS):
        stale: int | None = None
        try:
            with transaction(sessions) as session:
                now = timeutil.utcnow()
                expire_held(session, now)
                existing = _live_for_server(session, account_id, server_name)
                if existing is not None:
                    if existing.gpu_count != request.gpu_count:
                        raise Conflict(
                            f"server {server_name or '(default)'!r} of {user_name} already "
                            f"holds reservation {existing.id} with {existing.gpu_count} GPU(s); "
                            "release it first."
                        )
                    return public(existing), False
                chosen = _place(session, request, rules, index, spread)
                stale = chosen.node_pk  # until the allocation rows commit
                if chosen.exclusive:
                    _claim_exclusive(session, chosen.node_pk)
                # A retry (a race lost on this node) takes random free GPUs, so
                # racers that all chose the same node do not all want the same ones.
                indices = (
                    _pick(chosen, request.gpu_count)
                    if attempt == 0
                    else sorted(_RNG.sample(chosen.free_indices, request.gpu_count))
                )
                res = Reservation(
                    id=secrets.token_hex(12),
                    account_id=account_id,
                    node_id=chosen.node_pk,
                    gpu_count=request.gpu_count,
                    gpu_indices=indices,
                    gpu_model=chosen.model,
                    price_per_gpu_hour=chosen.price,
                    platform_fee_bps=rules.platform_fee_bps,
                    user_name=user_name,
                    server_name=server_name,
                    status="held",
                    created_at=now,
                    expires_at=now + timedelta(seconds=rules.hold_seconds),
                )
                session.add(res)
                session.flush()
                gpu_ids = session.scalars(
                    select(Gpu.id).where(Gpu.node_id == chosen.node_pk, Gpu.index.in_(indices))
                ).all()
                session.add_all(
                    GpuAllocation(gpu_id=g, reservation_id=res.id, created_at=now) for g in gpu_ids
                )
                session.flush()
                answer = public(res, session.get(Node, chosen.node_pk))
            log.info(
                "reserved %s: %d x %s on node %s for user %s server %r at %s/h",
                answer["id"],
                request.gpu_count,
                chosen.model,
                chosen.node_id,
                user_name,
                server_name,
                format_credits(chosen.price),
            )
            return answer, True
        except _StalePick as exc:
            stale = exc.node_pk
            log.debug("placement index pick on node %d was stale (attempt %d)", stale, attempt + 1)
            # Most often another reservation took it first, and the others racing for
            # it will find it stale too.
            spread = min(spread * 2, MAX_SPREAD)
        except IntegrityError:
            # Another transaction took these GPUs (or this server's slot) first. A
            # short random wait spreads the losers out before they choose again.
            log.debug("reservation race lost (attempt %d); retrying", attempt + 1)
            time.sleep(_RNG.uniform(0, RACE_BACKOFF_SECONDS * (attempt + 1)))
            spread = min(spread * 2, MAX_SPREAD)
        except OperationalError as exc:
            # SQLite under heavy contention can still report a busy database.
            if "locked" not in str(exc).lower():
                raise
            log.debug("database busy (attempt %d); retrying", attempt + 1)
        if index is not None and stale is not None:
            index.refresh_nodes([stale])  # retry with fresh data
    raise Conflict("the marketplace is busy; try the reservation again in a moment.")


def _locked(session: Session, reservation_id: str) -> Reservation:
    res = session.scalar(
        select(Reservation).where(Reservation.id == reservation_id).with_for_update()
    )
    if res is None:
        raise NotFound(f"no reservation {reservation_id!r}.")
    return res


def get(session: Session, reservation_id: str) -> Reservation:
    res = session.get(Reservation, reservation_id)
    if res is None:
        raise NotFound(f"no reservation {reservation_id!r}.")
    return res


def _free(session: Session, res: Reservation) -> None:
    session.execute(delete(GpuAllocation).where(GpuAllocation.reservation_id == res.id))
    capacity.touch(session, [res.node_id])


def activate(session: Session, reservation_id: str) -> dict[str, Any]:
    """held → active (idempotent: active stays active). Expired or released: Conflict."""
    res = _locked(session, reservation_id)
    now = timeutil.utcnow()
    if res.status == "held" and res.expires_at is not None and res.expires_at < now:
        res.status, res.released_at = "expired", now
        _free(session, res)
        session.flush()
        raise Conflict(
            f"reservation {res.id} expired at {res.expires_at.isoformat()}; reserve again."
        )
    if res.status in ("released", "expired"):
        raise Conflict(f"reservation {res.id} was {res.status}; reserve again.")
    if res.status == "held":
        res.status, res.activated_at, res.expires_at = "active", now, None
        session.flush()
        log.info(
            "activated reservation %s for user %s server %r", res.id, res.user_name, res.server_name
        )
    return public(res)


def release(session: Session, reservation_id: str) -> dict[str, Any]:
    """held/active → released, GPUs freed. Releasing again changes nothing."""
    res = _locked(session, reservation_id)
    if res.status in LIVE_STATUSES:
        res.status, res.released_at = "released", timeutil.utcnow()
        _free(session, res)
        session.flush()
        log.info(
            "released reservation %s for user %s server %r", res.id, res.user_name, res.server_name
        )
    return public(res)


def record_failed_start(
    session: Session, reservation_id: str, reason: str, reliability_start: float
) -> dict[str, Any]:
    """The server of this reservation failed to start on its node: count it against
    the node's reliability and give the GPUs back.

    Idempotent: a reservation's failure counts once, however often it is
    reported, and releasing a released reservation changes nothing. Reported
    only by the control plane (the spawner, an admin): a customer saying so
    must not lower a provider's score.
    """
    res = _locked(session, reservation_id)
    if res.failed_at is not None:
        return public(res)
    now = timeutil.utcnow()
    res.failed_at, res.failure_reason = now, reason.strip()[:500]
    node = session.get(Node, res.node_id, with_for_update=True)
    assert node is not None  # a foreign key
    node.failed_starts += 1
    node.reliability = score(node, uptime(session, node, now), reliability_start)
    if res.status in LIVE_STATUSES:
        res.status, res.released_at = "released", now
        _free(session, res)
    session.flush()
    log.warning(
        "failed start of reservation %s on node %s for user %s server %r: %s "
        "(%d failed starts, reliability %.3f)",
        res.id,
        node.node_id,
        res.user_name,
        res.server_name,
        res.failure_reason,
        node.failed_starts,
        node.reliability,
    )
    return public(res, node)


def account_id_for(session: Session, name: str) -> int | None:
    return session.scalar(select(Account.id).where(Account.hub_name == name))


def ensure_account(session: Session, model: dict[str, Any]) -> int:
    return accounts.upsert_account(session, model).id


def live_reservations(session: Session, account_id: int | None = None) -> Iterable[Reservation]:
    query = select(Reservation).where(Reservation.status.in_(LIVE_STATUSES))
    if account_id is not None:
        query = query.where(Reservation.account_id == account_id)
    return session.scalars(query.order_by(Reservation.created_at))
