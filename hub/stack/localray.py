"""The house Ray cluster of the embedded stack: one local head on 127.0.0.1.

``gpuportal up`` starts it (or reuses one an earlier ``up`` left running) as
``ray start --head --block`` in its own process group, so stopping that one
process stops every Ray process it started and nothing else on the machine.
GPUs come from NVML; on a machine without GPUs logical "demo" GPUs are declared
and labelled demo (the custom resource ``gpuportal/demo``) wherever they show.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass

import httpx

from gpuportal.provider import isolation, nvml, raynode

from ..errors import ConfigError
from ..settings import Settings

DEFAULT_DEMO_GPUS = "2xA100-80GB"
_DEMO_RE = re.compile(r"^\s*(\d+)\s*[xX\u00d7]\s*([A-Za-z0-9][A-Za-z0-9._-]{0,63})\s*$")


@dataclass(frozen=True)
class GpuPlan:
    """The GPUs the local head declares: ``{model: count}`` and whether they are demo."""

    models: dict[str, int]
    demo: bool
    reason: str

    @property
    def count(self) -> int:
        return sum(self.models.values())

    def describe(self) -> str:
        sizes = ", ".join(f"{n}x {m}" for m, n in self.models.items()) or "none"
        return f"{sizes} ({'DEMO, logical GPUs' if self.demo else 'NVML'}; {self.reason})"


def parse_demo_gpus(spec: str) -> dict[str, int]:
    """Parse ``GPUPORTAL_DEMO_GPUS`` such as ``2xA100-80GB`` or ``1xA100-80GB,2xL4``."""
    models: dict[str, int] = {}
    for part in spec.split(","):
        match = _DEMO_RE.match(part)
        if not match or int(match.group(1)) < 1 or int(match.group(1)) > 64:
            raise ConfigError(
                f"GPUPORTAL_DEMO_GPUS={spec!r} is not COUNTxMODEL (e.g. 2xA100-80GB or "
                "1xA100-80GB,2xL4; count 1..64)."
            )
        models[match.group(2)] = models.get(match.group(2), 0) + int(match.group(1))
    return models


def plan_gpus(settings: Settings) -> GpuPlan:
    """Real GPUs when NVML finds some; otherwise the labelled demo GPUs."""
    try:
        inventory = nvml.read_inventory()
    except nvml.NvmlUnavailable as exc:
        inventory, why = [], str(exc)
    else:
        why = "NVML found no GPU"
    if inventory:
        return GpuPlan(dict(Counter(g.model.replace(" ", "-") for g in inventory)), False, "NVML")
    if settings.demo_gpus:
        return GpuPlan(parse_demo_gpus(settings.demo_gpus), True, f"GPUPORTAL_DEMO_GPUS; {why}")
    return GpuPlan(
        parse_demo_gpus(DEFAULT_DEMO_GPUS),
        True,
        f"{why}; GPUPORTAL_DEMO_GPUS unset, so {DEFAULT_DEMO_GPUS} demo GPUs are used",
    )


def ray_resources(plan: GpuPlan, node_id: str | None = None) -> dict[str, float]:
    """Custom resources that tell placement what the GPUs are.

    With ``node_id`` the node also declares ``gpuportal/node:<node_id>`` (one
    unit per GPU), the resource a reservation pins its Ray job to.
    """
    return raynode.resources(node_id, plan.models, plan.demo)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def house_env(settings: Settings) -> dict[str, str]:
    """What the house Ray head adds to the node-side allow-list (``raynode.ray_env``,
    with token authentication): where customers' homes live. Every job inherits the
    head's environment, so no setting of the control plane is on it."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", isolation.ENV_HOMES: str(settings.homes_path)}


class _HeadExited(Exception):
    """The ``ray start`` process ended before the head was up (carries its exit code)."""


