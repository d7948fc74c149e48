"""Spawn-to-ready latency: RaySpawner warm and cold against LocalProcessSpawner.

Three rows in the same invocation on this machine, on 127.0.0.1:

* LocalProcessSpawner: a plain JupyterHub with JupyterHub's
  ``SimpleLocalProcessSpawner`` (``jupyterhub-singleuser`` as a child process);
* RaySpawner warm: ``gpuportal up`` with demo GPUs (one per burst server) and warm
  pools on, one slot per burst server: every spawn makes a real marketplace
  reservation, claims a waiting server on the house node (its own OS account,
  its sandbox) and activates the reservation. A first spawn starts the pool, and
  each measurement waits until enough slots are waiting (a pool refills in the
  background between spawns); the spawns that still went cold are counted;
* RaySpawner cold, through the node's pool: the same stack with a pool on the
  node that keeps no slot waiting (``GPUPORTAL_WARM_SLOTS_MAX=0``), so each spawn
  is a cold start on a node without a warm slot: the pool starts the server's
  process when the claim comes (no Ray job). The first spawn starts the pool, and
  the row waits until it is up;
* RaySpawner cold, Ray job: the same stack with warm pools off: a Ray job per
  spawn (its supervisor, the wrapper, its token claim), the wrapper's report,
  then the activation.

For each, ``--sequential`` spawns one after another, then a burst of
``--burst`` spawns at once. Latency is from the REST ``POST .../server`` to the
hub reporting the server ready (polled every 0.05 s). It prints p50/p95 for each
and the ratios to LocalProcessSpawner, the machine's load (``uptime``) before and
after, and writes JSON to ``benchmarks/results/``.

    .venv/bin/python benchmarks/spawn.py                 # 5 sequential + burst of 10
    .venv/bin/python benchmarks/spawn.py --sequential 3 --burst 4
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from gpuportal.hub.stack.ready import NotReady, wait_ready
from gpuportal.provider.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
# The test suite's stack launcher: one way to start `gpuportal up` and wait for it.
sys.path.insert(0, str(ROOT))
from tests.portal_stack import (  # noqa: E402
    Stack,
    grant,
    hub_login,
    hub_token,
    start_stack,
    stop_stack,
)

BIN = Path(sys.executable).parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


class Hub:
    """Just enough of the hub REST API to spawn, wait and stop."""

    def __init__(
        self,
        url: str,
        token: str,
        options: dict[str, Any],
        on_new_user: Callable[[str], None] | None = None,
    ) -> None:
        self.url, self.options, self.on_new_user = url, options, on_new_user
        self.http = httpx.Client(
            base_url=f"{url}/hub/api", timeout=120, headers={"Authorization": f"token {token}"}
        )

    def ensure_user(self, name: str) -> None:
        self.http.post(f"/users/{name}")
        if self.on_new_user is not None:
            self.on_new_user(name)

    def ready(self, name: str) -> bool | None:
        server = (self.http.get(f"/users/{name}").json().get("servers") or {}).get("")
        if not server:
            return None
        return bool(server.get("ready"))

    def spawn_to_ready(self, name: str, timeout: float = 180.0) -> float:
        start = time.perf_counter()
        reply = self.http.post(f"/users/{name}/server", json=self.options)
        if reply.status_code not in (201, 202):
            raise RuntimeError(f"spawn {name}: {reply.status_code} {reply.text[:300]}")
        deadline = start + timeout
        while time.perf_counter() < deadline:
            state = self.ready(name)
            if state:
                return time.perf_counter() - start
            if state is None:
                raise RuntimeError(f"spawn {name} failed")
            time.sleep(0.05)
        raise RuntimeError(f"spawn {name} not ready in {timeout}s")

    def was_warm(self, name: str) -> bool:
        server = (self.http.get(f"/users/{name}").json().get("servers") or {}).get("")
        return bool(((server or {}).get("state") or {}).get("warm_slot"))

    def wait_warm_slots(self, count: int, timeout: float = 300.0) -> None:
        """Until the pools hold ``count`` waiting slots (a pool refills one at a time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pools = self.http.get("/gpuportal/warm").json().get("pools") or []
            if sum(int(p.get("ready") or 0) for p in pools) >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} warm slots after {timeout}s")

    def wait_pool_up(self, timeout: float = 300.0) -> None:
        """Until a node's pool is up (answering claims)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pools = self.http.get("/gpuportal/warm").json().get("pools") or []
            if any(p.get("state") == "ready" for p in pools):
                return
            time.sleep(0.5)
        raise RuntimeError(f"no warm pool up after {timeout}s")

    def stop(self, name: str, timeout: float = 120.0) -> None:
        self.http.delete(f"/users/{name}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.ready(name) is not None:
            time.sleep(0.2)


def measure(
    hub: Hub, prefix: str, sequential: int, burst: int, warm: bool = False, pool: bool = False
) -> dict[str, list[float]]:
    """``warm``: wait for waiting slots before each spawn; ``warm`` or ``pool``: count
    the spawns a pool served (its ``warm`` result)."""
    counted = warm or pool
    names = [f"{prefix}s{i}" for i in range(sequential)] + [f"{prefix}b{i}" for i in range(burst)]
    for name in names:
        hub.ensure_user(name)
    seq: list[float] = []
    went_warm = 0
    for name in names[:sequential]:
        if warm:
            hub.wait_warm_slots(1)
        seq.append(hub.spawn_to_ready(name))
        went_warm += hub.was_warm(name) if counted else 0
        hub.stop(name)
    if warm:
        hub.wait_warm_slots(burst)
    failures: list[str] = []

    def attempt(name: str) -> float | None:
        try:
            return hub.spawn_to_ready(name)
        except RuntimeError as exc:
            failures.append(str(exc))
            return None

    with ThreadPoolExecutor(burst) as threads:
        bursts = [t for t in threads.map(attempt, names[sequential:]) if t is not None]
    went_warm += sum(hub.was_warm(n) for n in names[sequential:]) if counted else 0
    with ThreadPoolExecutor(burst) as threads:
        list(threads.map(hub.stop, names[sequential:]))
    if failures:
        print(f"{prefix}: {len(failures)} burst spawn(s) failed: {failures}", file=sys.stderr)
    return {
        "sequential": seq,
        "burst": bursts,
        "failures": [float(len(failures))],
        "warm": [float(went_warm)],
    }


def wait_http(
    url: str, proc: subprocess.Popen[Any], timeout: float, what: str, log: Callable[[], str]
) -> None:
    try:
        wait_ready(url, timeout, proc=proc)
    except NotReady as exc:
        raise RuntimeError(f"{what} not ready ({exc}):\n{log()[-3000:]}") from None


#: The Ray rows: how each stack runs its pools.
RAY_ROWS = {
    # One slot waiting per GPU.
    "ray_warm": {"GPUPORTAL_WARM_POOLS": "1", "GPUPORTAL_WARM_SLOTS": "{gpus}"},
    # A pool that keeps none waiting: it starts each server as its claim comes.
    "ray_cold_pool": {"GPUPORTAL_WARM_POOLS": "1", "GPUPORTAL_WARM_SLOTS_MAX": "0"},
    # No pools: a Ray job per spawn.
    "ray_cold_job": {"GPUPORTAL_WARM_POOLS": "0"},
}


def start_ray_stack(work: Path, gpus: int, row: str) -> tuple[Stack, Hub]:
    """``gpuportal up`` with ``gpus`` demo A100s and the pools of ``row``, started
    and waited for as the test suite starts it (tests/portal_stack.py); an admin
    token from the hub API."""
    pools = {k: v.format(gpus=gpus) for k, v in RAY_ROWS[row].items()}
    stack = start_stack(
        work / f"stack-{row}",
        timeout=240,
        GPUPORTAL_DEMO_GPUS=f"{gpus}xA100-80GB",
        GPUPORTAL_RAY_NUM_CPUS=str(os.cpu_count() or 1),
        **pools,
    )
    warm = pools["GPUPORTAL_WARM_POOLS"] == "1"
    browser = hub_login(stack.base_url, "admin", stack.admin_password)
    token = hub_token(browser, "admin")
    browser.close()
    # The house GPUs are offered once the node passed its verification challenge.
    for _ in range(240):
        offers = httpx.get(
            f"{stack.base_url}/services/portal/api/v1/offers",
            headers={"Authorization": f"token {token}"},
            timeout=10,
        ).json()
        if sum(o["free_gpus"] for o in offers) >= gpus:
            break
        time.sleep(0.5)
    gpu = {"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1}
    # Credit for every user (a launch needs runway for the minimum billable period).
    hub = Hub(stack.base_url, token, gpu, lambda name: grant(stack, name, 10**8, token))
    if warm:
        # The first GPU spawn on the node starts cold and starts its pool.
        try:
            hub.ensure_user("warmup")
            hub.spawn_to_ready("warmup")
            hub.stop("warmup")
            hub.wait_pool_up()
        except BaseException:
            stop_stack(stack)
            raise
    return stack, hub


LOCAL_CONFIG = """
import os, sys
from pathlib import Path
env = os.environ
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(env["BENCH_PORT"])
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env["BENCH_HUB_PORT"])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env['BENCH_PROXY_PORT']}"
c.ConfigurableHTTPProxy.command = [str(Path(sys.executable).parent / "configurable-http-proxy")]
c.JupyterHub.db_url = "sqlite:///" + env["BENCH_DIR"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = env["BENCH_DIR"] + "/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [{"name": "bench", "api_token": env["BENCH_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "bench", "services": ["bench"],
                            "scopes": ["admin:users", "admin:servers"]}]
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = env["BENCH_DIR"] + "/users/{username}"
c.Spawner.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
c.Spawner.ip = "127.0.0.1"
c.Spawner.default_url = "/lab"
if os.getuid() == 0:
    c.Spawner.args = ["--allow-root"]
