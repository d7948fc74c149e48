"""Reservations on the real portal DB, SQLite and PostgreSQL: atomic, idempotent, expiring."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import GpuAllocation, Provider, Reservation
from gpuportal.hub.market import marketplace
from gpuportal.hub.market.capacity import CapacityIndex
from gpuportal.hub.market.marketplace import Conflict, Invalid, NoCapacity
from gpuportal.hub.market.placement import Request
from gpuportal.hub.timeutil import utcnow

from .conftest import Market


def reserve(
    market: Market,
    user: str,
    server: str = "",
    count: int = 1,
    index: CapacityIndex | None = None,
    **kw: object,
) -> dict:
    account = market.accounts.get(user) or market.customer(user)
    answer, _created = marketplace.reserve(
        market.sessions,
        Request(count, **kw),  # type: ignore[arg-type]
        account_id=account,
        user_name=user,
        server_name=server,
        rules=market.rules,
        index=index,
    )
    return answer


def allocated(market: Market) -> int:
    with portal_db.transaction(market.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(GpuAllocation)) or 0)


def test_reserve_answers_the_contract(market: Market) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 2}, price=1_200_000)
    answer = reserve(market, "ann", "lab", gpu_model="A100-80GB")
    assert answer["status"] == "held"
    assert answer["node_id"] == "n1"
    assert answer["node_resource"] == "gpuportal/node:n1"
    assert answer["gpu_indices"] == [0]
    assert answer["price_per_gpu_hour"] == 1_200_000
    assert answer["price_per_gpu_hour_display"] == "1.20"
    assert answer["platform_fee_bps"] == 1000
    assert answer["region"] == "eu-west"
    assert answer["demo"] is True
    assert answer["expires_at"] - answer["created_at"] == timedelta(seconds=600)
    assert answer["expires_at"].tzinfo is not None


def test_never_places_on_unverified_nodes(market: Market) -> None:
    market.add_node("acme", "claimed", {"A100-80GB": 8}, price=10_000, verified=False)
    with pytest.raises(NoCapacity):
        reserve(market, "ann", gpu_model="A100-80GB")


def test_last_gpu_then_release_then_again(market: Market) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 2})
    first = reserve(market, "ann", "a", gpu_model="A100-80GB")
    second = reserve(market, "bob", "b", gpu_model="A100-80GB")
    assert sorted(first["gpu_indices"] + second["gpu_indices"]) == [0, 1]
    with pytest.raises(NoCapacity, match=r"^no A100-80GB free"):
        reserve(market, "cy", "c", gpu_model="A100-80GB")
    with portal_db.transaction(market.sessions) as session:
        assert marketplace.release(session, first["id"])["status"] == "released"
    with portal_db.transaction(market.sessions) as session:  # twice is fine
        assert marketplace.release(session, first["id"])["status"] == "released"
    third = reserve(market, "cy", "c", gpu_model="A100-80GB")
    assert third["gpu_indices"] == first["gpu_indices"]
    assert allocated(market) == 2


def test_activate_is_idempotent_and_locks_the_price(market: Market) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 2}, price=1_000_000)
    res = reserve(market, "ann", "lab")
    with portal_db.transaction(market.sessions) as session:
        once = marketplace.activate(session, res["id"])
    with portal_db.transaction(market.sessions) as session:
        twice = marketplace.activate(session, res["id"])
        # The provider raises its price: the running reservation keeps its own.
        session.scalar(select(Provider)).price_per_gpu_hour = 9_000_000  # type: ignore[union-attr]
    assert once["status"] == twice["status"] == "active"
    assert once["activated_at"] == twice["activated_at"]
    assert twice["expires_at"] is None
    with portal_db.transaction(market.sessions) as session:
        assert marketplace.get(session, res["id"]).price_per_gpu_hour == 1_000_000
    assert reserve(market, "bob", "x")["price_per_gpu_hour"] == 9_000_000


def test_held_reservations_expire_and_give_gpus_back(market: Market) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 1})
    res = reserve(market, "ann", "lab")
    with portal_db.transaction(market.sessions) as session:
        row = session.get(Reservation, res["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    # The next reservation expires the stale hold first and gets its GPU.
    other = reserve(market, "bob", "x")
    assert other["gpu_indices"] == [0]
    with portal_db.transaction(market.sessions) as session:
        assert marketplace.get(session, res["id"]).status == "expired"
    with (
        pytest.raises(Conflict, match="expired"),
        portal_db.transaction(market.sessions) as session,
    ):
        marketplace.activate(session, res["id"])


def test_retry_for_the_same_server_returns_its_reservation(market: Market) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 4})
    account = market.customer("ann")
    first, created = marketplace.reserve(
        market.sessions,
        Request(2),
        account_id=account,
        user_name="ann",
        server_name="lab",
        rules=market.rules,
    )
    again, created_again = marketplace.reserve(
        market.sessions,
        Request(2),
        account_id=account,
        user_name="ann",
        server_name="lab",
        rules=market.rules,
    )
    assert (created, created_again) == (True, False)
    assert again["id"] == first["id"]
    with pytest.raises(Conflict, match="already holds"):
        reserve(market, "ann", "lab", count=1)
    assert allocated(market) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"gpu_model": "B200"},
            Invalid,
            "unknown GPU model 'B200'; the marketplace has: A100-80GB, L4.",
        ),
        ({"count": 9}, Invalid, "gpu_count 9 is more than the largest node offers (4 GPUs)"),
        (
            {"gpu_model": "L4", "region": "us-east"},
            NoCapacity,
            "no L4 free in us-east; 2 free in eu-west.",
        ),
    ],
)
def test_refusals_are_sentences(market: Market, kwargs: dict, error: type, message: str) -> None:
    market.add_node("acme", "n1", {"A100-80GB": 4})
    market.add_node("beta", "n2", {"L4": 2})
    with pytest.raises(error) as info:
        reserve(market, "ann", **kwargs)
    assert message in info.value.message


def live_index(market: Market, indexed: bool) -> CapacityIndex | None:
    """The portal's live placement index on this market, or None for the SQL scan."""
    if not indexed:
        return None
    index = CapacityIndex(market.rules)
    index.attach(market.sessions)
    index.load()
    return index


