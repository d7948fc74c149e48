"""Failing starts, timeouts, contention, limits, hostile names and node death."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from .conftest import Hub
from .contract_portal import ContractPortal, Node
from .raynodes import RayNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def live_jobs(ray_nodes: RayNodes, user: str) -> list[str]:
    jobs = JobSubmissionClient(ray_nodes.jobs_url, headers=ray_nodes.headers).list_jobs()
    return [
        str(j.submission_id)
        for j in jobs
        if (j.metadata or {}).get("gpuportal_user") == user
        and str(j.status) in ("PENDING", "RUNNING")
    ]


def live_reservations(portal: ContractPortal, user: str) -> list[dict[str, object]]:
    return [r for r in portal.live() if r["user"] == user]


def test_failing_start_leaves_no_job_and_no_reservation(
    hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    reply = hub.spawn("fay", options={"profile": "broken"})
    assert reply.status_code == 500, reply.text
    assert "exited before it was ready" in reply.json()["message"]
    assert "Traceback" not in reply.text
    assert hub.server_model("fay") is None
    assert live_jobs(ray_nodes, "fay") == []
    assert live_reservations(portal, "fay") == []
    assert any(r["user"] == "fay" for r in portal.reservations.values())  # it did reserve


def test_start_timeout_leaves_no_job_and_no_reservation(
    hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    reply = hub.spawn("tim", options={"profile": "never"})
    assert reply.status_code >= 400, reply.text
    assert hub.server_model("tim") is None
    assert live_jobs(ray_nodes, "tim") == []
    assert live_reservations(portal, "tim") == []
    assert any(r["user"] == "tim" for r in portal.reservations.values())
    assert "failed to start in 6 seconds" in hub.log()


def test_concurrent_spawns_for_the_last_gpu(
    hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    gpu = {"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1}
    first = hub.spawn("holder", options=gpu)
    assert first.status_code in (201, 202), first.text
    hub.wait_ready("holder")
    racers = ["racer1", "racer2", "racer3"]
    for name in racers:
        hub.api("POST", f"/users/{name}")
    with ThreadPoolExecutor(len(racers)) as pool:
        replies = list(pool.map(lambda n: hub.spawn(n, options=gpu), racers))
    codes = sorted(r.status_code for r in replies)
    won = [n for n, r in zip(racers, replies, strict=True) if r.status_code in (201, 202)]
    assert len(won) == 1, [(r.status_code, r.text) for r in replies]
    for reply in replies:
        if reply.status_code not in (201, 202):
            assert reply.status_code == 409, codes
            assert "No 1x A100-80GB free" in reply.json()["message"]
    hub.wait_ready(won[0])
    assert {r["user"] for r in portal.live()} >= {"holder", won[0]}
    assert len([r for r in portal.live() if r["node_id"] == "n1"]) == 2
    for name in ("holder", won[0]):
        hub.stop_server(name)


def test_concurrent_spawn_limit(hub: Hub) -> None:
    """TEST_SPAWN_LIMIT=3: a fourth simultaneous spawn gets 429, not overload."""
    names = [f"limit{i}" for i in range(4)]
    for name in names:
        hub.api("POST", f"/users/{name}")
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda n: hub.spawn(n, options={"profile": "cpu"}), names))
    codes = [r.status_code for r in replies]
    assert 429 in codes, codes
    assert all(c in (201, 202, 429) for c in codes), [r.text for r in replies]
    for name, reply in zip(names, replies, strict=True):
        if reply.status_code in (201, 202):
            hub.wait_ready(name)
            hub.stop_server(name)


def test_hostile_names_get_distinct_jobs(hub: Hub) -> None:
    # JupyterHub 6 server names are ASCII slugs; user names may be any unicode.
    cases = [("a-b", ""), ("a", "b"), ("ünï-çødé", "srv")]
    for user, _ in cases:
        hub.api("POST", f"/users/{httpx.URL(path=user).raw_path.decode()}")
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda c: hub.spawn(c[0], c[1], {"profile": "cpu"}), cases))
    assert all(r.status_code in (201, 202) for r in replies), [r.text for r in replies]
    job_ids = []
    for user, server in cases:
        hub.wait_ready(user, server)
        job_ids.append(hub.state(user, server)["job_id"])
    prefixes = {j.rsplit("--", 1)[0] for j in job_ids}
    assert len(prefixes) == len(cases), job_ids
    # Each reaches its own server only.
    for user, server in cases:
        base = f"{hub.url}/user/{httpx.URL(path=user).raw_path.decode()}/"
        if server:
            base += f"{httpx.URL(path=server).raw_path.decode()}/"
        reply = httpx.get(
            f"{base}api/status", headers={"Authorization": f"token {hub.token}"}, timeout=10
        )
        assert reply.status_code == 200, (user, server, reply.status_code)
    for user, server in cases:
        hub.stop_server(user, server)


def test_node_death_is_noticed_and_the_reservation_released(
    hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    """TEST_DEAD_AFTER=8: the hub notices within its bound (no timing asserted here)."""
    ray_nodes.add_gpu_node("n2", 1)
    ray_nodes.wait_alive(3)
    portal.nodes.append(
        Node(
            "n2", 1, "A100-80GB", "doomed", 1_000_000, ray_nodes.jobs_url, ray_token=ray_nodes.token
        )
    )
    try:
        reply = hub.spawn("nora", options={"profile": "gpu", "region": "doomed"})
        assert reply.status_code in (201, 202), reply.text
        hub.wait_ready("nora")
        state = hub.state("nora")
        assert portal.reservations[state["reservation_id"]]["node_id"] == "n2"
        ray_nodes.kill_node("n2")
        hub.wait_gone("nora", timeout=90)
        routes = hub.api("GET", "/proxy").json()
        assert not any(path.startswith("/user/nora") for path in routes), routes
        # The stop that follows releases the GPUs (a bounded wait; no timing asserted).
        for _ in range(120):
            if portal.reservations[state["reservation_id"]]["status"] == "released":
                break
            time.sleep(0.5)
        assert portal.reservations[state["reservation_id"]]["status"] == "released"
        log = hub.log()
        assert "nora: node" in log or f"nora: job {state['job_id']} is FAILED" in log
    finally:
        portal.nodes[:] = [n for n in portal.nodes if n.node_id != "n2"]
