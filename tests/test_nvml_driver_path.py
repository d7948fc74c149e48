"""The NVML seam's driver path (the code that calls pynvml), without a GPU.

No NVIDIA driver exists on the test machines, so a stand-in ``pynvml`` module
replays device data shaped like a 2 x H100 machine's readings (driver 550; the
values are typical, not a capture). It is the one place tests replace NVML, and
it is a stand-in because no GPU is present: it checks what the seam makes of
NVML's answers and errors, not NVML itself.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gpuportal.provider import nvml

MIB = 1024 * 1024
RECORDED = [
    {
        "uuid": "GPU-6f1c2d3e-0000-4a1b-9c8d-111111111111",
        "name": b"NVIDIA H100 80GB HBM3",
        "total": 81559 * MIB,
        "used": 40960 * MIB,
        "util": 97,
        "temp": 61,
        "power": 512345,
        "limit": 700000,
        "cc": (9, 0),
        "bus": b"00000000:18:00.0",
        "procs": [(4242, 40000 * MIB)],
        "samples": [(4242, 1000, 90), (4242, 2000, 97)],
    },
    {
        "uuid": "GPU-6f1c2d3e-0000-4a1b-9c8d-222222222222",
        "name": "NVIDIA H100 80GB HBM3",
        "total": 81559 * MIB,
        "used": 0,
        "util": 0,
        "temp": 33,
        "power": None,
        "limit": 700000,
        "cc": (9, 0),
        "bus": "00000000:2A:00.0",
        "procs": [],
        "samples": None,
    },
]


class NVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict], *, init_fails: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    state = {"initialised": 0}

    def init() -> None:
        if init_fails:
            raise NVMLError("Driver Not Loaded")
        state["initialised"] += 1

    def shutdown() -> None:
        state["initialised"] -= 1

    def power(h: dict) -> int:
        if h["power"] is None:
            raise NVMLError("Not Supported")
        return int(h["power"])

    def samples(h: dict, _since: int) -> list:
        if h["samples"] is None:
            raise NVMLError("Not Found")
        return [SimpleNamespace(pid=p, timeStamp=t, smUtil=u) for p, t, u in h["samples"]]

    functions = {
        "nvmlInit": init,
        "nvmlShutdown": shutdown,
        "nvmlSystemGetDriverVersion": lambda: b"550.54.15",
        "nvmlDeviceGetCount": lambda: len(devices),
        "nvmlDeviceGetHandleByIndex": lambda i: devices[i],
        "nvmlDeviceGetUUID": lambda h: h["uuid"],
        "nvmlDeviceGetName": lambda h: h["name"],
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=h["total"], used=h["used"]),
        "nvmlDeviceGetCudaComputeCapability": lambda h: h["cc"],
        "nvmlDeviceGetPciInfo": lambda h: SimpleNamespace(busId=h["bus"]),
        "nvmlDeviceGetPowerManagementLimit": lambda h: h["limit"],
        "nvmlDeviceGetPowerUsage": power,
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=h["util"]),
        "nvmlDeviceGetTemperature": lambda h, _sensor: h["temp"],
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [
            SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h["procs"]
        ],
        "nvmlDeviceGetProcessUtilization": samples,
    }
    for name, fn in functions.items():
        setattr(mod, name, fn)
    mod.state = state  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    mod = fake_pynvml(RECORDED)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    yield mod
    assert mod.state["initialised"] == 0, "every reading shuts NVML down again"


def test_inventory(driver: types.ModuleType) -> None:
    gpus = nvml.read_inventory()
    assert [g.as_dict() for g in gpus] == [
        {
            "index": 0,
            "uuid": RECORDED[0]["uuid"],
            "model": "NVIDIA H100 80GB HBM3",
            "memory_total_mib": 81559,
            "driver_version": "550.54.15",
            "cuda_capability": "9.0",
            "pci_bus_id": "00000000:18:00.0",
            "power_limit_w": 700.0,
        },
        {
            "index": 1,
            "uuid": RECORDED[1]["uuid"],
            "model": "NVIDIA H100 80GB HBM3",
            "memory_total_mib": 81559,
            "driver_version": "550.54.15",
            "cuda_capability": "9.0",
            "pci_bus_id": "00000000:2A:00.0",
            "power_limit_w": 700.0,
        },
    ]


def test_metrics(driver: types.ModuleType) -> None:
    first, second = nvml.read_metrics()
    assert (
        first.utilization_pct,
        first.memory_used_mib,
        first.temperature_c,
        first.power_w,
        first.processes,
    ) == (97, 40960, 61, 512.345, [{"pid": 4242, "used_memory_mib": 40000}])
    assert (second.power_w, second.processes) == (None, [])  # "Not Supported" is no error


def test_process_use_takes_the_latest_sample(driver: types.ModuleType) -> None:
    (use,) = nvml.read_process_use()
    assert (use.pid, use.gpu_index, use.used_memory_mib, use.sm_utilization_pct) == (
        4242,
        0,
        40000,
        97,
    )


def test_no_driver_is_nvml_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(RECORDED, init_fails=True))
    for reader in (nvml.read_inventory, nvml.read_metrics, nvml.read_process_use):
        with pytest.raises(nvml.NvmlUnavailable, match="Driver Not Loaded"):
            reader()


def test_a_query_error_is_nvml_unavailable_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(RECORDED)

    def broken() -> int:
        raise NVMLError("GPU is lost")

    mod.nvmlDeviceGetCount = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    with pytest.raises(nvml.NvmlUnavailable, match="GPU is lost"):
        nvml.read_inventory()
    assert mod.state["initialised"] == 0
