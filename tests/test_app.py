"""The portal service in-process: error shape, auth, roles, token cache, health.

The hub here is a fault-injecting double of the portal's hub client (layer two
of STYLE.md's tests): it lets us say "this token is expired" or "the hub is
down" exactly. The real hub is exercised end to end in test_stack.py.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from fastapi.testclient import TestClient

from gpuportal.hub.errors import ConfigError
from gpuportal.hub.portal.auth import TOKEN_COOKIE
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.reqlog import RequestIdFilter
from gpuportal.hub.settings import load_settings

from .fakes import FakeHub, PortalClientFactory

USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-svc": {"name": "some-service", "kind": "service"},
}


GROUPS = [{"name": "ml", "users": ["ann"]}, {"name": "admins", "users": ["admin"]}]
NO_RAY = "http://127.0.0.1:9"


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub(USERS, GROUPS)


@pytest.fixture
def client(portal_client: PortalClientFactory, hub: FakeHub) -> TestClient:
    return portal_client(hub=hub, ray_dashboard_url=NO_RAY)


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
    # An Authorize button: "Try it out" can send a hub token, and the page says how.
    assert spec["components"]["securitySchemes"]["hubToken"]["name"] == "Authorization"
    assert "Token page" in spec["info"]["description"]


# --- Auth freshness (issue 9 item 5) and cookie writes (issue 8 item 7) ---


class TtlRecordingCache(MemoryCache):
    def __init__(self) -> None:
        super().__init__()
        self.ttls: list[float | None] = []

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self.ttls.append(ttl)
        await super().set(key, value, ttl)


RESERVE = {"user": "ann", "server_name": "", "gpu_count": 1}


def test_a_revoked_token_cannot_reserve_even_while_its_read_is_cached(
    portal_client: PortalClientFactory, hub: FakeHub
) -> None:
    client = portal_client(hub=hub, ray_dashboard_url=NO_RAY)
    assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 200
    before = client.post(f"{API}/reservations", json=RESERVE, headers=auth("tok-ann"))
    assert before.status_code == 409, before.text  # authenticated; no GPUs in this market
    hub.revoked.add("tok-ann")
    after = client.post(f"{API}/reservations", json=RESERVE, headers=auth("tok-ann"))
    assert after.status_code == 401, after.text
    assert "invalid or has expired" in after.json()["error"]["message"]
    # The refusal also dropped what the read had cached: reads stop at once too.
    assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 401


def test_a_removed_admin_role_stops_working_at_the_next_write(
    portal_client: PortalClientFactory, hub: FakeHub
) -> None:
    client = portal_client(hub=hub, ray_dashboard_url=NO_RAY)
    assert client.post(f"{API}/sync", headers=auth("tok-admin")).status_code == 200
    hub.changed["admin"] = {"name": "admin", "kind": "user", "admin": False, "groups": []}
    reply = client.post(f"{API}/sync", headers=auth("tok-admin"))
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"]["message"] == "This needs the admin role; you are a customer."


def test_writes_always_ask_the_hub_and_reads_are_cached_a_few_seconds(
    portal_client: PortalClientFactory, hub: FakeHub
) -> None:
    cache = TtlRecordingCache()
    client = portal_client(hub=hub, cache=cache, ray_dashboard_url=NO_RAY)
    for _ in range(3):
        client.get(f"{API}/me", headers=auth("tok-ann"))
    assert hub.token_checks == 1
    for _ in range(2):
        client.post(f"{API}/reservations", json=RESERVE, headers=auth("tok-ann"))
    assert hub.token_checks == 3
    auth_ttls = set(cache.ttls)
    assert auth_ttls == {3.0}, "the default read cache is 3 seconds, not 30"


def test_a_cache_time_of_zero_caches_nothing_rather_than_forever(
    portal_client: PortalClientFactory, hub: FakeHub
) -> None:
    client = portal_client(hub=hub, auth_cache_seconds=0, ray_dashboard_url=NO_RAY)
    for _ in range(3):
        assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 200
    assert hub.token_checks == 3
    hub.revoked.add("tok-ann")
    assert client.get(f"{API}/me", headers=auth("tok-ann")).status_code == 401


@pytest.mark.parametrize("seconds", [-1, 30])
def test_an_auth_cache_time_outside_0_to_10_seconds_is_refused(seconds: int) -> None:
    with pytest.raises(ConfigError, match="GPUPORTAL_AUTH_CACHE_SECONDS"):
        load_settings(auth_cache_seconds=seconds)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sync"),
        ("PUT", "/quotas"),
        ("PATCH", "/providers/me"),
        ("DELETE", "/reservations/r-1"),
    ],
)
def test_a_cookie_alone_cannot_write(
    client: TestClient, hub: FakeHub, method: str, path: str
) -> None:
    client.cookies.set(TOKEN_COOKIE, "tok-admin")
    reply = client.request(method, f"{API}{path}", json={})
    assert reply.status_code == 403, reply.text
    message = reply.json()["error"]["message"]
    assert "reading only" in message and "Authorization: token" in message
    assert hub.token_checks == 0, "refused before the token is even checked"


def test_a_cookie_reads_and_a_token_header_writes(client: TestClient) -> None:
    client.cookies.set(TOKEN_COOKIE, "tok-admin")
    assert client.get(f"{API}/me").status_code == 200
    assert client.post(f"{API}/sync", headers=auth("tok-admin")).status_code == 200


def test_health_names_no_internal_url(client: TestClient) -> None:
    body = client.get(f"{API}/health").json()
    assert "address" not in body["ray"]
    assert "127.0.0.1:9" not in json.dumps(body)


def test_the_access_log_keeps_failures_and_drops_routine_successes() -> None:
    """Heartbeats and page polls succeed every few seconds: at INFO only the failed
    requests' access lines are kept; at DEBUG every one is."""
    from gpuportal.hub.portal.reqlog import QuietAccess

    def line(status: int) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:1", "POST", "/api/v1/nodes/n/heartbeat", "1.1", status),
            None,
        )

    quiet, root = QuietAccess(), logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        assert [quiet.filter(line(s)) for s in (200, 204, 302, 400, 404, 500)] == [
            False,
            False,
            False,
            True,
            True,
            True,
        ]
        root.setLevel(logging.DEBUG)
        assert quiet.filter(line(200))
    finally:
        root.setLevel(before)


