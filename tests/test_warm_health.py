"""Who may read the hub's warm-pool view, and what the portal's health and admin node
list show of it: the hub's scope check and config reading as pure functions, the
portal in-process with the hub faked (up, down, refusing, off, cached), and the
portal's hub client against canned hub answers. The real hub's side runs in
``tests/spawner/test_warm.py`` (pools on) and ``tests/test_stack.py`` (pools off,
the production roles)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from jupyterhub.spawner import LocalProcessSpawner
from traitlets.config import Config

from gpuportal.hub.portal import warmslots
from gpuportal.hub.portal.hubapi import HubAPI, HubRefused, HubUnavailable
from gpuportal.spawners import warm
from gpuportal.spawners.spawner import RaySpawner

from .fakes import FakeHub, PortalClientFactory
from .ledger.conftest import add_node

API = "/services/portal/api/v1"
ADMIN = {"Authorization": "token tok-admin"}
USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": []},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": []},
}
#: Why a pool is out may name the node's address: admins only.
WHY = "its job or node is gone (ConnectError: http://10.9.8.7:41234/status)"
COUNTS = {"ready": 1, "starting": 0, "claimed": 2}
NO_COUNTS = {"ready": None, "starting": None, "claimed": None}
POOLS = {
    "enabled": True,
    "pools": [
        {
            "node_id": "node-b",
            "job_id": "raysubmit_bbb",
            "state": "failed",
            "why": WHY,
        },
        {
            "node_id": "node-a",
            "job_id": "raysubmit_aaa",
            "state": "ready",
            **COUNTS,
        },
    ],
}


@pytest.fixture
def hub() -> FakeHub:
    fake = FakeHub(USERS)
    fake.warm = json.loads(json.dumps(POOLS))
    return fake


@pytest.fixture
def client(portal_client: PortalClientFactory, hub: FakeHub) -> TestClient:
    return portal_client(hub=hub, ray_dashboard_url="http://127.0.0.1:9")


def health(client: TestClient) -> dict[str, Any]:
    reply = client.get(f"{API}/health")
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def warm_calls(hub: FakeHub) -> list[tuple[str, str]]:
    return [call for call in hub.calls if call[0] == "warm_pools"]


# --- the hub's handler: who may read the view ------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        ({"admin:servers", "admin:users"}, True),  # an admin, as today
        ({warm.READ_SCOPE, "read:users"}, True),  # the portal's token
        ({"admin:servers!user=ann"}, False),  # one user's servers are not every node
        ({f"{warm.READ_SCOPE}!user=ann"}, False),
        ({"servers", "read:users", "list:users"}, False),  # the portal without the scope
        (set(), False),  # a token with no scope (the ray-spawner service)
        (None, False),
    ],
)
def test_only_admins_and_the_read_scope_may_read_the_warm_pools(
    scopes: set[str] | None, allowed: bool
) -> None:
    assert warm.may_read(scopes) is allowed


def test_the_custom_scope_is_one_name_on_both_sides_and_described() -> None:
    assert warmslots.READ_SCOPE == warm.READ_SCOPE
    assert warm.READ_SCOPE.startswith("custom:")
    assert warm.CUSTOM_SCOPES[warm.READ_SCOPE]["description"]


def config(**sections: dict[str, Any]) -> Config:
    cfg = Config()
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, name), key, value)
    return cfg


@pytest.mark.parametrize(
    ("cfg", "spawner_class", "enabled"),
    [
        (config(RaySpawner={"warm_pools": True, "warm_secret": "s"}), RaySpawner, True),
        (config(RaySpawner={"warm_pools": True}), RaySpawner, False),  # nothing to sign with
        (config(RaySpawner={"warm_pools": False, "warm_secret": "s"}), RaySpawner, False),
        (config(RaySpawner={"warm_secret": "s"}), RaySpawner, False),  # off by default
        (config(RaySpawner={"warm_pools": True, "warm_secret": "s"}), LocalProcessSpawner, False),
        (None, RaySpawner, False),
    ],
)
def test_the_view_says_whether_the_hubs_config_runs_warm_pools(
    cfg: Config | None, spawner_class: type, enabled: bool
) -> None:
    assert warm.warm_configured(cfg, spawner_class) is enabled


# --- the portal's health ------------------------------------------------------------------


def test_the_health_shows_each_nodes_warm_slots_and_nothing_only_admins_may_read(
    client: TestClient, hub: FakeHub
) -> None:
    body = health(client)
    assert body["warm_pools"] == {
        "available": True,
        "nodes": [
            {"node_id": "node-a", "state": "ready", **COUNTS},
            {"node_id": "node-b", "state": "failed", **NO_COUNTS},
        ],
    }
    text = json.dumps(body)
    assert "raysubmit" not in text and "10.9.8.7" not in text and "why" not in text
    # Asked once, with the short bound, whoever asks next within the cache period.
    assert health(client)["warm_pools"] == body["warm_pools"]
    assert warm_calls(hub) == [("warm_pools", str(warmslots.HUB_TIMEOUT))]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("down", "The hub did not answer in time."),
        (
            "refused",
            "The hub refused the portal's token: it needs the custom:gpuportal-warm:read "
            "scope (role portal-service).",
        ),
        ("off", "Warm pools are off on the hub (c.RaySpawner.warm_pools)."),
        ("garbled", "The hub's answer was not understood."),
    ],
)
def test_without_the_hubs_view_the_health_still_answers_and_says_why(
    client: TestClient, hub: FakeHub, fault: str, reason: str
) -> None:
    if fault == "down":
        hub.down = True
    elif fault == "refused":
        hub.warm_refused = True
    elif fault == "off":
        hub.warm = {"enabled": False, "pools": []}
    else:
        hub.warm = {"enabled": True, "pools": [{"state": "ready"}]}
    body = health(client)
    assert body["warm_pools"] == {"available": False, "reason": reason}
    assert body["db"]["status"] == "ok"
    # A hub that is down is not asked again by every health check in the period.
    health(client)
    assert len(warm_calls(hub)) == 1


def test_the_health_asks_the_hub_again_once_its_answer_expires(
    client: TestClient, hub: FakeHub
) -> None:
    hub.down = True
    assert health(client)["warm_pools"]["available"] is False
    hub.down = False
    portal = client.app.state.portal  # type: ignore[attr-defined]
    asyncio.run(portal.cache.delete(warmslots.CACHE_KEY))  # as the TTL does
    assert health(client)["warm_pools"]["available"] is True
    assert len(warm_calls(hub)) == 2


# --- the admin node list --------------------------------------------------------------


def test_admins_see_each_nodes_warm_pool_with_its_job_and_why(
    client: TestClient, hub: FakeHub
) -> None:
    portal = client.app.state.portal  # type: ignore[attr-defined]
    for node_id in ("node-a", "node-b", "node-c"):
        add_node(portal.sessions, node_id=node_id)
    nodes = client.get(f"{API}/admin/nodes", headers=ADMIN).json()
    assert {n["node_id"]: n["warm"] for n in nodes} == {
        "node-a": {"job_id": "raysubmit_aaa", "state": "ready", **COUNTS},
        "node-b": {
            "job_id": "raysubmit_bbb",
            "state": "failed",
            **NO_COUNTS,
            "why": WHY,
        },
        "node-c": None,  # no pool there (yet)
    }
    customer = {"Authorization": "token tok-ann"}
    assert client.get(f"{API}/admin/nodes", headers=customer).status_code == 403

    hub.down = True
    asyncio.run(portal.cache.delete(warmslots.CACHE_KEY))
    nodes = client.get(f"{API}/admin/nodes", headers=ADMIN).json()
    unknown = {"state": "unknown", "why": "The hub did not answer in time."}
    assert [n["warm"] for n in nodes] == [unknown] * 3


# --- the portal's hub client ----------------------------------------------------------


def ask(answer: httpx.Response | Exception) -> dict[str, Any]:
    seen: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def run() -> dict[str, Any]:
        hub = HubAPI("http://127.0.0.1:1/hub/api", "service-token")
        hub._client = httpx.AsyncClient(transport=httpx.MockTransport(reply))
        try:
            return await hub.warm_pools(timeout=1.5)
        finally:
            await hub.close()

    try:
        return asyncio.run(run())
    finally:
        assert [str(r.url) for r in seen] == ["http://127.0.0.1:1/hub/api/gpuportal/warm"]
        assert seen[0].headers["authorization"] == "token service-token"
        assert seen[0].extensions["timeout"]["read"] == 1.5


def test_the_hub_client_reads_the_view_with_its_own_token_and_bound() -> None:
    assert ask(httpx.Response(200, json=POOLS)) == POOLS


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (httpx.Response(403, json={"message": "no"}), HubRefused),
        (httpx.Response(404), HubUnavailable),  # a hub without RaySpawner's handlers
        (httpx.Response(500), HubUnavailable),
        (httpx.Response(200, text="<html>"), HubUnavailable),
        (httpx.ReadTimeout("slow"), HubUnavailable),
        (httpx.ConnectError("refused"), HubUnavailable),
    ],
)
def test_the_hub_client_turns_each_failure_into_its_exception(
    answer: httpx.Response | Exception, raised: type[Exception]
) -> None:
    with pytest.raises(raised):
        ask(answer)


def test_the_public_health_names_a_node_as_spawn_progress_does() -> None:
    view = {
        "available": True,
        "pools": [{"node_id": "n-0123456789abcdef", "job_id": "j", "state": "ready", **COUNTS}],
    }
    assert warmslots.public(view)["nodes"] == [
        {"node_id": "n-0123456789", "state": "ready", **COUNTS}
    ]
    assert warmslots.for_node(view, "n-0123456789abcdef") == {
        "job_id": "j",
        "state": "ready",
        **COUNTS,
    }
