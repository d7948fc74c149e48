"""The marketplace API in-process (SQLite and PostgreSQL): the live index behind
reservations, cached offers, failed-start reports.

The hub is a double of the portal's hub client (as in tests/test_app.py) so each
caller is exactly who the test says: a user, an admin, the trusted spawner.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import Node
from gpuportal.hub.market import marketplace
from gpuportal.hub.market.capacity import load_candidates
from gpuportal.hub.market.marketplace import OFFERS_CACHE_KEY, rules_of
from gpuportal.hub.portal.context import Portal

from ..fakes import FakeHub, PortalClientFactory
from .conftest import Market

API = "/services/portal/api/v1"
USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": []},
    "tok-bob": {"name": "bob", "kind": "user", "admin": False, "groups": []},
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def client(portal_client: PortalClientFactory) -> TestClient:
    # Every user here is vouched for, so each gets the sign-up credit for reservations.
    return portal_client(hub=FakeHub(USERS), signup_credit_policy="identity")


@pytest.fixture
def portal(client: TestClient) -> Portal:
    return client.app.state.portal  # type: ignore[no-any-return]


@pytest.fixture
def seeded(portal: Portal, client: TestClient) -> Market:
    """Two demo nodes written through the portal's own sessions (so its index follows)."""
    market = Market(portal.sessions, rules_of(portal.settings), {})
    market.add_node("acme", "n-cheap", {"A100-80GB": 2}, price=1_000_000)
    market.add_node("beta", "n-dear", {"A100-80GB": 1}, price=2_000_000)
    return market


def sql_truth(portal: Portal) -> list[Any]:
    with portal_db.transaction(portal.sessions) as session:
        return sorted(load_candidates(session, portal.capacity.rules), key=lambda c: c.node_pk)


