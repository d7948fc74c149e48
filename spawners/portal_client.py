"""The spawner's only way to the portal: its HTTP marketplace API.

The hub process never opens the portal DB. It calls the portal service as the
hub service ``ray-spawner`` (a token the portal trusts to act for any user) and
names the user and server in the body. Every call is bounded by a timeout;
idempotent calls (GET, activate, DELETE) are retried with backoff on network
errors and 5xx; a 404 on DELETE means the reservation is already gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx

from .loopclient import LoopClient

log = logging.getLogger(__name__)

API = "api/v1"


class PortalError(Exception):
    """The portal answered with an error; ``message`` is a sentence a user can read."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class PortalUnavailable(PortalError):
    """The portal did not answer (network error, timeout or 5xx)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "unavailable", message)


@dataclass(frozen=True)
class Reservation:
    """The parts of a reservation the spawner needs (see the marketplace contract)."""

    id: str
    status: str
    node_id: str
    cluster_id: str
    jobs_url: str
    node_resource: str
    gpu_indices: list[int]
    gpu_count: int
    gpu_model: str
    price_per_gpu_hour: int
    region: str
    demo: bool
    #: The cluster's Ray token (trusted callers only); never logged, never sent to a node.
    ray_token: str = ""

    def __repr__(self) -> str:  # no token in a log line
        return f"Reservation(id={self.id!r}, node_id={self.node_id!r}, status={self.status!r})"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Reservation:
        return cls(
            id=str(body["id"]),
            status=str(body.get("status", "")),
            node_id=str(body["node_id"]),
            cluster_id=str(body.get("cluster_id", "")),
            jobs_url=str(body["jobs_url"]),
            node_resource=str(body["node_resource"]),
            gpu_indices=[int(i) for i in body.get("gpu_indices") or []],
            gpu_count=int(body["gpu_count"]),
            gpu_model=str(body.get("gpu_model", "")),
            price_per_gpu_hour=int(body.get("price_per_gpu_hour", 0)),
            region=str(body.get("region", "")),
            demo=bool(body.get("demo", False)),
            ray_token=str(body.get("ray_token") or ""),
        )


@dataclass(frozen=True)
class Balance:
    """What the spawn form shows of a user's money: micro-credits, and how long a
    launch must be covered for."""

    balance: int
    available: int
    currency: str
    min_billable_seconds: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Balance:
        return cls(
            balance=int(body["balance"]),
            available=int(body.get("available", body["balance"])),
            currency=str(body.get("currency") or "credits"),
            min_billable_seconds=int(body["min_billable_seconds"]),
        )


class PortalClient:
    """Async client for the marketplace endpoints of the portal service."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self._token = token
        self.timeout = timeout
        self.retries = retries
        self._http = LoopClient(
            base_url=self.base_url,
            timeout=self.timeout,
            headers={"Authorization": f"token {self._token}"},
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        attempts = self.retries if retry else 1
        delay = 0.2
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                reply = await asyncio.wait_for(
                    self._http.client().request(method, f"{API}/{path}", json=json, params=params),
                    timeout=self.timeout + 1,
                )
            except (httpx.HTTPError, TimeoutError) as exc:
                last = exc
            else:
                if reply.status_code < 500:
                    return reply
                last = PortalUnavailable(f"the portal answered {reply.status_code}")
            if attempt + 1 < attempts:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay = min(delay * 2, 2.0)
        log.warning("portal %s %s failed: %s", method, path, type(last).__name__)
        raise PortalUnavailable(
            "The GPU marketplace is not answering right now; try again in a minute."
        )

    @staticmethod
    def _error(reply: httpx.Response) -> PortalError:
        try:
            err = reply.json()["error"]
            code, message = str(err.get("code", "error")), str(err.get("message", ""))
        except (ValueError, KeyError, TypeError):
            code, message = "error", ""
        return PortalError(
            reply.status_code,
            code,
            message or f"The marketplace refused the request ({reply.status_code}).",
        )

    async def offers(self) -> list[dict[str, Any]]:
        reply = await self._request("GET", "offers", retry=True)
        if reply.status_code != 200:
            raise self._error(reply)
        body = reply.json()
        return body if isinstance(body, list) else []

    async def balance(self, user: str) -> Balance | None:
        """A user's balance and the minimum billable period; None when the portal has
        no account for them yet (a first spawn creates it)."""
        reply = await self._request("GET", "balance", retry=True, params={"user": user})
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise self._error(reply)
        return Balance.from_json(reply.json())

    async def billing_teams(self, user: str) -> list[dict[str, Any]]:
        """The teams ``user`` may bill a server to, for the spawn form's "Bill to":
        ``[{"name", "default_profile", "can_pay", "why"}]``."""
        reply = await self._request("GET", "billing-teams", retry=True, params={"user": user})
        if reply.status_code != 200:
            raise self._error(reply)
        body = reply.json()
        return [t for t in body if isinstance(t, dict)] if isinstance(body, list) else []

    async def reserve(
        self,
        *,
        user: str,
        server_name: str,
        gpu_count: int,
        gpu_model: str | None = None,
        min_vram_gb: int | None = None,
        region: str | None = None,
        max_price: int | None = None,
        min_reliability: float | None = None,
        team: str | None = None,
    ) -> Reservation:
        """Hold GPUs for one server. The portal answers a retry for the same
        server with the same live reservation, so a retry cannot double-book."""
        body: dict[str, Any] = {"user": user, "server_name": server_name, "gpu_count": gpu_count}
        for key, value in (
            ("gpu_model", gpu_model),
            ("min_vram_gb", min_vram_gb),
            ("region", region),
            ("max_price", max_price),
            ("min_reliability", min_reliability),
            ("team", team),
        ):
            if value not in (None, ""):
                body[key] = value
        reply = await self._request("POST", "reservations", retry=True, json=body)
        if reply.status_code not in (200, 201):
            raise self._error(reply)
        return Reservation.from_json(reply.json())

    async def activate(self, reservation_id: str) -> Reservation:
        reply = await self._request("POST", f"reservations/{reservation_id}/activate", retry=True)
        if reply.status_code != 200:
            raise self._error(reply)
        return Reservation.from_json(reply.json())

    async def get(self, reservation_id: str) -> Reservation | None:
        reply = await self._request("GET", f"reservations/{reservation_id}", retry=True)
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise self._error(reply)
        return Reservation.from_json(reply.json())

    async def failed(self, reservation_id: str, reason: str) -> bool:
        """Report a failed start (lowers the node's reliability) and release. Idempotent."""
        reply = await self._request(
            "POST",
            f"reservations/{reservation_id}/failed",
            json={"reason": reason[:500]},
            retry=True,
        )
        if reply.status_code == 404:
            return False
        if reply.status_code != 200:
            raise self._error(reply)
        return True

    async def release(self, reservation_id: str) -> bool:
        """Release; True if it was held or active, False if already gone. Idempotent."""
        reply = await self._request("DELETE", f"reservations/{reservation_id}", retry=True)
        if reply.status_code == 404:
            return False
        if reply.status_code not in (200, 204):
            raise self._error(reply)
        return True
