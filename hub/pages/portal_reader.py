"""The hub pages' client for the portal API: every read is made as the page's user.

The hub holds no credential that reads another user's money: for each user it
makes a hub API token of that user (``User.new_api_token``), read-only for the
portal (the token lacks ``access:services``, so the portal lets it read and
never write, as it does a user server's own token) and short-lived, keeps it in
this process's memory only, and makes a new one before it expires. The portal
checks it against the hub like any other token, so its rules (a user sees only
their own balance, usage and deposits) are the pages' rules too.

One ``httpx.AsyncClient`` for the hub process, every call bounded by a timeout;
a portal that does not answer makes a page say so in a sentence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from tornado import web

log = logging.getLogger(__name__)

#: What a page's token may do in the hub: read the user's own name (the portal
#: identifies it); no ``access:services``, so the portal treats it as read-only.
TOKEN_SCOPES = ["read:users:name!user"]
TOKEN_NOTE = "gpuportal hub pages (read-only, renewed automatically)"  # noqa: S105 (a note)
#: Lifetime of a page token (seconds) and how long before its end a new one is made.
TOKEN_SECONDS = 3600
TOKEN_RENEW_BEFORE = 600


class PortalUnavailable(Exception):
    """The portal did not answer or refused; ``str()`` is a sentence for the page."""


@dataclass
class _Token:
    value: str
    expires: float


class PortalReader:
    """Reads the portal API as a hub user (GET only)."""

    #: The page token's hub scopes, note and lifetime (seconds).
    scopes = TOKEN_SCOPES
    note = TOKEN_NOTE
    seconds = TOKEN_SECONDS

    def __init__(self, portal_url: str, timeout: float = 5.0) -> None:
        self.portal_url = portal_url.rstrip("/") + "/"
        self._client = httpx.AsyncClient(timeout=timeout)
        self._tokens: dict[str, _Token] = {}

    def token_for(self, user: Any) -> str:
        """The user's current page token, made (in the hub's DB) when none is fresh."""
        now = time.monotonic()
        held = self._tokens.get(user.name)
        if held is not None and held.expires - min(TOKEN_RENEW_BEFORE, self.seconds / 2) > now:
            return held.value
        value = user.new_api_token(note=self.note, expires_in=self.seconds, scopes=self.scopes)
        self._tokens[user.name] = _Token(value, now + self.seconds)
        return str(value)

    def forget(self, user: Any) -> None:
        self._tokens.pop(user.name, None)

    async def get(self, user: Any, path: str, **params: Any) -> Any:
        """``GET <portal>/api/v1/<path>`` as ``user``; JSON, or PortalUnavailable."""
        url = self.portal_url + "api/v1/" + quote(path, safe="/")
        query = {k: v for k, v in params.items() if v is not None}
        for attempt in range(2):
            headers = {"Authorization": f"token {self.token_for(user)}"}
            try:
                reply = await self._client.get(url, params=query, headers=headers)
            except httpx.HTTPError as exc:
                log.warning("portal read %s for %s failed: %s", path, user.name, type(exc).__name__)
                raise PortalUnavailable(
                    "The billing service is not answering right now; try again in a moment."
                ) from None
            if reply.status_code == 401 and attempt == 0:
                self.forget(user)  # revoked or expired early: make a new one, once
                continue
            break
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise PortalUnavailable(_message(reply))
        return reply.json()

    async def get_text(self, user: Any, path: str, **params: Any) -> str:
        """Like :meth:`get`, for a text answer (the CSV export)."""
        url = self.portal_url + "api/v1/" + quote(path, safe="/")
        headers = {"Authorization": f"token {self.token_for(user)}"}
        try:
            reply = await self._client.get(url, params=params, headers=headers)
        except httpx.HTTPError:
            raise PortalUnavailable(
                "The billing service is not answering right now; try again in a moment."
            ) from None
        if reply.status_code != 200:
            raise PortalUnavailable(_message(reply))
        return reply.text


def _message(reply: httpx.Response) -> str:
    """The portal's one-sentence error, or a plain one; never a body dump."""
    try:
        message = reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if isinstance(message, str) and message:
        return message[:300]
    return f"The billing service answered {reply.status_code}; try again in a moment."


#: The admin pages' token: it may use the portal (``access:services!service=portal``),
#: since the portal's admin API refuses read-only tokens, even for reads.
ADMIN_TOKEN_SCOPES = ["read:users:name!user", "access:services!service=portal"]


class PortalAdminClient(PortalReader):
    """Reads and acts on the portal's admin API as a hub admin (``/hub/portal-admin``).

    Its tokens are made only for users the hub's page handler has checked are admins
    (``admin-ui``), live 15 minutes and stay in this process's memory; the portal checks
    the admin role again on every call.
    """

    scopes = ADMIN_TOKEN_SCOPES
    note = "gpuportal admin pages (renewed automatically)"
    seconds = 900

    async def send(
        self,
        user: Any,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """``<method> <portal>/api/v1/<path>`` as ``user``: the JSON answer, or
        :class:`PortalUnavailable` with the portal's sentence."""
        url = self.portal_url + "api/v1/" + quote(path, safe="/")
        headers = {"Authorization": f"token {self.token_for(user)}"}
        try:
            reply = await self._client.request(
                method, url, json=body, params=params, headers=headers
            )
        except httpx.HTTPError as exc:
            log.warning(
                "portal %s %s for %s failed: %s", method, path, user.name, type(exc).__name__
            )
            raise PortalUnavailable(
                "The portal is not answering right now; nothing was done. Try again."
            ) from None
        if reply.status_code >= 300:
            raise PortalUnavailable(_message(reply))
        return reply.json()


class PortalUserClient(PortalAdminClient):
    """Reads and acts on the portal's team and share API as the logged-in hub user
    (``/hub/teams``, the home page's "Share" button).

    Its token may use the portal, as every hub user may (their ``user`` role holds
    ``access:services!service=portal``); the portal decides what the user may do.
    """

    note = "gpuportal team pages (renewed automatically)"


T = TypeVar("T")


class Configured(Generic[T]):
    """One page module's client, set once by ``configure()`` when the hub starts.

    Calling it returns the client; before ``configure()`` a page answers 503 with
    ``what`` in its sentence instead of failing on ``None``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.value: T | None = None

    def set(self, value: T) -> None:
        self.value = value

    def __call__(self) -> T:
        if self.value is None:
            raise web.HTTPError(503, f"{self.what} not configured.")
        return self.value
