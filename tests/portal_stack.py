"""Running the embedded stack (`gpuportal up`) from tests, and logging in to its hub."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from gpuportal.provider import ports

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port for a test's server, below the kernel's ephemeral range so nothing that
    binds port 0 (Ray's processes, clients) takes it before the server binds it."""
    return ports.free_port(span=ports.BELOW_EPHEMERAL)


@dataclass
class Stack:
    """A running ``gpuportal up`` on random ports."""

    proc: subprocess.Popen[str]
    data_dir: Path
    base_url: str
    admin_password: str
    env: dict[str, str]
    output: Path

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def read_output(self) -> str:
        return self.output.read_text(errors="replace")


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPORTAL_")}
    env.update(
        GPUPORTAL_DATA_DIR=str(data_dir),
        GPUPORTAL_PORT=str(free_port()),
        GPUPORTAL_HUB_PORT=str(free_port()),
        GPUPORTAL_PROXY_API_PORT=str(free_port()),
        GPUPORTAL_PORTAL_PORT=str(free_port()),
        GPUPORTAL_DASHBOARDS_PORT=str(free_port()),
        GPUPORTAL_RAY_PORT=str(free_port()),
        GPUPORTAL_RAY_DASHBOARD_PORT=str(free_port()),
        GPUPORTAL_RAY_NUM_CPUS="1",
        GPUPORTAL_AUTH_CACHE_SECONDS="2",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


def start_stack(data_dir: Path, timeout: float = 150.0, **extra: str) -> Stack:
    password = "pw-" + secrets.token_hex(6)
    env = stack_env(data_dir, GPUPORTAL_ADMIN_PASSWORD=password, **extra)
    output = data_dir.parent / f"{data_dir.name}-up.log"
    with open(output, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuportal.hub.stack.cli", "up", "--quiet"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    stack = Stack(
        proc, data_dir, f"http://127.0.0.1:{env['GPUPORTAL_PORT']}", password, env, output
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gpuportal up exited {proc.returncode}:\n{stack.read_output()}")
        if "[4/4] ready." in stack.read_output():
            return stack
        time.sleep(0.5)
    stop_stack(stack)
    raise AssertionError(f"gpuportal up not ready in {timeout}s:\n{stack.read_output()}")


def stop_stack(stack: Stack, timeout: float = 90.0) -> int:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait(10)
    return stack.proc.returncode


def hub_login(base_url: str, username: str, password: str) -> httpx.Client:
    """A browser-like client logged in to the hub (form login with the xsrf cookie)."""
    client = httpx.Client(base_url=base_url, follow_redirects=True, timeout=30)
    client.get("/hub/login")
    reply = client.post(
        "/hub/login",
        data={
            "username": username,
            "password": password,
            "_xsrf": client.cookies.get("_xsrf"),
        },
    )
    if "/hub/login" in str(reply.url):
        client.close()
        raise AssertionError(f"login failed for {username}: {reply.status_code}")
    return client


def hub_token(client: httpx.Client, username: str) -> str:
    """A hub API token for the logged-in user, made through the hub's own API."""
    reply = client.post(
        f"/hub/api/users/{username}/tokens",
        json={"note": "test", "expires_in": 3600},
        headers={"X-XSRFToken": client.cookies.get("_xsrf", path="/hub/") or ""},
    )
    reply.raise_for_status()
    return str(reply.json()["token"])
