"""A real multi-node Ray cluster on 127.0.0.1 for the spawner tests.

Nodes are separate ``ray start --block`` processes, each in its own session,
so a test can kill one node (every process of it, SIGKILL) exactly as a
provider machine dies, and the fixture stops only what it started, by PID.
Health checks are fast (as in Ray's own tests) so the cluster marks a dead
node within seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from gpuportal.hub.stack.localray import stop_process_group
from gpuportal.provider import isolation, raynode
from tests.portal_stack import free_port

RAY = str(Path(sys.executable).parent / "ray")
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}


def _ports(*names: str) -> list[str]:
    return [f"--{name}={free_port()}" for name in names]


@dataclass
class RayNodes:
    """A head (1 CPU, no GPU: the CPU-only cluster) plus GPU worker nodes."""

    workdir: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's.
    temp_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpsp-", dir="/tmp"))
    )

    @property
    def jobs_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.workdir / raynode.AUTH_TOKEN_FILE

    @property
    def token(self) -> str:
        """The cluster's Ray token: it runs with token authentication, as the product's do."""
        return raynode.ensure_auth_token(self.token_path)

    @property
    def headers(self) -> dict[str, str]:
        return raynode.auth_headers(self.token)

    def env(self) -> dict[str, str]:
        # The node's allow-list, exactly as the product starts Ray; homes in the test's dir.
        self.token  # noqa: B018 (made before Ray reads it)
        return raynode.ray_env(
            self.token_path, {**FAST_HEALTH, isolation.ENV_HOMES: str(self.workdir / "homes")}
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"ray-{name}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                "--object-store-memory=80000000",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            start_new_session=True,
        )
        log.close()

    def start_head(self) -> None:
        self._spawn(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--num-cpus=1",
                "--num-gpus=0",
                f"--temp-dir={self.temp_dir}",
                *_ports(
                    "ray-client-server-port",
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                    "node-manager-port",
                    "object-manager-port",
                ),
            ],
        )

    def add_gpu_node(self, node_id: str, gpus: int, model: str = "A100-80GB") -> None:
        resources = {
            f"gpuportal/node:{node_id}": gpus,
            f"accelerator_type:{model}": gpus,
            "gpuportal/demo": gpus,
        }
        self._spawn(
            node_id,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--num-cpus=1",
                f"--num-gpus={gpus}",
                f"--resources={json.dumps(resources)}",
                *_ports(
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                    "node-manager-port",
                    "object-manager-port",
                ),
            ],
        )

    def nodes(self) -> list[dict[str, object]]:
        reply = httpx.get(
            f"{self.jobs_url}/api/v0/nodes",
            params={"detail": "1"},
            timeout=5,
            headers=self.headers,
        )
        reply.raise_for_status()
        return list(reply.json()["data"]["result"]["result"])

    def ray_node_id(self, node_id: str) -> str | None:
        """Ray's own id of the alive node that declares ``gpuportal/node:<node_id>``."""
        for node in self.nodes():
            resources = node.get("resources_total") or {}
            if node.get("state") == "ALIVE" and f"gpuportal/node:{node_id}" in resources:  # type: ignore[operator]
                return str(node["node_id"])
        return None

    def wait_alive(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"ray node {name} exited: see {self.workdir}")
            try:
                if sum(n.get("state") == "ALIVE" for n in self.nodes()) >= count:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"Ray cluster not up with {count} nodes in {timeout}s")

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node at once, as when its machine dies."""
        proc = self.procs.pop(name)
        family = [psutil.Process(proc.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            family += family[0].children(recursive=True)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)
        proc.wait(10)

    def stop(self) -> None:
        # Workers first, then the head; each with everything it started.
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process_group(proc.pid, timeout=20)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
