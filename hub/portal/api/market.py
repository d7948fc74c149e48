"""Marketplace API v1: offers and reservations, mounted under the service prefix.

Who may do what:

- a hub user reserves only for themselves and sees, activates and releases
  only their own reservations (admins may see and release any);
- a hub service named in ``GPUPORTAL_TRUSTED_SERVICES`` (the spawner) acts on
  behalf of any user, because it starts servers for them.

Refusals carry a sentence in the standard error shape; "nothing fits" is a 409
with the code ``no_capacity`` and the nearest alternative.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ... import timeutil
from ...billing import reservation_billing
from ...market import marketplace
from ...market.marketplace import (
    OFFERS_CACHE_KEY,
    OFFERS_CACHE_SECONDS,
    SUMMARY_CACHE_KEY,
    MarketError,
    rules_of,
)
from ...market.placement import Candidate
from ...market.placement import Request as PlacementRequest
from ..auth import CurrentCaller, PortalDep, PortalUser
from ..context import Portal
from ..hubapi import HubUnavailable
from .plumbing import (
    LAUNCH_REFUSAL_CODES,
    ApiError,
    api_error,
    check_owner,
    check_trusted,
    in_db,
    small_body,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["marketplace"])

_NAME = r"^[^\s/\\?#%]*$"


class Offer(BaseModel):
    gpu_model: str
    vram_gb: int
    region: str
    price_per_gpu_hour: int = Field(description="Micro-credits per GPU-hour.")
    price_per_gpu_hour_display: str = Field(description="Credits per GPU-hour, e.g. 1.20.")
    free_gpus: int
    largest_free_gpus: int = Field(
        0, description="The most GPUs free on one node: the largest count one server can get."
    )
    total_gpus: int
    reliability: float
    demo: bool
    provider: str
    exclusive: bool = Field(
        False,
        description="The node hosts one customer at a time: it cannot run each customer "
        "under an OS account of their own.",
    )


class OfferSummary(BaseModel):
    gpu_model: str
    region: str
    vram_gb: int
    free_gpus: int
    total_gpus: int
    price_min: int
    price_median: int
    price_max: int
    reliability_max: float
    demo: bool


class ReservationCreate(BaseModel):
    """A request for GPUs on one node. Prices are micro-credits per GPU-hour."""

    model_config = ConfigDict(extra="forbid")

    gpu_model: str | None = Field(None, min_length=1, max_length=64)
    gpu_count: int = Field(ge=1, le=1024)
    min_vram_gb: int | None = Field(None, ge=0, le=100_000)
    region: str | None = Field(None, min_length=1, max_length=64)
    max_price: int | None = Field(None, ge=1)
    min_reliability: float | None = Field(None, ge=0, le=1)
    user: str = Field(min_length=1, max_length=255, pattern=_NAME)
    server_name: str = Field("", max_length=255, pattern=_NAME)
    team: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Bill this server to this team (the user must be a member); "
        "default: the user's own wallet.",
    )


class ReservationPublic(BaseModel):
    """A reservation as its customer sees it: no internal URL, no cluster detail.

    The Jobs API URL, the cluster id and the node's Ray resource are for the
    spawner only (``ReservationTrusted``); a customer who had them could reach
    the provider's Ray cluster directly.
    """

    id: str
    status: str
    user: str
    server_name: str
    node_id: str
    gpu_indices: list[int]
    gpu_count: int
    gpu_model: str
    price_per_gpu_hour: int
    price_per_gpu_hour_display: str
    platform_fee_bps: int
    region: str
    demo: bool
    created_at: datetime
    expires_at: datetime | None
    activated_at: datetime | None
    released_at: datetime | None
    failed_at: datetime | None = Field(
        None, description="When the spawner reported that the server failed to start."
    )
    failure_reason: str | None = None


class ReservationTrusted(ReservationPublic):
    """What a trusted hub service (the spawner) gets: where to submit the server's job,
    and the cluster's Ray token to submit it with (every cluster runs with Ray's
    token authentication)."""

    cluster_id: int
    jobs_url: str
    node_resource: str
    ray_token: str | None = None


def reservation_body(caller: PortalUser, answer: dict[str, Any]) -> dict[str, Any]:
    """The JSON for ``answer`` shaped for ``caller``: trusted services get the cluster
    detail, everyone else (customers, admins) the public model."""
    model = ReservationTrusted if caller.is_service else ReservationPublic
    return model(**answer).model_dump(mode="json")


class FailedStart(BaseModel):
    """Why the server of a reservation did not start (for the logs and the provider)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500)


