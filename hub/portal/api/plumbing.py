"""What every route module shares, written once: how a route runs DB work, how a
domain refusal becomes an HTTP error, who may act on what, and how paths are spelt.

* Paths: every route spells its full path (``/api/v1/...``), so searching for a URL
  finds its handler; the app mounts the routers under the service prefix.
* DB work: :func:`in_db` runs ``work(session)`` in one transaction (again if a
  concurrent writer won the race) off the event loop. Only a blocking call that is
  no DB work of the route's (a chain lookup, a domain function that opens its own
  transactions) runs through ``run_in_threadpool`` itself.
* Errors: :func:`api_error` turns the domains' refusals (:class:`MarketError`,
  :class:`LedgerError`) into a 4xx with one sentence; :func:`in_db` applies it.
* Who: :data:`Admin` (the admin role, never with a read-only token),
  :func:`check_trusted` / :data:`Trusted` (admins and trusted hub services such as
  the spawner), :func:`check_owner` (a user's own things; services, and admins unless
  refused, act on anyone's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ...billing import ledger
from ...billing.ledger import LedgerError
from ...db import accounts
from ...db.models import Account
from ...market.marketplace import MarketError
from ..auth import CurrentCaller, PortalUser, require_role
from ..context import Portal
from ..hubapi import HubUnavailable

T = TypeVar("T")

#: Request bodies larger than this are refused before they are parsed.
MAX_BODY_BYTES = 16 * 1024
#: The error codes of a refused launch (a reservation's payment check).
LAUNCH_REFUSAL_CODES: Mapping[int, str] = {402: "payment_required", 403: "quota_exceeded"}


class ApiError(HTTPException):
    """An HTTP error with its own machine-readable code (see app.error_body)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def api_error(exc: MarketError | LedgerError, codes: Mapping[int, str] | None = None) -> ApiError:
    """The HTTP error for a domain's refusal: its status and sentence; a market error
    keeps its own code, a ledger error takes ``codes[status]`` (else the status's)."""
    if isinstance(exc, MarketError):
        return ApiError(exc.status, exc.message, exc.code)
    return ApiError(exc.status, sentence(str(exc)), (codes or {}).get(exc.status))


async def in_db(
    portal: Portal, work: Callable[[Session], T], codes: Mapping[int, str] | None = None
) -> T:
    """Run ``work(session)`` in a DB transaction off the event loop (see
    :func:`ledger.with_retry`); a domain refusal becomes an :class:`ApiError`
    (``codes``: see :func:`api_error`)."""
    try:
        return await run_in_threadpool(ledger.with_retry, portal.sessions, work)
    except (MarketError, LedgerError) as exc:
        raise api_error(exc, codes) from None


class AdminReason(BaseModel):
    """Why an admin acts (an optional body of admin actions); it goes into the audit log."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


async def small_body(request: Request) -> None:
    """Refuse oversized bodies by their declared length, before parsing them."""
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.", "too_large")


async def full_admin(caller: Annotated[PortalUser, require_role("admin")]) -> PortalUser:
    """A hub admin with a token that may use the portal: a read-only token (a user
    server's own, or the hub pages' reading token) is refused even for reads, so code
    running in an admin's server cannot read what only admins see."""
    if caller.read_only:
        raise ApiError(
            403,
            "Admin endpoints need a token that may use the portal; a user server's "
            "read-only token cannot call them.",
        )
    return caller


#: The caller, who must have the admin role (a hub admin) and a full token.
Admin = Annotated[PortalUser, Depends(full_admin)]


def check_trusted(
    caller: PortalUser, refusal: str = "Only admins and the spawner service may do this."
) -> None:
    """Admins and trusted hub services (the spawner) only; anyone else gets 403."""
    if not (caller.is_service or caller.admin):
        raise ApiError(403, refusal)


async def trusted(caller: CurrentCaller) -> PortalUser:
    check_trusted(caller)
    return caller


#: The caller, who must be an admin or a trusted hub service.
Trusted = Annotated[PortalUser, Depends(trusted)]


def check_owner(caller: PortalUser, owner: str, refusal: str, *, admins: bool = True) -> None:
    """A user acts only on their own things (``owner`` names whose); trusted services act
    on anyone's, and so do admins unless ``admins`` is False. Else 403 with ``refusal``."""
    if caller.is_service or caller.name == owner or (admins and caller.admin):
        return
    raise ApiError(403, refusal)


async def account_from_hub(
    portal: Portal,
    name: str,
    *,
    missing: int = 404,
    hub_down: str = "The hub is not answering; try again in a moment.",
) -> None:
    """Make sure hub user ``name`` has a portal account, asking the hub if the portal lacks one.

    An admin may create a hub user and grant them credits (or a quota), or a team
    admin add them to a team, before they ever log in; the hub sync would add them
    only later, so the hub is asked on demand, as reservations do. ``missing``: the
    status when the hub has no such user (404 for a path's user, 422 for a body's).
    """

    def known(session: Session) -> bool:
        return session.scalar(select(Account.id).where(Account.hub_name == name)) is not None

    if await in_db(portal, known):
        return
    try:
        model = await portal.hub.user(name)
    except HubUnavailable:
        raise ApiError(503, hub_down) from None
    if model is None:
        raise ApiError(missing, f"There is no hub user named {name[:64]!r}.")
    await in_db(portal, lambda session: accounts.upsert_account(session, model))
