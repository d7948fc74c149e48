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
from gpuportal.hub.billing import ledger
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.portal.hubapi import HubAPI
from gpuportal.hub.settings import load_settings
from gpuportal.provider import money

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
    # Every hub user here is vouched for (as with an OAuth identity provider), so each
    # gets the 10-credit sign-up credit; tests/ledger/test_signup_credit.py covers who may.
    overrides.setdefault("signup_credit_policy", "identity")
    settings = load_settings(
        data_dir=tmp_path, db_url=db_url, ray_dashboard_url="http://127.0.0.1:9", **overrides
    )
    portal = Portal(settings, cache=MemoryCache(), hub=Hub())
    with TestClient(
        create_app(settings, portal, background=False), raise_server_exceptions=False
    ) as client:
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
        expected = money.accrued(2, PRICE, alloc.started_at, alloc.ended_at)
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


# --- issue 9: no hoarding ------------------------------------------------------------------


def free(client: TestClient) -> int:
    return sum(o["free_gpus"] for o in spawner(client, "GET", "/offers").json())


def grant(client: TestClient, user: str, micro: int) -> None:
    reply = client.post(
        f"{API}/credits/grants",
        json={"user": user, "amount": micro},
        headers={"Authorization": "token tok-admin"},
    )
    assert reply.status_code == 201, reply.text


def reserve(client: TestClient, server: str, gpus: int = 1, user: str = "ann") -> Any:
    return spawner(
        client,
        "POST",
        "/reservations",
        json={"user": user, "server_name": server, "gpu_count": gpus},
    )


@pytest.fixture
def eight(tmp_path: Path, db_url: str, market: Market) -> Iterator[TestClient]:
    """Eight GPUs at 1.00 credit/h (0.25 credits for the 15 min minimum), no sign-up credit."""
    market.add_node("house-admin", "node-8", {"A100-80GB": 8}, price=1_000_000, region="local")
    yield from client_for(tmp_path, db_url, signup_credits=0, max_live_reservations=8)


def test_a_user_with_credit_for_one_gpu_cannot_hold_eight_at_once(eight: TestClient) -> None:
    """Issue 9: 0.30 credits (each 1-GPU reservation needs 0.25) held 8 of 8 GPUs."""
    grant(eight, "ann", 300_000)
    replies = [reserve(eight, f"s{n}") for n in range(8)]
    assert [r.status_code for r in replies] == [201] + [402] * 7, [r.text for r in replies]
    assert "running and held servers" in replies[1].json()["error"]["message"]
    assert free(eight) == 7


def test_a_user_cannot_hold_gpus_one_after_another_either(eight: TestClient) -> None:
    """Sequentially: each reservation activated (its server starting) before the next."""
    grant(eight, "ann", 300_000)
    first = reserve(eight, "a")
    assert first.status_code == 201, first.text
    assert spawner(eight, "POST", f"/reservations/{first.json()['id']}/activate").status_code == 200
    second = reserve(eight, "b")
    assert second.status_code == 402, second.text
    assert free(eight) == 7
    # Releasing the first makes room for the next: the limit is what is held, not a count.
    assert spawner(eight, "DELETE", f"/reservations/{first.json()['id']}").status_code == 200
    assert reserve(eight, "b").status_code == 201


def test_enough_credit_holds_as_many_as_it_pays_for(eight: TestClient) -> None:
    grant(eight, "ann", 750_000)  # three minimum periods of one GPU
    codes = [reserve(eight, f"s{n}").status_code for n in range(5)]
    assert codes == [201, 201, 201, 402, 402]
    assert free(eight) == 5


def test_the_per_user_limit_on_live_reservations(
    tmp_path: Path, db_url: str, market: Market
) -> None:
    market.add_node("house-admin", "node-8", {"A100-80GB": 8}, price=1_000_000, region="local")
    for client in client_for(tmp_path, db_url, signup_credits=0, max_live_reservations=2):
        grant(client, "ann", 100 * 1_000_000)
        codes = [reserve(client, f"s{n}").status_code for n in range(3)]
        assert codes == [201, 201, 403]
        refused = reserve(client, "s9")
        assert "the most one user may hold at once (2)" in refused.json()["error"]["message"]
        assert free(client) == 6
        assert reserve(client, "x", user="bob").status_code in (201, 402)  # others unaffected


# --- issue 9: any failure after the GPUs are held gives them back --------------------------

#: Each step ``create_reservation`` takes after the GPUs are held: (module, function).
STEPS = [
    ("gpuportal.hub.market.marketplace", "get"),
    ("gpuportal.hub.billing.reservation_billing", "authorize_reservation"),
    ("gpuportal.hub.billing.credits", "welcome"),
    ("gpuportal.hub.billing.quotas", "authorize_launch"),
    ("gpuportal.hub.billing.quotas", "held_reservations"),
    ("gpuportal.hub.billing.metering", "payer_state"),
    ("gpuportal.hub.billing.ledger", "balance"),
    ("gpuportal.hub.billing.ledger", "wallet"),
    ("gpuportal.hub.portal.api.market", "reservation_body"),
]


@pytest.mark.parametrize(("module", "name"), STEPS)
def test_a_failure_in_any_step_of_a_reservation_gives_the_gpus_back(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, module: str, name: str
) -> None:
    import importlib

    target = importlib.import_module(module)
    real = getattr(target, name)
    calls = {"n": 0}

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        raise RuntimeError(f"injected failure in {name}")

    assert free(client) == 2
    monkeypatch.setattr(target, name, broken)
    reply = reserve(client, "gpu", gpus=2)
    monkeypatch.setattr(target, name, real)
    assert calls["n"] >= 1, f"{module}.{name} is not a step of create_reservation"
    assert reply.status_code == 500
    assert "Traceback" not in reply.text and "injected" not in reply.text
    assert free(client) == 2
    listed = spawner(client, "GET", "/reservations?user=ann").json()
    assert listed == []
    # The user can reserve again at once.
    assert reserve(client, "gpu", gpus=2).status_code == 201
