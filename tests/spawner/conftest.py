"""Fixtures for the RaySpawner tests: real Ray nodes, a real hub, the marketplace contract."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gpuportal.hub.stack.localray import stop_process_group
from gpuportal.hub.stack.ready import NotReady, wait_ready

from .contract_portal import ContractPortal, Node, Served, create_app
from .raynodes import RayNodes, free_port

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    """A head (the CPU cluster) and node ``n1`` with two logical A100-80GB GPUs."""
    nodes = RayNodes(tmp_path_factory.mktemp("raynodes"))
    try:
        nodes.start_head()
        nodes.wait_alive(1)
        nodes.add_gpu_node("n1", 2)
        nodes.wait_alive(2)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="session")
def portal(ray_nodes: RayNodes) -> Iterator[ContractPortal]:
    the_portal = ContractPortal(token="spawner-" + secrets.token_hex(16))
    the_portal.nodes.append(
        Node(
            "n1", 2, "A100-80GB", "local", 1_500_000, ray_nodes.jobs_url, ray_token=ray_nodes.token
        )
    )
    port = free_port()
    with Served(create_app(the_portal), port):
        the_portal.url = f"http://127.0.0.1:{port}/services/portal"  # type: ignore[attr-defined]
        yield the_portal


@dataclass
class Hub:
    """A JupyterHub process running RaySpawner (see hub_config.py)."""

    env: dict[str, str]
    data: Path
    proc: subprocess.Popen[bytes] | None = None
    log_paths: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['TEST_HUB_PORT']}"

    @property
    def token(self) -> str:
        return self.env["TEST_ADMIN_TOKEN"]

    def start(self, timeout: float = 60.0) -> None:
        log = self.data / f"hub-{len(self.log_paths)}.log"
        self.log_paths.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "jupyterhub"),
                    "-f",
                    str(HERE / "hub_config.py"),
                ],
                cwd=self.data,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_ready(f"{self.url}/hub/health", timeout, proc=self.proc, interval=0.3)
        except NotReady as exc:
            raise AssertionError(f"hub not up: {exc}:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc.pid, timeout=30)
            self.proc = None

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {self.token}"}
        return httpx.request(
            method, f"{self.url}/hub/api{path}", headers=headers, timeout=60, **kwargs
        )

    def server_path(self, user: str, server: str = "") -> str:
        path = f"/users/{quote(user, safe='')}/server"
        return f"{path}s/{quote(server, safe='')}" if server else path

    def spawn(
        self,
        user: str,
        server: str = "",
        options: dict[str, Any] | None = None,
    ) -> httpx.Response:
        self.api("POST", f"/users/{quote(user, safe='')}")  # 201 or 409 (exists): both fine
        return self.api("POST", self.server_path(user, server), json=options or {})

    def server_model(self, user: str, server: str = "") -> dict[str, Any] | None:
        reply = self.api("GET", f"/users/{quote(user, safe='')}")
        reply.raise_for_status()
        servers: dict[str, Any] = reply.json().get("servers") or {}
        return servers.get(server)

    def wait_ready(self, user: str, server: str = "", timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.server_model(user, server)
            if model and model.get("ready"):
                return model
            if model is None or (not model.get("pending") and not model.get("ready")):
                raise AssertionError(f"{user}/{server} failed to start:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{user}/{server} not ready in {timeout}s:\n{self.log()[-4000:]}")

    def wait_gone(self, user: str, server: str = "", timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_model(user, server) is None:
                return
            time.sleep(0.5)
        raise AssertionError(f"{user}/{server} still listed after {timeout}s")

    def stop_server(self, user: str, server: str = "") -> None:
        reply = self.api("DELETE", self.server_path(user, server))
        assert reply.status_code in (202, 204), reply.text
        self.wait_gone(user, server)

    def state(self, user: str, server: str = "") -> dict[str, Any]:
        reply = self.api(
            "GET", f"/users/{quote(user, safe='')}", params={"include_stopped_servers": "1"}
        )
        servers = reply.json().get("servers") or {}
        return dict((servers.get(server) or {}).get("state") or {})


def make_hub(tmp: Path, ray_nodes: RayNodes, portal: ContractPortal, **extra: str) -> Hub:
    data = tmp / "hub"
    data.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPORTAL_", "TEST_"))}
    env.update(
        TEST_HUB_DATA=str(data),
        TEST_HUB_PORT=str(free_port()),
        TEST_HUB_API_PORT=str(free_port()),
        TEST_PROXY_API_PORT=str(free_port()),
        TEST_PROXY_TOKEN=secrets.token_hex(16),
        TEST_ADMIN_TOKEN="admin-" + secrets.token_hex(16),
        TEST_SPAWNER_TOKEN=portal.token,
        TEST_PORTAL_SERVICE_TOKEN="portal-" + secrets.token_hex(16),
        TEST_PORTAL_URL=portal.url,  # type: ignore[attr-defined]
        TEST_JOBS_URL=ray_nodes.jobs_url,
        TEST_RAY_TOKEN=ray_nodes.token,
        RAY_USAGE_STATS_ENABLED="0",
        # A control-plane secret in the hub's own environment: must not reach a node.
        GPUPORTAL_DB_URL="postgresql+psycopg://portal:hub-secret@127.0.0.1/portal",
    )
    env.update(extra)
    return Hub(env, data)


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, ray_nodes: RayNodes, portal: ContractPortal
) -> Iterator[Hub]:
    running = make_hub(
        tmp_path_factory.mktemp("hubmod"),
        ray_nodes,
        portal,
        TEST_DEAD_AFTER="8",
        TEST_SPAWN_LIMIT="3",
    )
    running.start()
    yield running
    # Servers outlive the hub (cleanup_servers=False): stop them through it first.
    for user in running.api("GET", "/users").json():
        for name in user.get("servers") or {}:
            running.api("DELETE", running.server_path(user["name"], name))
    time.sleep(1)
    running.stop()
