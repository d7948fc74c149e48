"""A marketplace node's earnings go to the provider who owns it, never to the house.

Mutant (issue 9, item 8): ``reservation_billing.open_for`` forgets the provider, so
the allocation falls back to the house provider (the hub admin) and a third-party
provider is never paid. The existing billing tests use the house's own node, where
both answers agree; this one uses a provider's node.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from seed import Market, market_fixture  # noqa: F401  (the market fixture)
from sqlalchemy import select
from test_reservation_billing import PRICE, client_for, spawner

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger, metering
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account
from gpuportal.provider import money


@pytest.fixture
def client(tmp_path: Path, db_url: str, market: Market) -> Iterator[TestClient]:
    market.add_node("prov", "node-p", {"A100-80GB": 1}, price=PRICE, region="local")
    market.customer("admin")  # the house provider exists too: the fallback is possible
    yield from client_for(tmp_path, db_url)


def test_a_providers_node_pays_that_provider(client: TestClient, market: Market) -> None:
    made = spawner(client, "POST", "/reservations", json={"user": "ann", "gpu_count": 1})
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    assert spawner(client, "POST", f"/reservations/{rid}/activate").status_code == 200
    time.sleep(1.1)  # at least one whole second billed
    assert spawner(client, "DELETE", f"/reservations/{rid}").status_code == 200
    with portal_db.transaction(market.sessions) as session:
        alloc = session.scalars(select(Allocation)).one()
        prov = session.scalar(select(Account.id).where(Account.hub_name == "prov"))
        admin = session.scalar(select(Account.id).where(Account.hub_name == "admin"))
        assert alloc.provider_account_id == prov != admin
        assert alloc.ended_at is not None
        charged = money.accrued(1, PRICE, alloc.started_at, alloc.ended_at)
        fee = metering.fee_of(charged, alloc.platform_fee_bps)
        assert charged >= 1000
        assert ledger.balance_by_key(session, f"earnings:{prov}") == charged - fee
        assert ledger.balance_by_key(session, f"earnings:{admin}") == 0


def test_even_the_cheapest_reservation_needs_credit(
    tmp_path: Path, db_url: str, market: Market
) -> None:
    """Survivor of ``make mutate`` (reservation_billing.authorize_reservation: ``price <= 0`` became
    ``price <= 1``): a node at 1 micro-credit per GPU-hour is not free, so a user with
    no credit is refused (900 s at that price rounds up to 1 micro-credit)."""
    market.add_node("cheap", "node-c", {"A100-80GB": 1}, price=1, region="local")
    for client in client_for(tmp_path, db_url, signup_credits=0):
        refused = spawner(client, "POST", "/reservations", json={"user": "ann", "gpu_count": 1})
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "payment_required"
