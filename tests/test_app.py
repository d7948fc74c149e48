"""The portal service in-process: error shape, auth, roles, token cache, health.

The hub here is a fault-injecting double of the portal's hub client (layer two
of STYLE.md's tests): it lets us say "this token is expired" or "the hub is
down" exactly. The real hub is exercised end to end in test_stack.py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpuportal.hub.app import Portal, create_app
from gpuportal.hub.cache import MemoryCache
from gpuportal.hub.hubapi import HubAPI, HubUnavailable
from gpuportal.hub.reqlog import RequestIdFilter
from gpuportal.hub.settings import load_settings

USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-svc": {"name": "some-service", "kind": "service"},
}


class FakeHub(HubAPI):
    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1/hub/api", "service-token")
        self.token_checks = 0
        self.down = False

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        self.token_checks += 1
        if self.down:
            raise HubUnavailable("connection refused")
        return USERS.get(token)

    async def user(self, name: str) -> dict[str, Any] | None:
        return next((u for u in USERS.values() if u["name"] == name), None)

    async def users(self) -> list[dict[str, Any]]:
        return [u for u in USERS.values() if u["kind"] == "user"]

    async def groups(self) -> list[dict[str, Any]]:
        return [{"name": "ml", "users": ["ann"]}, {"name": "admins", "users": ["admin"]}]


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def client(tmp_path: Path, hub: FakeHub, db_url: str) -> Iterator[TestClient]:
    settings = load_settings(
        data_dir=tmp_path, db_url=db_url, ray_dashboard_url="http://127.0.0.1:9"
    )
    portal = Portal(settings, cache=MemoryCache(), hub=hub)
    with TestClient(create_app(settings, portal, background=False)) as test_client:
        yield test_client


API = "/services/portal/api/v1"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def test_unauthenticated_is_401_json(client: TestClient) -> None:
    reply = client.get(f"{API}/me")
    assert reply.status_code == 401
    body = reply.json()
    assert body["error"]["code"] == "unauthenticated"
    assert "Authorization: token" in body["error"]["message"]
    assert body["error"]["request_id"] == reply.headers["x-request-id"]


def test_request_id_is_echoed(client: TestClient) -> None:
    reply = client.get(f"{API}/me", headers={"X-Request-ID": "abc-123"})
    assert reply.headers["x-request-id"] == "abc-123"
    assert reply.json()["error"]["request_id"] == "abc-123"
    hostile = client.get(f"{API}/me", headers={"X-Request-ID": "x\r\ny" + "z" * 100})
    assert hostile.headers["x-request-id"] != "x\r\ny" + "z" * 100


def test_bad_token_is_401(client: TestClient) -> None:
    reply = client.get(f"{API}/me", headers=auth("nope"))
    assert reply.status_code == 401
    assert "invalid or has expired" in reply.json()["error"]["message"]


def test_bearer_and_token_schemes(client: TestClient) -> None:
    assert client.get(f"{API}/me", headers={"Authorization": "Bearer tok-ann"}).status_code == 200
    assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 200


def test_hub_down_is_503_not_401(client: TestClient, hub: FakeHub) -> None:
    hub.down = True
    reply = client.get(f"{API}/me", headers=auth("tok-ann"))
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "unavailable"


def test_me(client: TestClient) -> None:
    client.post(f"{API}/sync", headers=auth("tok-admin"))
    body = client.get(f"{API}/me", headers=auth("tok-ann")).json()
    assert {k: body[k] for k in ("name", "role", "admin", "teams", "active")} == {
        "name": "ann",
        "role": "customer",
        "admin": False,
        "teams": ["ml"],
        "active": True,
    }
    assert body["created_at"].endswith("Z") or "+00:00" in body["created_at"]


def test_wrong_role_is_403_json(client: TestClient) -> None:
    reply = client.get(f"{API}/accounts", headers=auth("tok-ann"))
    assert reply.status_code == 403
    assert reply.json()["error"] == {
        "code": "forbidden",
        "message": "This needs the admin role; you are a customer.",
        "request_id": reply.headers["x-request-id"],
    }
    ok = client.get(f"{API}/accounts", headers=auth("tok-admin"))
    assert ok.status_code == 200
    assert [a["name"] for a in ok.json()] == ["admin", "ann"]


def test_services_are_not_users(client: TestClient) -> None:
    reply = client.get(f"{API}/me", headers=auth("tok-svc"))
    assert reply.status_code == 403


def test_invalid_query_is_422_with_a_sentence(client: TestClient) -> None:
    reply = client.get(f"{API}/accounts?role=emperor", headers=auth("tok-admin"))
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid"
    assert reply.json()["error"]["message"].startswith("query.role:")


def test_unknown_endpoint_is_404_json(client: TestClient) -> None:
    reply = client.get(f"{API}/nope")
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == f"No such endpoint: GET {API}/nope"


def test_token_cache_is_keyed_by_hash(client: TestClient, hub: FakeHub) -> None:
    for _ in range(3):
        assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 200
    assert hub.token_checks == 1
    cache: MemoryCache = client.app.state.portal.cache  # type: ignore[attr-defined]
    keys = list(cache._data)
    assert f"auth:{hashlib.sha256(b'tok-ann').hexdigest()}" in keys
    assert not any("tok-ann" in key for key in keys)
    assert not any("tok-ann" in value for value, _ in cache._data.values())


def test_health_reports_each_part(client: TestClient) -> None:
    reply = client.get(f"{API}/health")
    assert reply.status_code == 200
    body = reply.json()
    assert body["db"]["status"] == "ok"
    assert body["db"]["revision"]
    assert body["cache"] == {"backend": "memory", "status": "ok"}
    assert body["ray"]["status"] == "unreachable"
    assert body["status"] == "degraded"


def test_log_lines_carry_the_request_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="gpuportal"):
        reply = client.get(f"{API}/me", headers=auth("tok-ann") | {"X-Request-ID": "req-42"})
    assert reply.status_code == 200
    lines = [r for r in caplog.records if r.name.startswith("gpuportal")]
    assert lines, "the auth path logs one line per verified user"
    assert all(getattr(r, "request_id", None) == "req-42" for r in lines)


def test_openapi_docs_are_served(client: TestClient) -> None:
    docs = client.get("/services/portal/docs")
    assert docs.status_code == 200
    assert "cdn." not in docs.text, "the docs page must work without internet"
    assert client.get("/services/portal/static/swagger/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/services/portal/openapi.json").json()
    assert f"{API}/health" in spec["paths"]
    assert f"{API}/me" in spec["paths"]
