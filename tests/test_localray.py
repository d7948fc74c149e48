"""The house Ray head: a real local cluster with logical demo GPUs."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from gpuportal.hub.market.raystatus import cluster_status, summarize_nodes
from gpuportal.hub.stack.localray import LocalRayHead, plan_gpus, stop_process_group
from gpuportal.provider import nvml

from .conftest import RayCluster


@pytest.mark.ray
async def test_status_shows_the_demo_gpus(ray_cluster: RayCluster) -> None:
    token = ray_cluster.settings.ray_token_path.read_text().strip()
    status = await cluster_status(ray_cluster.jobs_url, token=token)
    assert status["status"] == "ok"
    assert (status["nodes_alive"], status["gpus"], status["gpu_models"], status["demo"]) == (
        1,
        2,
        {"A100-80GB": 2},
        True,
    )


@pytest.mark.ray
async def test_the_house_head_runs_with_token_auth(ray_cluster: RayCluster) -> None:
    """Without the house cluster's token (0600 in the data dir) its dashboard refuses."""
    path = ray_cluster.settings.ray_token_path
    assert path.stat().st_mode & 0o777 == 0o600
    assert (await cluster_status(ray_cluster.jobs_url))["status"] == "unreachable"
    assert (await cluster_status(ray_cluster.jobs_url, token="guess"))["status"] == "unreachable"


@pytest.mark.ray
def test_the_house_head_inherits_no_secret_of_ours(ray_cluster: RayCluster) -> None:
    """The head was started from the allow-list: a variable of this (control-plane)
    process that is not on it is absent from every process of the head."""
    import os

    assert "GPUPORTAL_TEST_MARKER" in os.environ  # set by the fixture before the start
    seen = 0
    for pid in ray_cluster.pids:
        try:
            environ = psutil.Process(pid).environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not environ:  # gone, or a zombie: nothing to read
            continue
        seen += 1
        assert "GPUPORTAL_TEST_MARKER" not in environ
        assert environ.get("RAY_AUTH_MODE") == "token"
    assert seen > 0


@pytest.mark.ray
def test_a_running_head_is_found_for_reuse(ray_cluster: RayCluster) -> None:
    found = LocalRayHead(ray_cluster.settings).running()
    assert found is not None
    assert found["jobs_url"] == ray_cluster.jobs_url
    assert found["demo"] is True


async def test_unreachable_cluster_is_reported_not_raised() -> None:
    status = await cluster_status("http://127.0.0.1:9", timeout=1)
    assert status["status"] == "unreachable"


def test_summary_counts_only_alive_nodes() -> None:
    nodes = [
        {"state": "ALIVE", "resources_total": {"GPU": 4.0, "accelerator_type:H100": 4.0}},
        {"state": "DEAD", "resources_total": {"GPU": 8.0, "accelerator_type:H100": 8.0}},
        {"state": "ALIVE", "resources_total": {"CPU": 8.0}},
    ]
    assert summarize_nodes(nodes) == {
        "nodes_alive": 2,
        "nodes_dead": 1,
        "gpus": 4,
        "gpu_models": {"H100": 4},
        "demo_gpus": 0,
        "demo": False,
    }


def test_real_gpus_win_over_demo(tmp_path) -> None:
    """NVML data here is recorded from a real 2-GPU machine (no GPU on the test machine)."""
    from gpuportal.hub.settings import load_settings

    recorded = [
        {
            "index": i,
            "uuid": f"GPU-{i}",
            "model": "NVIDIA H200",
            "memory_total_mib": 143771,
            "driver_version": "570.86",
            "cuda_capability": "9.0",
            "pci_bus_id": f"0000:0{i}:00.0",
            "power_limit_w": 700.0,
        }
        for i in range(2)
    ]
    settings = load_settings(data_dir=tmp_path, demo_gpus="4xL4")
    with nvml.use_recording(recorded):
        plan = plan_gpus(settings)
    assert (plan.models, plan.demo) == ({"NVIDIA-H200": 2}, False)
    try:
        nvml.read_inventory()
    except nvml.NvmlUnavailable:  # no NVML here: the demo GPUs are declared
        plan = plan_gpus(settings)
        assert (plan.models, plan.demo) == ({"L4": 4}, True)


def test_stop_process_group_ends_the_whole_tree() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "time.sleep(300)",
        ],
        start_new_session=True,
    )
    try:
        for _ in range(100):
            children = psutil.Process(parent.pid).children(recursive=True)
            if children:
                break
            time.sleep(0.05)
        assert children
        assert stop_process_group(parent.pid, timeout=5) is True
        parent.wait(5)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert stop_process_group(parent.pid) is False
