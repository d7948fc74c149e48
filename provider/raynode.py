"""Start Ray on a provider's machine with the node's GPUs and marketplace resources.

Either a new head (the provider's own cluster) or a worker joining the cluster
at ``--ray-address``. Ray runs as ``ray start --block`` in its own process
group, so stopping that one process stops what it started and nothing else.
Usage statistics stay off.

Isolation: Ray gives no isolation inside a cluster, and every job's process
inherits the environment of the ``ray start`` that started its node. So Ray
starts from an allow-list of variables (:func:`ray_env`), never from a copy of
``os.environ``, and with Ray's token authentication on: the token lives in a
0600 file (:func:`ensure_auth_token`) that only the node's agent and the hub's
spawner read; a Jobs API or GCS call without it is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import httpx

from .ports import free_port
from .rayresources import DEMO_RESOURCE, NODE_RESOURCE_PREFIX


class RayStartError(RuntimeError):
    """Ray did not start; the message says why and where the log is."""


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


#: Variables a Ray process we start may inherit from ours: what a Python process
#: needs to run and find its GPUs. Nothing of the control plane (no GPUPORTAL_*
#: setting, database or Redis URL, password, or cloud credential) is on it.
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    # Older OpenBLAS builds need these on some CPUs to compute correctly.
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)
#: Ray tuning knobs that may pass (health-check periods, as tests shorten them).
INHERITED_PREFIXES = ("RAY_health_check_",)
AUTH_TOKEN_FILE = "ray-auth-token"  # noqa: S105 (a file name)


def ray_env(
    token_path: Path | None = None,
    extra: dict[str, str] | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment of a ``ray start`` we run: an allow-list of ``source``
    (default ``os.environ``), Ray's switches, and ``extra``. Never a copy.

    ``token_path``: turn on Ray's token authentication with the token in that file.
    """
    source = dict(os.environ) if source is None else source
    env = {
        k: v for k, v in source.items() if k in INHERITED_ENV or k.startswith(INHERITED_PREFIXES)
    }
    env.update(
        RAY_USAGE_STATS_ENABLED="0",  # never report to Ray's makers
        # Stopping should be quick: nothing of ours to drain.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # On a busy small machine the dashboard agent can take longer than Ray's
        # default to come up, and the raylet then exits; give it two minutes.
        RAY_agent_register_timeout_ms="120000",
    )
    if token_path is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra or {})
    return env


def ensure_auth_token(path: Path) -> str:
    """The cluster's Ray token, created once (0600, random) in ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    token = path.read_text().strip()
    if not token:
        raise RayStartError(f"the Ray token file {path} is empty; delete it to make a new one.")
    return token


def private_temp_dir(name: str) -> Path:
    """Ray's temp dir (sessions, logs, sockets) inside a 0700 folder of ours in /tmp.

    Ray makes its own temp dir world-writable and its logs world-readable; they
    hold every job's output. The folder around it keeps other OS accounts (the
    customers') out. Short, since Ray's socket paths must stay under 107 bytes.
    """
    outer = Path("/tmp") / name  # noqa: S108 (a 0700 folder, checked below)
    outer.mkdir(mode=0o700, exist_ok=True)
    if outer.is_symlink() or outer.stat().st_uid != os.getuid():
        raise RayStartError(f"{outer} exists and is not ours; remove it first.")
    os.chmod(outer, 0o700)
    return outer / "r"


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers that authenticate to a Ray dashboard / Jobs API with ``token``."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def end_process_group(pgid: int, wait: float = 10.0) -> None:
    """End a process group we started (``start_new_session``): SIGTERM, then SIGKILL
    what is still there after ``wait`` seconds. Only that group is touched."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class RayMissing(RayStartError):
    """The ``ray`` command is not installed."""


class RayExited(RayStartError):
    """The ``ray start`` process ended before Ray was up; ``code`` is its exit code."""

    def __init__(self, code: int | None, log_path: Path) -> None:
        super().__init__(f"Ray exited with code {code}; see {log_path}")
        self.code = code


class RayNode:
    """One ``ray start --block`` process we started: a provider's node, or the house head
    of ``gpuportal up`` (the one place gpuportal starts Ray)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], jobs_url: str, address: str, token: str = ""
    ) -> None:
        self.proc = proc
        self.jobs_url = jobs_url
        self.address = address
        self.token = token

    @classmethod
    def start(
        cls,
        node_id: str | None,
        models: dict[str, int],
        demo: bool,
        log_path: Path,
        address: str | None = None,
        num_cpus: int = 1,
        timeout: float = 120.0,
        token_path: Path | None = None,
        *,
        port: int | None = None,
        dashboard_port: int | None = None,
        object_store_bytes: int = 100_000_000,
        temp_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        avoid: Collection[int] = frozenset(),
    ) -> RayNode:
        """Start a head (or, with ``address``, a worker joining that cluster) and, for a
        head, wait until its Jobs API answers and its raylet has registered.

        ``token_path``: the cluster's Ray token (created when missing); default
        ``ray-auth-token`` beside ``log_path``. A worker joining a cluster needs the
        head's token there. ``port`` and ``dashboard_port``: the head's GCS and
        dashboard ports (default: free ones). Every other port Ray opens is a fixed
        free one, never one of ``avoid``, so two clusters on one machine never collide.
        ``temp_dir``: default a private one named after the GCS port. ``extra_env``:
        added to :func:`ray_env`'s allow-listed environment.

        Raises :class:`RayExited` when Ray ends while starting (after ending what it
        left behind in its process group) and :class:`RayStartError` when it does
        not answer within ``timeout`` seconds (after stopping it).
        """
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise RayMissing("the `ray` command is missing; install gpuportal first.")
        token_path = token_path or log_path.parent / AUTH_TOKEN_FILE
        token = ensure_auth_token(token_path)
        port = port or free_port(avoid=avoid)
        dashboard_port = dashboard_port or free_port(avoid=avoid)
        temp_dir = temp_dir or private_temp_dir(f"gpuportal-provider-ray-{os.getuid()}-{port}")
        common = [
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={sum(models.values())}",
            f"--resources={json.dumps(resources(node_id, models, demo))}",
            f"--node-manager-port={free_port(avoid=avoid)}",
            f"--object-manager-port={free_port(avoid=avoid)}",
            f"--dashboard-agent-listen-port={free_port(avoid=avoid)}",
            f"--dashboard-agent-grpc-port={free_port(avoid=avoid)}",
            f"--runtime-env-agent-port={free_port(avoid=avoid)}",
            f"--metrics-export-port={free_port(avoid=avoid)}",
            f"--object-store-memory={object_store_bytes}",
            f"--temp-dir={temp_dir}",
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
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port(avoid=avoid)}",
                *common,
            ]
            jobs_url, addr = f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=ray_env(token_path, extra_env),
                start_new_session=True,
            )
        node = cls(proc, jobs_url, addr, token)
        if jobs_url:
            node.wait_ready(timeout, log_path)
        return node

    def wait_ready(self, timeout: float, log_path: Path) -> None:
        """Until the head's raylet has registered, so its GPUs show at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                end_process_group(self.proc.pid)  # what it left behind (a GCS server, say)
                raise RayExited(self.proc.returncode, log_path)
            try:
                reply = httpx.get(
                    f"{self.jobs_url}/api/v0/nodes", timeout=2, headers=auth_headers(self.token)
                )
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