class LocalRayHead:
    """Start, find and stop the house Ray head whose pid lives in the data dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_file = settings.run_dir / "ray.json"
        self.log_file = settings.logs_dir / "ray.log"
        self.token_path = settings.ray_token_path

    @property
    def headers(self) -> dict[str, str]:
        return raynode.auth_headers(raynode.ensure_auth_token(self.token_path))

    @property
    def jobs_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.ray_dashboard_port}"

    def running(self) -> dict[str, object] | None:
        """The recorded head if its process is alive and its dashboard answers."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not _pid_alive(int(state.get("pid", 0))):
            return None
        try:
            httpx.get(
                f"{state['jobs_url']}/api/version", timeout=3, headers=self.headers
            ).raise_for_status()
        except httpx.HTTPError:
            return None
        return dict(state)

    def start(
        self, plan: GpuPlan, timeout: float = 120.0, node_id: str | None = None
    ) -> dict[str, object]:
        """Start ``ray start --head --block`` and wait until the Jobs API answers.

        ``node_id``: the marketplace node id the head declares as a resource.
        Ray gives its raylet a fixed 30 s to register; on a busy small machine
        that can run out, so a head that exits while starting is tried once more.
        """
        try:
            return self._start_once(plan, timeout, node_id)
        except _HeadExited as exc:
            with open(self.log_file, "a") as log:
                log.write(
                    f"\ngpuportal: the Ray head exited while starting ({exc}); retrying once\n"
                )
            try:
                return self._start_once(plan, timeout, node_id)
            except _HeadExited as again:
                raise ConfigError(
                    f"the local Ray head exited with code {again}; see {self.log_file}"
                ) from None

    def _start_once(self, plan: GpuPlan, timeout: float, node_id: str | None) -> dict[str, object]:
        s = self.settings
        for name, port in (
            ("GPUPORTAL_RAY_PORT", s.ray_port),
            ("GPUPORTAL_RAY_DASHBOARD_PORT", s.ray_dashboard_port),
        ):
            if port_in_use(port):
                raise ConfigError(f"port {port} ({name}) is already in use; choose another.")
        temp_dir = raynode.private_temp_dir(f"gpuportal-ray-{os.getuid()}-{s.ray_port}")
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        raynode.ensure_auth_token(self.token_path)  # its own errors, before Ray starts
        try:
            head = raynode.RayNode.start(
                node_id,
                plan.models,
                plan.demo,
                self.log_file,
                num_cpus=s.ray_num_cpus,
                timeout=timeout,
                token_path=self.token_path,
                port=s.ray_port,
                dashboard_port=s.ray_dashboard_port,
                object_store_bytes=s.ray_object_store_mb * 1024 * 1024,
                temp_dir=temp_dir,
                extra_env=house_env(s),
                # The stack's own ports are free until it binds them: never hand them to Ray.
                avoid={
                    *(s.port, s.hub_port, s.proxy_api_port, s.portal_port),
                    *(s.ray_port, s.ray_dashboard_port),
                },
            )
        except raynode.RayMissing:
            raise ConfigError(
                "the `ray` command is missing: install gpuportal with its dependencies "
                "(make run does) or put Ray on PATH."
            ) from None
        except raynode.RayExited as exc:
            raise _HeadExited(exc.code) from None
        except raynode.RayStartError:
            raise ConfigError(
                f"the local Ray head did not answer within {timeout:.0f}s; see {self.log_file}"
            ) from None
        state: dict[str, object] = {
            "pid": head.proc.pid,
            "address": head.address,
            "jobs_url": head.jobs_url,
            "gpus": plan.models,
            "demo": plan.demo,
            "node_id": node_id,
        }
        self.state_file.write_text(json.dumps(state))
        return state

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded head and everything it started. False if none was running."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        pid = int(state.get("pid", 0))
        # Only a process that is still our `ray start --head` (not a reused PID).
        stopped = _is_ray_head(pid) and stop_process_group(pid, timeout)
        self.state_file.unlink(missing_ok=True)
        return stopped


def _is_ray_head(pid: int) -> bool:
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return "start" in cmdline and "--head" in cmdline


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(proc: object) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)  # type: ignore[attr-defined]
    except psutil.NoSuchProcess:
        return False


def stop_process_group(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM ``pid`` and its descendants, wait, then SIGKILL what is left.

    Only processes we started are touched: the leader and its own descendants.
    Returns False when ``pid`` was not running.
    """
    import psutil

    try:
        leader = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    family = [leader, *leader.children(recursive=True)]
    with suppress(psutil.NoSuchProcess):
        leader.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs([leader], timeout=timeout)
    # Descendants the leader did not take down with it (or all, if it hung).
    survivors = [p for p in family if _running(p)]
    for proc in survivors:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _gone, alive = psutil.wait_procs(survivors, timeout=5)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return True