"""


def start_local_hub(work: Path) -> tuple[subprocess.Popen[Any], Hub]:
    (work / "local").mkdir()
    config = work / "local" / "jupyterhub_config.py"
    config.write_text(LOCAL_CONFIG)
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPORTAL_")}
    env.update(
        BENCH_PORT=str(free_port()),
        BENCH_HUB_PORT=str(free_port()),
        BENCH_PROXY_PORT=str(free_port()),
        BENCH_DIR=str(work / "local"),
        BENCH_TOKEN=token,
    )
    log_path = work / "local-hub.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "jupyterhub"), "-f", str(config)],
            cwd=work / "local",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{env['BENCH_PORT']}"
    wait_http(f"{base}/hub/health", proc, 60, "local hub", log_path.read_text)
    return proc, Hub(base, token, {})


def stop_local(proc: subprocess.Popen[Any]) -> None:
    """Stop the local hub and its servers (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": percentile(samples, 50), "p95": percentile(samples, 95)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=5)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spawn.json")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data dirs")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="gp-bench-"))
    print(f"work dir: {work}", file=sys.stderr)
    load_before = uptime()
    try:
        local_proc, local_hub = start_local_hub(work)
        try:
            results["local"] = measure(local_hub, "l", args.sequential, args.burst)
        finally:
            stop_local(local_proc)
        for row in RAY_ROWS:
            ray_stack, ray_hub = start_ray_stack(work, max(args.burst, 1), row)
            try:
                results[row] = measure(
                    ray_hub,
                    row[4] + row[-1],
                    args.sequential,
                    args.burst,
                    warm=row == "ray_warm",
                    pool=row == "ray_cold_pool",
                )
            finally:
                stop_stack(ray_stack)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "sequential": args.sequential,
        "burst": args.burst,
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "raw": results,
    }
    print(f"spawn-to-ready latency, seconds ({os.cpu_count()} CPUs)")
    print(f"load before: {load_before}\nload after:  {report['uptime_after']}")
    print(f"{'':26}{'p50':>8}{'p95':>8}{'/local p50':>12}{'/local p95':>12}")
    for kind in ("sequential", "burst"):
        local = summary(results["local"][kind])
        report[kind] = {"local": local}
        print(f"{kind + ' local':26}{local['p50']:8.2f}{local['p95']:8.2f}")
        for row in RAY_ROWS:
            got = summary(results[row][kind])
            report[kind][row] = {
                **got,
                "ratio_p50": got["p50"] / local["p50"],
                "ratio_p95": got["p95"] / local["p95"],
            }
            print(
                f"{kind + ' ' + row:26}{got['p50']:8.2f}{got['p95']:8.2f}"
                f"{got['p50'] / local['p50']:12.2f}{got['p95'] / local['p95']:12.2f}"
            )
    for name in ("local", *RAY_ROWS):
        print(f"failed burst spawns, {name}: {int(results[name]['failures'][0])}")
    print(
        f"warm spawns that were claimed warm: {int(results['ray_warm']['warm'][0])} of "
        f"{args.sequential + args.burst}"
    )
    print(
        "cold-pool spawns started by the node's pool (not a Ray job): "
        f"{int(results['ray_cold_pool']['warm'][0])} of "
        f"{args.sequential + args.burst}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
