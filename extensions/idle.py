"""GPU-aware idle culling: a server whose GPUs and kernels idled for T stops itself.

Unlike jupyter-server's ``shutdown_no_activity_timeout`` (which waits for zero
kernels) and the hub's idle culler (which sees only HTTP activity), this counts
a server as active while any kernel is busy, while any kernel's
last activity is recent, or while any of its GPUs (or any process of its
kernels) computes. A kernel busy on the GPU is therefore never culled, even
when the notebook looks idle. Stopping goes through ``ServerApp.stop()``, the
same clean path as jupyter-server's own idle shutdown: kernels are shut down,
the process exits, the hub sees the server stopped and the spawner closes the
allocation. The clock is injected so tests travel in time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .gpuuse import GpuSample, KernelState

#: "starting" is not busy: jupyter-server leaves a kernel "starting" until a client
#: connects, so a kernel nobody opened would otherwise keep a GPU server forever.
#: Its start time is its last activity, which the timeout already counts from.
BUSY_KERNEL_STATES = frozenset({"busy"})

log = logging.getLogger(__name__)


def gpus_busy(sample: GpuSample, kernel_rows: list[dict[str, Any]], threshold_pct: int) -> bool:
    """Whether this server's GPUs or its kernels' GPU processes compute right now."""
    if any(g.utilization_pct > threshold_pct for g in sample.gpus):
        return True
    return any(row["gpu_utilization_pct"] > 0 for row in kernel_rows)


def kernels_busy(kernels: list[KernelState]) -> bool:
    return any(k.execution_state in BUSY_KERNEL_STATES for k in kernels)


class IdleCuller:
    """Tracks when this server was last active and stops it after ``timeout_seconds``.

    ``observe`` is fed every reading (the culler's own periodic check and each
    usage request), so activity seen by either counts. ``timeout_seconds`` 0
    disables culling; observing still reports idle time.
    """

    def __init__(
        self,
        *,
        timeout_seconds: int,
        busy_gpu_pct: int,
        shutdown: Callable[[str], None],
        started_at: datetime,
        user: str = "",
        server: str = "",
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.busy_gpu_pct = busy_gpu_pct
        self.shutdown = shutdown
        self.last_active = started_at
        self.user = user
        self.server = server
        self.stopping = False
        self.last_reason = "started"

    def observe(
        self,
        now: datetime,
        kernels: list[KernelState],
        sample: GpuSample,
        kernel_rows: list[dict[str, Any]],
    ) -> None:
        """Move ``last_active`` forward from one reading."""
        if kernels_busy(kernels):
            self._active(now, "a kernel is busy")
        elif gpus_busy(sample, kernel_rows, self.busy_gpu_pct):
            self._active(now, "a GPU is computing")
        latest = max((k.last_activity for k in kernels if k.last_activity), default=None)
        if latest is not None and latest > self.last_active:
            self.last_active, self.last_reason = latest, "kernel activity"

    def _active(self, now: datetime, reason: str) -> None:
        if now > self.last_active:
            self.last_active = now
        self.last_reason = reason

    def idle_seconds(self, now: datetime) -> float:
        return max(0.0, (now - self.last_active).total_seconds())

    def report(self, now: datetime) -> dict[str, Any]:
        """The ``idle`` part of the usage report."""
        shutdown_at = (
            (self.last_active + timedelta(seconds=self.timeout_seconds)).isoformat()
            if self.timeout_seconds > 0
            else None
        )
        return {
            "timeout_seconds": self.timeout_seconds,
            "idle_seconds": round(self.idle_seconds(now), 3),
            "last_active": self.last_active.isoformat(),
            "last_activity_reason": self.last_reason,
            "shutdown_at": shutdown_at,
        }

    def due(self, now: datetime) -> bool:
        return self.timeout_seconds > 0 and self.idle_seconds(now) >= self.timeout_seconds

    def cull_if_due(self, now: datetime) -> bool:
        """Stop the server once when it has idled for the timeout; True when it did."""
        if self.stopping or not self.due(now):
            return False
        self.stopping = True
        idle = self.idle_seconds(now)
        log.info(
            "gpuportal: server %s/%s idle for %.0f s (GPUs idle, kernels unbusy; limit %s s);"
            " shutting down",
            self.user,
            self.server,
            idle,
            self.timeout_seconds,
        )
        self.shutdown(f"idle for {idle:.0f} s")
        return True
