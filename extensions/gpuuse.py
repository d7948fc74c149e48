"""Which GPU each kernel uses: kernel PIDs and their children matched to NVML processes.

NVML lists compute processes per GPU by PID; a kernel's GPU work may run in
the kernel process or in processes it started (a DataLoader worker, a
``torchrun`` child). So each kernel's process tree is collected with psutil
and every NVML process in it is counted for that kernel. Reading NVML goes
through ``gpuportal.provider.nvml`` only, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil

from gpuportal.provider import nvml


@dataclass(frozen=True)
class KernelState:
    """A kernel as the server's kernel manager knows it."""

    id: str
    name: str
    execution_state: str
    last_activity: datetime | None
    pid: int | None


@dataclass
class GpuSample:
    """One reading of this server's GPUs and of the processes on them."""

    available: bool
    error: str | None = None
    gpus: list[nvml.GpuMetrics] = field(default_factory=list)
    processes: list[nvml.ProcessGpuUse] = field(default_factory=list)


def kernel_states(kernel_manager: Any) -> list[KernelState]:
    """The running kernels, with the PID of each kernel process when it is local."""
    states = []
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            kernel = kernel_manager.get_kernel(kernel_id)
        except KeyError:
            continue  # shut down while we looked
        provisioner = getattr(kernel, "provisioner", None)
        pid = getattr(provisioner, "pid", None)
        states.append(
            KernelState(
                id=kernel_id,
                name=str(getattr(kernel, "kernel_name", "")),
                execution_state=str(getattr(kernel, "execution_state", "unknown")),
                last_activity=getattr(kernel, "last_activity", None),
                pid=int(pid) if pid else None,
            )
        )
    return states


def process_tree(pid: int | None) -> set[int]:
    """``pid`` and all its descendants that exist now; empty for a gone process."""
    if not pid:
        return set()
    try:
        proc = psutil.Process(pid)
        return {pid, *(child.pid for child in proc.children(recursive=True))}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def visible(gpu: nvml.GpuMetrics, only: Iterable[str]) -> bool:
    """Whether ``gpu`` is one of this server's (``CUDA_VISIBLE_DEVICES`` style list).

    An empty list means every GPU of the machine.
    """
    wanted = [w for w in only if w]
    return not wanted or str(gpu.index) in wanted or gpu.uuid in wanted


def sample_gpus(only: Iterable[str] = ()) -> GpuSample:
    """Read this server's GPUs and every GPU process through the NVML seam."""
    wanted = list(only)
    try:
        gpus = [g for g in nvml.read_metrics() if visible(g, wanted)]
        processes = nvml.read_process_use()
    except nvml.NvmlUnavailable as exc:
        return GpuSample(available=False, error=str(exc))
    return GpuSample(available=True, gpus=gpus, processes=processes)


async def sample_gpus_async(only: Iterable[str] = ()) -> GpuSample:
    """:func:`sample_gpus` in a worker thread: NVML calls block."""
    return await asyncio.to_thread(sample_gpus, list(only))


def per_kernel(
    kernels: list[KernelState],
    trees: Mapping[str, set[int]],
    processes: list[nvml.ProcessGpuUse],
) -> list[dict[str, Any]]:
    """Each kernel's GPU memory and utilisation, summed over its process tree.

    Utilisation is NVML's per-process SM sample; when NVML has no sample for a
    process it counts as 0 % (a process that computes gets sampled).
    """
    rows = []
    for kernel in kernels:
        pids = trees.get(kernel.id, set())
        mine = [p for p in processes if p.pid in pids]
        gpus: dict[int, dict[str, Any]] = {}
        for proc in mine:
            entry = gpus.setdefault(
                proc.gpu_index,
                {
                    "index": proc.gpu_index,
                    "uuid": proc.gpu_uuid,
                    "memory_used_mib": 0,
                    "utilization_pct": 0,
                    "pids": [],
                },
            )
            entry["memory_used_mib"] += proc.used_memory_mib
            entry["utilization_pct"] = min(
                100, entry["utilization_pct"] + (proc.sm_utilization_pct or 0)
            )
            entry["pids"].append(proc.pid)
        for entry in gpus.values():
            entry["pids"].sort()
        rows.append(
            {
                "id": kernel.id,
                "name": kernel.name,
                "execution_state": kernel.execution_state,
                "last_activity": kernel.last_activity.isoformat() if kernel.last_activity else None,
                "pid": kernel.pid,
                "gpu_memory_used_mib": sum(e["memory_used_mib"] for e in gpus.values()),
                "gpu_utilization_pct": max(
                    (e["utilization_pct"] for e in gpus.values()), default=0
                ),
                "gpus": [gpus[i] for i in sorted(gpus)],
            }
        )
    return rows
