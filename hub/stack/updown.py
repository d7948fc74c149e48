"""``gpuportal up`` and ``gpuportal down``: the embedded stack on one machine.

``up`` checks everything it can before starting anything (ports, database,
Redis, Ray), then starts the house Ray head and JupyterHub (which starts the
proxy and the portal service), waits until the portal answers, and stays in
the foreground. Ctrl-C (or ``gpuportal down`` from another terminal) stops
exactly what it started, by PID, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from gpuportal.provider import raynode
from gpuportal.provider.identity import Identity
from gpuportal.provider.money import format_credits

from .. import db
from ..errors import ConfigError
from ..portal.cache import check_redis
from ..settings import Settings
from . import dashboards
from .admin import ensure_admin
from .datadir import secure_data_dir
from .house import house_dir, house_identity, register_house, verification_of
from .localray import GpuPlan, LocalRayHead, plan_gpus, port_in_use, stop_process_group

Echo = Callable[[str], None]


def stack_file(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def _read_stack(settings: Settings) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(stack_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return state


def _ours(pid: int | None, marker: str) -> bool:
    """Is ``pid`` alive and still the process we recorded (not a reused PID)?"""
    if not pid:
        return False
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return marker in cmdline


def preflight(settings: Settings, config: Path) -> None:
    """Everything that can be checked before starting anything. Raises ConfigError."""
    if not config.is_file():
        raise ConfigError(
            f"no JupyterHub config at {config}; run from the repository root or pass --config."
        )
    running = _read_stack(settings)
    if running and _ours(running.get("pid"), "gpuportal"):
        raise ConfigError(
            f"gpuportal is already running for {settings.data_dir} (pid {running['pid']}); "
            "stop it with `gpuportal down` first."
        )
    for name, port in (
        ("GPUPORTAL_PORT", settings.port),
        ("GPUPORTAL_HUB_PORT", settings.hub_port),
        ("GPUPORTAL_PROXY_API_PORT", settings.proxy_api_port),
        ("GPUPORTAL_PORTAL_PORT", settings.portal_port),
        ("GPUPORTAL_DASHBOARDS_PORT", settings.dashboards_port),
    ):
        if port_in_use(port):
            raise ConfigError(f"port {port} ({name}) is already in use; set {name} to a free port.")
    if shutil.which("jupyterhub", path=_path_with_venv()) is None:
        raise ConfigError("the `jupyterhub` command is missing; install gpuportal (make run does).")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(
            "Ray is not installed; install gpuportal with its dependencies (make run does)."
        ) from None
    if settings.redis_url:
        check_redis(settings.redis_url)


def _path_with_venv() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _tee(stream: IO[bytes], log_path: Path, echo: bool) -> threading.Thread:
    def pump() -> None:
        with open(log_path, "ab") as log:
            for line in iter(stream.readline, b""):
                log.write(line)
                log.flush()
                if echo:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()

    thread = threading.Thread(target=pump, name="hub-log", daemon=True)
    thread.start()
    return thread


def _wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(
                f"JupyterHub exited with code {proc.returncode} while starting; see {log_path}"
            )
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log_path}")


def up(
    settings: Settings,
    config: Path,
    echo: Echo,
    *,
    hub_output: bool = True,
    ready_timeout: float = 120.0,
) -> int:
    """Run the stack in the foreground until SIGINT/SIGTERM. Returns the exit code."""
    preflight(settings, config)
    secure_data_dir(settings.data_dir)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    _migrate(settings, echo)

    stop_event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    head = LocalRayHead(settings)
    ray_pid: int | None = None
    hub: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    house: dict[str, Any] | None = None
    try:
        if settings.ray_dashboard_url:
            echo(f"[2/4] Ray: using the cluster at {settings.ray_dashboard_url}")
        else:
            plan = plan_gpus(settings)
            echo(f"[2/4] GPUs: {plan.describe()}")
            identity = house_identity(settings, plan, f"http://127.0.0.1:{settings.port}")
            ray_pid = _start_house_head(head, plan, identity.node_id, echo)
            house = _register_house_node(settings, identity, head, echo)
        if stop_event.is_set():
            return 130

        generated = None
        if settings.authenticator == "firstuse":
            generated = ensure_admin(
                settings.data_dir,
                settings.admin_user,
                settings.admin_password.get_secret_value() if settings.admin_password else None,
                settings.min_password_length,
            )

        echo(f"[3/4] JupyterHub: starting on http://127.0.0.1:{settings.port} ...")
        env = _control_plane_env(settings)
        log_path = settings.logs_dir / "jupyterhub.log"
        hub = _start_hub(config, env, settings.data_dir, log_path, hub_output)
        stack_file(settings).write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "hub_pid": hub.pid,
                    "ray_pid": ray_pid,
                    "port": settings.port,
                }
            )
        )
        base = f"http://127.0.0.1:{settings.port}"
        _wait_ready(f"{base}/hub/health", hub, ready_timeout, "JupyterHub", log_path)
        _wait_ready(
            f"{base}{settings.service_prefix}api/v1/health",
            hub,
            ready_timeout,
            "the portal service",
            log_path,
        )
        if house is not None:
            agent = _start_house_agent(settings, env)
            outcome = _wait_verified(settings, house["node_id"], agent, ready_timeout)
            echo(f"      house node {house['node_id']}: {outcome}")
        _announce_ready(settings, echo, base, generated)
        return _supervise(hub, stop_event, echo, log_path)
    finally:
        echo("stopping ...")
        if agent is not None:
            stop_process_group(agent.pid, timeout=15)
        if hub is not None:
            stop_process_group(hub.pid, timeout=30)
        if ray_pid is not None and not settings.ray_dashboard_url:
            head.stop()
        stack_file(settings).unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        echo("stopped.")


def _migrate(settings: Settings, echo: Echo) -> None:
    """Step 1: bring the portal database to the current schema."""
    echo(f"[1/4] portal database: {settings.database_url.render_as_string(hide_password=True)}")
    engine = db.make_engine(settings.database_url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


def _start_house_head(head: LocalRayHead, plan: GpuPlan, node_id: str, echo: Echo) -> int:
    """Step 2 without an external cluster: the house Ray head, started or the one an
    earlier ``up`` left running. Returns its pid."""
    reused = head.running()
    if reused:
        ray_pid = int(str(reused["pid"]))
        echo(f"      Ray: reusing the local head (pid {ray_pid}) at {reused['jobs_url']}")
        if reused.get("node_id") != node_id:
            echo(
                "      Ray: that head does not declare this house node; stop it "
                "with `gpuportal down` so the next start can."
            )
        return ray_pid
    echo("      Ray: starting a local head on 127.0.0.1 ...")
    started = head.start(plan, node_id=node_id)
    ray_pid = int(str(started["pid"]))
    echo(f"      Ray: up (pid {ray_pid}), Jobs API at {started['jobs_url']}")
    return ray_pid


def _register_house_node(
    settings: Settings, identity: Identity, head: LocalRayHead, echo: Echo
) -> dict[str, Any]:
    """The house provider and its node in the marketplace, on the house head."""
    engine = db.make_engine(settings.database_url)
    try:
        house = register_house(
            settings, engine, identity, head.jobs_url, f"127.0.0.1:{settings.ray_port}"
        )
    finally:
        engine.dispose()
    echo(
        f"      house provider: node {house['node_id']}, {house['gpus']} GPU(s) at "
        f"{format_credits(house['price'])}/h in {settings.region}"
        f"{' (DEMO)' if house['demo'] else ''}"
    )
    return house


def _control_plane_env(settings: Settings) -> dict[str, str]:
    """The hub and the portal are the control plane: they get our environment."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["GPUPORTAL_DATA_DIR"] = str(settings.data_dir)
    env["PATH"] = _path_with_venv()
    return env


