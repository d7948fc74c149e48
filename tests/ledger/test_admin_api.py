"""The admin control panel's API in-process, on SQLite and PostgreSQL: refunds and their
limits, stopping a server through the hub, the audit record every admin action
leaves, and the 403 every non-admin gets, whatever token they craft."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpuportal.hub.db import transaction
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.portal.hubapi import HubUnavailable

from ..fakes import FakeHub, PortalClientFactory
from .conftest import CREDIT, Clock, add_node, balance_of, reserve, total

#: A user server's own token: the ``server`` role's scopes, no ``access:services``.
SERVER_SCOPES = ["access:servers!server={}/", "users:activity!user={}"]
USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": []},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": []},
    "tok-prov": {"name": "prov", "kind": "user", "admin": False, "groups": ["providers"]},
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
    "tok-dash": {"name": "dashboards", "kind": "service"},
    # Servers' own tokens (read-only for the portal), of a customer and of an admin.
    "tok-ann-server": {
        "name": "ann",
        "kind": "user",
        "admin": False,
        "groups": [],
        "scopes": [s.format("ann") for s in SERVER_SCOPES],
    },
    "tok-admin-server": {
        "name": "admin",
        "kind": "user",
        "admin": True,
        "groups": [],
        "scopes": [s.format("admin") for s in SERVER_SCOPES],
    },
}
API = "/services/portal/api/v1"
ADMIN = {"Authorization": "token tok-admin"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def error(reply: Any) -> str:
    return str(reply.json()["error"]["message"])


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub(USERS)


@pytest.fixture
def client(portal_client: PortalClientFactory, hub: FakeHub) -> TestClient:
    client = portal_client(hub=hub, ray_dashboard_url="http://127.0.0.1:9", signup_credits=0)
    for token in ("tok-admin", "tok-ann", "tok-prov"):
        assert client.get(f"{API}/me", headers=auth(token)).status_code == 200
    return client


@pytest.fixture
def portal(client: TestClient) -> Portal:
    return client.app.state.portal  # type: ignore[no-any-return]


def audit(client: TestClient, **filters: Any) -> list[dict[str, Any]]:
    reply = client.get(f"{API}/admin/audit", params=filters, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def charged_allocation(client: TestClient, portal: Portal, clock: Clock, seconds: int) -> int:
    """ann's server ran ``seconds`` at 3.6 credits/GPU-hour (1,000 micro a second), 10% fee."""
    client.post(f"{API}/credits/grants", json={"user": "ann", "amount": 10 * CREDIT}, headers=ADMIN)
    add_node(portal.sessions)
    rid = reserve(portal.sessions, "ann", server="gpu", fee_bps=1000)
    opened = client.post(
        f"{API}/allocations", json={"reservation_id": rid}, headers=auth("tok-spawner")
    )
    assert opened.status_code == 201, opened.text
    clock.advance(seconds)
    alloc_id = int(opened.json()["id"])
    closed = client.post(f"{API}/allocations/{alloc_id}/close", headers=auth("tok-spawner"))
    assert closed.json()["charged"] == seconds * 1000
    return alloc_id


