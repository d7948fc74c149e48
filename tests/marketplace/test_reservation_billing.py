"""Reservations drive the bill, through the portal API (SQLite and PostgreSQL).

Made: authorized (sign-up credit, then runway at the locked price).
Activated: the allocation opens at the locked price and fee.
Released: it closes, charged exactly price x time held, nothing more.
The hub here is a double that says which token is whose (as in test_app.py);
the real hub path is covered by the spawner's stack tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from seed import Market, market_fixture  # noqa: F401  (the market fixture)
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub import ledger, metering
from gpuportal.hub.app import Portal, create_app
from gpuportal.hub.cache import MemoryCache
from gpuportal.hub.hubapi import HubAPI
from gpuportal.hub.ledger_models import Allocation
from gpuportal.hub.settings import load_settings

API = "/services/portal/api/v1"
PRICE = 3_600_000  # 3.60 credits per GPU-hour: 1000 micro-credits per GPU-second
USERS = {
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": []},
    "tok-bob": {"name": "bob", "kind": "user", "admin": False, "groups": []},
}


class Hub(HubAPI):
    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1/hub/api", "service-token")

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        return USERS.get(token)

    async def user(self, name: str) -> dict[str, Any] | None:
        return next((u for u in USERS.values() if u["name"] == name), None)

    async def users(self) -> list[dict[str, Any]]:
        return [u for u in USERS.values() if u["kind"] == "user"]

    async def groups(self) -> list[dict[str, Any]]:
        return []


def client_for(tmp_path: Path, db_url: str, **overrides: Any) -> Iterator[TestClient]:
    settings = load_settings(
        data_dir=tmp_path, db_url=db_url, ray_dashboard_url="http://127.0.0.1:9", **overrides
    )
    portal = Portal(settings, cache=MemoryCache(), hub=Hub())
    with TestClient(create_app(settings, portal, background=False)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path, db_url: str, market: Market) -> Iterator[TestClient]:
    market.add_node("house-admin", "node-a", {"A100-80GB": 2}, price=PRICE, region="local")
    yield from client_for(tmp_path, db_url)


def spawner(client: TestClient, method: str, path: str, **kw: Any) -> Any:
    return client.request(
        method, f"{API}{path}", headers={"Authorization": "token tok-spawner"}, **kw
    )


def test_activate_opens_and_release_closes_the_bill(client: TestClient, market: Market) -> None:
    made = spawner(
        client, "POST", "/reservations", json={"user": "ann", "server_name": "gpu", "gpu_count": 2}
    )
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    sessions = market.sessions
    with portal_db.transaction(sessions) as session:
        assert session.scalars(select(Allocation)).all() == [], "no bill while starting"

    assert spawner(client, "POST", f"/reservations/{rid}/activate").status_code == 200
    assert spawner(client, "POST", f"/reservations/{rid}/activate").status_code == 200
    with portal_db.transaction(sessions) as session:
        (alloc,) = session.scalars(select(Allocation)).all()
        assert (
            alloc.reservation_id,
            alloc.user_name,
            alloc.server_name,
            alloc.gpu_count,
            alloc.price_per_gpu_hour,
            alloc.status,
        ) == (rid, "ann", "gpu", 2, PRICE, "running")
    time.sleep(1.2)
    assert spawner(client, "DELETE", f"/reservations/{rid}").status_code == 200
    assert spawner(client, "DELETE", f"/reservations/{rid}").status_code == 200  # idempotent
    with portal_db.transaction(sessions) as session:
        alloc = session.scalars(select(Allocation)).one()
        assert alloc.status == "closed"
        assert alloc.ended_at is not None and alloc.ended_at > alloc.started_at
        expected = metering.accrued(2, PRICE, alloc.started_at, alloc.ended_at)
        assert expected >= 2 * 1000, "at least one second of two GPUs"
        paid = 10_000_000 - ledger.balance_by_key(session, f"wallet:{alloc.account_id}")
        assert paid == expected
    # The GPUs are back on offer.
    offers = spawner(client, "GET", "/offers").json()
    assert sum(o["free_gpus"] for o in offers) == 2


def test_new_users_get_the_sign_up_credit_once(client: TestClient) -> None:
    for _ in range(2):
        client.get(f"{API}/me", headers={"Authorization": "token tok-bob"})
    balance = client.get(f"{API}/balance", headers={"Authorization": "token tok-bob"})
    assert balance.status_code == 200, balance.text
    assert balance.json()["balance"] == 10_000_000


def test_without_credit_the_reservation_is_refused_and_gpus_go_back(
    tmp_path: Path, db_url: str, market: Market
) -> None:
    market.add_node("house-admin", "node-a", {"A100-80GB": 1}, price=PRICE, region="local")
    for client in client_for(tmp_path, db_url, signup_credits=0):
        refused = spawner(
            client, "POST", "/reservations", json={"user": "ann", "server_name": "", "gpu_count": 1}
        )
        assert refused.status_code == 402, refused.text
        error = refused.json()["error"]
        assert error["code"] == "payment_required"
        assert "15 min" in error["message"] or "minute" in error["message"]
        assert "Traceback" not in refused.text
        offers = spawner(client, "GET", "/offers").json()
        assert sum(o["free_gpus"] for o in offers) == 1
