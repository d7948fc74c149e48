"""A node that cannot give each customer an OS account of their own (its agent is
not root) hosts one customer at a time: it never receives a second one while the
first holds it, the offers say so, and it is free again once the first leaves."""

from __future__ import annotations

import threading

import pytest

from gpuportal.hub import db as portal_db
from gpuportal.hub.market import marketplace
from gpuportal.hub.market.capacity import CapacityIndex
from gpuportal.hub.market.marketplace import Conflict, NoCapacity

from .conftest import Market
from .test_reservations import reserve


def test_an_exclusive_node_never_receives_a_second_customer(market: Market) -> None:
    market.add_node("solo", "n-solo", {"A100-80GB": 4}, isolation="exclusive")
    first = reserve(market, "ann", gpu_model="A100-80GB")
    assert first["node_id"] == "n-solo"
    with pytest.raises(NoCapacity):
        reserve(market, "bob", gpu_model="A100-80GB")
    with portal_db.transaction(market.sessions) as session:
        offers = marketplace.offers(session, market.rules)
    assert [(o["free_gpus"], o["total_gpus"], o["exclusive"]) for o in offers] == [(0, 4, True)]
    with portal_db.transaction(market.sessions) as session:
        marketplace.release(session, first["id"])
    assert reserve(market, "bob", gpu_model="A100-80GB")["node_id"] == "n-solo"


def test_a_shared_node_takes_several_customers(market: Market) -> None:
    market.add_node("many", "n-many", {"A100-80GB": 4})
    assert reserve(market, "ann", gpu_model="A100-80GB")["node_id"] == "n-many"
    assert reserve(market, "bob", gpu_model="A100-80GB")["node_id"] == "n-many"
    with portal_db.transaction(market.sessions) as session:
        offers = marketplace.offers(session, market.rules)
    assert [(o["free_gpus"], o["exclusive"]) for o in offers] == [(2, False)]


def test_racing_customers_for_an_exclusive_node_exactly_one_wins(market: Market) -> None:
    market.add_node("solo", "n-solo", {"A100-80GB": 8}, isolation="exclusive")
    index = CapacityIndex(market.rules)
    index.attach(market.sessions)
    index.load()
    names = [f"user{i}" for i in range(8)]
    for name in names:
        market.customer(name)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(name: str) -> None:
        try:
            reserve(market, name, gpu_model="A100-80GB", index=index)
            result = "won"
        except (NoCapacity, Conflict):
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
