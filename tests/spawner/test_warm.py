"""Warm pools end to end: a real hub with RaySpawner, the real Ray node ``n1`` and its
pool job, the marketplace contract. One story, so the pool is started once:

1. the first GPU spawn on ``n1`` starts cold and starts the node's pool;
2. a waiting slot holds nothing of any user (its process environment, read as root);
3. the next spawn claims a slot: it runs as its customer, sees exactly the reserved
   GPU indices, holds only its own token, and has no Ray job of its own, yet Ray counts
   its GPU as used on the node (read by a driver of the cluster, as a scheduler would);
4. the pool refuses a forged and a replayed request;
5. with the free slot stolen (claimed by someone else first), the pool starts a
   server for the next spawn as its claim comes (no Ray job) on its one
   reservation: activated once, never a second reservation;
6. a hub restart keeps the claimed server and the unclaimed slots: a new spawn claims
   one through the new hub; while both warm servers run Ray counts both GPUs used;
   stopping the servers ends their processes, releases their GPUs in the marketplace
   and in Ray's count, and the pool has a slot waiting again.

Then a second node ``nw`` gets a pool (and a cold server) and is killed (SIGKILL,
every process): its pool is out of the hub's registry within the dead-node bound
(``dead_after``, 8 s here) with no claim there to notice, the next spawn goes to
``n1``'s pool (or cold), never to the dead one, billed once, and the cold server
that died with the node is gone and its GPU released.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from gpuportal.provider import isolation, warmclaim

from .conftest import Hub, make_hub
from .contract_portal import ContractPortal, Node
from .kernel import run_code
from .raynodes import RayNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GPU = {"profile": "gpu", "gpu_count": 1}


@pytest.fixture(scope="module")
def warm_hub(
    tmp_path_factory: pytest.TempPathFactory, ray_nodes: RayNodes, portal: ContractPortal
) -> Iterator[Hub]:
    hub = make_hub(
        tmp_path_factory.mktemp("warm"),
        ray_nodes,
        portal,
        TEST_WARM_SECRET=secrets.token_hex(32),
        TEST_WARM_SLOTS="1",
        TEST_DEAD_AFTER="8",
    )
    hub.start()
    yield hub
    if hub.proc is None:
        hub.start()
    for user in hub.api("GET", "/users").json():
        for name in user.get("servers") or {}:
            hub.api("DELETE", hub.server_path(user["name"], name))
    time.sleep(1)
    # The pool job outlives the hub (as servers do): stop it, and the slots with it.
    for pool in pools(hub):
        httpx.post(
            f"{ray_nodes.jobs_url}/api/jobs/{pool['job_id']}/stop",
            headers=ray_nodes.headers,
            timeout=10,
        )
    hub.stop()


#: A driver of the test cluster that answers, per request, once Ray's count of one
#: node's available GPUs is what the test expects (or the time is up): what it saw.
PROBE = """
import json, sys, time
import ray
from ray._private.state import available_resources_per_node

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps({"connected": True}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    deadline = time.monotonic() + ask["timeout"]
    while True:
        seen = available_resources_per_node().get(ask["node"], {}).get("GPU", 0.0)
        if seen == ask["gpus"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(json.dumps({"available": seen}), flush=True)
"""


class RayGpuCount:
    """Ray's count of a node's available GPUs, read by a driver of the test cluster
    (one process for the whole test: connecting costs seconds on a loaded machine)."""

    def __init__(self, ray_nodes: RayNodes) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, f"127.0.0.1:{ray_nodes.gcs_port}"],
            env={**ray_nodes.env(), "RAY_USAGE_STATS_ENABLED": "0"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def available(self, ray_node_id: str, expect: float, timeout: float = 30.0) -> float:
        """The node's available GPUs once they are ``expect`` (or ``timeout`` is up)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        ask = {"node": ray_node_id, "gpus": expect, "timeout": timeout}
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "the Ray probe ended"
            if line.startswith('{"available"'):
                return float(json.loads(line)["available"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def pools(hub: Hub) -> list[dict[str, Any]]:
    reply = hub.api("GET", "/gpuportal/warm")
    assert reply.status_code == 200, reply.text
    return list(reply.json()["pools"])


def wait_slot(hub: Hub, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [p for p in pools(hub) if p["state"] == "ready" and (p.get("ready") or 0) >= 1]
        if ready:
            return ready[0]
        time.sleep(0.5)
    raise AssertionError(f"no warm slot in {timeout}s: {pools(hub)}\n{hub.log()[-3000:]}")


def slot_processes() -> list[psutil.Process]:
    """Python processes of warm slots (inside their sandboxes, seen from outside)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = proc.info["cmdline"] or []
        if "gpuportal.provider.warmslot" in cmd and "python" in (proc.info["name"] or ""):
            found.append(proc)
    return found


def server_of(account: str) -> psutil.Process:
    """The claimed slot that now runs as ``account`` (its /proc environ is still the
    waiting slot's: a claim changes the process's environment, not its exec record)."""
    for proc in slot_processes():
        try:
            if proc.username() == account:
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no warm server process for {account}")


def pool_request(
    ray_nodes: RayNodes, hub: Hub, address: str, job_id: str, op: str, fields: dict[str, Any]
) -> httpx.Response:
    key = warmclaim.pool_key(hub.env["TEST_WARM_SECRET"], job_id)
    body, headers = warmclaim.make_request(key, job_id, op, fields)
    return httpx.post(f"{address}/{op}", content=body, headers=headers, timeout=30)


@pytest.fixture
def ray_gpus(ray_nodes: RayNodes) -> Iterator[RayGpuCount]:
    probe = RayGpuCount(ray_nodes)  # connects while the test's first spawn runs
    yield probe
    probe.close()


def test_warm_pool_claim_fallback_restart_and_stop(
    warm_hub: Hub, ray_nodes: RayNodes, portal: ContractPortal, ray_gpus: RayGpuCount
) -> None:
    hub = warm_hub
    n1 = ray_nodes.ray_node_id("n1")
    assert n1
    # 1. Cold first: the node has no pool yet; the spawn starts one for the next.
    assert hub.spawn("wcold", options=GPU).status_code in (201, 202)
    hub.wait_ready("wcold")
    assert hub.state("wcold").get("job_id") and not hub.state("wcold").get("warm_slot")
    cold_token = server_env_token("wcold", hub)
    hub.stop_server("wcold")
    pool = wait_slot(hub)

    # 2. A waiting slot holds nothing of a user, the hub or the pool's key.
    waiting = slot_processes()
    assert waiting
    for proc in waiting:
        env = proc.environ()
        assert not [k for k in env if k.startswith(("JUPYTERHUB_", "GPUPORTAL_WARM_K", "RAY_"))]
        assert cold_token not in repr(env) and "hub-secret" not in repr(env)
        assert proc.uids().real == 0  # root until its claim, then its customer

    # 3. A warm spawn: claimed, no Ray job of its own, the reserved GPUs, its own account.
    assert hub.spawn("wwarm", options=GPU).status_code in (201, 202)
    hub.wait_ready("wwarm")
    state = hub.state("wwarm")
    assert state["warm_slot"] and state["warm_job_id"] == pool["job_id"]
    assert "job_id" not in state
    reservation = portal.reservations[state["reservation_id"]]
    assert reservation["status"] == "active"
    account = isolation.os_user_name("wwarm")
    server = server_of(account)
    assert server.uids().real == server.uids().effective != 0
    # Inside the server (a kernel inherits its environment), as the customer.
    out = run_code(
        f"{hub.url}/user/wwarm/",
        hub.token,
        "import os, json, pwd; e = dict(os.environ); print(json.dumps([e, "
        "pwd.getpwuid(os.getuid()).pw_name, os.getgroups()]))",
    )
    env, user_name, groups = json.loads(out)
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, reservation["gpu_indices"]))
    assert state["gpus"] == env["CUDA_VISIBLE_DEVICES"]
    assert user_name == account and groups in ([], [server.gids().real])
    assert env["HOME"].endswith(account) and env["USER"] == account
    assert env["JUPYTERHUB_USER"] == "wwarm" and "LEAKY_SECRET" not in env
    assert env["JUPYTERHUB_API_TOKEN"] != cold_token and cold_token not in out
    assert not [k for k in env if k.startswith(("RAY_", "GPUPORTAL_WARM"))]
    # Ray counts the warm server's GPU as used on n1 (2 GPUs), though it has no Ray job.
    assert ray_gpus.available(n1, 1) == 1

    # 4. Forged and replayed requests to the pool are refused.
    address = f"http://127.0.0.1:{pool_port(hub, pool['job_id'])}"
    forged_body, _ = warmclaim.make_request("not-the-key", pool["job_id"], "status")
    forged = httpx.post(
        f"{address}/status",
        content=forged_body,
        headers={warmclaim.SIGNATURE_HEADER: "0" * 64},
        timeout=10,
    )
    assert forged.status_code == 401
    key = warmclaim.pool_key(hub.env["TEST_WARM_SECRET"], pool["job_id"])
    body, headers = warmclaim.make_request(key, pool["job_id"], "status")
    assert httpx.post(f"{address}/status", content=body, headers=headers).status_code == 200
    replay = httpx.post(f"{address}/status", content=body, headers=headers)
    assert replay.status_code == 409

    # 5. The free slot is stolen first. A claim that does not say how long it may wait
    # is refused (409); the spawn's claim (it says) gets a slot started for it, or the
    # one refilling, raised to normal priority: no Ray job, one reservation, billed once.
    wait_slot(hub)
    thief = {"user": "thief", "token": "not-a-hub-token", "gpus": "", "env": {}, "args": []}
    stolen = pool_request(ray_nodes, hub, address, pool["job_id"], "claim", thief)
    assert stolen.status_code == 200, stolen.text
    assert stolen.json()["started"] is False
    impatient = pool_request(ray_nodes, hub, address, pool["job_id"], "claim", thief)
    assert impatient.status_code == 409, impatient.text
    activations = len([r for r in portal.requests if r[1].endswith("/activate")])
    assert hub.spawn("wfall", options=GPU).status_code in (201, 202)
    hub.wait_ready("wfall")
    fell = hub.state("wfall")
    assert fell.get("warm_slot") and fell["warm_job_id"] == pool["job_id"], fell
    assert "job_id" not in fell
    assert "wfall: Started a server on node n1 (none was waiting)" in hub.log()
    theirs = [r for r in portal.reservations.values() if r["user"] == "wfall"]
    assert [r["status"] for r in theirs] == ["active"]
    assert len([r for r in portal.requests if r[1].endswith("/activate")]) == activations + 1
    assert server_of(isolation.os_user_name("wfall")).uids().effective != 0
    pool_request(ray_nodes, hub, address, pool["job_id"], "stop", {"slot": stolen.json()["slot"]})
    hub.stop_server("wfall")

    # 6. A hub restart keeps the warm server and the waiting slot (claimable through the
    # new hub); stopping the server releases it, and a slot waits again.
    wait_slot(hub)
    hub.stop()
    hub.start()
    model = hub.server_model("wwarm")
    assert model is not None and model["ready"], model
    assert hub.state("wwarm") == state
    assert wait_slot(hub)["job_id"] == pool["job_id"]  # the same pool, adopted
    assert hub.spawn("wnext", options=GPU).status_code in (201, 202)
    hub.wait_ready("wnext")
    after = hub.state("wnext")
    assert after["warm_job_id"] == pool["job_id"] and after["warm_slot"] != state["warm_slot"]
    assert "job_id" not in after
    assert portal.reservations[after["reservation_id"]]["status"] == "active"
    assert ray_gpus.available(n1, 0) == 0  # both warm servers' GPUs, across the restart
    hub.stop_server("wnext")
    assert portal.reservations[after["reservation_id"]]["status"] == "released"
    hub.stop_server("wwarm")
    assert portal.reservations[state["reservation_id"]]["status"] == "released"
    assert not server.is_running()
    assert ray_gpus.available(n1, 2) == 2  # both freed in Ray's count too
    assert wait_slot(hub)["job_id"] == pool["job_id"]


def test_a_dead_node_takes_its_warm_slots_out(
    warm_hub: Hub, ray_nodes: RayNodes, portal: ContractPortal
) -> None:
    hub = warm_hub
    ray_nodes.add_gpu_node("nw", 1)
    ray_nodes.wait_alive(len(ray_nodes.procs))
    portal.nodes.append(
        Node(
            "nw",
            1,
            "A100-80GB",
            "warmdoom",
            1_000_000,
            ray_nodes.jobs_url,
            ray_token=ray_nodes.token,
        )
    )
    try:
        # A cold spawn on nw starts its pool; then nw has a slot waiting (and the cold
        # server keeps running: it dies with the node).
        assert hub.spawn("wnode", options={**GPU, "region": "warmdoom"}).status_code in (201, 202)
        hub.wait_ready("wnode")
        deadline = time.monotonic() + 120
        while not [p for p in pools(hub) if p["node_id"] == "nw" and (p.get("ready") or 0) >= 1]:
            assert time.monotonic() < deadline, f"no slot on nw: {pools(hub)}"
            time.sleep(0.5)
        doomed = next(p for p in pools(hub) if p["node_id"] == "nw")
        n1_pools = {p["job_id"] for p in pools(hub) if p["node_id"] == "n1"}

        # The machine dies; the marketplace stops offering it (its own dead-node rule).
        ray_nodes.kill_node("nw")
        portal.nodes[:] = [n for n in portal.nodes if n.node_id != "nw"]
        # The hub takes the pool out by itself, with no claim or server there to notice:
        # within dead_after (8 s) plus one check and this loop's slack on a loaded machine.
        deadline = time.monotonic() + 3 * 8
        while (row := next(p for p in pools(hub) if p["node_id"] == "nw"))["state"] != "failed":
            assert time.monotonic() < deadline, f"dead pool still offered: {pools(hub)}"
            time.sleep(0.5)
        assert row["job_id"] == doomed["job_id"] and row["why"], row
        assert "ready" not in row  # no slot counts for a pool that is out

        # The next spawn goes to n1's pool (or cold), never to the dead slot, billed once.
        activations = len([r for r in portal.requests if r[1].endswith("/activate")])
        assert hub.spawn("wafter", options=GPU).status_code in (201, 202)
        hub.wait_ready("wafter")
        state = hub.state("wafter")
        assert state.get("warm_job_id") in (n1_pools | {None}), state
        assert state.get("warm_job_id") != doomed["job_id"]
        theirs = [r for r in portal.reservations.values() if r["user"] == "wafter"]
        assert [(r["status"], r["node_id"]) for r in theirs] == [("active", "n1")]
        assert len([r for r in portal.requests if r[1].endswith("/activate")]) == activations + 1
        hub.stop_server("wafter")
        # The cold server that died with nw is gone, and its GPU released.
        hub.wait_gone("wnode")
        gone = [r for r in portal.reservations.values() if r["user"] == "wnode"]
        for _ in range(120):  # the stop that follows releases it (bounded, not timed)
            if [r["status"] for r in gone] == ["released"]:
                break
            time.sleep(0.5)
        assert [r["status"] for r in gone] == ["released"]
    finally:
        portal.nodes[:] = [n for n in portal.nodes if n.node_id != "nw"]


def pool_port(hub: Hub, job_id: str) -> int:
    """Where the pool listens, from the spawner state of a warm server."""
    for user in hub.api("GET", "/users").json():
        for name in user.get("servers") or {}:
            state = hub.state(user["name"], name)
            if state.get("warm_job_id") == job_id:
                return int(str(state["warm_url"]).rsplit(":", 1)[1])
    raise AssertionError("no warm server to learn the pool's address from")


def server_env_token(user: str, hub: Hub) -> str:
    """The hub token of a running cold server, read from its process (as root)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any("jupyterhub.singleuser" in part for part in cmd):
            try:
                env = proc.environ()
            except psutil.Error:
                continue
            if env.get("JUPYTERHUB_USER") == user:
                return env["JUPYTERHUB_API_TOKEN"]
    raise AssertionError(f"no server process for {user}")


def test_the_portals_health_shows_each_nodes_warm_slots(
    warm_hub: Hub, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The real portal app (in-process, its own SQLite) reads this real hub's warm
    pools with the portal's service token, which holds the read-only custom scope and
    not admin:servers, and its public health shows each node's slots, no job id; a
    token without the scope is refused with a sentence."""
    from fastapi.testclient import TestClient

    from gpuportal.hub.portal.app import create_app
    from gpuportal.hub.portal.cache import MemoryCache
    from gpuportal.hub.portal.context import Portal
    from gpuportal.hub.portal.hubapi import HubAPI
    from gpuportal.hub.settings import load_settings

    hub = warm_hub
    if not any(p["state"] == "ready" for p in pools(hub)):  # run alone: n1 gets its pool
        assert hub.spawn("whealth", options=GPU).status_code in (201, 202)
        hub.wait_ready("whealth")
        hub.stop_server("whealth")
    slot = wait_slot(hub)
    spawner = {"Authorization": f"token {hub.env['TEST_SPAWNER_TOKEN']}"}
    refused = httpx.get(f"{hub.url}/hub/api/gpuportal/warm", headers=spawner, timeout=30)
    assert refused.status_code == 403, refused.text
    assert "custom:gpuportal-warm:read" in refused.json()["message"]

    data = tmp_path_factory.mktemp("warm-portal")
    settings = load_settings(
        data_dir=data,
        db_url=f"sqlite:///{data / 'portal.sqlite'}",
        ray_dashboard_url="http://127.0.0.1:9",
    )
    token = hub.env["TEST_PORTAL_SERVICE_TOKEN"]
    portal_app = Portal(
        settings, cache=MemoryCache(), hub=HubAPI(f"{hub.url}/hub/api", token, timeout=30)
    )
    with TestClient(create_app(settings, portal_app, background=False)) as client:
        body = client.get("/services/portal/api/v1/health").json()
    warm = body["warm_pools"]
    assert warm["available"] is True, warm
    # The public health names a node by its first 12 characters, as spawn progress does.
    row = next(n for n in warm["nodes"] if n["node_id"] == slot["node_id"][:12])
    assert slot["node_id"] not in json.dumps(body) or len(slot["node_id"]) <= 12
    assert row["state"] == "ready" and (row["ready"] or 0) >= 1, warm
    assert isinstance(row["claimed"], int) and isinstance(row["starting"], int), warm
    assert slot["job_id"] not in json.dumps(body)