def test_a_refund_gives_back_at_most_what_was_charged_and_only_once(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    alloc = charged_allocation(client, portal, clock, 90)
    url = f"{API}/admin/allocations/{alloc}/refund"
    before = balance_of(portal.sessions, _wallet(portal, "ann"))
    assert before == 10 * CREDIT - 90_000

    too_much = client.post(url, json={"amount": 90_001, "reason": "node lost"}, headers=ADMIN)
    assert too_much.status_code == 400, too_much.text
    assert "more than allocation" in error(too_much) and "(90000)" in error(too_much)
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == before

    no_reason = client.post(url, json={"amount": 5, "reason": "  "}, headers=ADMIN)
    assert no_reason.status_code == 400 and "Say why" in error(no_reason)

    done = client.post(url, json={"amount": 90_000, "reason": "node lost"}, headers=ADMIN)
    assert done.status_code == 200, done.text
    assert (done.json()["amount"], done.json()["refunded"]) == (90_000, 90_000)
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == 10 * CREDIT
    # The provider (90%) and the platform (10%) give back exactly what they were paid.
    assert balance_of(portal.sessions, "platform:revenue") == 0
    assert total(portal.sessions) == 0

    history = client.get(f"{API}/credits/history", headers=auth("tok-ann")).json()
    assert (history[0]["kind"], history[0]["amount"]) == ("refund", 90_000)
    assert "node lost" in history[0]["memo"]

    again = client.post(url, json={"amount": 1, "reason": "again"}, headers=ADMIN)
    assert again.status_code == 409 and "already refunded" in error(again)
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == 10 * CREDIT

    [record] = audit(client, action="allocation.refund")
    assert (record["actor"], record["target"], record["reason"]) == (
        "admin",
        str(alloc),
        "node lost",
    )
    assert record["detail"]["amount"] == 90_000


def test_a_partial_refund_splits_between_provider_and_platform(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    alloc = charged_allocation(client, portal, clock, 100)
    reply = client.post(
        f"{API}/admin/allocations/{alloc}/refund",
        json={"amount": 33_333, "reason": "slow GPU"},
        headers=ADMIN,
    )
    assert reply.status_code == 200, reply.text
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == 10 * CREDIT - 100_000 + 33_333
    # Charged 100,000: the platform got 10,000; it gives back 33,333 - 29,999 = 3,334.
    assert balance_of(portal.sessions, "platform:revenue") == 10_000 - 3_334
    assert total(portal.sessions) == 0


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"amount": 0, "reason": "x"}, 422, "amount"),
        ({"amount": -5, "reason": "x"}, 422, "amount"),
        ({"amount": 1.5, "reason": "x"}, 422, "amount"),
        ({"amount": 5}, 422, "reason"),
        ({"amount": 5, "reason": "x", "extra": 1}, 422, "extra"),
    ],
)
def test_bad_refunds_are_refused_with_a_sentence(
    client: TestClient, body: dict[str, Any], status: int, words: str
) -> None:
    reply = client.post(f"{API}/admin/allocations/1/refund", json=body, headers=ADMIN)
    assert reply.status_code == status, reply.text
    assert words in reply.text
    missing = client.post(
        f"{API}/admin/allocations/999/refund", json={"reason": "x"}, headers=ADMIN
    )
    assert missing.status_code == 404 and "no allocation 999" in error(missing)


def test_an_admin_stops_a_server_through_the_hub(
    client: TestClient, portal: Portal, hub: FakeHub, clock: Clock
) -> None:
    client.post(f"{API}/credits/grants", json={"user": "ann", "amount": CREDIT}, headers=ADMIN)
    add_node(portal.sessions)
    rid = reserve(portal.sessions, "ann", server="gpu")
    alloc = client.post(
        f"{API}/allocations", json={"reservation_id": rid}, headers=auth("tok-spawner")
    ).json()["id"]
    live = client.get(f"{API}/admin/allocations", headers=ADMIN).json()
    assert [(a["id"], a["user"], a["server"]) for a in live] == [(alloc, "ann", "gpu")]
    stop = client.post(
        f"{API}/admin/allocations/{alloc}/stop", json={"reason": "abuse"}, headers=ADMIN
    )
    assert stop.status_code == 200, stop.text
    assert hub.stopped == [("ann", "gpu")]
    [record] = audit(client, action="allocation.stop")
    assert (record["reason"], record["detail"]) == ("abuse", {"user": "ann", "server": "gpu"})

    async def unreachable(user: str, server: str = "") -> bool:
        raise HubUnavailable("connection refused")

    hub.stop_server = unreachable  # type: ignore[method-assign]
    down = client.post(f"{API}/admin/allocations/{alloc}/stop", headers=ADMIN)
    assert down.status_code == 503 and "nothing was stopped" in error(down)
    assert len(audit(client, action="allocation.stop")) == 1