def race(
    market: Market, names: list[str], index: CapacityIndex | None
) -> tuple[list[dict], list[str]]:
    """Every named customer reserves one GPU at the same moment, each in a thread of
    its own: (the reservations made, the no-capacity refusals). Any other error fails."""
    for name in names:
        market.customer(name)
    barrier = threading.Barrier(len(names))
    wins: list[dict] = []
    refusals: list[str] = []
    errors: list[BaseException] = []

    def one(name: str) -> None:
        barrier.wait(timeout=60)
        try:
            wins.append(reserve(market, name, "lab", index=index))
        except NoCapacity as exc:
            refusals.append(exc.message)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return wins, refusals


@pytest.mark.parametrize("indexed", [True, False], ids=["live-index", "sql-scan"])
def test_racers_that_all_choose_the_same_node_all_get_a_gpu(market: Market, indexed: bool) -> None:
    """16 customers at once, 16 GPUs on four 4-GPU nodes and eight 1-GPU nodes: each
    racer first chooses the same cheapest node and its lowest GPU; a loser retries after
    a short random wait on random free GPUs of one of the 2, 4, 8, 16 best fits, so
    every one of them is placed (none told the market is busy)."""
    index = live_index(market, indexed)
    for n in range(12):
        market.add_node("acme", f"n{n:02d}", {"A100-80GB": 4 if n % 3 == 0 else 1})
    wins, refusals = race(market, [f"racer{i}" for i in range(16)], index)
    assert (len(wins), refusals) == (16, [])
    held = {(w["node_id"], tuple(w["gpu_indices"])) for w in wins}
    assert len(held) == 16
    assert allocated(market) == 16


@pytest.mark.parametrize("indexed", [True, False], ids=["live-index", "sql-scan"])
@pytest.mark.parametrize("racers", [50])
def test_racing_for_the_last_gpu_exactly_one_wins(
    market: Market, racers: int, indexed: bool
) -> None:
    """The portal's path (the live index) and the plain SQL scan alike: the index may
    offer all 50 the same GPU, the DB lets exactly one have it."""
    index = live_index(market, indexed)
    market.add_node("acme", "n1", {"A100-80GB": 2})
    reserve(market, "early", "x", index=index)  # one of two GPUs is taken: one left
    wins, refusals = race(market, [f"user{i}" for i in range(racers)], index)
    assert len(wins) == 1
    assert len(refusals) == racers - 1
    assert all(r.startswith("no GPU free") for r in refusals)
    assert allocated(market) == 2
    with portal_db.transaction(market.sessions) as session:
        live = session.scalar(
            select(func.count()).select_from(Reservation).where(Reservation.status == "held")
        )
    assert live == 2
    if index is not None:  # and the index agrees: nothing left
        assert [c.free_gpus for c in index.candidates()] == [0]
