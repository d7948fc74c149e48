"""The control plane at fleet scale: one portal on PostgreSQL + Redis, N simulated nodes.

    python benchmarks/fleet.py [--quick | --nodes 10000 | --full] [--servers 1000]
                               [--concurrency 1,8,32,64] [--workers 1,2] [--seconds 5]
                               [--meter-sizes 1000,10000,50000] [--pg URL] [--redis URL]

What it does, all on 127.0.0.1, every loop bounded in count and time:

1. a scratch PostgreSQL database (made and dropped) and a portal process
   (uvicorn, the real app with its background loops, a stand-in hub that knows
   the simulated users' tokens; the Ray cross-check is off, as the simulated
   nodes run no Ray);
2. N nodes register through ``POST /providers/register`` (20 providers, 6
   regions, 4 GPU models); their verification is then marked passed in the DB
   (a CPU cannot answer a GPU challenge; docs/providers.md);
3. heartbeats, each signed with the node's real ed25519 key, sent by a load
   process at rising concurrency (the knee), against: the direct path (one
   commit per heartbeat, the naive baseline), the batched path with one portal
   process, and the batched path with several worker processes sharing the
   port (``--workers``). Heartbeats/s, p50 and p99 latency, and the portal's CPU
   (cores) and memory during the run;
4. M customers (funded by the sign-up credit) reserve and activate a GPU each
   through the API as the spawner does; one meter tick then charges all M,
   timed beside the ORM reference meter on the same allocations;
5. ``GET /offers`` built from the in-memory index beside the SQL path, at N;
6. placement p50/p99 at N and 100k nodes, index beside a full scan
   (benchmarks/placement.py's machinery);
7. the meter tick at 1k/10k/50k open allocations beside the ORM reference and a
   naive insert-and-commit per event (benchmarks/metering.py's machinery).

``--quick`` (500 nodes, 50 servers, short steps, meter at 1k) finishes in about a
minute. Numbers vary with the machine and its load (``uptime`` is printed beside
them); nothing asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import metering as meter_bench  # noqa: E402
import placement as placement_bench  # noqa: E402

from gpuportal.provider import signing  # noqa: E402

API = "/services/portal/api/v1"
MODELS = ["A100-80GB", "H100-80GB", "L4", "RTX-4090"]
REGIONS = ["eu-west", "eu-north", "us-east", "us-west", "ap-south", "local"]
PROVIDERS = 20
PORT = 18_765
#: Nodes whose first heartbeats are signed and sent together (well within the
#: portal's allowed clock skew at the direct path's rate).
WARMUP_CHUNK = 1_500
#: The portal processes' console output.
LOG = Path(os.environ.get("TMPDIR", "/tmp")) / "gpuportal-fleet-bench.log"  # noqa: S108


# --- the portal process ----------------------------------------------------------------


def users(servers: int) -> dict[str, dict[str, Any]]:
    """The stand-in hub's tokens: providers, the spawner, customers."""
    out: dict[str, dict[str, Any]] = {
        "tok-spawner": {"name": "ray-spawner", "kind": "service"},
    }
    for p in range(PROVIDERS):
        out[f"tok-p{p}"] = {
            "name": f"p{p}",
            "kind": "user",
            "admin": False,
            "groups": ["providers"],
        }
    for c in range(servers):
        out[f"tok-c{c}"] = {"name": f"c{c}", "kind": "user", "admin": False, "groups": []}
    return out


def serve_app() -> Any:
    """The app one portal worker serves (uvicorn factory; settings from the environment)."""
    sys.path.insert(0, str(ROOT))
    from gpuportal.hub.portal import loops
    from gpuportal.hub.portal.app import create_app
    from gpuportal.hub.portal.context import Portal
    from gpuportal.hub.settings import load_settings
    from tests.fakes import FakeHub

    settings = load_settings(
        provider_networks_allowed="127.0.0.0/8",
        signup_credit_policy="identity",
        signup_credit_daily_budget=10**15,
    )
    portal = Portal(settings, hub=FakeHub(users(int(os.environ["FLEET_SERVERS"]))))
    # The simulated nodes run no Ray: the Ray cross-check would take them all offline.
    loops.check_ray = _no_ray  # type: ignore[assignment]
    return create_app(settings, portal, background=True)


