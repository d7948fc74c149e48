"""Provider and node API v1: registration, signed node calls, self-service, admin.

Three kinds of caller:

- a provider (hub user in the ``providers`` group, or an admin) registers its
  node, sees its status, sets its price, pauses, resumes and leaves, with its
  hub token;
- a node calls ``/api/v1/nodes/{node_id}/...`` signed with its ed25519 key
  (see ``gpuportal.provider.signing``); anything unsigned, stale, replayed,
  forged or for another node is a 401, and logged;
- an admin lists providers and nodes, blocks and unblocks nodes, delists
  providers.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from gpuportal.provider import signing, workload
from gpuportal.provider.money import format_credits

from ... import egress, timeutil
from ...billing import payouts
from ...db import audit
from ...db.marketplace_models import Cluster, Node, NodeChallenge, Provider
from ...db.models import Account
from ...market import heartbeats as heartbeat_batching
from ...market import nodes
from ...market.marketplace import MarketError
from ...market.providers import (
    GpuClaim,
    node_summary,
    register_node,
    upsert_cluster,
    upsert_provider,
    validate_price,
    validate_wallet,
)
from ...settings import Settings
from .. import warmslots
from ..auth import CurrentUser, PortalDep, PortalUser, require_role
from ..context import Portal
from ..heartbeats import RedisUnavailable
from .plumbing import Admin, AdminReason, ApiError, api_error, in_db, small_body

log = logging.getLogger(__name__)
router = APIRouter(tags=["providers"])

MAX_NODE_BODY = 64 * 1024
#: A verification carries up to 64 GPUs' group fingerprints (about 88 KB each).
MAX_VERIFICATION_BODY = 64 * 90 * 1024 + MAX_NODE_BODY
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class GpuIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, le=63)
    uuid: str = Field(min_length=1, max_length=96)
    model: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    vram_mib: int = Field(ge=0, le=10_000_000)
    cuda_capability: str | None = Field(None, max_length=16)
    pci_bus_id: str | None = Field(None, max_length=32)


class NodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(pattern=_ID)
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    demo: bool = False
    driver_version: str | None = Field(None, max_length=64)
    #: ``user`` (customers under accounts of their own) or ``exclusive`` (one at a time).
    isolation: str = Field("exclusive", pattern="^(user|exclusive)$")
    gpus: list[GpuIn] = Field(min_length=1, max_length=64)


class Registration(BaseModel):
    """What ``gpuportal provider join`` sends. Prices are micro-credits per GPU-hour."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(None, min_length=1, max_length=128)
    region: str = Field(min_length=1, max_length=64, pattern=_ID)
    country: str | None = Field(None, min_length=2, max_length=2)
    payout_wallet: str | None = Field(None, max_length=64)
    price_per_gpu_hour: int = Field(ge=1)
    cluster_name: str = Field("default", pattern=_ID)
    jobs_url: str = Field(min_length=8, max_length=512, pattern=r"^https?://")
    ray_address: str | None = Field(None, max_length=255)
    #: The cluster's Ray token, for the spawner (Jobs API) and the Ray cross-check.
    ray_token: str | None = Field(None, min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")
    node: NodeIn


class ProviderUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    price_per_gpu_hour: int | None = Field(None, ge=1)
    status: str | None = Field(None, pattern="^(listed|paused)$")
    payout_wallet: str | None = Field(None, max_length=64)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gpus: list[dict[str, Any]] = Field(default_factory=list, max_length=64)


class GpuAnswer(BaseModel):
    """One GPU's answer: its NVML UUID and the base64 fingerprints of its chain's groups
    of rows.

    Anything else a node sends (its own timing, its device) is ignored."""

    model_config = ConfigDict(extra="ignore")

    uuid: str = Field(min_length=1, max_length=96)
    rows: str = Field(max_length=4 * (4 * workload.GPU_ROWS // workload.GROUP + 2) // 3 + 4)


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(min_length=1, max_length=64)
    inventory: list[dict[str, Any]] = Field(max_length=64)
    results: list[GpuAnswer] = Field(max_length=64)


def _provider_of(session: Any, user: PortalUser) -> Provider:
    provider = session.scalar(select(Provider).where(Provider.account_id == user.account_id))
    if provider is None:
        raise ApiError(404, "You are not a provider yet: run `gpuportal provider join`.")
    return provider


def _provider_view(session: Any, provider: Provider) -> dict[str, Any]:
    owned = session.scalars(
        select(Node)
        .join(Cluster, Node.cluster_id == Cluster.id)
        .where(Cluster.provider_id == provider.id)
        .order_by(Node.node_id)
    ).all()
    account = session.get(Account, provider.account_id)
    return {
        "id": provider.id,
        "owner": account.hub_name if account else None,
        "display_name": provider.display_name,
        "region": provider.region,
        "country": provider.country,
        "payout_wallet": provider.payout_wallet,
        "price_per_gpu_hour": provider.price_per_gpu_hour,
        "price_per_gpu_hour_display": format_credits(provider.price_per_gpu_hour),
        "status": provider.status,
        "house": provider.house,
        "nodes": [node_summary(n) for n in owned],
    }


# --- provider self-service ------------------------------------------------------------


@router.post("/api/v1/providers/register", status_code=201, dependencies=[Depends(small_body)])
async def register(
    body: Registration,
    portal: PortalDep,
    user: Annotated[PortalUser, require_role("provider", "admin")],
) -> Any:
    """Register (or re-register after a restart) a provider, its cluster and one node.

    The node's GPUs are claims until it answers the challenge in the reply.
    """
    settings: Settings = portal.settings
    rules = nodes.NodeRules.from_settings(settings)
    if signing.node_id_for(body.node.public_key) != body.node.node_id:
        raise ApiError(
            422,
            "node.node_id does not belong to node.public_key; the agent "
            "derives one from the other.",
        )
    validate_or_raise(
        lambda: validate_price(body.price_per_gpu_hour, settings.min_price, settings.max_price)
    )
    if body.payout_wallet:
        validate_or_raise(lambda: validate_wallet(body.payout_wallet or ""))
    # Resolved outside the transaction; only the house provider may ignore the answer.
    url_refusal = await run_in_threadpool(
        egress.refusal, body.jobs_url, egress.parse_networks(settings.provider_networks_allowed)
    )

    def write(session: Any) -> dict[str, Any]:
        provider = upsert_provider(
            session,
            user.account_id,
            display_name=body.display_name or user.name,
            region=body.region,
            price=body.price_per_gpu_hour,
            country=body.country.upper() if body.country else None,
            wallet=body.payout_wallet or None,
        )
        if url_refusal and not provider.house:
            raise ApiError(
                422, f"jobs_url: the portal will not fetch it: {url_refusal}.", "jobs_url_refused"
            )
        cluster = upsert_cluster(
            session,
            provider,
            name=body.cluster_name,
            jobs_url=body.jobs_url,
            ray_address=body.ray_address,
            ray_token=body.ray_token,
        )
        claims = [
            GpuClaim(g.index, g.uuid, g.model, g.vram_mib, g.cuda_capability, g.pci_bus_id)
            for g in body.node.gpus
        ]
        node = register_node(
            session,
            cluster,
            body.node.node_id,
            claims,
            demo=body.node.demo,
            reliability_start=settings.reliability_start,
            public_key=body.node.public_key,
            driver_version=body.node.driver_version,
            isolation=body.node.isolation,
        )
        if node.status == "left":
            node.status = "pending"
        challenge = nodes.issue_challenge(session, node, rules)  # every (re)start
        log.info(
            "provider %s registered node %s (%d GPUs%s)",
            user.name,
            node.node_id,
            len(claims),
            ", demo" if node.demo else "",
        )
        return {
            "provider_id": provider.id,
            "cluster_id": cluster.id,
            "node_id": node.node_id,
            "status": node.status,
            "verification": node.verification,
            "heartbeat_seconds": settings.heartbeat_seconds,
            "challenge": nodes.challenge_public(challenge),
        }

    return await in_db(portal, write)


def validate_or_raise(check: Any) -> None:
    try:
        check()
    except MarketError as exc:
        raise api_error(exc) from None


@router.get("/api/v1/providers/me")
async def my_provider(user: CurrentUser, portal: PortalDep) -> Any:
    """Your provider record and nodes: status, verification, reliability."""
    return await in_db(portal, lambda s: _provider_view(s, _provider_of(s, user)))


@router.patch("/api/v1/providers/me", dependencies=[Depends(small_body)])
async def update_provider(body: ProviderUpdate, user: CurrentUser, portal: PortalDep) -> Any:
    """Set the price (new reservations only; running ones keep theirs), pause or resume."""
    settings: Settings = portal.settings
    if body.price_per_gpu_hour is not None:
        validate_or_raise(
            lambda: validate_price(
                body.price_per_gpu_hour or 0, settings.min_price, settings.max_price
            )
        )
    if body.payout_wallet:
        validate_or_raise(lambda: validate_wallet(body.payout_wallet or ""))

    def write(session: Any) -> dict[str, Any]:
        provider = _provider_of(session, user)
        if body.status is not None:
            if provider.status == "delisted":
                raise ApiError(403, "An admin delisted you; ask them to list you again.")
            provider.status = body.status
        if body.price_per_gpu_hour is not None:
            provider.price_per_gpu_hour = body.price_per_gpu_hour
        if body.payout_wallet:
            # Recorded now, it pays from the next payout period on (docs/payouts.md); the
            # wallet it replaces is recorded first, so the current period keeps it.
            for wallet in (provider.payout_wallet, validate_wallet(body.payout_wallet)):
                if wallet:
                    payouts.record_wallet(session, settings, user.account_id, wallet)
            provider.payout_wallet = validate_wallet(body.payout_wallet)
        session.flush()
        log.info(
            "provider %s: status %s, price %s/h",
            user.name,
            provider.status,
            format_credits(provider.price_per_gpu_hour),
        )
        return _provider_view(session, provider)

    return await in_db(portal, write)


@router.delete("/api/v1/providers/me/nodes/{node_id}")
async def leave(node_id: str, user: CurrentUser, portal: PortalDep) -> Any:
    """Take a node off the marketplace (it is kept for the ledger, status ``left``)."""

    def write(session: Any) -> dict[str, Any]:
        provider = _provider_of(session, user)
        node = session.scalar(select(Node).where(Node.node_id == node_id))
        if node is None:
            raise ApiError(404, f"no node {node_id[:64]!r}.")
        cluster = session.get(Cluster, node.cluster_id)
        if cluster is None or cluster.provider_id != provider.id:
            raise ApiError(403, f"node {node_id!r} belongs to another provider.")
        node.status = "left"
        session.flush()
        log.info("provider %s: node %s left", user.name, node_id)
        return node_summary(node)

    return await in_db(portal, write)


# --- signed node calls ----------------------------------------------------------------


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 before it is read when its declared length
    is over ``cap``, and as soon as more than ``cap`` bytes arrive when it declares none."""
    too_large = ApiError(413, f"The request body is larger than {cap} bytes.", "too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or len(length) > 12 or int(length) > cap):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _signed(
    request: Request,
    portal: Portal,
    node_id: str,
    handle: Any,
    cap: int = MAX_NODE_BODY,
    *,
    body: bytes | None = None,
    advanced: bool = False,
) -> Any:
    """Authenticate a node's signed request, then run ``handle(session, node, body)``.

    The body's size is checked before it is read and its signature before
    ``handle`` does anything. With batched heartbeats the counter is advanced
    in Redis too, inside the request's transaction (a replay is refused by
    every portal process); ``advanced`` says the fast path already did.
    """
    if body is None:
        body = await read_capped(request, cap)
    request.state.received_at = timeutil.utcnow()
    settings: Settings = portal.settings
    batched = portal.heartbeats

    def run(session: Any) -> Any:
        node = nodes.authenticate(
            session,
            request.headers,
            request.method,
            request.url.path,
            body,
            node_id,
            timeutil.utcnow(),
            settings.node_clock_skew_seconds,
        )
        if batched is not None and not advanced:
            counter = signing.read_headers(request.headers)[2]
            if not batched.liveness.advance(node_id, counter):
                raise nodes.NodeAuthError("replayed", f"counter {counter} was already used")
        return handle(session, node, body)

    try:
        return await in_db(portal, run)
    except nodes.NodeAuthError as exc:
        raise _rejected(request, exc) from None
    except RedisUnavailable:
        raise _redis_down() from None
    except ValidationError as exc:
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(422, f"{where}: {first.get('msg', 'invalid value')}") from None


def _rejected(request: Request, exc: nodes.NodeAuthError) -> ApiError:
    log.warning(
        "rejected %s %s from %s: %s (%s)",
        request.method,
        signing.api_path(request.url.path),
        request.client.host if request.client else "?",
        exc.reason,
        exc.message,
    )
    return ApiError(
        401,
        f"Node request rejected ({exc.reason}): {exc.message}.",
        f"node_{exc.reason.replace('-', '_')}",
    )


def _redis_down() -> ApiError:
    return ApiError(
        503,
        "The portal cannot check this request against replays now (its Redis is not "
        "answering); nothing was recorded. Send it again in a moment.",
    )


@router.post("/api/v1/nodes/{node_id}/heartbeat")
async def heartbeat(node_id: str, request: Request, portal: PortalDep) -> Any:
    """A node is alive: store its metrics (cache + per-minute rollup), answer with the
    challenge it must run, if one is due.

    With batched heartbeats a routine one (online, verified, same GPUs, no
    challenge due) is accepted without SQL and written with the next batch."""
    rules = nodes.NodeRules.from_settings(portal.settings)
    batched = portal.heartbeats
    body = await read_capped(request, MAX_NODE_BODY)
    advanced = False
    if batched is not None:
        try:
            fast = await batched.try_fast(
                node_id, request.headers, request.method, request.url.path, body
            )
        except nodes.NodeAuthError as exc:
            raise _rejected(request, exc) from None
        except RedisUnavailable:
            raise _redis_down() from None
        if fast is not None and not fast.get("direct"):
            return fast
        advanced = fast is not None

    def handle(session: Any, node: Node, body: bytes) -> dict[str, Any]:
        data = Heartbeat.model_validate_json(body or b"{}")
        if node.status == "left":
            raise ApiError(409, f"node {node.node_id} has left the marketplace; join again.")
        state = nodes.record_heartbeat(session, node, data.gpus, timeutil.utcnow())
        challenge = nodes.due_challenge(session, node, rules)
        facts = (
            heartbeat_batching.facts_of(session, node, rules.verification_interval_seconds)
            if batched is not None
            else None
        )
        return {
            "state": state,
            "facts": facts,
            "counter": node.heartbeat_counter,
            "reply": {
                "status": node.status,
                "verification": node.verification,
                "heartbeat_seconds": rules.heartbeat_seconds,
                "challenge": nodes.challenge_public(challenge) if challenge else None,
            },
        }

    answer = await _signed(request, portal, node_id, handle, body=body, advanced=advanced)
    await portal.cache.set(
        nodes.cache_key(node_id),
        nodes.cache_value(answer["state"]),
        ttl=rules.heartbeat_seconds * rules.heartbeat_missed * 2,
    )
    if batched is not None:
        try:
            await batched.after_direct(node_id, answer["facts"], answer["counter"])
        except RedisUnavailable:
            # Committed, so the node is online; it rejoins the fast path at its next
            # heartbeat once Redis answers again.
            log.warning("node %s: Redis did not answer; it stays on the direct path", node_id)
    return answer["reply"]


@router.post("/api/v1/nodes/{node_id}/challenge")
async def new_challenge(node_id: str, request: Request, portal: PortalDep) -> Any:
    """A node asks for a challenge (at agent start): the pending one, or a fresh one."""
    rules = nodes.NodeRules.from_settings(portal.settings)

    def handle(session: Any, node: Node, body: bytes) -> dict[str, Any]:
        pending = nodes.due_challenge(session, node, rules)
        return nodes.challenge_public(pending or nodes.issue_challenge(session, node, rules))

    return await _signed(request, portal, node_id, handle)


@router.post("/api/v1/nodes/{node_id}/verification")
async def verification(node_id: str, request: Request, portal: PortalDep) -> Any:
    """A node answers its challenge. Passing makes its GPUs schedulable.

    In this order, so an unsigned or oversized request costs nothing: the body's
    size, the signature (which also loads the challenge), the arrival time
    against the deadline, then the portal's own chain for the sampled rows
    (outside any DB transaction), then the verdict.
    """
    rules = nodes.NodeRules.from_settings(portal.settings)
    arrived: dict[str, Any] = {}

    def load(session: Any, node: Node, body: bytes) -> dict[str, Any]:
        arrived["at"] = request.state.received_at  # the portal's clock stopped here
        data = Verification.model_validate_json(body or b"{}")
        ch = session.scalar(select(NodeChallenge).where(NodeChallenge.nonce == data.nonce))
        if ch is None or ch.node_id != node.id:
            raise ApiError(422, "This nonce was not issued to this node.")
        if ch.status != "pending":
            raise ApiError(409, f"This challenge was already {ch.status}; ask for a new one.")
        return {
            "data": data,
            "challenge": ch.id,
            "seed": ch.seed,
            "spec": nodes.challenge_spec(ch),
            "sample": dict(ch.sample or {}),
            "late": nodes.received_in_time(ch, arrived["at"]),
            "inventory": nodes.check_inventory(node, data.inventory),
        }

    found = await _signed(request, portal, node_id, load, MAX_VERIFICATION_BODY)
    failure = found["late"] or found["inventory"]
    expected: dict[str, dict[int, bytes]] = {}
    if failure is None:
        expected = await run_in_threadpool(
            workload.expected_groups, found["seed"], found["spec"], found["sample"]
        )

    def judge(session: Any) -> dict[str, Any]:
        ch = session.scalar(
            select(NodeChallenge).where(NodeChallenge.id == found["challenge"]).with_for_update()
        )
        node = session.get(Node, ch.node_id)
        if ch.status != "pending":
            raise ApiError(409, f"This challenge was already {ch.status}; ask for a new one.")
        results = [r.model_dump() for r in found["data"].results]
        verdict = failure or nodes.check_results(node, ch, results, expected)
        return nodes.record_verification(session, node, ch, verdict, rules, arrived["at"])

    return await in_db(portal, judge)


# --- admin ------------------------------------------------------------------------------


@router.get("/api/v1/admin/providers", tags=["admin"])
async def admin_providers(_admin: Admin, portal: PortalDep) -> Any:
    """Every provider with its nodes, verification and reliability."""
    return await in_db(
        portal,
        lambda s: [_provider_view(s, p) for p in s.scalars(select(Provider).order_by(Provider.id))],
    )


@router.get("/api/v1/admin/nodes", tags=["admin"])
async def admin_nodes(_admin: Admin, portal: PortalDep) -> Any:
    """Every node with status, verification, reliability and last heartbeat, and its
    warm pool as the hub reports it (``warm``: job id, state, slot counts, why it is
    out; null without a pool; see ``portal.warmslots``)."""

    def load(session: Any) -> list[dict[str, Any]]:
        out = []
        for node in session.scalars(select(Node).order_by(Node.node_id)):
            view = node_summary(node)
            view["provider"] = node.cluster.provider.display_name
            out.append(view)
        return out

    answer = await in_db(portal, load)
    warm = await warmslots.hub_view(portal)  # one cached, bounded hub call for all nodes
    for view in answer:
        cached = await portal.cache.get(nodes.cache_key(view["node_id"]))
        view["latest"] = None if cached is None else json.loads(cached)
        view["warm"] = warmslots.for_node(warm, view["node_id"])
    return answer


def _admin_node(action: str) -> Any:
    async def act(
        node_id: str, _admin: Admin, portal: PortalDep, body: AdminReason | None = None
    ) -> Any:
        def write(session: Any) -> dict[str, Any]:
            node = session.scalar(select(Node).where(Node.node_id == node_id))
            if node is None:
                raise ApiError(404, f"no node {node_id[:64]!r}.")
            node.blocked = action == "block"
            session.flush()
            audit.record(
                session,
                actor=_admin.name,
                action=f"node.{action}",
                target_kind="node",
                target=node_id,
                reason=body.reason if body else "",
                detail={"provider": node.cluster.provider.display_name},
            )
            log.warning("admin %s: node %s %sed", _admin.name, node_id, action)
            return node_summary(node)

        return await in_db(portal, write)

    act.__doc__ = f"{action.capitalize()} a node: blocked nodes are never placed."
    return act


router.post("/api/v1/admin/nodes/{node_id}/block", tags=["admin"])(_admin_node("block"))
router.post("/api/v1/admin/nodes/{node_id}/unblock", tags=["admin"])(_admin_node("unblock"))


@router.post("/api/v1/admin/providers/{provider_id}/delist", tags=["admin"])
async def delist(
    provider_id: int,
    _admin: Admin,
    portal: PortalDep,
    listed: bool = False,
    body: AdminReason | None = None,
) -> Any:
    """Delist a provider (none of its nodes is placed); ``?listed=true`` lists it again."""

    def write(session: Any) -> dict[str, Any]:
        provider = session.get(Provider, provider_id)
        if provider is None:
            raise ApiError(404, f"no provider {provider_id}.")
        provider.status = "listed" if listed else "delisted"
        session.flush()
        audit.record(
            session,
            actor=_admin.name,
            action="provider.list" if listed else "provider.delist",
            target_kind="provider",
            target=str(provider_id),
            reason=body.reason if body else "",
            detail={"name": provider.display_name},
        )
        log.warning("admin %s: provider %s %s", _admin.name, provider.display_name, provider.status)
        return _provider_view(session, provider)

    return await in_db(portal, write)