def test_every_admin_action_leaves_an_audit_record(client: TestClient, portal: Portal) -> None:
    add_node(portal.sessions, provider="<b>prov</b>", node_id="node-b")
    grant = {"user": "ann", "amount": 5 * CREDIT, "memo": "welcome"}
    assert client.post(f"{API}/credits/grants", json=grant, headers=ADMIN).status_code == 201
    quota = {"user": "ann", "window": "day", "gpu_hours": 2, "reason": "trial"}
    assert client.put(f"{API}/quotas", json=quota, headers=ADMIN).status_code == 200
    node = f"{API}/admin/nodes/node-b"
    assert client.post(f"{node}/block", json={"reason": "bad GPU"}, headers=ADMIN).is_success
    assert client.post(f"{node}/unblock", headers=ADMIN).is_success
    [provider] = client.get(f"{API}/admin/providers", headers=ADMIN).json()
    delist = f"{API}/admin/providers/{provider['id']}/delist"
    assert client.post(delist, json={"reason": "fraud"}, headers=ADMIN).is_success
    assert client.post(f"{delist}?listed=true", headers=ADMIN).is_success

    records = audit(client)
    assert [(r["action"], r["target_kind"], r["target"], r["reason"]) for r in records] == [
        ("provider.list", "provider", str(provider["id"]), ""),
        ("provider.delist", "provider", str(provider["id"]), "fraud"),
        ("node.unblock", "node", "node-b", ""),
        ("node.block", "node", "node-b", "bad GPU"),
        ("quota.set", "user", "ann", "trial"),
        ("credits.grant", "user", "ann", "welcome"),
    ]
    assert all(r["actor"] == "admin" and r["at"] for r in records)
    assert records[-1]["detail"]["amount"] == 5 * CREDIT
    assert [r["action"] for r in audit(client, action="node.")] == ["node.unblock", "node.block"]
    assert len(audit(client, target="ann")) == 2
    assert audit(client, actor="nobody") == []
    assert len(audit(client, limit=1)) == 1
    bad = client.get(f"{API}/admin/audit", params={"since": "yesterday"}, headers=ADMIN)
    assert bad.status_code == 422


def test_the_accounts_overview_and_pricing(client: TestClient, portal: Portal) -> None:
    client.post(f"{API}/credits/grants", json={"user": "ann", "amount": 7}, headers=ADMIN)
    users = client.get(f"{API}/admin/accounts", headers=ADMIN).json()["users"]
    assert {u["name"]: u["balance"] for u in users}["ann"] == 7
    pricing = client.get(f"{API}/admin/pricing", headers=ADMIN).json()
    assert pricing["platform_fee_bps"] == portal.settings.platform_fee_bps
    assert "restart" in pricing["how_to_change"]


#: Every admin endpoint, as (method, path, body).
ADMIN_CALLS = [
    ("GET", "/admin/audit", None),
    ("GET", "/admin/accounts", None),
    ("GET", "/admin/allocations", None),
    ("GET", "/admin/pricing", None),
    ("GET", "/admin/providers", None),
    ("GET", "/admin/nodes", None),
    ("POST", "/admin/allocations/1/refund", {"amount": 1, "reason": "x"}),
    ("POST", "/admin/allocations/1/stop", {"reason": "x"}),
    ("POST", "/admin/nodes/node-a/block", {"reason": "x"}),
    ("POST", "/admin/nodes/node-a/unblock", None),
    ("POST", "/admin/providers/1/delist", None),
    ("POST", "/credits/grants", {"user": "ann", "amount": 5}),
    ("POST", "/credits/signup", {"user": "ann"}),
    ("PUT", "/quotas", {"user": "ann", "gpu_hours": 1}),
]


