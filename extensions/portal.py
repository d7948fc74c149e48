"""Reading this server's allocation and its owner's balance from the portal.

The extension calls the portal as the server itself, with the server's own
hub token (``JUPYTERHUB_API_TOKEN``), which the portal accepts read-only for
the token's owner. Answers are cached for a few seconds so a dashboard that
polls every second costs the portal one request per cache period, every call
is bounded by a timeout, and a portal that does not answer becomes a reading
with ``reachable=False`` and a sentence, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Timezone-aware now; the extension's clock, replaced in tests to travel in time."""
    return datetime.now(UTC)


@dataclass
class PortalReading:
    """What the portal said about this server, or why it said nothing.

    ``forbidden`` means the portal refused the token for this user (it belongs
    to someone else); the usage endpoint answers 403 then.
    """

    reachable: bool
    error: str | None = None
    forbidden: bool = False
    fetched_at: datetime | None = None
    allocation: dict[str, Any] | None = None
    balance: dict[str, Any] | None = None
    stale: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class PortalError(Exception):
    """One portal call failed; ``forbidden`` for 403."""

    def __init__(self, message: str, *, forbidden: bool = False, reachable: bool = True) -> None:
        super().__init__(message)
        self.forbidden = forbidden
        self.reachable = reachable


class PortalClient:
    """The portal's billing API as seen from one user server.

    ``base_url`` ends with ``/services/portal/`` (or wherever the portal is
    served); ``token`` is never logged and never used as a cache key.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        user: str,
        server: str,
        *,
        timeout: float = 3.0,
        cache_seconds: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/" if base_url else ""
        self._token = token
        self.user = user
        self.server = server
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._cached: PortalReading | None = None
        self._last_good: PortalReading | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout), transport=self._transport
            )
        return self._client

    async def read(self) -> PortalReading:
        """The cached reading, refreshed when older than ``cache_seconds``."""
        async with self._lock:  # one refresh in flight; concurrent callers share it
            now = self.clock()
            cached = self._cached
            if (
                cached is not None
                and cached.fetched_at is not None
                and 0 <= (now - cached.fetched_at).total_seconds() < self.cache_seconds
            ):
                return cached
            reading = await self._fetch(now)
            self._cached = reading
            return reading

    async def _fetch(self, now: datetime) -> PortalReading:
        if not self.base_url:
            return PortalReading(
                reachable=False,
                error="The portal's URL is not configured (GPUPORTAL_PORTAL_URL).",
                fetched_at=now,
            )
        if not self._token:
            return PortalReading(
                reachable=False,
                error="This server has no hub API token (JUPYTERHUB_API_TOKEN).",
                fetched_at=now,
            )
        user = quote(self.user, safe="")
        try:
            allocations, balance = await asyncio.wait_for(
                asyncio.gather(
                    self._get(
                        "api/v1/allocations",
                        {"user": user, "server": self.server, "open_only": "true"},
                    ),
                    self._get("api/v1/balance", {"user": user}),
                ),
                timeout=self.timeout * 2,
            )
        except PortalError as exc:
            reading = PortalReading(
                reachable=exc.reachable, error=str(exc), forbidden=exc.forbidden, fetched_at=now
            )
            return self._degraded(reading)
        except TimeoutError:
            reading = PortalReading(
                reachable=False,
                error=f"Portal unreachable: no answer within {self.timeout * 2:g} s.",
                fetched_at=now,
            )
            return self._degraded(reading)
        allocation = allocations[0] if isinstance(allocations, list) and allocations else None
        reading = PortalReading(
            reachable=True, fetched_at=now, allocation=allocation, balance=balance
        )
        self._last_good = reading
        return reading

    def _degraded(self, reading: PortalReading) -> PortalReading:
        """Keep showing the last good numbers, marked stale, when the portal fails."""
        good = self._last_good
        if good is not None and not reading.forbidden:
            reading.allocation, reading.balance, reading.stale = good.allocation, good.balance, True
        return reading

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        url = self.base_url + path
        try:
            reply = await self._http().get(
                url, params=params, headers={"Authorization": f"token {self._token}"}
            )
        except httpx.HTTPError as exc:
            log.warning("portal unreachable (GET %s): %s", path, type(exc).__name__)
            raise PortalError(
                f"Portal unreachable: {type(exc).__name__} from GET {path}.", reachable=False
            ) from None
        if reply.status_code == 200:
            try:
                return reply.json()
            except ValueError:
                raise PortalError(f"The portal's answer to {path} is not JSON.") from None
        detail = _detail(reply)
        if reply.status_code == 403:
            log.warning("portal refused this server's token for user %s: %s", self.user, detail)
            raise PortalError(f"The portal refused this server's token: {detail}", forbidden=True)
        if reply.status_code == 401:
            raise PortalError(f"The portal does not accept this server's token: {detail}")
        log.warning("portal answered %s to GET %s", reply.status_code, path)
        raise PortalError(f"The portal answered {reply.status_code} to GET {path}: {detail}")


def _detail(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.reason_phrase or "no detail"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])  # the portal's standard error shape
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
    return reply.reason_phrase or "no detail"
