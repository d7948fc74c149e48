"""The NVML seam: the only module in gpuportal that touches NVML.

Everything that wants to know about physical GPUs (the embedded stack counting
GPUs, the provider agent's inventory and heartbeats, the server extension's
per-kernel use) asks this module. On a machine without an NVIDIA driver it
raises :class:`NvmlUnavailable`; tests without a GPU feed it recorded device data
through :func:`use_recording` instead of faking NVML calls all over the code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here: no driver, no library, or no permission."""


@dataclass(frozen=True)
class GpuInfo:
    """What NVML says about one GPU. ``memory_total_mib`` is in MiB."""

    index: int
    uuid: str
    model: str
    memory_total_mib: int
    driver_version: str
    cuda_capability: str
    pci_bus_id: str
    power_limit_w: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuMetrics:
    """One GPU's live readings for a heartbeat. Information, never a basis for billing."""

    index: int
    uuid: str
    utilization_pct: int
    memory_used_mib: int
    memory_total_mib: int
    temperature_c: int
    power_w: float | None
    processes: list[dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProcessGpuUse:
    """One process's use of one GPU, as NVML reports it. Information only.

    ``sm_utilization_pct`` is NVML's latest per-process SM sample, or None when
    the driver keeps no samples for the process (it has been idle since the
    last sample window, or the GPU does not support accounting).
    """

    pid: int
    gpu_index: int
    gpu_uuid: str
    used_memory_mib: int
    sm_utilization_pct: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_recording: list[GpuInfo] | None = None
_recorded_metrics: list[GpuMetrics] | None = None
_recorded_processes: list[ProcessGpuUse] | None = None


@contextmanager
def use_recording(
    path_or_gpus: Path | list[dict[str, Any]] | dict[str, Any],
) -> Iterator[None]:
    """Serve recorded device data instead of NVML (tests on machines without GPUs).

    Accepts a list of inventory entries (:class:`GpuInfo` fields), or a dict
    ``{"gpus": [...], "metrics": [...], "processes": [...]}`` with
    :class:`GpuMetrics` readings and :class:`ProcessGpuUse` samples too; a path
    to a JSON file of either shape also works.
    """
    global _recording, _recorded_metrics, _recorded_processes
    raw = (
        json.loads(Path(path_or_gpus).read_text())
        if isinstance(path_or_gpus, Path)
        else path_or_gpus
    )
    gpus, metrics = (
        (raw.get("gpus", []), raw.get("metrics")) if isinstance(raw, dict) else (raw, None)
    )
    processes = raw.get("processes") if isinstance(raw, dict) else None
    previous = (_recording, _recorded_metrics, _recorded_processes)
    _recording = [GpuInfo(**gpu) for gpu in gpus]
    _recorded_metrics = None if metrics is None else [GpuMetrics(**m) for m in metrics]
    _recorded_processes = None if processes is None else [ProcessGpuUse(**p) for p in processes]
    try:
        yield
    finally:
        _recording, _recorded_metrics, _recorded_processes = previous


def marketplace_model(name: str) -> str:
    """The model name offered to customers: NVML's name without the vendor words.

    ``NVIDIA H100 80GB HBM3`` → ``H100-80GB-HBM3``; ``NVIDIA GeForce RTX 4090`` →
    ``RTX-4090``; ``NVIDIA A100-SXM4-80GB`` → ``A100-SXM4-80GB``.
    """
    words = [w for w in name.replace("_", " ").split() if w.upper() not in ("NVIDIA", "GEFORCE")]
    return "-".join(words) or name


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextmanager
def _nvml() -> Iterator[Any]:
    """NVML, initialised for one reading and shut down after it.

    Every NVML failure (no library, no driver, a query error) becomes
    :class:`NvmlUnavailable`, so callers handle one exception.
    """
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML did not start: {exc}") from None
    try:
        yield pynvml
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML query failed: {exc}") from None
    finally:
        pynvml.nvmlShutdown()


def read_inventory() -> list[GpuInfo]:
    """List this machine's GPUs, or raise :class:`NvmlUnavailable`."""
    if _recording is not None:
        return list(_recording)
    with _nvml() as pynvml:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                power: float | None = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
            except pynvml.NVMLError:
                power = None
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    model=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mib=pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024),
                    driver_version=driver,
                    cuda_capability=f"{major}.{minor}",
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                    power_limit_w=power,
                )
            )
        return gpus


def read_metrics() -> list[GpuMetrics]:
    """Live readings of every GPU, or raise :class:`NvmlUnavailable`."""
    if _recording is not None:
        if _recorded_metrics is not None:
            return list(_recorded_metrics)
        return [
            GpuMetrics(g.index, g.uuid, 0, 0, g.memory_total_mib, 0, None, []) for g in _recording
        ]
    with _nvml() as pynvml:
        readings = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                power: float | None = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
            except pynvml.NVMLError:
                power = None
            try:
                procs = [
                    {
                        "pid": int(p.pid),
                        "used_memory_mib": int((p.usedGpuMemory or 0) // (1024 * 1024)),
                    }
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                ]
            except pynvml.NVMLError:
                procs = []
            readings.append(
                GpuMetrics(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    utilization_pct=int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    memory_used_mib=int(memory.used // (1024 * 1024)),
                    memory_total_mib=int(memory.total // (1024 * 1024)),
                    temperature_c=int(
                        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                    ),
                    power_w=power,
                    processes=procs,
                )
            )
        return readings


def read_process_use() -> list[ProcessGpuUse]:
    """Every compute process on every GPU, with its memory and latest SM sample.

    The server extension maps these PIDs to its kernels. Raises
    :class:`NvmlUnavailable` like the other readers. With a recording that has
    no ``processes``, the processes listed in its metrics are served, with no
    utilisation sample.
    """
    if _recording is not None:
        if _recorded_processes is not None:
            return list(_recorded_processes)
        return [
            ProcessGpuUse(int(p["pid"]), m.index, m.uuid, int(p["used_memory_mib"]), None)
            for m in read_metrics()
            for p in m.processes
        ]
    with _nvml() as pynvml:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            latest: dict[int, tuple[int, int]] = {}  # pid -> (timestamp, sm %)
            try:
                for sample in pynvml.nvmlDeviceGetProcessUtilization(handle, 0):
                    seen = latest.get(int(sample.pid))
                    if seen is None or int(sample.timeStamp) >= seen[0]:
                        latest[int(sample.pid)] = (int(sample.timeStamp), int(sample.smUtil))
            except pynvml.NVMLError:
                pass  # no samples yet (NOT_FOUND), or not supported on this GPU
            try:
                running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                running = []
            for proc in running:
                sample = latest.get(int(proc.pid))
                found.append(
                    ProcessGpuUse(
                        pid=int(proc.pid),
                        gpu_index=index,
                        gpu_uuid=uuid,
                        used_memory_mib=int((proc.usedGpuMemory or 0) // (1024 * 1024)),
                        sm_utilization_pct=None if sample is None else sample[1],
                    )
                )
        return found
