"""The embedded stack for real: `gpuportal up` on random ports, a real hub,
proxy, portal service and local Ray cluster; then `gpuportal down`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from gpuportal.hub.stack.admin import check_password, ensure_admin

from .portal_stack import ROOT, Stack, hub_login, hub_token, stack_env, start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.ray]
PORTAL = "/services/portal"


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpuportal.hub.stack.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_up_login_health_down(tmp_path: Path) -> None:
    """The issue's smoke test: up, admin logs in over HTTP, health 200, down, nothing left."""
    stack = start_stack(tmp_path / "data", GPUPORTAL_DEMO_GPUS="2xA100-80GB")
    try:
        started = [p.pid for p in stack.descendants()]
        assert len(started) >= 4, "Ray, the hub, the proxy and the portal service run"
        assert httpx.get(f"{stack.base_url}/hub/login").status_code == 200

        browser = hub_login(stack.base_url, "admin", stack.admin_password)
        # The hub OAuth cookie flow: a browser is redirected through the hub and back.
        me = browser.get(f"{PORTAL}/api/v1/me", headers={"Accept": "text/html"})
        assert me.status_code == 200, me.text
        assert me.json()["name"] == "admin"
        assert me.json()["role"] == "admin"

        health = httpx.get(f"{stack.base_url}{PORTAL}/api/v1/health", timeout=30)
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok"
        assert (body["db"]["backend"], body["db"]["status"]) == ("sqlite", "ok")
        assert body["db"]["revision"]
        assert body["cache"] == {"backend": "memory", "status": "ok"}
        assert body["ray"]["status"] == "ok"
        assert body["ray"]["gpus"] == 2
        assert body["ray"]["gpu_models"] == {"A100-80GB": 2}
        assert body["ray"]["demo"] is True
        # The test stacks run without warm pools; the hub says so to the portal's own
        # token (jupyterhub_config.py grants its role the read-only warm scope).
        assert body["warm_pools"] == {
            "available": False,
            "reason": "Warm pools are off on the hub (c.RaySpawner.warm_pools).",
        }
        assert httpx.get(f"{stack.base_url}{PORTAL}/docs").status_code == 200
        browser.close()

        down = run_cli("down", env=stack.env)
        assert down.returncode == 0, down.stdout + down.stderr
        stack.proc.wait(60)
        assert stack.proc.returncode == 0
    finally:
        stop_stack(stack)
    left = [
        pid
        for pid in started
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert left == [], f"still running after down: {left}"
    assert not (stack.data_dir / "run" / "stack.json").exists()
    assert not (stack.data_dir / "run" / "ray.json").exists()


class TestRunningStack:
    def test_signup_by_first_login_makes_a_customer(self, stack: Stack) -> None:
        user = hub_login(stack.base_url, "zoë-a-b", "a-long-password")
        token = hub_token(user, "zoë-a-b")
        me = httpx.get(
            f"{stack.base_url}{PORTAL}/api/v1/me",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        assert me.status_code == 200
        assert (me.json()["name"], me.json()["role"]) == ("zoë-a-b", "customer")
        # Wrong role: 403 JSON with a sentence.
        accounts = httpx.get(
            f"{stack.base_url}{PORTAL}/api/v1/accounts",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        assert accounts.status_code == 403
        assert accounts.json()["error"]["message"] == (
            "This needs the admin role; you are a customer."
        )
        user.close()

    def test_short_password_is_refused_at_signup(self, stack: Stack) -> None:
        with pytest.raises(AssertionError, match="login failed"):
            hub_login(stack.base_url, "shorty", "abc")

    def test_admin_lists_accounts(self, stack: Stack) -> None:
        admin = hub_login(stack.base_url, "admin", stack.admin_password)
        token = hub_token(admin, "admin")
        names = [
            a["name"]
            for a in httpx.get(
                f"{stack.base_url}{PORTAL}/api/v1/accounts",
                headers={"Authorization": f"token {token}"},
                timeout=30,
            ).json()
        ]
        assert "admin" in names
        admin.close()

    def test_unauthenticated_api_call_is_401_json(self, stack: Stack) -> None:
        reply = httpx.get(f"{stack.base_url}{PORTAL}/api/v1/me", timeout=30)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "unauthenticated"
        bad = httpx.get(
            f"{stack.base_url}{PORTAL}/api/v1/me",
            headers={"Authorization": "token not-a-token"},
            timeout=30,
        )
        assert bad.status_code == 401

    def test_second_up_on_same_data_dir_is_refused(self, stack: Stack) -> None:
        again = run_cli("up", env=stack.env, timeout=60)
        assert again.returncode == 2
        assert "already running" in again.stderr
        assert "Traceback" not in again.stderr

    def test_data_dir_holds_the_state(self, stack: Stack) -> None:
        names = {p.name for p in stack.data_dir.iterdir()}
        assert {
            "portal.sqlite",
            "jupyterhub.sqlite",
            "jupyterhub_cookie_secret",
            "logs",
            "run",
        } <= names
        secret = stack.data_dir / "jupyterhub_cookie_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


# --- Bad input: one clear line, exit code 2, no traceback -----------------------


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"GPUPORTAL_DB_URL": "mysql://x@127.0.0.1/db"}, "GPUPORTAL_DB_URL uses the driver"),
        ({"GPUPORTAL_DB_URL": "::not a url::"}, "GPUPORTAL_DB_URL is not a database URL"),
        (
            {"GPUPORTAL_DB_URL": "postgresql+psycopg://nobody@127.0.0.1:1/db"},
            "cannot reach the portal database",
        ),
        ({"GPUPORTAL_REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
        ({"GPUPORTAL_PORT": "eighty"}, "GPUPORTAL_PORT"),
        ({"GPUPORTAL_DEMO_GPUS": "lots"}, "GPUPORTAL_DEMO_GPUS"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    result = run_cli("up", env=stack_env(tmp_path / "data", **extra))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "run" / "ray.json").exists(), "nothing was started"


def test_port_in_use_names_the_variable(tmp_path: Path) -> None:
    busy = _busy_port()
    try:
        env = stack_env(tmp_path / "data", GPUPORTAL_PORT=str(busy.getsockname()[1]))
        result = run_cli("up", env=env)
    finally:
        busy.close()
    assert result.returncode == 2
    assert "(GPUPORTAL_PORT) is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_ray_is_one_line(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "data")
    code = (
        "import sys; sys.modules['ray'] = None; "
        "from gpuportal.hub.stack.cli import main; sys.argv = ['gpuportal', 'up']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Ray is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_down_with_nothing_running(tmp_path: Path) -> None:
    result = run_cli("down", env=stack_env(tmp_path / "data"))
    assert result.returncode == 1
    assert "nothing of gpuportal is running" in result.stdout


# --- The admin account -------------------------------------------------------------


def test_generated_admin_password_is_saved_0600_and_shown_once(tmp_path: Path) -> None:
    generated = ensure_admin(tmp_path, "admin", None)
    assert generated and len(generated) >= 12
    saved = tmp_path / "admin-password"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert saved.read_text() == f"admin:{generated}\n"
    assert check_password(tmp_path, "admin", generated)
    assert ensure_admin(tmp_path, "admin", None) is None  # not shown again
    # An explicit password always wins (so an operator can reset it).
    assert ensure_admin(tmp_path, "admin", "new-password-1") is None
    assert check_password(tmp_path, "admin", "new-password-1")
    assert not check_password(tmp_path, "admin", generated)


def test_cli_admin_create_and_db_upgrade(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "data", GPUPORTAL_NEW_ADMIN_PASSWORD="ops-password-1")
    created = run_cli("admin", "create", "ops", env=env)
    assert created.returncode == 0, created.stderr
    assert check_password(tmp_path / "data", "ops", "ops-password-1")
    assert (tmp_path / "data" / "admin-users").read_text() == "ops\n"
    short = run_cli("admin", "create", "ops2", "--password", "x", env=env)
    assert short.returncode == 2
    assert "at least 8 characters" in short.stderr
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0
    assert "is at revision" in upgraded.stdout


@pytest.mark.parametrize(
    "command",
    [[], ["up"], ["down"], ["db"], ["db", "upgrade"], ["admin"], ["admin", "create"], ["version"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuportal.hub.stack.cli", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0
    assert "Usage: " in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_stack_file_names_what_up_started(stack: Stack) -> None:
    state = json.loads((stack.data_dir / "run" / "stack.json").read_text())
    assert state["pid"] == stack.proc.pid
    assert psutil.pid_exists(state["hub_pid"])
    assert psutil.pid_exists(state["ray_pid"])


@pytest.mark.postgres
@pytest.mark.redis
def test_production_path_postgresql_and_redis(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """The same stack with the portal DB on PostgreSQL and the cache on Redis."""
    stack = start_stack(
        tmp_path / "data",
        GPUPORTAL_DB_URL=pg_url,
        GPUPORTAL_REDIS_URL=redis_url,
        GPUPORTAL_DEMO_GPUS="1xL4",
    )
    try:
        body = httpx.get(f"{stack.base_url}{PORTAL}/api/v1/health", timeout=30).json()
        assert (body["db"]["backend"], body["db"]["status"]) == ("postgresql", "ok")
        assert body["cache"] == {"backend": "redis", "status": "ok"}
        assert (body["ray"]["gpus"], body["ray"]["gpu_models"]) == (1, {"L4": 1})
        admin = hub_login(stack.base_url, "admin", stack.admin_password)
        token = hub_token(admin, "admin")
        me = httpx.get(
            f"{stack.base_url}{PORTAL}/api/v1/me",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )
        assert me.json()["role"] == "admin"
        admin.close()
    finally:
        assert stop_stack(stack) == 0


@pytest.mark.browser
def test_browser_login_then_portal(stack: Stack, browser_page, tmp_path: Path) -> None:
    """A person in Chromium: log in, land on the hub home, open the portal API as themselves."""
    page = browser_page
    page.goto(f"{stack.base_url}/hub/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", stack.admin_password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/hub/home", timeout=30_000)
    assert "Start My Server" in page.content() or "My Server" in page.content()
    # The hub OAuth flow into the portal service, in a real browser.
    page.goto(f"{stack.base_url}{PORTAL}/api/v1/me")
    page.wait_for_url(f"**{PORTAL}/api/v1/me", timeout=30_000)
    me = json.loads(page.inner_text("body"))
    assert (me["name"], me["role"]) == ("admin", "admin")
    page.goto(f"{stack.base_url}{PORTAL}/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    page.screenshot(path=str(tmp_path / "portal-docs.png"))
    assert "/services/portal/api/v1/health" in page.inner_text("body")
    assert "gpuportal portal API" in page.inner_text(".swagger-ui .info .title")