def test_first_requests_of_new_users_at_once_make_their_accounts_and_no_500(
    portal_client: PortalClientFactory,
) -> None:
    """On a fresh portal, new users' first requests race: two for each of four users (to
    make the account), and all of them to make the sign-up credit's ledger account on
    the first welcome. Every request gets its answer; each user has one account,
    welcomed once."""
    import threading

    from sqlalchemy import func, select

    from gpuportal.hub import db as portal_db
    from gpuportal.hub.billing import ledger
    from gpuportal.hub.db.models import Account
    from gpuportal.hub.portal import auth as portal_auth

    client = portal_client(
        hub=FakeHub(USERS, GROUPS),
        ray_dashboard_url=NO_RAY,
        signup_credits=5_000_000,
        signup_credit_policy="identity",
    )
    portal = client.app.state.portal
    names = [f"newcomer{i}" for i in range(4)] * 2
    start, results, errors = threading.Barrier(len(names)), [], []

    def first_request(name: str) -> None:
        model = {"name": name, "kind": "user", "admin": False, "groups": []}
        start.wait(timeout=30)
        try:
            results.append(portal_auth._record(portal, model, []))
        except Exception as exc:  # what a user would have got as a 500
            errors.append(exc)

    threads = [threading.Thread(target=first_request, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == len(names)
    with portal_db.transaction(portal.sessions) as session:
        for name in set(names):
            ids = session.scalars(select(Account.id).where(Account.hub_name == name)).all()
            assert len(ids) == 1
            assert ledger.balance(session, ledger.wallet(session, ids[0]).id) == 5_000_000
        count = session.scalar(select(func.count()).select_from(Account))
    assert count == 4
