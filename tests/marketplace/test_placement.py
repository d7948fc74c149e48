"""The placement engine as pure logic: exact choices from tables of candidates."""

from __future__ import annotations

import dataclasses
import random

import pytest

from gpuportal.hub.market.placement import (
    Candidate,
    PlacementIndex,
    Request,
    best,
    choose,
    explain_no_fit,
    normalize_model,
    pick_indices,
)


def node(
    node_id: str,
    *,
    model: str = "A100-80GB",
    vram: int = 81920,
    region: str = "eu-west",
    price: int = 2_000_000,
    rel: float = 0.9,
    total: int = 8,
    free: int | None = None,
    ok: bool = True,
    pk: int | None = None,
) -> Candidate:
    free = total if free is None else free
    return Candidate(
        node_pk=hash(node_id) & 0xFFFF if pk is None else pk,
        node_id=node_id,
        model=model,
        vram_mib=vram,
        region=region,
        price=price,
        reliability=rel,
        total_gpus=total,
        free_indices=tuple(range(total - free, total)),
        schedulable=ok,
    )


POOL = [
    node("cheap-small", price=1_000_000, total=2),
    node("cheap-big", price=1_000_000, total=8),
    node("cheap-reliable", price=1_000_000, total=8, rel=0.99),
    node("dear", price=3_000_000, total=8, rel=1.0),
    node("us", region="us-east", price=500_000, total=4),
    node("h100", model="H100-80GB", price=4_000_000, total=8),
    node("l4", model="L4", vram=23034, price=300_000, total=4),
    node("unverified", price=10_000, total=8, ok=False),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        # Cheapest fit first: the unverified node is cheaper still but never placed.
        (Request(1), "l4"),
        (Request(1, "A100-80GB"), "us"),
        # Same price: higher reliability wins over better fit.
        (Request(1, "A100-80GB", region="eu-west"), "cheap-reliable"),
        (Request(2, "A100-80GB", region="eu-west", min_reliability=0.95), "cheap-reliable"),
        # Same price and reliability: the best fit (fewest GPUs left over).
        (
            Request(2, "A100-80GB", region="eu-west", max_price=1_000_000, min_reliability=0.0),
            "cheap-reliable",
        ),
        (Request(8, "A100-80GB", region="eu-west", min_reliability=0.99), "cheap-reliable"),
        (Request(8, "A100-80GB", region="eu-west", min_reliability=1.0), "dear"),
        (Request(5, "A100-80GB", region="us-east"), None),
        (Request(1, "a100 80gb", region="us-east"), "us"),
        (Request(1, min_vram_mib=80 * 1024), "us"),
        (Request(1, min_vram_mib=100 * 1024), None),
        (Request(1, "H100-80GB", max_price=3_999_999), None),
        (Request(1, "H100-80GB", max_price=4_000_000), "h100"),
        (Request(1, "B200"), None),
        (Request(9), None),
    ],
)
def test_choose(request_: Request, expected: str | None) -> None:
    chosen = choose(request_, POOL)
    assert (chosen.node_id if chosen else None) == expected
    index_choice = PlacementIndex.build(POOL).choose(request_)
    assert (index_choice.node_id if index_choice else None) == expected


@pytest.mark.parametrize(
    ("nodes", "count", "expected"),
    [
        # Equal price and reliability: best fit keeps the big node whole.
        ([node("a", total=8), node("b", total=2)], 2, "b"),
        ([node("a", total=8), node("b", total=2)], 3, "a"),
        # Partly used nodes: free GPUs count, not total.
        ([node("a", total=8, free=2), node("b", total=4, free=4)], 2, "a"),
        ([node("a", total=8, free=1), node("b", total=4, free=4)], 2, "b"),
        # Full tie: the node id decides, so the choice is stable.
        ([node("b", total=4), node("a", total=4)], 1, "a"),
    ],
)
def test_best_fit_and_ties(nodes: list[Candidate], count: int, expected: str) -> None:
    assert choose(Request(count), nodes).node_id == expected  # type: ignore[union-attr]


def test_pick_lowest_free_indices() -> None:
    c = node("a", total=8, free=3)  # free: 5, 6, 7
    assert pick_indices(c, 2) == [5, 6]


@pytest.mark.parametrize(
    ("request_", "pool", "sentence"),
    [
        (
            Request(1, "A100-80GB", region="eu-west", max_price=2_000_000),
            [node("x", region="us-east", free=3, total=4), node("y", region="eu-west", free=0)],
            "no A100-80GB free in eu-west under 2.00/h; 3 free in us-east",
        ),
        (
            Request(1, "A100-80GB", max_price=1_500_000),
            [node("x", price=2_500_000), node("y", price=1_750_000)],
            "no A100-80GB free under 1.50/h; some free from 1.75/h",
        ),
        (
            Request(4, "A100-80GB"),
            [node("x", total=8, free=3)],
            "no 4 A100-80GB free; at most 3 free on one node",
        ),
        (Request(1, "A100-80GB"), [node("x", free=0)], "no A100-80GB free"),
        (Request(1), [], "no GPU free"),
    ],
)
def test_explain_no_fit(request_: Request, pool: list[Candidate], sentence: str) -> None:
    assert choose(request_, pool) is None
    assert explain_no_fit(request_, pool) == sentence


def test_model_names_normalise() -> None:
    assert normalize_model("NVIDIA A100_80GB") == normalize_model("nvidia-a100-80gb")


def test_index_agrees_with_scan_on_random_pools() -> None:
    rng = random.Random(7)
    models = ["A100-80GB", "H100-80GB", "L4", "RTX-4090"]
    pool = [
        node(
            f"n{i}",
            pk=i,
            model=rng.choice(models),
            region=rng.choice(["eu", "us"]),
            price=rng.choice([1, 2, 3, 4]) * 500_000,
            rel=rng.choice([0.5, 0.8, 0.95]),
            total=(t := rng.choice([1, 2, 4, 8])),
            free=rng.randint(0, t),
            ok=rng.random() > 0.1,
        )
        for i in range(500)
    ]
    index = PlacementIndex.build(pool)
    for step in range(300):
        if step % 3 == 0:
            # Capacity changes reach the index one node at a time (and its any-model lists).
            at = rng.randrange(len(pool))
            old = pool[at]
            pool[at] = dataclasses.replace(
                old,
                free_indices=tuple(range(rng.randint(0, old.total_gpus))),
                price=rng.choice([1, 2, 3, 4]) * 500_000,
                schedulable=rng.random() > 0.1,
            )
            index.replace([old.node_pk], [pool[at]])
        req = Request(
            rng.choice([1, 2, 4, 8]),
            rng.choice([None, *models]),
            region=rng.choice([None, "eu", "us"]),
            max_price=rng.choice([None, 1_000_000, 1_500_000]),
            min_reliability=rng.choice([0.0, 0.9]),
        )
        a, b = choose(req, pool), index.choose(req)
        assert (a.node_id if a else None) == (b.node_id if b else None), req
        k = rng.choice([2, 3, 8])  # a retry's spread: the k best, in rank order
        assert [c.node_id for c in index.best(req, k)] == [c.node_id for c in best(req, pool, k)], (
            req,
            k,
        )
