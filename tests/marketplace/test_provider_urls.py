"""The portal fetches a provider's jobs_url only on an allowed network (SQLite and
PostgreSQL): never loopback, private, link-local or other special addresses,
unless the node is the house node or the admin allowed that network."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from seed import Market
from sqlalchemy import select
from test_verification import FakeHub, Identity, auth, registration

from gpuportal.hub import db as portal_db
from gpuportal.hub import egress
from gpuportal.hub.db.marketplace_models import Provider
from gpuportal.hub.errors import ConfigError
from gpuportal.hub.market.marketplace import rules_of
from gpuportal.hub.portal import loops
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import load_settings

API = "/services/portal/api/v1"


def resolver(table: dict[str, list[str]]) -> Any:
    def resolve(host: str, _port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:8265", True),
        ("http://127.9.9.9:8265", True),
        ("http://localhost:8265", True),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://10.0.0.5:8265", True),
        ("http://192.168.1.2:8265", True),
        ("http://100.64.0.1:8265", True),  # carrier-grade NAT
        ("http://0.0.0.0:8265", True),
        ("http://[::1]:8265", True),
        ("http://[fe80::1]:8265", True),
        ("http://[::ffff:127.0.0.1]:8265", True),
        ("http://inside.example:8265", True),  # a public name that points inside
        ("http://nowhere.example:8265", True),  # does not resolve
        ("ftp://8.8.8.8/", True),
        ("http://ray.example:8265", False),
        ("https://8.8.8.8:8265", False),
    ],
)
def test_provider_urls_must_be_public(url: str, refused: bool) -> None:
    names = resolver(
        {
            "localhost": ["127.0.0.1", "::1"],
            "inside.example": ["93.184.215.14", "10.1.2.3"],
            "ray.example": ["93.184.215.14"],
        }
    )
    reason = egress.refusal(url, resolver=names)
    assert (reason is not None) is refused, reason


def test_an_allowed_network_is_fetched() -> None:
    allowed = egress.parse_networks("10.20.0.0/16, 127.0.0.0/8")
    assert egress.refusal("http://10.20.3.4:8265", allowed) is None
    assert egress.refusal("http://127.0.0.1:8265", allowed) is None
    assert egress.refusal("http://10.21.3.4:8265", allowed) is not None
    with pytest.raises(ValueError, match="is not a network"):
        egress.parse_networks("10.0.0.0/8, lan")
    with pytest.raises(ConfigError, match=r"GPUPORTAL_PROVIDER_NETWORKS_ALLOWED: .*'lan' is not"):
        load_settings(provider_networks_allowed="lan")


@pytest.fixture
def portal(tmp_path: Path, db_url: str) -> Portal:
    settings = load_settings(data_dir=tmp_path, db_url=db_url)  # no network allowed
    return Portal(settings, cache=MemoryCache(), hub=FakeHub())


@pytest.fixture
def client(portal: Portal) -> Iterator[TestClient]:
    with TestClient(create_app(portal.settings, portal, background=False)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "jobs_url", ["http://127.0.0.1:8265", "http://localhost:8265", "http://169.254.169.254/"]
)
def test_a_provider_registering_a_loopback_jobs_url_is_refused(
    client: TestClient, tmp_path: Path, jobs_url: str
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, "L4", 1, demo=True, vram=23034, jobs_url=jobs_url)
    reply = client.post(f"{API}/providers/register", json=body, headers=auth("tok-mallory"))
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith("jobs_url: the portal will not fetch it: the host ")
    assert "which is not a public address" in message
    assert client.get(f"{API}/providers/me", headers=auth("tok-mallory")).status_code == 404


class Dashboard:
    """A Ray dashboard double on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = b'{"data": {"result": {"result": []}}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    board = Dashboard()
    yield board
    board.close()


@pytest.mark.parametrize("who", ["provider", "house", "allowed"])
async def test_a_loopback_jobs_url_is_never_fetched_unless_trusted(
    tmp_path: Path, db_url: str, dashboard: Dashboard, who: str
) -> None:
    allowed = "127.0.0.0/8" if who == "allowed" else ""
    settings = load_settings(data_dir=tmp_path, db_url=db_url, provider_networks_allowed=allowed)
    portal = Portal(settings, cache=MemoryCache(), hub=FakeHub())
    try:
        portal_db.upgrade(portal.engine)
        await portal.start()
        market = Market(portal.sessions, rules_of(settings), {})
        # Written straight to the DB, as a registration before this check would have.
        market.add_node("mallory", "n-sneaky", {"L4": 1}, jobs_url=dashboard.url)
        if who == "house":
            with portal_db.transaction(portal.sessions) as session:
                for provider in session.scalars(select(Provider)):
                    provider.house = True
        for _ in range(3):
            await loops.check_ray(portal)
        assert dashboard.hits == (0 if who == "provider" else 3)
    finally:
        await portal.close()
