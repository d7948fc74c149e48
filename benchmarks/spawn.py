"""Spawn-to-ready latency: RaySpawner (the embedded stack) against LocalProcessSpawner.

Both run in the same invocation on this machine, on 127.0.0.1:

* RaySpawner: ``gpuportal up`` with demo GPUs (one per burst server), so every
  spawn goes through the real marketplace reservation, a Ray job pinned to the
  house node, the wrapper's report and the reservation's activation;
* LocalProcessSpawner: a plain JupyterHub with JupyterHub's
  ``SimpleLocalProcessSpawner`` (``jupyterhub-singleuser`` as a child process).

For each, ``--sequential`` spawns one after another, then a burst of
``--burst`` spawns at once. Latency is from the REST ``POST .../server`` to the
hub reporting the server ready (polled every 0.1 s). It prints p50/p95 for each
and the Ray/local ratios, and writes JSON to ``benchmarks/results/``.

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

from gpuportal.provider.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


class Hub:
    """Just enough of the hub REST API to spawn, wait and stop."""

    def __init__(self, url: str, token: str, options: dict[str, Any]) -> None:
        self.url, self.options = url, options
        self.http = httpx.Client(
            base_url=f"{url}/hub/api", timeout=120, headers={"Authorization": f"token {token}"}
        )

    def ensure_user(self, name: str) -> None:
        self.http.post(f"/users/{name}")

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
            time.sleep(0.1)
        raise RuntimeError(f"spawn {name} not ready in {timeout}s")

    def stop(self, name: str, timeout: float = 120.0) -> None:
        self.http.delete(f"/users/{name}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.ready(name) is not None:
            time.sleep(0.2)


def measure(hub: Hub, prefix: str, sequential: int, burst: int) -> dict[str, list[float]]:
    names = [f"{prefix}s{i}" for i in range(sequential)] + [f"{prefix}b{i}" for i in range(burst)]
    for name in names:
        hub.ensure_user(name)
    seq: list[float] = []
    for name in names[:sequential]:
        seq.append(hub.spawn_to_ready(name))
        hub.stop(name)
    failures: list[str] = []

    def attempt(name: str) -> float | None:
        try:
            return hub.spawn_to_ready(name)
        except RuntimeError as exc:
            failures.append(str(exc))
            return None

    with ThreadPoolExecutor(burst) as pool:
        bursts = [t for t in pool.map(attempt, names[sequential:]) if t is not None]
    with ThreadPoolExecutor(burst) as pool:
        list(pool.map(hub.stop, names[sequential:]))
    if failures:
        print(f"{prefix}: {len(failures)} burst spawn(s) failed: {failures}", file=sys.stderr)
    return {"sequential": seq, "burst": bursts, "failures": [float(len(failures))]}


def wait_http(
    url: str, proc: subprocess.Popen[Any], timeout: float, what: str, log: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready in {timeout}s:\n{log()[-3000:]}")


def start_ray_stack(work: Path, gpus: int) -> tuple[subprocess.Popen[Any], Hub]:
    """``gpuportal up`` with ``gpus`` demo A100s; an admin token from the hub API."""
    password = "bench-" + secrets.token_hex(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPORTAL_")}
    env.update(
        GPUPORTAL_DATA_DIR=str(work / "stack"),
        GPUPORTAL_PORT=str(free_port()),
        GPUPORTAL_HUB_PORT=str(free_port()),
        GPUPORTAL_PROXY_API_PORT=str(free_port()),
        GPUPORTAL_PORTAL_PORT=str(free_port()),
        GPUPORTAL_RAY_PORT=str(free_port()),
        GPUPORTAL_RAY_DASHBOARD_PORT=str(free_port()),
        GPUPORTAL_ADMIN_PASSWORD=password,
        GPUPORTAL_DEMO_GPUS=f"{gpus}xA100-80GB",
        RAY_USAGE_STATS_ENABLED="0",
    )
    out = work / "stack-up.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuportal.hub.stack.cli", "up", "--quiet"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{env['GPUPORTAL_PORT']}"
    deadline = time.monotonic() + 240
    while "[4/4] ready." not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("gpuportal up failed:\n" + out.read_text()[-3000:])
        time.sleep(0.5)
    browser = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
    browser.get("/hub/login")
    browser.post(
        "/hub/login",
        data={"username": "admin", "password": password, "_xsrf": browser.cookies.get("_xsrf")},
    )
    reply = browser.post(
        "/hub/api/users/admin/tokens",
        json={"note": "benchmark"},
        headers={"X-XSRFToken": browser.cookies.get("_xsrf", path="/hub/") or ""},
    )
    reply.raise_for_status()
    token = reply.json()["token"]
    browser.close()
    # The house GPUs are offered once the node passed its verification challenge.
    for _ in range(240):
        offers = httpx.get(
            f"{base}/services/portal/api/v1/offers",
            headers={"Authorization": f"token {token}"},
            timeout=10,
        ).json()
        if sum(o["free_gpus"] for o in offers) >= gpus:
            break
        time.sleep(0.5)
    return proc, Hub(base, token, {"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1})


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


def stop(proc: subprocess.Popen[Any], group: bool) -> None:
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": percentile(samples, 50), "p95": percentile(samples, 95)}


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
    try:
        local_proc, local_hub = start_local_hub(work)
        try:
            results["local"] = measure(local_hub, "l", args.sequential, args.burst)
        finally:
            stop(local_proc, group=True)
        ray_proc, ray_hub = start_ray_stack(work, max(args.burst, 1))
        try:
            results["ray"] = measure(ray_hub, "r", args.sequential, args.burst)
        finally:
            stop(ray_proc, group=False)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "sequential": args.sequential,
        "burst": args.burst,
        "raw": results,
    }
    print(f"spawn-to-ready latency, seconds ({os.cpu_count()} CPUs)")
    print(f"{'':22}{'p50':>8}{'p95':>8}")
    for kind in ("sequential", "burst"):
        local, ray = summary(results["local"][kind]), summary(results["ray"][kind])
        report[kind] = {
            "local": local,
            "ray": ray,
            "ratio_p50": ray["p50"] / local["p50"],
            "ratio_p95": ray["p95"] / local["p95"],
        }
        print(f"{kind + ' local':22}{local['p50']:8.2f}{local['p95']:8.2f}")
        print(f"{kind + ' ray':22}{ray['p50']:8.2f}{ray['p95']:8.2f}")
        print(
            f"{kind + ' ray/local':22}{report[kind]['ratio_p50']:8.2f}"
            f"{report[kind]['ratio_p95']:8.2f}"
        )
    for name in ("local", "ray"):
        print(f"failed burst spawns, {name}: {int(results[name]['failures'][0])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
