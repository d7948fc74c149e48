"""The test doubles shared by the suite: one fake hub API and one clock.

Only what a test cannot run for real is faked here: the portal's view of JupyterHub
(tests of the portal app alone have no hub) and the time (tests move it instead of
sleeping). Tests of the whole stack use the real hub (``tests/portal_stack.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from gpuportal.hub.portal.hubapi import HubAPI, HubRefused, HubUnavailable

#: The ``portal_client`` fixture (``tests/conftest.py``): ``portal_client(hub=..., **settings)``
#: makes the portal app and returns a started ``TestClient`` for it.
PortalClientFactory = Callable[..., Any]


class FakeHub(HubAPI):
    """JupyterHub's REST API as the portal sees it, from a table of tokens.

    ``users`` maps a token to the hub's model of its owner (``name``, ``kind``,
    ``admin``, ``groups``); ``groups`` are hub group models (``name``, ``users``).
    Every call is recorded in ``calls`` as ``(method, argument)``; ``stopped`` lists
    the servers the portal asked the hub to stop. ``down = True`` makes the hub
    unreachable, as a refused connection does; a token in ``revoked`` is refused as
    the hub refuses a revoked one (403, so None); ``changed`` holds a user's new model
    by name (an admin flag or groups changed on the hub). ``warm`` is the hub's
    warm-pool view (``GET /hub/api/gpuportal/warm``: ``{"enabled", "pools"}``);
    ``warm_refused = True`` answers it 403, as a hub does to a token without the scope.
    """

    def __init__(
        self,
        users: Mapping[str, dict[str, Any]],
        groups: Iterable[dict[str, Any]] = (),
    ) -> None:
        super().__init__("http://127.0.0.1:1/hub/api", "service-token")
        self.tokens = dict(users)
        self.group_models = list(groups)
        self.calls: list[tuple[str, str]] = []
        self.stopped: list[tuple[str, str]] = []
        self.down = False
        self.revoked: set[str] = set()
        self.changed: dict[str, dict[str, Any]] = {}
        self.shares: set[tuple[str, str, str]] = set()
        self.warm: dict[str, Any] = {"enabled": False, "pools": []}
        self.warm_refused = False

    def _call(self, method: str, argument: str = "") -> None:
        self.calls.append((method, argument))
        if self.down:
            raise HubUnavailable("connection refused")

    @property
    def token_checks(self) -> int:
        """How many times the portal asked the hub who owns a token."""
        return sum(1 for method, _ in self.calls if method == "user_for_token")

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        self._call("user_for_token")  # never record a token
        if token in self.revoked:
            return None
        model = self.tokens.get(token)
        return self.changed.get(model["name"], model) if model else None

    async def user(self, name: str) -> dict[str, Any] | None:
        self._call("user", name)
        if name in self.changed:
            return self.changed[name]
        return next((u for u in self.tokens.values() if u["name"] == name), None)

    async def users(self) -> list[dict[str, Any]]:
        self._call("users")
        return [u for u in self.tokens.values() if u["kind"] == "user"]

    async def groups(self) -> list[dict[str, Any]]:
        self._call("groups")
        return list(self.group_models)

    async def stop_server(self, user: str, server: str = "") -> bool:
        self._call("stop_server", f"{user}/{server}")
        self.stopped.append((user, server))
        return True

    async def warm_pools(self, timeout: float) -> dict[str, Any]:
        self._call("warm_pools", str(timeout))
        if self.warm_refused:
            raise HubRefused("hub answered 403 to GET gpuportal/warm")
        return copy.deepcopy(self.warm)

    # Groups and shares: the hub side of teams, kept in ``group_models`` and ``shares``
    # (``(owner, server, user)`` triples) so a test reads what the hub would hold.

    def _group(self, name: str) -> dict[str, Any] | None:
        return next((g for g in self.group_models if g["name"] == name), None)

    async def create_group(self, name: str) -> None:
        self._call("create_group", name)
        if self._group(name) is None:
            self.group_models.append({"name": name, "users": []})

    async def add_group_users(self, group: str, users: list[str]) -> None:
        self._call("add_group_users", f"{group}:{','.join(users)}")
        model = self._group(group)
        if model is None:
            raise HubUnavailable(f"hub answered 404 to adding users to group {group}")
        model["users"] = sorted(set(model.get("users") or ()) | set(users))

    async def remove_group_users(self, group: str, users: list[str]) -> None:
        self._call("remove_group_users", f"{group}:{','.join(users)}")
        model = self._group(group)
        if model is not None:
            model["users"] = sorted(set(model.get("users") or ()) - set(users))

    async def share_server(self, owner: str, server: str, with_user: str) -> None:
        self._call("share_server", f"{owner}/{server}:{with_user}")
        self.shares.add((owner, server, with_user))

    async def revoke_share(self, owner: str, server: str, with_user: str) -> None:
        self._call("revoke_share", f"{owner}/{server}:{with_user}")
        self.shares.discard((owner, server, with_user))

    async def shared_with(self, user: str) -> list[dict[str, Any]]:
        self._call("shared_with", user)
        found = self.shares
        return [{"owner": o, "server": s} for o, s, u in sorted(found) if u == user]

    async def shares_of(self, owner: str) -> list[dict[str, Any]]:
        self._call("shares_of", owner)
        found = self.shares
        return [{"server": s, "user": u} for o, s, u in sorted(found) if o == owner]


class Clock:
    """A settable UTC clock, installed as ``gpuportal.hub.timeutil.utcnow``.

    Every module reads the time through ``timeutil.utcnow()`` (``tests/test_clock.py``
    checks that none binds the function at import), so this one patch moves the
    time for all of them.
    """

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now