def reserve(client: TestClient, user: str, server: str = "", **body: Any) -> Any:
    reply = client.post(
        f"{API}/reservations",
        json={"gpu_count": 1, "user": user, "server_name": server, **body},
        headers=auth("tok-spawner"),
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def free(client: TestClient) -> dict[str, int]:
    offers = client.get(f"{API}/offers", headers=auth("tok-ann")).json()
    return {o["provider"]: o["free_gpus"] for o in offers}


def test_reservations_pick_from_the_live_index(
    portal: Portal, client: TestClient, seeded: Market
) -> None:
    assert portal.capacity.ready
    assert sorted(portal.capacity.candidates(), key=lambda c: c.node_pk) == sql_truth(portal)
    first = reserve(client, "ann")
    assert first["node_id"] == "n-cheap"
    assert sorted(portal.capacity.candidates(), key=lambda c: c.node_pk) == sql_truth(portal)
    # The index answers without a SQL scan of the nodes: it already knows one GPU is gone.
    assert {c.node_id: c.free_gpus for c in portal.capacity.candidates()} == {
        "n-cheap": 1,
        "n-dear": 1,
    }
    client.delete(f"{API}/reservations/{first['id']}", headers=auth("tok-spawner"))
    assert {c.node_id: c.free_gpus for c in portal.capacity.candidates()}["n-cheap"] == 2


def test_offers_come_from_the_cache_until_capacity_changes(
    portal: Portal, client: TestClient, seeded: Market
) -> None:
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(portal.engine, "before_cursor_execute", count)
    try:
        assert free(client) == {"acme": 2, "beta": 1}  # computed (and the token checked)
        summary = client.get(f"{API}/offers/summary", headers=auth("tok-ann")).json()
        assert summary[0]["free_gpus"] == 3
        statements.clear()
        for _ in range(5):  # the spawn form polling
            assert free(client) == {"acme": 2, "beta": 1}
            client.get(f"{API}/offers/summary", headers=auth("tok-ann"))
        assert statements == []
        held = reserve(client, "ann")
        assert free(client) == {"acme": 1, "beta": 1}  # the very next call shows it
        assert (
            client.get(f"{API}/offers/summary", headers=auth("tok-ann")).json()[0]["free_gpus"] == 2
        )
        statements.clear()
        assert free(client) == {"acme": 1, "beta": 1}
        assert statements == []
        client.delete(f"{API}/reservations/{held['id']}", headers=auth("tok-ann"))
        assert free(client) == {"acme": 2, "beta": 1}
        # An admin blocking a node is a capacity change too.
        blocked = client.post(f"{API}/admin/nodes/n-cheap/block", headers=auth("tok-admin"))
        assert blocked.status_code == 200
        assert free(client) == {"beta": 1}
    finally:
        event.remove(portal.engine, "before_cursor_execute", count)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # no SQL of its own
def test_uncached_offers_are_built_from_the_index_and_cached_as_bytes(
    portal: Portal, client: TestClient, seeded: Market
) -> None:
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    free(client)  # the caller's token is checked and cached
    reserve(client, "bob")
    event.listen(portal.engine, "before_cursor_execute", count)
    try:
        raw = client.get(f"{API}/offers", headers=auth("tok-ann"))
    finally:
        event.remove(portal.engine, "before_cursor_execute", count)
    # No scan of the nodes and their GPUs: one look for expired holds, nothing more.
    assert not [s for s in statements if "gpus" in s.lower()], statements
    with portal_db.transaction(portal.sessions) as session:
        assert raw.json() == marketplace.offers(session, portal.capacity.rules)
    cached = client.portal.call(portal.cache.get, OFFERS_CACHE_KEY)  # type: ignore[union-attr]
    assert cached is not None and cached.partition("\n")[2].encode() == raw.content
    # A hit returns those bytes as they are (never parsed again).
    at = cached.partition("\n")[0]
    client.portal.call(  # type: ignore[union-attr]
        portal.cache.set, OFFERS_CACHE_KEY, f'{at}\n[{{"gpu_model": "as stored"}}]'
    )
    assert client.get(f"{API}/offers", headers=auth("tok-ann")).json() == [
        {"gpu_model": "as stored"}
    ]


def test_a_failed_start_lowers_reliability_once_and_releases(
    portal: Portal, client: TestClient, seeded: Market
) -> None:
    held = reserve(client, "ann", "lab", gpu_count=2)
    assert held["node_id"] == "n-cheap" and held["failed_at"] is None
    url = f"{API}/reservations/{held['id']}/failed"
    body = {"reason": "the Ray job exited with code 1 before the server answered"}

    # The customer cannot lower a provider's score; another user even less.
    for token in ("tok-ann", "tok-bob"):
        refused = client.post(url, json=body, headers=auth(token))
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == (
            "Only the spawner (a trusted hub service) or an admin may report a failed start."
        )
    bad = client.post(url, json={"reason": ""}, headers=auth("tok-spawner"))
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == "reason: String should have at least 1 character"

    failed = client.post(url, json=body, headers=auth("tok-spawner"))
    assert failed.status_code == 200, failed.text
    answer = failed.json()
    assert answer["status"] == "released"
    assert answer["failure_reason"] == body["reason"]
    assert answer["failed_at"] is not None and answer["released_at"] is not None

    def node() -> tuple[int, float]:
        with portal_db.transaction(portal.sessions) as session:
            n = session.scalar(select(Node).where(Node.node_id == "n-cheap"))
            assert n is not None
            return n.failed_starts, n.reliability

    assert node() == (1, pytest.approx(0.85))  # 0.9 to start, minus 0.05 per failed start
    offers = client.get(f"{API}/offers", headers=auth("tok-ann")).json()
    assert {o["provider"]: (o["free_gpus"], o["reliability"]) for o in offers} == {
        "acme": (2, 0.85),
        "beta": (1, 0.9),
    }
    # Reported again (a retried call): the same answer, counted once.
    again = client.post(url, json=body, headers=auth("tok-spawner"))
    assert again.status_code == 200 and again.json() == answer
    assert node() == (1, pytest.approx(0.85))

    # An admin may report one too; an unknown reservation is a 404.
    other = reserve(client, "bob", gpu_count=2)
    assert (
        client.post(
            f"{API}/reservations/{other['id']}/failed", json=body, headers=auth("tok-admin")
        ).json()["status"]
        == "released"
    )
    assert node() == (2, pytest.approx(0.8))
    missing = client.post(f"{API}/reservations/nope/failed", json=body, headers=auth("tok-admin"))
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no reservation 'nope'."
