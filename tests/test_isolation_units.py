"""The pieces of the isolation model, one at a time: what a Ray process and a user
server inherit, how the server's token is handed over, how customers' accounts
are named, what the sandbox mounts, and the data dir's modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpuportal.hub.stack.datadir import secure_data_dir
from gpuportal.provider import isolation, raynode
from gpuportal.spawners import report
from gpuportal.spawners.singleuser import server_env

#: What a control plane's environment may hold; none of it may reach Ray or a server.
CONTROL_PLANE_ENV = {
    "GPUPORTAL_ADMIN_PASSWORD": "hunter2-admin",
    "GPUPORTAL_DB_URL": "postgresql+psycopg://portal:pw@db/portal",
    "GPUPORTAL_REDIS_URL": "redis://:pw@cache:6379/0",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "GITHUB_CLIENT_SECRET": "oauth-secret",
    "JUPYTERHUB_API_TOKEN": "the-portal-services-token",
    "RAY_ADDRESS": "127.0.0.1:6380",
    "PATH": "/usr/bin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


def test_ray_starts_from_the_allow_list_never_a_copy(tmp_path: Path) -> None:
    token = tmp_path / "ray-auth-token"
    env = raynode.ray_env(token, {"EXTRA": "1"}, source=CONTROL_PLANE_ENV)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_agent_register_timeout_ms": "120000",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "EXTRA": "1",
    }


def test_ray_without_a_token_says_so(tmp_path: Path) -> None:
    assert raynode.ray_env(None, source={})["RAY_AUTH_MODE"] == "disabled"


def test_the_ray_token_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ray-auth-token"
    first = raynode.ensure_auth_token(path)
    assert len(first) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert raynode.ensure_auth_token(path) == first
    assert raynode.auth_headers(first) == {"Authorization": f"Bearer {first}"}
    assert raynode.auth_headers(None) == {}


def test_rays_temp_dir_sits_in_a_private_folder() -> None:
    name = f"gp-test-{os.getpid()}"
    inner = raynode.private_temp_dir(name)
    try:
        assert inner.parent == Path("/tmp") / name
        assert stat.S_IMODE(inner.parent.stat().st_mode) == 0o700
    finally:
        inner.parent.rmdir()


def _account(home: Path) -> isolation.Account:
    return isolation.Account("gp-alice-0123456789", 4242, 4242, home)


def test_a_server_env_holds_its_own_token_and_nothing_of_the_node(tmp_path: Path) -> None:
    source = {
        **CONTROL_PLANE_ENV,
        "JUPYTERHUB_USER": "alice",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JPY_API_TOKEN": "stale",
        "RAY_AUTH_TOKEN_PATH": "/data/ray-auth-token",
        "RAY_JOB_ID": "02000000",
        "GPUPORTAL_SINGLEUSER_CLAIM": "one-time-claim",
        "GPUPORTAL_PORTAL_URL": "http://127.0.0.1:8000/services/portal/",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    env = server_env(source, "alices-token", _account(tmp_path), "http://127.0.0.1:5000/u/")
    bindir = str(Path(sys.executable).parent)
    assert env == {
        "JUPYTERHUB_USER": "alice",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JUPYTERHUB_API_TOKEN": "alices-token",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:5000/u/",
        "JUPYTERHUB_ROOT_DIR": str(tmp_path),
        "GPUPORTAL_PORTAL_URL": "http://127.0.0.1:8000/services/portal/",
        "CUDA_VISIBLE_DEVICES": "1",
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "USER": "gp-alice-0123456789",
        "LOGNAME": "gp-alice-0123456789",
        "SHELL": "/bin/bash",
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
    }


class _Waiting:
    api_token = "server-token"
    conflicts = 0

    def claim_conflict(self) -> None:
        self.conflicts += 1


def test_a_claim_is_good_once_and_a_second_try_fails_the_spawn() -> None:
    spawner = _Waiting()
    report.expect_claim("job-1", "right", spawner)
    try:
        assert report.take_claim("job-1", "wrong") is None
        assert report.take_claim("job-2", "right") is None
        assert report.take_claim("job-1", "right") is spawner
        assert spawner.conflicts == 0
        # A guess at a used job's claim changes nothing (no one can fail a spawn by it)...
        assert report.take_claim("job-1", "guess") is None
        assert spawner.conflicts == 0
        # ...the right claim replayed means the job was read: the spawn fails.
        assert report.take_claim("job-1", "right") is None
        assert spawner.conflicts == 1
    finally:
        report.forget_claim("job-1")
    assert report.take_claim("job-1", "right") is None
    assert spawner.conflicts == 1  # forgotten: no longer this spawner's business


@pytest.mark.parametrize(
    ("a", "b"), [("a-b", "a.b"), ("alice", "Alice"), ("x" * 40, "x" * 41), ("", "-")]
)
def test_account_names_are_safe_and_distinct(a: str, b: str) -> None:
    names = {isolation.os_user_name(a), isolation.os_user_name(b)}
    assert len(names) == 2
    for name in names:
        assert len(name) <= 32
        assert name.startswith("gp-")
        assert all(c.islower() or c.isdigit() or c == "-" for c in name)


def test_the_sandbox_mounts_the_home_and_python_but_not_the_data_dir(tmp_path: Path) -> None:
    home = tmp_path / "homes" / "gp-alice"
    command = isolation.sandbox_command(["python", "-V"], home, "/usr/bin/bwrap", _account(home))
    assert command[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-pid", "--unshare-ipc", "--die-with-parent"):
        assert flag in command
    pairs = list(zip(command, command[1:], command[2:], strict=False))
    assert ("--bind", str(home), str(home)) in pairs
    assert ("--ro-bind", str(Path(sys.prefix).resolve()), str(Path(sys.prefix).resolve())) in pairs
    assert ("--tmpfs", "/tmp", "--ro-bind") in pairs
    mounted = {c for c in command if c.startswith("/")}
    assert not any(m.startswith(str(Path(__file__).resolve().parent)) for m in mounted)
    assert not any(Path(m).name == "hub" for m in mounted)  # the control plane's code
    tail = command[command.index("--") + 1 :]
    assert tail[0].endswith("setpriv")
    assert "--reuid=4242" in tail and "--clear-groups" in tail and "--no-new-privs" in tail
    assert tail[-2:] == ["python", "-V"]


def test_a_python_under_tmp_is_bound_into_the_sandboxs_own_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox's /tmp is an empty tmpfs: a venv that lives under the host's /tmp
    must be bound into it, or the server cannot even start its Python."""
    venv = Path("/tmp") / tmp_path.name / "venv"  # a path only, never created
    monkeypatch.setattr(sys, "prefix", str(venv))
    home = tmp_path / "homes" / "gp-alice"
    command = isolation.sandbox_command(["python", "-V"], home, "/usr/bin/bwrap", _account(home))
    pairs = list(zip(command, command[1:], command[2:], strict=False))
    assert ("--ro-bind", str(venv), str(venv)) in pairs
    # ...after the tmpfs is mounted on /tmp, so the bind is not hidden by it.
    assert command.index("--tmpfs") < command.index(str(venv))


