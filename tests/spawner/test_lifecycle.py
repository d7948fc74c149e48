"""The spawner contract through a real hub on real Ray nodes."""

from __future__ import annotations

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from .conftest import Hub
from .contract_portal import ContractPortal
from .raynodes import RayNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_gpu_server_lifecycle(hub: Hub, ray_nodes: RayNodes, portal: ContractPortal) -> None:
    reply = hub.spawn("alice", options={"profile": "gpu", "gpu_model": "A100-80GB",
                                        "gpu_count": 1})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("alice")
    state = hub.state("alice")
    assert set(state) >= {"jobs_url", "job_id", "reservation_id", "url", "node_id"}
    jobs = JobSubmissionClient(ray_nodes.jobs_url)
    info = jobs.get_job_info(state["job_id"])
    assert str(info.status) == "RUNNING"
    # Pinned to the reserved node, holding one of its GPUs.
    assert info.driver_node_id == ray_nodes.ray_node_id("n1")
    assert len(state["gpus"].split(",")) == 1
    env = info.runtime_env["env_vars"]
    assert all(k.startswith(("JUPYTERHUB_", "GPUPORTAL_SINGLEUSER_")) for k in env), env
    assert "hub-secret" not in repr(info.runtime_env)
    assert "LEAKY_SECRET" not in env
    assert portal.reservations[state["reservation_id"]]["status"] == "active"
    # Reachable through the hub's proxy.
    api = httpx.get(f"{hub.url}/user/alice/api", headers={"Authorization": f"token {hub.token}"},
                    timeout=10)
    assert api.status_code == 200

    hub.stop_server("alice")
    assert str(jobs.get_job_info(state["job_id"]).status) == "STOPPED"
    assert portal.reservations[state["reservation_id"]]["status"] == "released"
    # Stopping again is harmless.
    again = hub.api("DELETE", hub.server_path("alice"))
    assert again.status_code in (204, 400, 404), again.text
