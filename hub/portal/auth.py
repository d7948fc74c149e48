"""Who is calling the portal: a hub API token or the portal's hub-OAuth cookie.

Tokens are checked against the hub's ``GET /hub/api/user``. The answer is
cached, keyed by a SHA-256 of the token (never the token itself), for reads
only and only for ``GPUPORTAL_AUTH_CACHE_SECONDS`` (a few seconds, at most
10): a request that changes anything (POST, PUT, PATCH, DELETE) is always
checked against the hub afresh, so a revoked token or a removed role can never
spend, reserve or grant, and reads follow the hub within seconds. A refusal
is never cached, and it drops whatever the cache held for that token.

A browser without a cookie is sent through the hub's OAuth flow (PKCE) and
comes back with an HttpOnly cookie scoped to the portal's prefix; an API
client without a token gets a 401 JSON error. The cookie is good for reading
only (GET, HEAD, OPTIONS): pages under ``/user/*`` share the portal's origin,
so a cookie that could write would let any notebook page forge requests
(XSRF). Anything that changes state needs ``Authorization: token ...``.

A user server's own token (``JUPYTERHUB_API_TOKEN``, the ``server`` role's
scopes) identifies its owner but lacks ``access:services``; the portal takes
it as that user, **read-only**: the server extension reads its allocation and
balance with it, and a provider who copies it off their machine can read, not
spend.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..db import accounts, transaction
from .context import Portal
from .hubapi import HubUnavailable

log = logging.getLogger(__name__)

TOKEN_COOKIE = "gpuportal-portal-token"  # noqa: S105 (a cookie name)
STATE_COOKIE = "gpuportal-portal-oauth-state"


class AuthRequired(HTTPException):
    """401, or for a browser a redirect into the hub's OAuth flow (see app.py)."""

    def __init__(
        self,
        message: str = "Log in to the hub first, or send 'Authorization: token <hub API token>'.",
    ) -> None:
        super().__init__(status_code=401, detail=message)


@dataclass
class PortalUser:
    """The caller, as the hub knows them and the portal DB records them."""

    name: str
    role: str
    admin: bool
    account_id: int
    groups: list[str] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    #: "user", or "service" for a trusted hub service (no account; acts for users).
    kind: str = "user"
    #: A token without access to the portal service (a user server's own token): GET only.
    read_only: bool = False

    @property
    def is_service(self) -> bool:
        return self.kind == "service"


