"""Start Ray on a provider's machine with the node's GPUs and marketplace resources.

Either a new head (the provider's own cluster) or a worker joining the cluster
at ``--ray-address``. Ray runs as ``ray start --block`` in its own process
group, so stopping that one process stops what it started and nothing else.
Usage statistics stay off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

NODE_RESOURCE_PREFIX = "gpuportal/node:"
DEMO_RESOURCE = "gpuportal/demo"


class RayStartError(RuntimeError):
    """Ray did not start; the message says why and where the log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resources(node_id: str | None, models: dict[str, int], demo: bool) -> dict[str, float]:
    """``accelerator_type:<model>``, ``gpuportal/node:<id>`` (one unit per GPU; none
    without a node id) and ``gpuportal/demo``: the one definition of what a
    gpuportal Ray node declares, for provider nodes and the house head alike."""
    count = sum(models.values())
    out = {f"accelerator_type:{m}": float(n) for m, n in models.items()}
    if node_id:
        out[f"{NODE_RESOURCE_PREFIX}{node_id}"] = float(max(count, 1))
    if demo:
        out[DEMO_RESOURCE] = float(count)
    return out


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Stopping should be quick: nothing of ours to drain.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


class RayNode:
    """One ``ray start --block`` process this agent started."""

    def __init__(self, proc: subprocess.Popen[bytes], jobs_url: str, address: str) -> None:
        self.proc = proc
        self.jobs_url = jobs_url
        self.address = address

    @classmethod
    def start(
        cls,
        node_id: str,
        models: dict[str, int],
        demo: bool,
        log_path: Path,
        address: str | None = None,
        num_cpus: int = 1,
        timeout: float = 120.0,
    ) -> RayNode:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise RayStartError("the `ray` command is missing; install gpuportal first.")
        port, dashboard = free_port(), free_port()
        common = [
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={sum(models.values())}",
            f"--resources={json.dumps(resources(node_id, models, demo))}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=100000000",
            f"--temp-dir=/tmp/gpuportal-provider-ray-{os.getuid()}-{port}",
        ]
        if address:
            cmd = [ray, "start", f"--address={address}", *common]
            jobs_url, addr = "", address
        else:
            cmd = [
                ray,
                "start",
                "--head",
                f"--port={port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                *common,
            ]
            jobs_url, addr = f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=ray_env(),
                start_new_session=True,
            )
        node = cls(proc, jobs_url, addr)
        if jobs_url:
            node.wait_ready(timeout, log_path)
        return node

    def wait_ready(self, timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RayStartError(f"Ray exited with code {self.proc.returncode}; see {log_path}")
            try:
                reply = httpx.get(f"{self.jobs_url}/api/v0/nodes", timeout=2)
                if reply.status_code == 200 and reply.json()["data"]["result"]["total"] > 0:
                    return
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RayStartError(f"Ray did not answer within {timeout:.0f}s; see {log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the ``ray start --block`` we started: SIGTERM to it (it takes its Ray
        processes down), then SIGKILL to its process group if anything lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # only our group: we made it
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