def _start_hub(
    config: Path, env: dict[str, str], cwd: Path, log_path: Path, echo_output: bool
) -> subprocess.Popen[bytes]:
    """JupyterHub (which starts the proxy and the portal service) in its own process
    group, its output copied to ``log_path`` (and to stderr with ``echo_output``)."""
    jupyterhub = shutil.which("jupyterhub", path=env["PATH"]) or "jupyterhub"
    hub = subprocess.Popen(
        [jupyterhub, "-f", str(config.resolve())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=cwd,
    )
    assert hub.stdout is not None
    _tee(hub.stdout, log_path, echo_output)
    return hub


def _announce_ready(settings: Settings, echo: Echo, base: str, generated: str | None) -> None:
    """Step 4: where everything is, and the admin's password if it was just made."""
    echo("[4/4] ready.")
    echo("")
    echo(f"  Portal:      {base}/hub/login")
    echo(f"  Portal API:  {base}{settings.service_prefix}docs")
    echo(f"  Dashboards:  {dashboards.url(settings)}")
    if settings.authenticator == "firstuse":
        if generated:
            echo(
                f"  Admin:       {settings.admin_user} / {generated}   (shown once; saved "
                f"0600 in {settings.data_dir / 'admin-password'})"
            )
        else:
            echo(
                f"  Admin:       {settings.admin_user} (password from "
                "GPUPORTAL_ADMIN_PASSWORD or the first start)"
            )
        echo("  New users sign up by logging in with a name and password of their choice.")
    echo(f"  Logs:        {settings.logs_dir}")
    echo("  Stop:        Ctrl-C here, or `gpuportal down`")


def _supervise(
    hub: subprocess.Popen[bytes], stop_event: threading.Event, echo: Echo, log_path: Path
) -> int:
    """Stay in the foreground until asked to stop (0) or the hub dies (1)."""
    while not stop_event.wait(1.0):
        if hub.poll() is not None:
            echo(
                f"JupyterHub exited unexpectedly (code {hub.returncode}); stopping; see {log_path}"
            )
            return 1
    return 0


def _start_house_agent(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The house node's provider agent: verification, then signed heartbeats."""
    log_path = settings.logs_dir / "house-agent.log"
    # The agent is node-side: the node's allow-list, none of the control plane's settings.
    env = raynode.ray_env(None, {"PATH": env["PATH"]})
    env.pop("RAY_AUTH_MODE", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpuportal.hub.stack.cli",
                "provider",
                "run",
                "--config-dir",
                str(house_dir(settings)),
                "--hub",
                f"http://127.0.0.1:{settings.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _wait_verified(
    settings: Settings, node_id: str, agent: subprocess.Popen[bytes], timeout: float
) -> str:
    """Wait until the house node passed (or failed) its challenge; say which."""
    engine = db.make_engine(settings.database_url)
    log_path = settings.logs_dir / "house-agent.log"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = verification_of(engine, node_id)
            if state == "verified":
                return "verified; its GPUs are on offer"
            if state == "failed":
                return f"FAILED verification, its GPUs are not offered; see {log_path}"
            if agent.poll() is not None:
                return f"agent exited with code {agent.returncode}; see {log_path}"
            time.sleep(0.5)
        return f"not verified within {timeout:.0f}s; see {log_path}"
    finally:
        engine.dispose()


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited, within ``timeout`` seconds.

    A process that has exited but that its parent has not reaped yet is a zombie:
    it is stopped, although ``psutil.Process.wait`` on a process that is not our
    child waits out the whole timeout for it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def down(settings: Settings, echo: Echo, timeout: float = 90.0) -> int:
    """Stop what ``up`` started for this data dir. 0 when something was stopped."""
    state = _read_stack(settings)
    stopped_any = False
    if state and _ours(state.get("pid"), "gpuportal"):
        echo(f"stopping gpuportal (pid {state['pid']}) ...")
        os.kill(int(state["pid"]), signal.SIGTERM)
        if _wait_exit(int(state["pid"]), timeout):
            echo("stopped.")
            return 0
        echo("it did not stop in time; stopping its processes directly")
        stopped_any = True
    # `up` is gone (killed hard?): stop what it left behind, if still ours.
    if state and _ours(state.get("hub_pid"), "jupyterhub"):
        stop_process_group(int(state["hub_pid"]))
        echo(f"stopped JupyterHub (pid {state['hub_pid']})")
        stopped_any = True
    if LocalRayHead(settings).stop():
        echo("stopped the local Ray head")
        stopped_any = True
    stack_file(settings).unlink(missing_ok=True)
    if not stopped_any:
        echo(f"nothing of gpuportal is running for {settings.data_dir}")
        return 1
    return 0