async def _cached(
    portal: Portal,
    key: str,
    from_index: Callable[[list[Candidate]], list[dict[str, Any]]],
    from_sql: Callable[[Session], list[dict[str, Any]]],
) -> Response:
    """The JSON bytes of ``from_index(candidates)``, served from the cache until it
    expires or capacity changes.

    The answer is built from this process's placement index (no SQL, unless a
    held reservation has expired and must give its GPUs back first); while the
    index is not ready, ``from_sql(session)`` reads the DB instead. The cache
    holds the response bytes, returned as they are (no parsing, no validation
    on a hit). An entry counts only if it was computed after this process last
    saw a capacity change (``portal.capacity.changed_at``), so a reservation
    shows in the very next answer; other processes' changes delete the entry
    (see ``Portal``) or outlive it by at most the TTL. A cache that fails is
    skipped, never fatal.
    """
    try:
        raw = await portal.cache.get(key)
    except (RedisError, OSError) as exc:
        log.warning("offers cache unavailable: %s", exc)
        raw = None
    if raw:
        at, _, content = raw.partition("\n")
        try:
            fresh = float(at) > portal.capacity.changed_at
        except ValueError:
            fresh = False
        if fresh:
            return Response(content, media_type="application/json")
    started = time.time()
    index = portal.capacity

    def expire(session: Session) -> None:
        now = timeutil.utcnow()
        if marketplace.holds_expired(session, now):
            marketplace.expire_held(session, now)

    if index.ready:
        await in_db(portal, expire)  # the index follows the commit before this returns
    if index.ready:
        data = from_index(index.candidates())
    else:
        data = await in_db(portal, from_sql)
    content = json.dumps(data, separators=(",", ":"))
    try:
        await portal.cache.set(key, f"{started!r}\n{content}", ttl=OFFERS_CACHE_SECONDS)
    except (RedisError, OSError) as exc:
        log.warning("offers cache unavailable: %s", exc)
    return Response(content, media_type="application/json")


@router.get("/api/v1/offers", response_model=list[Offer])
async def list_offers(caller: CurrentCaller, portal: PortalDep) -> Any:
    """Verified, schedulable GPUs per model, region, provider and price: what the spawn
    form shows. Prices are integer micro-credits per GPU-hour. Built from the
    placement index in memory, cached for a few seconds, and invalidated by every
    capacity change."""
    rules = rules_of(portal.settings)

    def load(session: Session) -> list[dict[str, Any]]:
        return marketplace.offers(session, rules)

    return await _cached(portal, OFFERS_CACHE_KEY, marketplace.offers_of, load)


@router.get("/api/v1/offers/summary", response_model=list[OfferSummary])
async def offers_summary(caller: CurrentCaller, portal: PortalDep) -> Any:
    """Availability per GPU model and region with price min/median/max (built and
    cached like the offers)."""
    rules = rules_of(portal.settings)

    def load(session: Session) -> list[dict[str, Any]]:
        return marketplace.summary(session, rules)

    return await _cached(portal, SUMMARY_CACHE_KEY, marketplace.summary_of, load)


async def _account_for(portal: Portal, caller: PortalUser, user: str) -> int:
    """The account the reservation is for; a user only for themselves."""
    check_owner(
        caller,
        user,
        f"You may reserve GPUs only for yourself ({caller.name}), not for {user!r}.",
        admins=False,
    )
    if not caller.is_service:
        return caller.account_id

    def lookup(session: Session) -> int | None:
        return marketplace.account_id_for(session, user)

    account_id = await in_db(portal, lookup)
    if account_id is not None:
        return account_id
    try:
        model = await portal.hub.user(user)
    except HubUnavailable:
        raise ApiError(503, "The hub is not answering; try again in a moment.") from None
    if model is None:
        raise ApiError(422, f"There is no hub user named {user!r}.")

    def create(session: Session) -> int:
        return marketplace.ensure_account(session, model)

    return await in_db(portal, create)


@router.post(
    "/api/v1/reservations",
    response_model=ReservationPublic,
    status_code=201,
    dependencies=[Depends(small_body)],
    responses={
        200: {"description": "This server already holds this reservation."},
        409: {"description": "No capacity fits (code no_capacity)."},
    },
)
async def create_reservation(
    body: ReservationCreate, caller: CurrentCaller, portal: PortalDep
) -> Any:
    """Hold GPUs on one verified node for a user's server, at a locked price.

    The answer names the node, the GPU indices and when the hold expires
    unless activated; only a trusted service also gets the node's Ray resource
    and its cluster's Jobs API. Retrying for the same
    server returns its live reservation (200) instead of holding more GPUs.
    """
    account_id = await _account_for(portal, caller, body.user)
    request = PlacementRequest(
        gpu_count=body.gpu_count,
        gpu_model=body.gpu_model,
        min_vram_mib=(body.min_vram_gb or 0) * 1024,
        region=body.region,
        max_price=body.max_price,
        min_reliability=body.min_reliability or 0.0,
    )
    rules = rules_of(portal.settings)
    try:
        answer, created = await run_in_threadpool(
            marketplace.reserve,
            portal.sessions,
            request,
            account_id=account_id,
            user_name=body.user,
            server_name=body.server_name,
            rules=rules,
            index=portal.capacity,
        )
    except MarketError as exc:
        log.info(
            "reservation refused for user %s server %r: %s",
            body.user,
            body.server_name,
            exc.message,
        )
        raise api_error(exc) from None
    if not created:
        return JSONResponse(reservation_body(caller, answer), status_code=200)
    # The GPUs are held from here on. The user must afford the minimum billable
    # period at the locked price (and stay within quotas and the reservation
    # limit); any failure from here to the answer, a refusal or a bug, gives
    # the GPUs straight back.
    rid = str(answer["id"])
    try:
        await in_db(
            portal, partial(_authorize_reservation, portal, rid, body.team), LAUNCH_REFUSAL_CODES
        )
        return JSONResponse(reservation_body(caller, answer), status_code=201)
    except BaseException as exc:
        await _release_after_failure(portal, rid, body.user, exc)
        if isinstance(exc, ApiError):
            log.info("reservation refused for user %s: %s", body.user, exc.detail)
        raise


