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


_recording: list[GpuInfo] | None = None


@contextmanager
def use_recording(path_or_gpus: Path | list[dict[str, Any]]) -> Iterator[None]:
    """Serve recorded device data instead of NVML (tests on machines without GPUs)."""
    global _recording
    raw = (
        json.loads(Path(path_or_gpus).read_text())
        if isinstance(path_or_gpus, Path)
        else path_or_gpus
    )
    previous, _recording = _recording, [GpuInfo(**gpu) for gpu in raw]
    try:
        yield
    finally:
        _recording = previous


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_inventory() -> list[GpuInfo]:
    """List this machine's GPUs, or raise :class:`NvmlUnavailable`."""
    if _recording is not None:
        return list(_recording)
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML did not start: {exc}") from None
    try:
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
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML query failed: {exc}") from None
    finally:
        pynvml.nvmlShutdown()
