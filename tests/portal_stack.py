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
        # Warm pools start slot processes on the first GPU spawn: off in the shared
        # stacks (tests/spawner/test_warm.py and benchmarks/spawn.py turn them on).
        GPUPORTAL_WARM_POOLS="0",
        # A revoked share loses its server at once (tests/test_templates_stack.py).
        GPUPORTAL_TOKEN_CHECK_SECONDS="1",
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


# --- Talking to a running stack as its users (the hub's REST API and the portal's) ---

#: The portal's API under the hub.
PORTAL_API = f"{PORTAL}/api/v1"


def password_of(stack: Stack, name: str) -> str:
    """The password a test user signs up with (the admin's comes with the stack)."""
    return stack.admin_password if name == "admin" else f"pw-{name}-12345"


def token_for(stack: Stack, name: str, *, meet_portal: bool = False) -> str:
    """Sign up (first login) or log in, and get a hub API token for ``name``.

    ``meet_portal``: also call the portal's ``/me`` once, so the portal knows the user.
    """
    client = hub_login(stack.base_url, name, password_of(stack, name))
    try:
        token = hub_token(client, name)
    finally:
        client.close()
    if meet_portal:
        me = call(stack, token, "GET", f"{PORTAL_API}/me")
        assert me.status_code == 200, me.text
    return token


def call(stack: Stack, token: str, method: str, path: str, **kw: object) -> httpx.Response:
    """One request to ``path`` on the stack's public address, with ``token``."""
    return httpx.request(
        method,
        f"{stack.base_url}{path}",
        headers={"Authorization": f"token {token}"},
        timeout=90,
        **kw,  # type: ignore[arg-type]
    )


def grant(stack: Stack, user: str, amount: int, admin_token: str | None = None) -> None:
    """Credit ``user``'s wallet with ``amount`` micro-credits, as the admin."""
    admin = admin_token or token_for(stack, "admin")
    reply = call(
        stack, admin, "POST", f"{PORTAL_API}/credits/grants", json={"user": user, "amount": amount}
    )
    assert reply.status_code == 201, reply.text


def server_of(stack: Stack, token: str, user: str) -> dict[str, object] | None:
    """``user``'s default server model from the hub, or None when there is none."""
    model = call(stack, token, "GET", f"/hub/api/users/{user}").json()
    server: dict[str, object] | None = (model.get("servers") or {}).get("")
    return server


def wait_free_gpus(stack: Stack, token: str, count: int) -> None:
    """Until the marketplace offers exactly ``count`` free GPUs (bounded: 2 minutes)."""
    offers: list[dict[str, int]] = []
    for _ in range(240):
        offers = call(stack, token, "GET", f"{PORTAL_API}/offers").json()
        if sum(o["free_gpus"] for o in offers) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"never {count} free GPUs: {offers}")
