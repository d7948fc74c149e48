"""The extension's logic without a server: money arithmetic, per-kernel attribution,
idle decisions, portal URL defaults, the metrics text and the NVML seam's per-process
reader. NVML numbers come from hand-written device data (tests/extension/data, not
captured from a GPU) fed through ``nvml.use_recording`` (these machines have no GPU)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuportal.extensions import gpuuse, metrics
from gpuportal.extensions.app import portal_url_from_env
from gpuportal.extensions.idle import IdleCuller
from gpuportal.extensions.portal import PortalReading
from gpuportal.extensions.usage import build_report
from gpuportal.provider import nvml
from gpuportal.provider.money import accrued

from .recordings import CHILD_PID, OTHER_PID, TRAINING_PID, a100_kernels, idle

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("gpus", "price", "seconds", "expected"),
    [
        (2, 1_234_567, 60, 41_152),  # docs/billing.md's example
        (1, 3_600_000, 1, 1_000),
        (1, 3_600_000, 0, 0),
        (1, 3_600_000, -5, 0),  # a clock behind the start never goes negative
        (8, 2_000_000, 3600, 16_000_000),
    ],
)
def test_accrued_follows_the_portal_rounding_rule(
    gpus: int, price: int, seconds: int, expected: int
) -> None:
    assert accrued(gpus, price, T0, T0 + timedelta(seconds=seconds)) == expected


def test_process_use_from_recording() -> None:
    """Recorded per-process samples come back through the seam, unchanged."""
    with nvml.use_recording(a100_kernels()):
        procs = nvml.read_process_use()
    assert [(p.pid, p.gpu_index, p.used_memory_mib, p.sm_utilization_pct) for p in procs] == [
        (TRAINING_PID, 0, 21504, 87),
        (CHILD_PID, 0, 1536, 4),
        (OTHER_PID, 1, 9728, 35),
    ]


def test_process_use_without_samples_reads_the_metrics_processes() -> None:
    raw = a100_kernels()
    del raw["processes"]
    with nvml.use_recording(raw):
        procs = nvml.read_process_use()
    assert [(p.pid, p.used_memory_mib, p.sm_utilization_pct) for p in procs] == [
        (TRAINING_PID, 21504, None),
        (CHILD_PID, 1536, None),
        (OTHER_PID, 9728, None),
    ]


def kernel(kid: str, state: str = "idle", pid: int | None = None) -> gpuuse.KernelState:
    return gpuuse.KernelState(kid, "python3", state, T0, pid)


def test_per_kernel_counts_the_process_tree_and_nothing_else() -> None:
    """A kernel's DataLoader child counts for the kernel; another tenant's process does not."""
    with nvml.use_recording(a100_kernels()):
        procs = nvml.read_process_use()
    rows = gpuuse.per_kernel(
        [kernel("k1", pid=TRAINING_PID), kernel("k2", pid=7)],
        {"k1": {TRAINING_PID, CHILD_PID}, "k2": {7}},
        procs,
    )
    assert rows == [
        {
            "id": "k1",
            "name": "python3",
            "execution_state": "idle",
            "last_activity": T0.isoformat(),
            "pid": TRAINING_PID,
            "gpu_memory_used_mib": 23040,
            "gpu_utilization_pct": 91,
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-6f1c2a40-0000-a100-9e3b-5d2c8a1f0000",
                    "memory_used_mib": 23040,
                    "utilization_pct": 91,
                    "pids": [TRAINING_PID, CHILD_PID],
                }
            ],
        },
        {
            "id": "k2",
            "name": "python3",
            "execution_state": "idle",
            "last_activity": T0.isoformat(),
            "pid": 7,
            "gpu_memory_used_mib": 0,
            "gpu_utilization_pct": 0,
            "gpus": [],
        },
    ]


@pytest.mark.parametrize(
    ("only", "indices"),
    [([], [0, 1]), (["1"], [1]), (["GPU-6f1c2a40-0000-a100-9e3b-5d2c8a1f0000"], [0])],
)
def test_visible_gpus(only: list[str], indices: list[int]) -> None:
    with nvml.use_recording(a100_kernels()):
        sample = gpuuse.sample_gpus(only)
    assert sample.available and [g.index for g in sample.gpus] == indices


def test_without_nvml_the_sample_says_why() -> None:
    sample = gpuuse.sample_gpus()
    if sample.available:
        pytest.skip("this machine has NVML; the refusal needs a machine without it")
    assert sample.error and sample.gpus == [] and sample.processes == []


def culler(timeout: int = 1800) -> tuple[IdleCuller, list[str]]:
    calls: list[str] = []
    return (
        IdleCuller(timeout_seconds=timeout, busy_gpu_pct=5, shutdown=calls.append, started_at=T0),
        calls,
    )


def observe(c: IdleCuller, at: datetime, kernels: list[gpuuse.KernelState], raw: Any) -> None:
    with nvml.use_recording(raw):
        sample = gpuuse.sample_gpus()
    trees = {k.id: {k.pid} if k.pid else set() for k in kernels}
    c.observe(at, kernels, sample, gpuuse.per_kernel(kernels, trees, sample.processes))


@pytest.mark.parametrize(
    ("case", "kernels", "recording", "culled"),
    [
        ("nothing runs", [], "idle", True),
        ("idle kernel, idle GPUs", ["idle"], "idle", True),
        ("kernel busy without GPU", ["busy"], "idle", False),
        ("kernel left starting (nobody connected)", ["starting"], "idle", True),
        ("kernel looks idle but computes on the GPU", ["idle"], "busy", False),
    ],
)
def test_idle_decisions(case: str, kernels: list[str], recording: str, culled: bool) -> None:
    c, calls = culler()
    raw = a100_kernels()
    states = [
        gpuuse.KernelState(f"k{i}", "python3", s, T0, TRAINING_PID) for i, s in enumerate(kernels)
    ]
    # the GPU-busy case: only the kernel's own process computes, the device total is low
    if recording == "busy":
        raw = idle(raw)
        raw["processes"] = [a100_kernels()["processes"][0]]
    else:
        raw = idle(raw)
    later = T0 + timedelta(minutes=31)
    observe(c, later, states, raw)
    assert c.cull_if_due(later) is culled, case
    assert calls == (["idle for 1860 s"] if culled else [])


def test_culling_waits_for_the_timeout_and_fires_once() -> None:
    c, calls = culler()
    quiet = idle(a100_kernels())
    observe(c, T0 + timedelta(minutes=29), [], quiet)
    assert not c.cull_if_due(T0 + timedelta(minutes=29))
    assert c.cull_if_due(T0 + timedelta(minutes=30))
    assert not c.cull_if_due(T0 + timedelta(minutes=45))
    assert calls == ["idle for 1800 s"]


def test_gpu_activity_restarts_the_idle_clock() -> None:
    c, calls = culler()
    observe(c, T0 + timedelta(minutes=20), [], a100_kernels())  # GPU 0 at 91 %
    assert not c.cull_if_due(T0 + timedelta(minutes=45))
    assert c.report(T0 + timedelta(minutes=45))["idle_seconds"] == 1500.0
    assert c.cull_if_due(T0 + timedelta(minutes=50))
    assert calls == ["idle for 1800 s"]


def test_zero_disables_culling() -> None:
    c, calls = culler(timeout=0)
    assert not c.cull_if_due(T0 + timedelta(days=30))
    assert c.report(T0)["shutdown_at"] is None and calls == []


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, ""),
        (
            {"GPUPORTAL_PORTAL_URL": "https://hub.example.org/services/portal"},
            "https://hub.example.org/services/portal/",
        ),
        (
            {
                "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/jh/hub/",
                "JUPYTERHUB_BASE_URL": "/jh/",
            },
            "https://hub.example.org/jh/services/portal/",
        ),
        ({"JUPYTERHUB_PUBLIC_HUB_URL": "", "JUPYTERHUB_BASE_URL": "/"}, ""),
        (
            {
                "GPUPORTAL_PORTAL_URL": "http://127.0.0.1:8000/services/portal/",
                "JUPYTERHUB_PUBLIC_HUB_URL": "https://elsewhere.example/hub/",
            },
            "http://127.0.0.1:8000/services/portal/",
        ),
    ],
)
def test_portal_url_defaults(env: dict[str, str], url: str) -> None:
    assert portal_url_from_env(env) == url


def test_metrics_text_parses_and_names_units() -> None:
    """The report renders as Prometheus text that prometheus_client's own parser reads."""
    with nvml.use_recording(a100_kernels()):
        sample = gpuuse.sample_gpus()
    rows = gpuuse.per_kernel(
        [kernel("k1", pid=TRAINING_PID)], {"k1": {TRAINING_PID}}, sample.processes
    )
    reading = PortalReading(
        reachable=True,
        fetched_at=T0,
        allocation={
            "id": 3,
            "gpu_count": 2,
            "price_per_gpu_hour": 1_234_567,
            "status": "stopping",
            "started_at": T0.isoformat(),
            "last_charged_at": T0.isoformat(),
            "stopping_at": (T0 + timedelta(minutes=2)).isoformat(),
            "stop_reason": "out_of_credit",
            "charged": 0,
        },
        balance={"balance": 5, "available": 3, "runway_seconds": 0.0, "currency": "credits"},
    )
    c, _ = culler()
    report = build_report(
        user="meg",
        server="",
        portal_url="http://127.0.0.1:1/",
        reading=reading,
        sample=sample,
        kernels=rows,
        idle=c.report(T0 + timedelta(seconds=60)),
        now=T0 + timedelta(seconds=60),
    )
    assert (report["spent"], report["price_per_hour"]) == (41_152, 2_469_134)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(metrics.render(report).decode()):
        assert family.name.startswith("gpuportal_")
        for sample_ in family.samples:
            values[(sample_.name, tuple(sorted(sample_.labels.items())))] = sample_.value
    assert values[("gpuportal_session_spent_microcredits", ())] == 41_152
    assert values[("gpuportal_price_locked_microcredits_per_hour", ())] == 2_469_134
    assert values[("gpuportal_balance_available_microcredits", ())] == 3
    assert values[("gpuportal_runway_remaining_seconds", ())] == 0
    assert values[("gpuportal_portal_reachable_bool", ())] == 1
    assert (
        values[("gpuportal_stop_scheduled_timestamp_seconds", ())]
        == (T0 + timedelta(minutes=2)).timestamp()
    )
    assert values[("gpuportal_gpu_utilized_ratio", (("gpu", "0"),))] == 0.91
    assert (
        values[("gpuportal_kernel_gpu_memory_used_bytes", (("gpu", "0"), ("kernel_id", "k1")))]
        == 21504 * 1024 * 1024
    )
    assert (
        values[("gpuportal_kernel_gpu_utilized_ratio", (("gpu", "0"), ("kernel_id", "k1")))] == 0.87
    )
