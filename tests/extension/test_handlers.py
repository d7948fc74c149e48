"""The extension inside a real jupyter-server (pytest-jupyter's ``jp_serverapp``), with
real ipykernel kernels. GPU readings are hand-written device data (tests/extension/data,
not captured from a GPU) fed through ``nvml.use_recording`` (these machines have no
GPU), with their PIDs rewritten
to this test's kernel processes; the portal here is a closed port on 127.0.0.1
(test_with_portal.py runs against the real one).

The tests are plain functions that drive pytest-jupyter's own event loop, because
the suite's pytest-asyncio would run coroutines in a loop the server does not use.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError

from gpuportal.extensions.app import GpuPortalExtension
from gpuportal.provider import nvml

from .recordings import TRAINING_PID, a100_kernels, idle


def extension(serverapp: Any) -> GpuPortalExtension:
    for point in serverapp.extension_manager.extension_points.values():
        if isinstance(point.app, GpuPortalExtension):
            return point.app
    raise AssertionError("the gpuportal extension is not loaded")


def fetch(loop: asyncio.AbstractEventLoop, jp_fetch: Any, *path: str, **kw: Any) -> Any:
    return loop.run_until_complete(jp_fetch(*path, **kw))


def start_kernel(loop: asyncio.AbstractEventLoop, jp_fetch: Any, serverapp: Any) -> tuple[str, int]:
    """A real ipykernel process; returns its id and PID.

    No client connects, so jupyter-server keeps its state "starting".
    """
    reply = fetch(loop, jp_fetch, "api", "kernels", method="POST", body=json.dumps({}))
    kernel_id = json.loads(reply.body)["id"]
    return kernel_id, int(serverapp.kernel_manager.get_kernel(kernel_id).provisioner.pid)


def test_portal_unreachable_is_200_with_a_clear_field(jp_fetch: Any, jp_asyncio_loop: Any) -> None:
    reply = fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "usage")
    assert reply.code == 200
    body = json.loads(reply.body)
    assert body["portal"]["reachable"] is False
    assert body["portal"]["error"].startswith("Portal unreachable: ConnectError")
    assert "not-a-real-token" not in reply.body.decode()
    assert [body[k] for k in ("allocation", "price_per_hour", "spent", "balance")] == [None] * 4
    metrics = fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "metrics")
    assert metrics.code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
    assert families["gpuportal_portal_reachable_bool"].samples[0].value == 0
    # Unknown numbers are absent series, never a false zero.
    assert "gpuportal_balance_available_microcredits" not in families
    assert "gpuportal_session_spent_microcredits" not in families


@pytest.mark.parametrize("endpoint", ["usage", "metrics"])
def test_endpoints_need_a_login(jp_fetch: Any, jp_asyncio_loop: Any, endpoint: str) -> None:
    with pytest.raises(HTTPClientError) as refused:
        fetch(
            jp_asyncio_loop,
            jp_fetch,
            "api",
            "gpuportal",
            endpoint,
            headers={"Authorization": "token wrong"},
        )
    assert refused.value.code == 403


def test_per_kernel_gpu_use_from_nvml_readings(
    jp_fetch: Any, jp_asyncio_loop: Any, jp_serverapp: Any
) -> None:
    kernel_id, pid = start_kernel(jp_asyncio_loop, jp_fetch, jp_serverapp)
    with nvml.use_recording(a100_kernels({TRAINING_PID: pid})):
        body = json.loads(fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "usage").body)
        text = fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "metrics").body.decode()
    assert body["nvml"] == {"available": True, "error": None}
    assert [(g["index"], g["utilization_pct"], g["memory_used_mib"]) for g in body["gpus"]] == [
        (0, 91, 23552),
        (1, 38, 10240),
    ]
    [row] = body["kernels"]
    assert (row["id"], row["pid"], row["execution_state"]) == (kernel_id, pid, "starting")
    # The data's DataLoader child (4243) is not this kernel's child here, and the
    # other tenant's process on GPU 1 is nobody's: only the kernel's own PID counts.
    assert (row["gpu_memory_used_mib"], row["gpu_utilization_pct"]) == (21504, 87)
    assert row["gpus"] == [
        {
            "index": 0,
            "uuid": "GPU-6f1c2a40-0000-a100-9e3b-5d2c8a1f0000",
            "memory_used_mib": 21504,
            "utilization_pct": 87,
            "pids": [pid],
        }
    ]
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (("gpu", "0"), ("kernel_id", kernel_id))
    assert values[("gpuportal_kernel_gpu_utilized_ratio", key)] == 0.87
    assert values[("gpuportal_kernel_gpu_memory_used_bytes", key)] == 21504 * 1024 * 1024


@pytest.fixture
def gpuportal_config(gpuportal_config: dict[str, Any]) -> dict[str, Any]:
    return {**gpuportal_config, "idle_timeout_seconds": 1800}


def test_idle_server_shuts_down_and_gpu_busy_kernel_is_kept(
    jp_fetch: Any, jp_asyncio_loop: Any, jp_serverapp: Any
) -> None:
    """Time travel through the extension's clock; the shutdown hook records the call
    instead of stopping the test's own server (in production it is ServerApp.stop)."""
    ext = extension(jp_serverapp)
    assert ext.idle_timeout_seconds == 1800
    calls: list[str] = []
    ext.culler.shutdown = calls.append
    start = ext.clock()
    kernel_id, pid = start_kernel(jp_asyncio_loop, jp_fetch, jp_serverapp)
    busy = a100_kernels({TRAINING_PID: pid})
    quiet = idle(busy)
    # Only the kernel's own process computes; the device totals look idle.
    only_kernel = {**quiet, "processes": [busy["processes"][0]]}

    ext.clock = lambda: start + timedelta(hours=2)
    with nvml.use_recording(only_kernel):
        assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is False
    assert calls == []
    report = json.loads(fetch(jp_asyncio_loop, jp_fetch, "api", "gpuportal", "usage").body)
    assert report["idle"]["last_activity_reason"] == "a GPU is computing"
    assert report["kernels"][0]["id"] == kernel_id

    ext.clock = lambda: start + timedelta(hours=2, minutes=29)
    with nvml.use_recording(quiet):
        assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is False
    ext.clock = lambda: start + timedelta(hours=2, minutes=30)
    with nvml.use_recording(quiet):
        assert jp_asyncio_loop.run_until_complete(ext.check_idle()) is True
    assert calls == ["idle for 1800 s"]