@router.get("/api/v1/reservations", response_model=list[ReservationPublic])
async def list_reservations(
    caller: CurrentCaller,
    portal: PortalDep,
    user: Annotated[str | None, Query(max_length=255)] = None,
) -> Any:
    """Live (held or active) reservations: your own, or a user's for services and admins."""
    name = user or caller.name
    check_owner(caller, name, "You may list only your own reservations.")

    def load(session: Session) -> list[dict[str, Any]]:
        account_id = marketplace.account_id_for(session, name)
        if account_id is None:
            return []
        return [
            reservation_body(caller, marketplace.public(r))
            for r in marketplace.live_reservations(session, account_id)
        ]

    return JSONResponse(await in_db(portal, load))


def _authorize_reservation(
    portal: Portal, reservation_id: str, team: str | None, session: Session
) -> None:
    res = marketplace.get(session, reservation_id)
    reservation_billing.bill_to_team(session, res, team)
    reservation_billing.authorize_reservation(session, portal.settings, res, timeutil.utcnow())


async def _release_after_failure(
    portal: Portal, reservation_id: str, user: str, exc: BaseException
) -> None:
    """Give back the GPUs of a reservation whose creation failed after they were held.

    Runs even when the request was cancelled; if the release itself fails, the
    hold still expires after ``reservation_hold_seconds``.
    """
    if not isinstance(exc, ApiError):
        log.warning(
            "reservation %s for user %s failed after its GPUs were held (%s); releasing it",
            reservation_id,
            user,
            type(exc).__name__,
        )

    def release(session: Session) -> None:
        marketplace.release(session, reservation_id)

    try:
        await asyncio.shield(in_db(portal, release))
    except Exception:
        log.exception("could not release reservation %s; its hold will expire", reservation_id)


async def _act(portal: Portal, caller: PortalUser, reservation_id: str, action: str) -> Any:
    def run(session: Session) -> dict[str, Any]:
        res = marketplace.get(session, reservation_id)
        check_owner(
            caller,
            res.user_name,
            "This reservation belongs to another user.",
            admins=action != "activate",
        )
        # The bill follows the reservation in the same transaction: the
        # server is ready when it is activated, gone when it is released.
        if action == "activate":
            answer = marketplace.activate(session, reservation_id)
            reservation_billing.open_for(session, portal.settings, res, timeutil.utcnow())
            return answer
        if action == "release":
            answer = marketplace.release(session, reservation_id)
            reservation_billing.close_for(
                session, portal.settings, reservation_id, timeutil.utcnow()
            )
            return answer
        return marketplace.public(res)

    return JSONResponse(reservation_body(caller, await in_db(portal, run, LAUNCH_REFUSAL_CODES)))


@router.get("/api/v1/reservations/{reservation_id}", response_model=ReservationPublic)
async def get_reservation(reservation_id: str, caller: CurrentCaller, portal: PortalDep) -> Any:
    """One reservation (its owner, an admin, or a trusted service)."""
    return await _act(portal, caller, reservation_id, "get")


@router.post("/api/v1/reservations/{reservation_id}/activate", response_model=ReservationPublic)
async def activate_reservation(
    reservation_id: str, caller: CurrentCaller, portal: PortalDep
) -> Any:
    """Held → active: the server is starting on the node. Idempotent; an expired or
    released reservation answers 409."""
    return await _act(portal, caller, reservation_id, "activate")


@router.delete("/api/v1/reservations/{reservation_id}", response_model=ReservationPublic)
async def release_reservation(reservation_id: str, caller: CurrentCaller, portal: PortalDep) -> Any:
    """Give the GPUs back. Idempotent: releasing a released reservation is fine."""
    return await _act(portal, caller, reservation_id, "release")


@router.post(
    "/api/v1/reservations/{reservation_id}/failed",
    response_model=ReservationPublic,
    dependencies=[Depends(small_body)],
)
async def failed_start(
    reservation_id: str, body: FailedStart, caller: CurrentCaller, portal: PortalDep
) -> Any:
    """The server of this reservation failed to start on its node (trusted services and
    admins only): the failure lowers the node's reliability score and the GPUs
    are released. Idempotent: reporting the same reservation again changes
    nothing and answers the same."""
    check_trusted(
        caller, "Only the spawner (a trusted hub service) or an admin may report a failed start."
    )
    start = portal.settings.reliability_start

    def run(session: Session) -> dict[str, Any]:
        return marketplace.record_failed_start(session, reservation_id, body.reason, start)

    return JSONResponse(reservation_body(caller, await in_db(portal, run)))
