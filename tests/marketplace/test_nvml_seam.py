"""The NVML seam with hand-written device data (these machines have no GPU): files in
tests/marketplace/data written in the shape of nvidia-ml-py readings on H100, A100 and
RTX 4090 machines, from NVIDIA's specifications; nothing in them was captured from real
hardware. They are fed through ``nvml.use_recording``, the seam's own test entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuportal.provider import agent, nvml

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("recording", "count", "model", "vram", "capability"),
    [
        ("nvml_h100.json", 8, "H100-80GB-HBM3", 81559, "9.0"),
        ("nvml_a100.json", 4, "A100-SXM4-80GB", 81920, "8.0"),
        ("nvml_rtx4090.json", 2, "RTX-4090", 24564, "8.9"),
    ],
)
def test_inventory_and_metrics_from_recordings(
    recording: str, count: int, model: str, vram: int, capability: str
) -> None:
    with nvml.use_recording(DATA / recording):
        gpus = nvml.read_inventory()
        metrics = nvml.read_metrics()
        claims, driver = agent.inventory(demo=False, demo_gpus="", node_id="n-1")
    assert len(gpus) == len(metrics) == len(claims) == count
    assert [g.index for g in gpus] == list(range(count))
    assert {g.cuda_capability for g in gpus} == {capability}
    assert {c.model for c in claims} == {model}
    assert {c.vram_mib for c in claims} == {vram}
    assert [c.uuid for c in claims] == [g.uuid for g in gpus]
    assert driver == gpus[0].driver_version
    assert [m.uuid for m in metrics] == [g.uuid for g in gpus]
    busy = metrics[0]
    assert busy.utilization_pct > 0 and busy.memory_used_mib > 0 and busy.processes
    assert busy.memory_used_mib <= busy.memory_total_mib


@pytest.mark.parametrize(
    ("nvml_name", "offered"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB-HBM3"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
        ("Tesla T4", "Tesla-T4"),
    ],
)
def test_marketplace_model_names(nvml_name: str, offered: str) -> None:
    assert nvml.marketplace_model(nvml_name) == offered


def test_without_nvml_only_demo_runs() -> None:
    try:
        nvml.read_inventory()
    except nvml.NvmlUnavailable:
        pass
    else:
        pytest.skip("this machine has NVML; the refusal needs a machine without it")
    with pytest.raises(agent.AgentError, match="NVML is not available here"):
        agent.inventory(demo=False, demo_gpus="", node_id="n-1")
    gpus, driver = agent.inventory(demo=True, demo_gpus="2xA100-80GB,1xL4", node_id="n-1")
    assert [(g.index, g.model, g.vram_mib, g.uuid) for g in gpus] == [
        (0, "A100-80GB", 81920, "GPU-demo-n-1-0"),
        (1, "A100-80GB", 81920, "GPU-demo-n-1-1"),
        (2, "L4", 23034, "GPU-demo-n-1-2"),
    ]
    assert driver is None


def test_an_inventory_without_metrics_reads_idle() -> None:
    gpu = {
        "index": 0,
        "uuid": "GPU-x",
        "model": "NVIDIA L4",
        "memory_total_mib": 23034,
        "driver_version": "550",
        "cuda_capability": "8.9",
        "pci_bus_id": "0:1:0.0",
        "power_limit_w": 72.0,
    }
    with nvml.use_recording([gpu]):
        assert nvml.read_metrics() == [nvml.GpuMetrics(0, "GPU-x", 0, 0, 23034, 0, None, [])]
