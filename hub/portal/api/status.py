"""Portal API v1 endpoints, mounted under the service prefix."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ... import __version__, db
from ...db import accounts
from ...db.models import Account
from ...market.raystatus import cluster_status
from .. import warmslots
from ..auth import (
    STATE_COOKIE,
    TOKEN_COOKIE,
    CurrentUser,
    PortalDep,
    safe_next,
)
from ..loops import sync_from_hub
from .plumbing import Admin, ApiError, in_db

log = logging.getLogger(__name__)
router = APIRouter()


class Health(BaseModel):
    status: str
    version: str
    db: dict[str, Any]
    cache: dict[str, Any]
    ray: dict[str, Any]
    warm_pools: dict[str, Any]


class Me(BaseModel):
    name: str
    role: str
    admin: bool
    teams: list[str]
    active: bool
    created_at: datetime


class AccountPublic(BaseModel):
    name: str
    role: str
    active: bool
    teams: list[str]
    created_at: datetime


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    return RedirectResponse(f"{request.url.path.rstrip('/')}/docs")


@router.get("/api/v1/health", response_model=Health, tags=["status"])
async def health(portal: PortalDep) -> Any:
    """Is the portal able to serve? DB, cache and the house Ray cluster (with its GPUs),
    and each node's warm slots as the hub reports them (``warm_pools``).

    Public, like a load balancer's health check; it reveals no user data and no
    internal URL (the Ray cluster's address stays out of the answer; the warm pools
    show node ids, states and slot counts only, see ``portal.warmslots``). The warm
    pools are information: a hub that is down or runs without them gives
    ``{"available": false, "reason": ...}`` and leaves ``status`` as it is.
    """

    def db_status() -> dict[str, Any]:
        backend = portal.engine.url.get_backend_name()
        try:
            return {
                "backend": backend,
                "status": "ok",
                "revision": db.current_revision(portal.engine),
            }
        except Exception as exc:
            return {"backend": backend, "status": "error", "detail": type(exc).__name__}

    db_info = await run_in_threadpool(db_status)
    cache_ok = await portal.cache.ping()
    # Both are bounded (5 s, 4 s) and asked at once, so the warm pools add no wait.
    ray, warm = await asyncio.gather(
        cluster_status(portal.settings.ray_jobs_url, token=portal.house_ray_token),
        warmslots.hub_view(portal),
    )
    ray.pop("address", None)
    overall = (
        "ok" if db_info["status"] == "ok" and cache_ok and ray["status"] == "ok" else "degraded"
    )
    body = {
        "status": overall,
        "version": __version__,
        "db": db_info,
        "cache": {"backend": portal.cache.backend, "status": "ok" if cache_ok else "error"},
        "ray": ray,
        "warm_pools": warmslots.public(warm),
    }
    if db_info["status"] != "ok":
        raise ApiError(503, "The portal database is not answering.")
    return body


@router.get("/api/v1/me", response_model=Me, tags=["accounts"])
async def me(user: CurrentUser, portal: PortalDep) -> Any:
    """The calling hub user's portal account: role and teams."""

    def load(session: Session) -> dict[str, Any]:
        account = session.get(Account, user.account_id)
        if account is None:  # pragma: no cover - _record created it
            raise ApiError(404, "No portal account for you yet; try again.")
        return {
            "name": account.hub_name,
            "role": account.role,
            "admin": user.admin,
            "teams": accounts.teams_of(session, account),
            "active": account.active,
            "created_at": account.created_at,
        }

    return await in_db(portal, load)


@router.get("/api/v1/accounts", response_model=list[AccountPublic], tags=["accounts"])
async def list_accounts(
    portal: PortalDep,
    _admin: Admin,
    role: Annotated[str | None, Query(pattern="^(customer|provider|admin)$")] = None,
) -> Any:
    """Every account (admins only), optionally of one role."""

    def load(session: Session) -> list[dict[str, Any]]:
        query = select(Account).order_by(Account.hub_name)
        if role:
            query = query.where(Account.role == role)
        return [
            {
                "name": a.hub_name,
                "role": a.role,
                "active": a.active,
                "teams": accounts.teams_of(session, a),
                "created_at": a.created_at,
            }
            for a in session.scalars(query)
        ]

    return await in_db(portal, load)


@router.post("/api/v1/sync", tags=["accounts"])
async def sync_now(portal: PortalDep, _admin: Admin) -> dict[str, int]:
    """Sync accounts and teams from the hub now (admins only)."""
    return dict(await sync_from_hub(portal))


@router.get("/oauth_callback", include_in_schema=False)
async def oauth_callback(
    request: Request, portal: PortalDep, code: str = "", state: str = ""
) -> Response:
    """End of the hub OAuth flow: trade the code for a token, set the cookie."""
    if not code or not state or request.cookies.get(STATE_COOKIE) != state:
        raise ApiError(
            400, "This login link is stale or was not started here; open the portal page again."
        )
    oauth = portal.oauth
    try:
        token = await oauth.token_for_code(
            code, code_verifier=oauth.get_code_verifier(state), sync=False
        )
    except Exception as exc:
        log.warning("OAuth code exchange failed: %s", type(exc).__name__)
        raise ApiError(400, "The hub refused this login; open the portal page again.") from None
    next_url = safe_next(portal, oauth.get_next_url(state))
    oauth.clear_oauth_state(state)
    response = RedirectResponse(next_url, status_code=302)
    prefix = portal.settings.service_prefix
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        httponly=True,
        samesite="lax",
        path=prefix,
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(STATE_COOKIE, path=prefix)
    return response
