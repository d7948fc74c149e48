"""Placement decisions per second: the placement index against a naive scan.

    python benchmarks/placement.py [--seconds 1.0]

For 1k, 10k and 100k synthetic nodes (8 GPU models, 6 regions, mixed prices,
reliability and free GPUs) it times random requests through
``PlacementIndex.choose`` and through ``choose`` (a scan of every node), checks
that both pick the same node, and prints decisions per second and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import random
import time

from gpuportal.hub.market.placement import Candidate, PlacementIndex, Request, choose

MODELS = ["A100-80GB", "H100-80GB", "L4", "RTX-4090", "A10G", "T4", "L40S", "H200"]
REGIONS = ["eu-west", "eu-north", "us-east", "us-west", "ap-south", "local"]


def fleet(n: int, rng: random.Random) -> list[Candidate]:
    nodes = []
    for i in range(n):
        total = rng.choice([1, 2, 4, 8])
        free = rng.randint(0, total)
        nodes.append(
            Candidate(
                node_pk=i,
                node_id=f"n{i:06d}",
                model=rng.choice(MODELS),
                vram_mib=81920,
                region=rng.choice(REGIONS),
                price=rng.randint(20, 400) * 10_000,
                reliability=round(rng.uniform(0.5, 1.0), 3),
                total_gpus=total,
                free_indices=tuple(range(free)),
                schedulable=rng.random() > 0.05,
            )
        )
    return nodes


def requests(rng: random.Random, count: int) -> list[Request]:
    return [
        Request(
            rng.choice([1, 1, 2, 4, 8]),
            rng.choice(MODELS),
            region=rng.choice([None, *REGIONS]),
            max_price=rng.choice([None, 1_000_000, 2_000_000, 3_000_000]),
            min_reliability=rng.choice([0.0, 0.8, 0.95]),
        )
        for _ in range(count)
    ]


def scan(request: Request, nodes: list[Candidate]) -> Candidate | None:
    return choose(request, nodes)


def rate(fn: object, reqs: list[Request], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for req in reqs:
            fn(req)  # type: ignore[operator]
            done += 1
        if done >= 1_000_000:
            break
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    rng = random.Random(42)  # noqa: S311 - synthetic data, not secrets
    print(f"{'nodes':>8} {'index/s':>12} {'scan/s':>12} {'ratio':>8} {'index µs':>10}")
    for n in (1_000, 10_000, 100_000):
        nodes = fleet(n, rng)
        index = PlacementIndex.build(nodes)
        reqs = requests(rng, 200)
        for req in reqs[:50]:  # both engines must agree
            a, b = index.choose(req), choose(req, nodes)
            assert (a and a.node_id) == (b and b.node_id), req
        fast = rate(index.choose, reqs, args.seconds)
        slow = rate(functools.partial(scan, nodes=nodes), reqs[:20], args.seconds)
        print(f"{n:>8} {fast:>12,.0f} {slow:>12,.0f} {fast / slow:>7.1f}x {1e6 / fast:>10.1f}")


if __name__ == "__main__":
    main()
