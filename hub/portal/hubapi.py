"""The portal's client for JupyterHub's REST API.

Two kinds of call: checking a *user's* token (``GET /hub/api/user`` with that
token) and acting with the portal service's own token, whose scopes
``jupyterhub_config.py`` keeps to reading users and groups (``list:users``,
``read:users``, ``list:groups``, ``read:groups``), ``servers`` (the meter stops a
server whose payer ran out of credit), ``admin:groups`` and ``groups`` (teams are
hub groups: the portal's team API creates them and changes their members), and
``shares`` (a member shares a running server with a teammate through the portal,
which checks that they are teammates; users themselves hold no ``shares`` scope),
and the read-only custom scope ``custom:gpuportal-warm:read`` (the health's view
of each node's warm slots, ``GET /hub/api/gpuportal/warm``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

PAGINATION = "application/jupyterhub-pagination+json"


class HubUnavailable(Exception):
    """The hub did not answer; callers answer 503 rather than 401."""


class HubRefused(HubUnavailable):
    """The hub answered 403: the portal's token lacks the scope for this call."""


class HubAPI:
    def __init__(self, api_url: str, service_token: str, timeout: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = service_token
        self._client = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        """The hub's model of the token's owner, or None for a bad or expired token."""
        try:
            reply = await self._client.get(
                f"{self.api_url}/user", headers={"Authorization": f"token {token}"}
            )
        except httpx.HTTPError as exc:
            raise HubUnavailable(str(exc)) from None
        if reply.status_code in (401, 403, 404):
            return None
        if reply.status_code != 200:
            raise HubUnavailable(f"hub answered {reply.status_code}")
        model: dict[str, Any] = reply.json()
        return model

    async def _paginated(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset = 0
        headers = {"Authorization": f"token {self._token}", "Accept": PAGINATION}
        for _ in range(10_000):  # bounded: 200 per page covers two million entries
            try:
                reply = await self._client.get(
                    f"{self.api_url}/{path}",
                    params={"offset": offset, "limit": 200},
                    headers=headers,
                )
                reply.raise_for_status()
            except httpx.HTTPError as exc:
                raise HubUnavailable(f"GET {path}: {exc}") from None
            page = reply.json()
            items.extend(page["items"])
            nxt = page.get("_pagination", {}).get("next")
            if not nxt:
                break
            offset = nxt["offset"]
        return items

    async def users(self) -> list[dict[str, Any]]:
        return await self._paginated("users")

    async def groups(self) -> list[dict[str, Any]]:
        return await self._paginated("groups")

    async def user(self, name: str) -> dict[str, Any] | None:
        try:
            reply = await self._client.get(
                f"{self.api_url}/users/{quote(name, safe='')}",
                headers={"Authorization": f"token {self._token}"},
            )
        except httpx.HTTPError as exc:
            raise HubUnavailable(str(exc)) from None
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise HubUnavailable(f"hub answered {reply.status_code}")
        model: dict[str, Any] = reply.json()
        return model

    async def stop_server(self, user: str, server: str = "") -> bool:
        """Ask the hub to stop ``user``'s server; True once it is stopping or gone.

        404 (no such user or server) and 400 (not running) count as done, so a
        retry after a lost reply is harmless.
        """
        path = f"users/{quote(user, safe='')}/server"
        if server:
            path = f"users/{quote(user, safe='')}/servers/{quote(server, safe='')}"
        try:
            reply = await self._client.delete(
                f"{self.api_url}/{path}", headers={"Authorization": f"token {self._token}"}
            )
        except httpx.HTTPError as exc:
            raise HubUnavailable(str(exc)) from None
        if reply.status_code in (200, 202, 204, 400, 404):
            return True
        raise HubUnavailable(f"hub answered {reply.status_code} to stopping {user}/{server}")

    async def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return await self._client.request(
                method,
                f"{self.api_url}/{path}",
                json=body,
                headers={"Authorization": f"token {self._token}"},
            )
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"{method} {path}: {exc}") from None

    @staticmethod
    def _done(reply: httpx.Response, what: str, ok: tuple[int, ...] = (200, 201, 204)) -> None:
        if reply.status_code not in ok:
            raise HubUnavailable(f"hub answered {reply.status_code} to {what}")

    async def create_group(self, name: str) -> None:
        """Create the hub group ``name``; an existing group (409) is fine."""
        reply = await self._send("POST", f"groups/{quote(name, safe='')}")
        self._done(reply, f"creating group {name}", (200, 201, 409))

    async def add_group_users(self, group: str, users: list[str]) -> None:
        reply = await self._send("POST", f"groups/{quote(group, safe='')}/users", {"users": users})
        self._done(reply, f"adding users to group {group}")

    async def remove_group_users(self, group: str, users: list[str]) -> None:
        reply = await self._send(
            "DELETE", f"groups/{quote(group, safe='')}/users", {"users": users}
        )
        self._done(reply, f"removing users from group {group}", (200, 204, 404))

    async def share_server(self, owner: str, server: str, with_user: str) -> None:
        """Grant ``with_user`` access to ``owner``'s server (a JupyterHub 5 share)."""
        reply = await self._send(
            "POST", f"shares/{quote(owner, safe='')}/{quote(server, safe='')}", {"user": with_user}
        )
        self._done(reply, f"sharing {owner}/{server}")

    async def revoke_share(self, owner: str, server: str, with_user: str) -> None:
        """Take ``with_user``'s access to ``owner``'s server away; no share (or server)
        is already done."""
        reply = await self._send(
            "PATCH", f"shares/{quote(owner, safe='')}/{quote(server, safe='')}", {"user": with_user}
        )
        self._done(reply, f"revoking the share of {owner}/{server}", (200, 204, 404))

    async def shared_with(self, user: str) -> list[dict[str, Any]]:
        """The shares granted to ``user``: ``[{"owner": name, "server": name}]``."""
        items = await self._paginated(f"users/{quote(user, safe='')}/shared")
        return [
            {"owner": item["server"]["user"]["name"], "server": item["server"]["name"]}
            for item in items
        ]

    async def shares_of(self, owner: str) -> list[dict[str, Any]]:
        """The shares of ``owner``'s servers: ``[{"server", "user"}]`` (users only)."""
        items = await self._paginated(f"shares/{quote(owner, safe='')}")
        return [
            {"server": item["server"]["name"], "user": item["user"]["name"]}
            for item in items
            if item.get("user")
        ]

    async def warm_pools(self, timeout: float) -> dict[str, Any]:
        """The hub's warm-pool view (``{"enabled": bool, "pools": [...]}``), bounded by
        ``timeout`` seconds: the health reads it and must stay quick. 403 raises
        :class:`HubRefused`; no answer, 404 (a hub without RaySpawner) or anything
        else raises :class:`HubUnavailable`."""
        try:
            reply = await self._client.get(
                f"{self.api_url}/gpuportal/warm",
                headers={"Authorization": f"token {self._token}"},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"GET gpuportal/warm: {type(exc).__name__}") from None
        if reply.status_code == 403:
            raise HubRefused("hub answered 403 to GET gpuportal/warm")
        if reply.status_code != 200:
            raise HubUnavailable(f"hub answered {reply.status_code} to GET gpuportal/warm")
        try:
            view: dict[str, Any] = reply.json()
        except ValueError:
            raise HubUnavailable("hub answered GET gpuportal/warm with no JSON") from None
        return view