async def _no_ray(portal: Any) -> list[str]:
    return []


def start_portal(env: dict[str, str], workers: int) -> subprocess.Popen[bytes]:
    code = (
        "import sys, uvicorn; sys.path.insert(0, 'benchmarks');"
        f"uvicorn.run('fleet:serve_app', factory=True, host='127.0.0.1', port={PORT},"
        f" workers={workers}, log_level='warning', access_log=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    from gpuportal.hub.stack.ready import wait_ready

    wait_ready(f"http://127.0.0.1:{PORT}{API}/health", 120, proc=proc)
    return proc


def stop_portal(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def usage(proc: subprocess.Popen[bytes]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the portal and its worker processes."""
    import psutil

    root = psutil.Process(proc.pid)
    cpu, rss = 0.0, 0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return cpu, rss


def start_profile(proc: subprocess.Popen[bytes], out: Path, seconds: float) -> Any:
    """py-spy (if installed) sampling the portal and its workers for ``seconds``, as
    collapsed stacks in ``out``; None without py-spy."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("# --profile: py-spy is not installed (pip install py-spy)", flush=True)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(proc.pid),
            "--subprocesses",
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            str(max(1, int(seconds))),
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """Where the sampled time went, from collapsed stacks: the functions holding the
    most samples with their callees (inclusive) and by themselves (self)."""
    if not path.exists():
        return [f"(no profile written to {path})"]
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        # "function (file:line)"; the process, thread and uvicorn frames are on every stack.
        frames = [
            f.split(" (")[0]
            for f in stack.split(";")
            if not f.startswith(("process ", " sys.path", "uvicorn.run(", "Thread._bootstrap"))
        ]
        if not frames:
            continue
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    if not total:
        return ["(empty profile)"]

    def share(table: dict[str, int]) -> list[str]:
        busiest = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in busiest]

    return [
        f"{total:,} samples; inclusive:",
        *share(inclusive),
        "self:",
        *share(own),
    ]


# --- nodes -----------------------------------------------------------------------------


#: (node id, private key hex, provider number, GPU count)
SimNode = tuple[str, str, int, int]


def make_nodes(n: int) -> list[SimNode]:
    """The simulated nodes; their keys are real ed25519 keys."""
    rng = random.Random(n)  # noqa: S311 - synthetic data
    out = []
    for i in range(n):
        key = Ed25519PrivateKey.generate()
        pub = signing.public_key_hex(key)
        raw = key.private_bytes_raw().hex()
        out.append((signing.node_id_for(pub), raw, i % PROVIDERS, rng.choice([1, 2, 4, 8])))
    return out


def registration(node: SimNode, i: int) -> dict[str, Any]:
    node_id, key_hex, provider, count = node
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
    model = MODELS[provider % len(MODELS)]
    return {
        "region": REGIONS[provider % len(REGIONS)],
        "price_per_gpu_hour": 200_000 + 50_000 * provider,
        "jobs_url": "http://127.0.0.1:9",
        "cluster_name": f"c{i // 500}",
        "node": {
            "node_id": node_id,
            "public_key": signing.public_key_hex(key),
            "demo": True,
            "gpus": [
                {"index": g, "uuid": f"GPU-{node_id}-{g}", "model": model, "vram_mib": 81920}
                for g in range(count)
            ],
        },
    }


async def register_all(fleet: list[SimNode], deadline: float) -> int:
    """Every node registers through the API, 16 at a time; returns how many did."""
    done = 0
    failed: list[str] = []
    queue = list(enumerate(fleet))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while queue and time.monotonic() < deadline:
            i, node = queue.pop()
            for _attempt in range(3):  # a race of first sign-ups can answer 500 once
                reply = await client.post(
                    f"{API}/providers/register",
                    json=registration(node, i),
                    headers={"Authorization": f"token tok-p{node[2]}"},
                )
                if reply.status_code < 500:
                    break
            if reply.status_code == 201:
                done += 1
            else:
                failed.append(reply.text)
                if len(failed) > 10:
                    raise RuntimeError(f"registrations refused: {failed[:3]}")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
        # Each provider's first call alone: concurrent first sign-ups of one account
        # race (an open bug: the loser answers 500).
        for p in range(PROVIDERS):
            await client.get(f"{API}/providers/me", headers={"Authorization": f"token tok-p{p}"})
        await asyncio.gather(*(worker(client) for _ in range(16)))
    return done


def mark_verified(db_url: str) -> None:
    """What a passed challenge sets (a CPU cannot answer a GPU challenge)."""
    from sqlalchemy import text

    from gpuportal.hub import db as portal_db
    from gpuportal.hub.settings import load_settings

    engine = portal_db.make_engine(load_settings(db_url=db_url).database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE node_challenges SET status = 'passed'"))
        conn.execute(
            text(
                "UPDATE nodes SET status = 'online', verification = 'verified', "
                "verified_at = now(), next_challenge_at = now() + interval '1 day'"
            )
        )
    engine.dispose()


# --- the heartbeat load ------------------------------------------------------------------


def _heartbeat_requests(
    fleet: list[SimNode], counters: dict[str, int], per_node: int
) -> dict[str, list[bytes]]:
    """Every node's next ``per_node`` heartbeats as raw HTTP/1.1 requests, signed now.

    Signing is the node's work, not the portal's: it is done before the clock starts,
    so the load process only writes bytes and reads replies. The timestamps stay well
    within the portal's allowed clock skew for a step of a few seconds."""
    out: dict[str, list[bytes]] = {}
    now = int(time.time())
    for node_id, raw, _provider, gpus in fleet:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))
        path = f"{API}/nodes/{node_id}/heartbeat"
        requests = []
        for k in range(per_node):
            counters[node_id] += 1
            body = json.dumps(
                {
                    "gpus": [
                        {
                            "uuid": f"GPU-{node_id}-{g}",
                            "utilization_pct": 40 + k % 50,
                            "memory_used_mib": 1000,
                            "temperature_c": 60,
                            "power_w": 250.0,
                        }
                        for g in range(gpus)
                    ]
                }
            ).encode()
            headers = signing.sign(key, "POST", path, node_id, now, counters[node_id], body)
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            requests.append(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{head}\r\n".encode()
                + body
            )
        out[node_id] = requests
    return out


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Send one request on a kept-alive connection; read its reply; return the status."""
    writer.write(request)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return int(status_line.split()[1]) if status_line else 599


def heartbeat_load(
    fleet: list[SimNode],
    requests: dict[str, list[bytes]],
    concurrency: int,
    seconds: float,
    once: bool,
    out: Any,
) -> None:
    """In a separate process: pre-signed heartbeats for ``seconds`` at ``concurrency``
    (or one per node, ``once``), over kept-alive raw HTTP/1.1 connections; each task
    owns a disjoint share of the nodes, so each node's counters arrive in order."""

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        errors: dict[int, int] = {}
        stop = time.monotonic() + seconds
        used = dict.fromkeys(requests, 0)

        async def task(share: list[str]) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
            try:
                k = 0
                while time.monotonic() < stop and share and not (once and k >= len(share)):
                    node_id = share[k % len(share)]
                    k += 1
                    if used[node_id] >= len(requests[node_id]):
                        break  # this share's signed heartbeats are spent
                    request = requests[node_id][used[node_id]]
                    used[node_id] += 1
                    t = time.perf_counter()
                    status = await _exchange(reader, writer, request)
                    latencies.append(time.perf_counter() - t)
                    if status != 200:
                        errors[status] = errors.get(status, 0) + 1
            finally:
                writer.close()

        ids = [n[0] for n in fleet]
        start = time.perf_counter()
        await asyncio.gather(*(task(ids[j::concurrency]) for j in range(concurrency)))
        wall = time.perf_counter() - start
        return {"latencies": latencies, "wall": wall, "errors": errors, "used": used}

    out.put(asyncio.run(run()))


def load_step(
    fleet: list[SimNode],
    counters: dict[str, int],
    concurrency: int,
    seconds: float,
    proc: subprocess.Popen[bytes],
    once: bool = False,
    load_procs: int = 1,
    per_node: int = 1,
) -> dict[str, Any]:
    """One step of the load: ``load_procs`` processes, each with a disjoint share of
    the fleet and ``concurrency`` connections, for ``seconds``. Heartbeats a node did
    not get to send are skipped by the next step (its counter only has to rise)."""
    ctx = mp.get_context("spawn")
    queue: Any = ctx.Queue()
    procs = max(1, min(load_procs, len(fleet)))
    shares = [fleet[i::procs] for i in range(procs)]
    per_proc = max(1, concurrency // procs)
    signed = [_heartbeat_requests(share, counters, per_node) for share in shares]
    cpu0, _ = usage(proc)
    wall0 = time.perf_counter()
    workers = [
        ctx.Process(target=heartbeat_load, args=(share, reqs, per_proc, seconds, once, queue))
        for share, reqs in zip(shares, signed, strict=True)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    wall = time.perf_counter() - wall0
    cpu1, rss = usage(proc)
    lat = sorted(x for r in results for x in r["latencies"])
    errors: dict[int, int] = {}
    for r in results:
        for status, n in r["errors"].items():
            errors[status] = errors.get(status, 0) + n
    return {
        "concurrency": per_proc * procs,
        "load_procs": procs,
        "rate": len(lat) / max(r["wall"] for r in results),
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan"),
        "errors": errors,
        "cores": (cpu1 - cpu0) / wall,
        "rss_mb": rss / 2**20,
    }


# --- the rest ----------------------------------------------------------------------------


async def reserve_servers(servers: int) -> tuple[int, dict[int, int]]:
    """Each customer reserves one GPU and activates it, as the spawner does."""
    made, refused = 0, {}
    reasons: set[str] = set()
    queue = list(range(servers))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal made
        while queue:
            c = queue.pop()
            reply = await client.post(
                f"{API}/reservations",
                json={"gpu_count": 1, "user": f"c{c}", "server_name": ""},
                headers={"Authorization": "token tok-spawner"},
            )
            if reply.status_code != 201:
                refused[reply.status_code] = refused.get(reply.status_code, 0) + 1
                if len(reasons) < 3:
                    reasons.add(reply.text[:200])
                continue
            rid = reply.json()["id"]
            done = await client.post(
                f"{API}/reservations/{rid}/activate", headers={"Authorization": "token tok-spawner"}
            )
            if done.status_code == 200:
                made += 1

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
        for c in range(servers):  # accounts first, one at a time (see register_all)
            await client.get(f"{API}/balance", headers={"Authorization": f"token tok-c{c}"})
        await asyncio.gather(*(worker(client) for _ in range(8)))
    for reason in sorted(reasons):
        print(f"  a refusal: {reason}", flush=True)
    return made, refused


def meter_servers(db_url: str, servers: int) -> tuple[float, float, int]:
    """One tick of the set-based meter and one of the ORM reference over the open
    allocations (each one interval later): seconds each, intervals the first charged."""
    from gpuportal.hub import db as portal_db
    from gpuportal.hub import timeutil
    from gpuportal.hub.billing import metering, metering_reference
    from gpuportal.hub.settings import load_settings

    settings = load_settings(db_url=db_url)
    engine = portal_db.make_engine(settings.database_url)
    sessions = portal_db.session_factory(engine)
    interval = settings.meter_interval_seconds
    now = timeutil.utcnow() + timedelta(seconds=interval * 2)
    t = time.perf_counter()
    ours = metering.tick(sessions, settings, now)
    took = time.perf_counter() - t
    t = time.perf_counter()
    metering_reference.tick(sessions, settings, now + timedelta(seconds=interval))
    ref = time.perf_counter() - t
    engine.dispose()
    return took, ref, ours.intervals


def offers_timing(db_url: str, repeat: int) -> tuple[float, float, int]:
    """Median seconds of GET /offers's work from the index and from SQL, and offers."""
    from gpuportal.hub import db as portal_db
    from gpuportal.hub.market import marketplace
    from gpuportal.hub.market.capacity import CapacityIndex
    from gpuportal.hub.settings import load_settings

    settings = load_settings(db_url=db_url)
    engine = portal_db.make_engine(settings.database_url)
    sessions = portal_db.session_factory(engine)
    rules = marketplace.rules_of(settings)
    index = CapacityIndex(rules)
    index.attach(sessions)
    index.load()
    fast, slow = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        a = json.dumps(marketplace.offers_of(index.candidates()))
        fast.append(time.perf_counter() - t)
        t = time.perf_counter()
        with portal_db.transaction(sessions) as session:
            b = json.dumps(marketplace.offers(session, rules))
        slow.append(time.perf_counter() - t)
        assert a == b, "the index's offers differ from SQL's"
    engine.dispose()
    return statistics.median(fast), statistics.median(slow), len(json.loads(a))


def placement_rows(
    sizes: list[int], seconds: float
) -> list[tuple[int, str, float, float, float, float]]:
    rng = random.Random(42)  # noqa: S311 - synthetic data
    rows = []
    for n in sizes:
        pool = placement_bench.fleet(n, rng)
        index = placement_bench.PlacementIndex.build(pool)
        for mix, any_model in (("model", False), ("any model", True)):
            reqs = placement_bench.requests(rng, 200, any_model)
            fast = placement_bench.latencies(index.choose, reqs, seconds)
            slow = placement_bench.latencies(
                lambda r, pool=pool: placement_bench.choose(r, pool), reqs[:20], seconds
            )
            rows.append(
                (
                    n,
                    mix,
                    placement_bench.pct(fast, 0.5),
                    placement_bench.pct(fast, 0.99),
                    placement_bench.pct(slow, 0.5),
                    placement_bench.pct(slow, 0.99),
                )
            )
    return rows


def uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "?"


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--full", action="store_true", help="100,000 nodes")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--servers", type=int, default=1_000)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--workers", default="1,2", help="portal processes for the batched path")
    parser.add_argument("--seconds", type=float, default=5.0, help="per load step")
    parser.add_argument(
        "--load-procs", type=int, default=2, help="load processes (each its share of nodes)"
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        default=4000.0,
        help="heartbeats/s each step can send at most (they are signed before it starts)",
    )
    parser.add_argument("--meter-sizes", default="1000,10000,50000")
    parser.add_argument("--batch-seconds", type=float, default=2.0)
    parser.add_argument("--register-seconds", type=float, default=900.0)
    parser.add_argument(
        "--profile",
        type=Path,
        help="a folder: sample the portal with py-spy during each mode's last step",
    )
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.servers, args.seconds = 500, 50, 2.0
        args.concurrency, args.meter_sizes = "8,32", "1000"
    if args.full:
        args.nodes = 100_000
    print(f"# fleet benchmark: {args.nodes:,} nodes, {args.servers:,} servers")
    print(f"# {uptime()}")
    print(f"# the portal's console: {LOG}")
    LOG.write_bytes(b"")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    found = meter_bench.pg_engine(args.pg)
    if found is None:
        raise SystemExit("PostgreSQL is needed at --pg")
    engine, drop = found
    db_url = engine.url.render_as_string(hide_password=False)
    import redis

    store = redis.Redis.from_url(args.redis)
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    try:
        from gpuportal.hub import db as portal_db

        portal_db.upgrade(engine)
        base_env = {
            **os.environ,
            "GPUPORTAL_DB_URL": db_url,
            "GPUPORTAL_REDIS_URL": args.redis,
            "GPUPORTAL_DATA_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / "fleet-bench"),  # noqa: S108
            "FLEET_SERVERS": str(args.servers),
            # The load sends as fast as the portal answers, not once per interval: a
            # long interval keeps the nodes online while it cycles through them.
            "GPUPORTAL_HEARTBEAT_SECONDS": "600",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        fleet = make_nodes(args.nodes)
        counters = {n[0]: 0 for n in fleet}

        proc = start_portal({**base_env, "GPUPORTAL_HEARTBEAT_BATCH_SECONDS": "0"}, 1)
        procs.append(proc)
        t = time.perf_counter()
        registered = asyncio.run(register_all(fleet, time.monotonic() + args.register_seconds))
        took = time.perf_counter() - t
        print(
            f"registered {registered:,} nodes through the API in {took:.1f} s "
            f"({registered / took:,.0f}/s)",
            flush=True,
        )
        stop_portal(procs.pop())
        mark_verified(db_url)
        fleet = fleet[:registered] if registered < len(fleet) else fleet

        modes = [("direct (commit per heartbeat)", "0", 1)] + [
            (f"batched, {w} process{'es' if w > 1 else ''}", str(args.batch_seconds), w)
            for w in (int(x) for x in args.workers.split(","))
        ]
        beats: list[tuple[str, dict[str, Any]]] = []
        for label, batch, workers in modes:
            for key in store.scan_iter("gpuportal:*"):
                store.delete(key)
            proc = start_portal({**base_env, "GPUPORTAL_HEARTBEAT_BATCH_SECONDS": batch}, workers)
            procs.append(proc)
            # One heartbeat each first: the direct path puts a node on the fast path.
            # (In chunks, each signed just before it is sent: the portal refuses a
            # timestamp more than a minute old, and the direct path answers ~100/s.)
            for at in range(0, len(fleet), WARMUP_CHUNK):
                load_step(fleet[at : at + WARMUP_CHUNK], counters, 16, 600.0, proc, once=True)
            per_node = max(1, math.ceil(args.max_rate * args.seconds / len(fleet)))
            steps = [int(x) for x in args.concurrency.split(",")]
            for c in steps:
                spy = None
                if args.profile and c == steps[-1]:
                    name = "heartbeats-" + label.split(" ")[0].strip(",") + f"-{workers}.txt"
                    spy = start_profile(proc, args.profile / name, args.seconds)
                row = load_step(
                    fleet,
                    counters,
                    c,
                    args.seconds,
                    proc,
                    load_procs=args.load_procs,
                    per_node=per_node,
                )
                beats.append((label, row))
                print(
                    f"heartbeats {label:32s} c={c:<3} x{row['load_procs']} {row['rate']:>8,.0f}/s "
                    f"p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:7.1f} ms "
                    f"portal {row['cores']:.2f} cores {row['rss_mb']:.0f} MB"
                    + (f" errors {row['errors']}" if row["errors"] else ""),
                    flush=True,
                )
                if spy is not None:
                    spy.wait(timeout=args.seconds + 60)
                    print("\n".join(profile_summary(args.profile / name)), flush=True)
            if label.startswith("batched, 1"):
                t = time.perf_counter()
                made, refused = asyncio.run(reserve_servers(args.servers))
                results["reserve"] = (made, refused, time.perf_counter() - t)
                print(
                    f"reserved and activated {made:,} servers in "
                    f"{results['reserve'][2]:.1f} s; refused {refused}",
                    flush=True,
                )
            stop_portal(procs.pop())
        results["beats"] = beats

        ours, ref, charged = meter_servers(db_url, args.servers)
        results["meter_servers"] = (ours, ref, charged)
        made = results["reserve"][0] if "reserve" in results else 0
        print(
            f"meter tick over the {made:,} servers' allocations ({charged:,} intervals): "
            f"{ours:.3f} s; "
            f"ORM reference {ref:.3f} s ({ref / max(ours, 1e-9):.1f}x)",
            flush=True,
        )

        fast, slow, count = offers_timing(db_url, 3 if args.quick else 5)
        results["offers"] = (fast, slow, count)
        print(
            f"GET /offers uncached at {len(fleet):,} nodes ({count} offers): index "
            f"{fast * 1000:.1f} ms, SQL path {slow * 1000:.1f} ms ({slow / fast:.1f}x)",
            flush=True,
        )
    finally:
        for proc in procs:
            stop_portal(proc)
        for key in store.scan_iter("gpuportal:*"):
            store.delete(key)
        store.close()
        drop()

    sizes = sorted({args.nodes, 100_000})
    for n, mix, f50, f99, s50, s99 in placement_rows(sizes, 0.5 if args.quick else 1.0):
        print(
            f"placement {n:>7,} {mix:9s}: index p50 {f50 * 1e6:6.1f} µs p99 "
            f"{f99 * 1e6:7.1f} µs | scan p50 {s50 * 1e6:8.0f} µs p99 {s99 * 1e6:8.0f} µs "
            f"| {s99 / f99:,.0f}x at p99",
            flush=True,
        )

    meter_args = argparse.Namespace(
        repeat=1 if args.quick else 3, reference_max=10_000, naive_max=500 if args.quick else 2_000
    )
    for n in (int(x) for x in args.meter_sizes.split(",")):
        found = meter_bench.pg_engine(args.pg)
        if found is None:
            break
        engine, drop = found
        try:
            meter_bench.run("postgres", engine, n, meter_args)
        finally:
            drop()
    print(f"# {uptime()}")


if __name__ == "__main__":
    main()
