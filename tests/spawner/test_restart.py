"""A hub restart resumes running servers; a server that died while the hub was down
is cleaned up (job gone, reservation released) when the hub comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from .conftest import Hub, make_hub
from .contract_portal import ContractPortal
from .raynodes import RayNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def restart_hub(
    tmp_path_factory: pytest.TempPathFactory, ray_nodes: RayNodes, portal: ContractPortal
) -> Iterator[Hub]:
    hub = make_hub(tmp_path_factory.mktemp("restart"), ray_nodes, portal, TEST_ACTIVE_LIMIT="1")
    hub.start()
    yield hub
    if hub.proc is None:
        hub.start()
    for user in hub.api("GET", "/users").json():
        for name in user.get("servers") or {}:
            hub.api("DELETE", hub.server_path(user["name"], name))
    hub.stop()


def reachable(hub: Hub, user: str) -> int:
    return httpx.get(
        f"{hub.url}/user/{user}/api/status",
        headers={"Authorization": f"token {hub.token}"},
        timeout=10,
    ).status_code


def test_hub_restart_keeps_running_servers(
    restart_hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    hub = restart_hub
    reply = hub.spawn("rita", options={"profile": "gpu", "gpu_count": 1})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("rita")
    before = hub.state("rita")
    # active_server_limit=1: a second server is refused, not started.
    refused = hub.spawn("sam", options={"profile": "cpu"})
    assert refused.status_code == 429, refused.text

    hub.stop()
    jobs = JobSubmissionClient(ray_nodes.jobs_url, headers=ray_nodes.headers)
    assert str(jobs.get_job_info(before["job_id"]).status) == "RUNNING"
    hub.start()
    model = hub.server_model("rita")
    assert model is not None and model["ready"], model
    assert hub.state("rita") == before
    assert reachable(hub, "rita") == 200
    assert portal.reservations[before["reservation_id"]]["status"] == "active"

    # The server dies while the hub is down: the hub notices at start and cleans up.
    hub.stop()
    jobs.stop_job(before["job_id"])
    for _ in range(60):
        if str(jobs.get_job_info(before["job_id"]).status) == "STOPPED":
            break
        time.sleep(0.5)
    hub.start()
    hub.wait_gone("rita")
    assert portal.reservations[before["reservation_id"]]["status"] == "released"
