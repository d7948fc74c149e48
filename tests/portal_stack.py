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

from gpuportal.hub import db as portal_db
from gpuportal.hub.settings import load_settings
from gpuportal.hub.stack.house import house_dir, verification_of
from gpuportal.hub.stack.ready import wait_ready
from gpuportal.provider import ports
from gpuportal.provider.identity import KEY_FILE, Identity

ROOT = Path(__file__).resolve().parent.parent
#: The portal service's prefix under the hub (the default ``GPUPORTAL_SERVICE_PREFIX``).
PORTAL = "/services/portal"
#: The token of ``other-service``, a hub service the portal does not trust, in the
#: shared default stack (``tests/conftest.py``).
OTHER_SERVICE_TOKEN = secrets.token_hex(16)


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


#: The data dir of every ``gpuportal up`` this run started (the session summary counts them).
STARTED: list[Path] = []


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
    STARTED.append(data_dir)
    stack = Stack(
        proc, data_dir, f"http://127.0.0.1:{env['GPUPORTAL_PORT']}", password, env, output
    )
    deadline = time.monotonic() + timeout
    try:
        wait_ready(f"{stack.base_url}{PORTAL}/api/v1/health", timeout, proc=proc)
        _wait_house_decided(stack, deadline)
    except Exception as exc:
        stop_stack(stack)
        raise AssertionError(f"gpuportal up not ready: {exc}\n{stack.read_output()}") from None
    except BaseException:  # Ctrl-C: stop what was started, then stop
        stop_stack(stack)
        raise
    return stack


def _wait_house_decided(stack: Stack, deadline: float) -> None:
    """Wait, as ``up`` does, until the house node passed or failed its challenge.

    The health endpoint says the hub and the portal answer; the house GPUs are on
    offer only once the house agent has answered its verification challenge.
    """
    where: dict[str, object] = {"data_dir": stack.data_dir}
    if stack.env.get("GPUPORTAL_DB_URL"):
        where["db_url"] = stack.env["GPUPORTAL_DB_URL"]
    settings = load_settings(**where)
    if not (house_dir(settings) / KEY_FILE).exists():
        return  # an external Ray cluster: no house node
    node_id = Identity.load(house_dir(settings)).node_id
    engine = portal_db.make_engine(settings.database_url)
    try:
        while verification_of(engine, node_id) not in ("verified", "failed"):
            if stack.proc.poll() is not None:
                raise AssertionError(f"gpuportal up exited {stack.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError("the house node was not verified in time")
            time.sleep(0.5)
    finally:
        engine.dispose()


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
    """A browser-like client logged in to the hub (form login with the xsrf cookie).

    A name the hub does not know yet is signed up first (``/hub/signup``), since
    logging in never creates an account.
    """
    client = httpx.Client(base_url=base_url, follow_redirects=True, timeout=30)
    client.get("/hub/login")
    form = {"username": username, "password": password, "_xsrf": client.cookies.get("_xsrf")}
    reply = client.post("/hub/login", data=form)
    if "/hub/login" in str(reply.url):
        reply = client.post("/hub/signup", data={**form, "password_again": password})
    if "/hub/login" in str(reply.url) or "/hub/signup" in str(reply.url):
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