@pytest.mark.parametrize(
    "token",
    ["tok-ann", "tok-prov", "tok-ann-server", "tok-admin-server", "tok-spawner", "tok-dash"],
)
def test_no_one_but_an_admin_reaches_an_admin_endpoint(
    client: TestClient, portal: Portal, token: str
) -> None:
    add_node(portal.sessions)
    for method, path, body in ADMIN_CALLS:
        reply = client.request(method, API + path, json=body, headers=auth(token))
        assert reply.status_code == 403, (method, path, reply.text)
        assert error(reply), "a sentence says why"
        # Crafted: the admin's name in the body or query changes nothing.
        crafted = client.request(
            method, API + path, json=body, params={"user": "admin"}, headers=auth(token)
        )
        assert crafted.status_code == 403
    no_token = client.get(f"{API}/admin/audit")
    assert no_token.status_code == 401
    assert audit(client) == [], "nothing was done"
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == 0


def _wallet(portal: Portal, name: str) -> str:
    from sqlalchemy import select

    from gpuportal.hub.db.models import Account

    with transaction(portal.sessions) as session:
        return f"wallet:{session.scalar(select(Account.id).where(Account.hub_name == name))}"


def test_a_team_paid_session_is_refunded_to_the_team_budget(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    from sqlalchemy import select

    from gpuportal.hub.db.models import Account

    from .conftest import add_team

    with transaction(portal.sessions) as session:
        ann = session.scalar(select(Account.id).where(Account.hub_name == "ann"))
    team = add_team(portal.sessions, "ml", [ann])
    grant = {"team": "ml", "amount": 5 * CREDIT}
    assert client.post(f"{API}/credits/grants", json=grant, headers=ADMIN).status_code == 201
    add_node(portal.sessions)
    rid = reserve(portal.sessions, "ann", server="gpu")
    opened = client.post(
        f"{API}/allocations",
        json={"reservation_id": rid, "team": "ml"},
        headers=auth("tok-spawner"),
    )
    assert opened.status_code == 201, opened.text
    clock.advance(60)
    alloc = opened.json()["id"]
    client.post(f"{API}/allocations/{alloc}/close", headers=auth("tok-spawner"))
    assert balance_of(portal.sessions, f"team:{team}") == 5 * CREDIT - 60_000
    reply = client.post(
        f"{API}/admin/allocations/{alloc}/refund", json={"reason": "outage"}, headers=ADMIN
    )
    assert reply.status_code == 200, reply.text
    assert balance_of(portal.sessions, f"team:{team}") == 5 * CREDIT
    assert balance_of(portal.sessions, _wallet(portal, "ann")) == 0
    assert total(portal.sessions) == 0


def test_the_revenue_reports_net_out_a_refund_on_the_day_it_was_made(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    """Spend, earnings and the fee in the admin analytics are net of refunds: a refund of a
    third of a session counts on its own day, and the totals fall by exactly that."""
    from datetime import timedelta

    from gpuportal.hub.billing import analytics

    start = clock.now
    alloc = charged_allocation(client, portal, clock, 90)  # 90,000: 81,000 + 9,000 fee
    clock.advance(86_400)
    done = client.post(
        f"{API}/admin/allocations/{alloc}/refund",
        json={"amount": 30_000, "reason": "slow node"},
        headers=ADMIN,
    )
    assert done.status_code == 200, done.text
    since, until = start - timedelta(days=1), clock.now + timedelta(days=1)
    with transaction(portal.sessions) as session:
        days = analytics.revenue_by_day(session, since, until)
        payers = analytics.spend_by_payer(session, since, until)
        providers = analytics.top_providers(session, since, until)
    assert [(d["spend"], d["earnings"], d["fee"]) for d in days] == [
        (90_000, 81_000, 9_000),
        (-30_000, -27_000, -3_000),
    ]
    assert [(p["name"], p["spend"]) for p in payers] == [("ann", 60_000)]
    assert [p["earned"] for p in providers] == [54_000]