def test_idle_timeout_from_the_spawners_env(
    monkeypatch: pytest.MonkeyPatch, jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    monkeypatch.setenv("GPUPORTAL_IDLE_TIMEOUT_SECONDS", "900")
    assert GpuPortalExtension().idle_timeout_seconds == 900
    monkeypatch.setenv("GPUPORTAL_IDLE_TIMEOUT_SECONDS", "0")
    assert GpuPortalExtension().idle_timeout_seconds == 0
    monkeypatch.delenv("GPUPORTAL_IDLE_TIMEOUT_SECONDS")
    assert GpuPortalExtension().idle_timeout_seconds == 1800


def test_the_idle_check_samples_a_quarter_of_the_limit_at_most_every_minute(
    jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    checks = {
        limit: GpuPortalExtension(idle_timeout_seconds=limit).idle_check_seconds
        for limit in (1800, 300, 120, 5, 2)
    }
    assert checks == {1800: 60, 300: 60, 120: 30, 5: 1, 2: 1}
    assert GpuPortalExtension(idle_timeout_seconds=5, idle_check_seconds=9).idle_check_seconds == 9


def test_the_top_up_link_is_the_hubs_billing_page_under_jupyterhub(
    monkeypatch: pytest.MonkeyPatch, jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    monkeypatch.delenv("GPUPORTAL_TOPUP_URL", raising=False)
    monkeypatch.setenv("JUPYTERHUB_BASE_URL", "/gpu/")
    assert GpuPortalExtension().topup_url == "/gpu/hub/billing"
    monkeypatch.setenv("GPUPORTAL_TOPUP_URL", "https://pay.example.org/")
    assert GpuPortalExtension().topup_url == "https://pay.example.org/"