PORTAL_ACCESS_SCOPES = frozenset({"access:services", "access:services!service=portal"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def token_from(request: Request) -> str | None:
    """The caller's hub token: the ``Authorization`` header, else the portal's cookie.

    The cookie counts only for reads. A browser sends it with any request to
    the portal's path, including one that a page under ``/user/*`` (same
    origin, customer code) or another site makes in its name, so a write that
    carried only the cookie is refused with 403 rather than trusted.
    """
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    cookie = request.cookies.get(TOKEN_COOKIE) or None
    if cookie and request.method not in READ_METHODS:
        raise HTTPException(
            403,
            "The portal's login cookie is good for reading only; to change anything, "
            "send your hub API token as 'Authorization: token <hub API token>'.",
        )
    return cookie


def server_token_only(model: dict[str, Any]) -> bool:
    """A token that may not access the portal service: a server's ``JUPYTERHUB_API_TOKEN``.

    User tokens, the portal's OAuth tokens and admin tokens all carry
    ``access:services!service=portal`` (or ``access:services``). The hub always
    lists the token's scopes in ``GET /hub/api/user``; a model without the
    list says nothing about them.
    """
    scopes = model.get("scopes")
    return isinstance(scopes, list) and not PORTAL_ACCESS_SCOPES.intersection(scopes)


def refuse_writes(request: Request, caller: PortalUser) -> PortalUser:
    if caller.read_only and request.method not in READ_METHODS:
        raise HTTPException(
            403, "A user server's token can only read; use your own hub token to change anything."
        )
    return caller


def cache_key(token: str) -> str:
    return "auth:" + hashlib.sha256(token.encode()).hexdigest()


def get_portal(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


PortalDep = Annotated[Portal, Depends(get_portal)]


async def current_caller(request: Request, portal: PortalDep) -> PortalUser:
    """A hub user, or a hub service named in ``GPUPORTAL_TRUSTED_SERVICES``.

    Trusted services (the spawner) act on behalf of users; every other service
    is refused with 403. Both kinds are cached by token hash, for reads only
    (see the module docstring): a write always asks the hub.
    """
    token = token_from(request)
    if not token:
        raise AuthRequired()
    key = cache_key(token)
    if request.method in READ_METHODS:
        cached = await portal.cache.get(key)
        if cached:
            return refuse_writes(request, PortalUser(**json.loads(cached)))
    try:
        model = await portal.hub.user_for_token(token)
    except HubUnavailable as exc:
        log.warning("hub unavailable while checking a token: %s", exc)
        raise HTTPException(503, "The hub is not answering; try again in a moment.") from None
    if model is None:
        # Revoked or expired: what a read cached a moment ago must not outlive it.
        await portal.cache.delete(key)
        raise AuthRequired("Your hub token is invalid or has expired; log in again.")
    kind = model.get("kind", "user")
    if kind == "service" and model.get("name") in portal.settings.trusted_service_names:
        service = PortalUser(
            name=str(model["name"]),
            role="service",
            admin=False,
            account_id=0,
            scopes=sorted(model.get("scopes") or []),
            kind="service",
        )
        await _remember(portal, key, service)
        log.info("authenticated trusted hub service %s", service.name)
        return service
    if kind != "user":
        await portal.cache.delete(key)
        raise HTTPException(403, "Only hub users and trusted services can use this endpoint.")
    # The token's own model may lack groups (OAuth tokens carry few scopes), so
    # the portal reads the full model with its service token.
    full = model if "groups" in model and "admin" in model else await portal.hub.user(model["name"])
    if full is None:
        await portal.cache.delete(key)
        raise AuthRequired("Your hub user no longer exists.")
    scopes = model.get("scopes") or []
    user = await run_in_threadpool(_record, portal, full, scopes)
    user.read_only = server_token_only(model)
    await _remember(portal, key, user)
    log.info(
        "authenticated hub user %s (role %s%s)",
        user.name,
        user.role,
        ", server token: read-only" if user.read_only else "",
    )
    return refuse_writes(request, user)


async def _remember(portal: Portal, key: str, caller: PortalUser) -> None:
    """Cache a verified caller for reads; a TTL of 0 caches nothing (never "forever")."""
    ttl = portal.settings.auth_cache_seconds
    if ttl > 0:
        await portal.cache.set(key, json.dumps(asdict(caller)), ttl=ttl)


def _record(portal: Portal, model: dict[str, Any], scopes: list[str]) -> PortalUser:
    """The caller's account, made on first sight. Two first requests of a new user at
    once (a page asking for balance and allocations together) race to insert it:
    the loser's insert fails on the unique name and it reads the winner's row. With
    more than two at once, a loser's second try can lose again (to another loser's
    welcome credit), so it tries a few times before the error stands."""
    from sqlalchemy.exc import IntegrityError

    for _ in range(RECORD_TRIES - 1):
        try:
            return _record_once(portal, model, scopes)
        except IntegrityError:
            continue
    return _record_once(portal, model, scopes)


#: How many times a first request tries to make its account before failing.
RECORD_TRIES = 5


def _record_once(portal: Portal, model: dict[str, Any], scopes: list[str]) -> PortalUser:
    from ..billing.credits import welcome

    with transaction(portal.sessions) as session:
        account = accounts.upsert_account(session, model)
        welcome(session, portal.settings, account.id)
        return PortalUser(
            name=account.hub_name,
            role=account.role,
            admin=bool(model.get("admin")),
            account_id=account.id,
            groups=sorted(model.get("groups") or []),
            scopes=sorted(scopes),
        )


async def current_user(caller: Annotated[PortalUser, Depends(current_caller)]) -> PortalUser:
    """The calling hub user; services (even trusted ones) are refused with 403."""
    if caller.is_service:
        raise HTTPException(403, "Only hub users can use this endpoint.")
    return caller


CurrentCaller = Annotated[PortalUser, Depends(current_caller)]
CurrentUser = Annotated[PortalUser, Depends(current_user)]


def require_role(*roles: str) -> Any:
    """Dependency: the caller's role must be one of ``roles``, else 403."""

    async def check(user: CurrentUser) -> PortalUser:
        if user.role not in roles:
            raise HTTPException(
                403, f"This needs the {' or '.join(roles)} role; you are a {user.role}."
            )
        return user

    return Depends(check)


def oauth_redirect_url(portal: Portal, next_url: str) -> tuple[str, str]:
    """Start the hub OAuth flow: returns (authorize URL, state id for the cookie)."""
    oauth = portal.oauth
    verifier, challenge, method = oauth.generate_pkce_code_challenge()
    state = oauth.generate_state(next_url=next_url, code_verifier=verifier)
    query = urlencode(
        {
            "client_id": oauth.oauth_client_id,
            "redirect_uri": oauth.oauth_redirect_uri,
            "response_type": "code",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": method,
        }
    )
    return f"{oauth.oauth_authorization_url}?{query}", state


def safe_next(portal: Portal, next_url: str | None) -> str:
    """Only local paths under the portal's prefix; anything else goes to the prefix."""
    prefix = portal.settings.service_prefix
    if (
        not next_url
        or not next_url.startswith(prefix)
        or next_url.startswith("//")
        or "\\" in next_url
    ):
        return prefix
    return next_url