@pytest.mark.skipif(os.geteuid() != 0, reason="creating accounts needs root")
def test_a_customer_gets_an_unprivileged_account_and_a_0700_home(tmp_path: Path) -> None:
    homes = tmp_path / "homes"
    account = isolation.ensure_account("isolation-test-user", homes)
    again = isolation.ensure_account("isolation-test-user", homes)
    assert again == account
    assert account.uid != 0 and account.gid != 0
    assert stat.S_IMODE(account.home.stat().st_mode) == 0o700
    assert account.home.stat().st_uid == account.uid
    assert stat.S_IMODE(homes.stat().st_mode) == 0o711
    # The account cannot read a root-only file.
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    done = subprocess.run(
        ["cat", str(secret)], user=account.uid, group=account.gid, capture_output=True, check=False
    )
    assert done.returncode != 0


def test_the_data_dir_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "hub.log").write_text("x")
    (data / "portal.sqlite").write_text("x")
    os.chmod(data, 0o755)  # noqa: S103 (the state to be repaired)
    os.chmod(data / "portal.sqlite", 0o644)
    previous = os.umask(0o022)
    try:
        secure_data_dir(data)
        assert os.umask(0o022) == 0o077  # later files are private from the start
    finally:
        os.umask(previous)
    modes: dict[str, Any] = {
        str(p.relative_to(data)): stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*")
    }
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert modes == {"logs": 0o700, "logs/hub.log": 0o600, "portal.sqlite": 0o600}
