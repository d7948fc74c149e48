"""Placement decisions: the placement index against a naive scan, p50 and p99 per decision.

    python benchmarks/placement.py [--seconds 1.0] [--sizes 1000,10000,100000]

For each size of synthetic fleet (8 GPU models, 6 regions, mixed prices,
reliability and free GPUs) it times random requests one by one through
``PlacementIndex.choose`` and through ``choose`` (a scan of every node), in the
same run, checks that both pick the same node, and prints decisions per second,
p50 and p99 latency of each, and the ratios. Two request mixes: with a GPU
model, and with none (any model: the index merges the model buckets in price
order). Numbers vary by machine; nothing asserts them.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable

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


def requests(rng: random.Random, count: int, any_model: bool = False) -> list[Request]:
    return [
        Request(
            rng.choice([1, 1, 2, 4, 8]),
            None if any_model else rng.choice(MODELS),
            region=rng.choice([None, *REGIONS]),
            max_price=rng.choice([None, 1_000_000, 2_000_000, 3_000_000]),
            min_reliability=rng.choice([0.0, 0.8, 0.95]),
        )
        for _ in range(count)
    ]


def scan(request: Request, nodes: list[Candidate]) -> Candidate | None:
    return choose(request, nodes)


def latencies(fn: Callable[[Request], object], reqs: list[Request], seconds: float) -> list[float]:
    """Seconds per decision, one timed call each, for about ``seconds`` (bounded in count)."""
    out: list[float] = []
    clock = time.perf_counter
    start = clock()
    while clock() - start < seconds and len(out) < 200_000:
        for req in reqs:
            t = clock()
            fn(req)
            out.append(clock() - t)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    rng = random.Random(42)  # noqa: S311 - synthetic data, not secrets
    print(
        f"{'nodes':>8} {'mix':>9} | {'index/s':>9} {'p50 µs':>8} {'p99 µs':>8} | "
        f"{'scan/s':>7} {'p50 µs':>9} {'p99 µs':>9} | {'ratio p50':>9} {'ratio p99':>9}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        nodes = fleet(n, rng)
        index = PlacementIndex.build(nodes)
        for mix, any_model in (("model", False), ("any model", True)):
            reqs = requests(rng, 200, any_model)
            for req in reqs[:50]:  # both engines must agree
                a, b = index.choose(req), choose(req, nodes)
                assert (a and a.node_id) == (b and b.node_id), req
            fast = latencies(index.choose, reqs, args.seconds)
            slow = latencies(functools.partial(scan, nodes=nodes), reqs[:20], args.seconds)
            f50, f99, s50, s99 = pct(fast, 0.5), pct(fast, 0.99), pct(slow, 0.5), pct(slow, 0.99)
            print(
                f"{n:>8} {mix:>9} | {len(fast) / sum(fast):>9,.0f} {f50 * 1e6:>8.1f} "
                f"{f99 * 1e6:>8.1f} | {len(slow) / sum(slow):>7,.0f} {s50 * 1e6:>9.0f} "
                f"{s99 * 1e6:>9.0f} | {s50 / f50:>8.0f}x {s99 / f99:>8.0f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
