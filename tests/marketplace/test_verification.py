"""Verification a CPU cannot pass, through the real portal app (SQLite and PostgreSQL).

The portal times each challenge itself (issue → answer received) against a
deadline sized to the claimed model; the answer is bound to the registered GPU
UUIDs; an unsigned or oversized request costs the portal nothing; any change
to a claim makes the node a claim again.

There is no GPU on the machines that run this suite, so the real-GPU path is
tested with a hand-written arrival time (what a real H100 answer would take),
fed through the portal's clock seam. Nothing here was recorded on a GPU.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import Node, NodeChallenge
from gpuportal.hub.market import nodes
from gpuportal.hub.portal.api import providers as provider_routes
from gpuportal.hub.portal.context import Portal
from gpuportal.provider import signing, workload
from gpuportal.provider.identity import Identity

from ..fakes import Clock, FakeHub, PortalClientFactory

API = "/services/portal/api/v1"
USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-mallory": {"name": "mallory", "kind": "user", "admin": False, "groups": ["providers"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": []},
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
}
H100 = "H100-80GB"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def client(portal_client: PortalClientFactory) -> TestClient:
    # The fake providers' Ray dashboards are on loopback: the admin allows it here.
    # Customers get the sign-up credit at once, so a placed reservation is affordable.
    return portal_client(
        hub=FakeHub(USERS),
        provider_networks_allowed="127.0.0.0/8",
        signup_credit_policy="identity",
    )


@pytest.fixture
def portal(client: TestClient) -> Portal:
    return client.app.state.portal  # type: ignore[no-any-return]


def registration(
    identity: Identity,
    model: str,
    count: int,
    *,
    demo: bool,
    vram: int = 81920,
    jobs_url: str = "http://127.0.0.1:9",
) -> dict[str, Any]:
    return {
        "region": "eu-west",
        "price_per_gpu_hour": 500_000,
        "jobs_url": jobs_url,
        "node": {
            "node_id": identity.node_id,
            "public_key": identity.public_key,
            "demo": demo,
            "gpus": [
                {
                    "index": i,
                    "uuid": f"GPU-{identity.node_id}-{i}",
                    "model": model,
                    "vram_mib": vram,
                }
                for i in range(count)
            ],
        },
    }


def register(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    reply = client.post(f"{API}/providers/register", json=body, headers=auth("tok-mallory"))
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def node_call(
    client: TestClient,
    identity: Identity,
    what: str,
    body: dict[str, Any],
    clock: Clock | None = None,
    counter: int | None = None,
) -> Any:
    raw = json.dumps(body).encode()
    path = f"{API}/nodes/{identity.node_id}/{what}"
    headers = signing.sign(
        identity.key,
        "POST",
        path,
        identity.node_id,
        int(clock.now.timestamp()) if clock else int(time.time()),
        counter if counter is not None else identity.next_counter(),
        raw,
    )
    return client.post(path, content=raw, headers={**headers, "Content-Type": "application/json"})


def inventory(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "index": g["index"],
            "uuid": g["uuid"],
            "model": g["model"],
            "memory_total_mib": g["vram_mib"],
        }
        for g in body["node"]["gpus"]
    ]


def honest_demo_answer(challenge: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """What the agent of a demo node sends: the whole (small) chain, run on the CPU."""
    gpus = [(g["index"], g["uuid"]) for g in body["node"]["gpus"]]
    return {
        "nonce": challenge["nonce"],
        "inventory": inventory(body),
        "results": workload.run_challenge(challenge, gpus),
    }


def sampled_answer(
    portal: Portal, challenge: dict[str, Any], body: dict[str, Any]
) -> dict[str, Any]:
    """A correct answer to a full-size challenge, made cheaply by reading the portal's
    secret sample from its DB (no real node can): the groups the portal checks are
    right, the others zero. Computing all of them on this CPU would take hours,
    which is the point of the challenge."""
    with portal_db.transaction(portal.sessions) as session:
        ch = session.scalar(select(NodeChallenge).where(NodeChallenge.nonce == challenge["nonce"]))
        assert ch is not None and ch.sample is not None
        spec, sample = nodes.challenge_spec(ch), dict(ch.sample)
    right = workload.expected_groups(int(challenge["seed"]), spec, sample)
    width = workload.FINGERPRINT_BYTES
    results = []
    for g in body["node"]["gpus"]:
        prints = bytearray(spec.groups * width)
        for group, value in right[g["uuid"]].items():
            prints[group * width : (group + 1) * width] = value
        results.append(
            # The node's own claims about its device and timing, ignored by the portal.
            {"uuid": g["uuid"], "rows": workload.encode(bytes(prints)), "device": "cuda:0"}
            | {"seconds": 0.05}
        )
    return {"nonce": challenge["nonce"], "inventory": inventory(body), "results": results}


def measured_cpu_tflops() -> float:
    """This machine's numpy fp32 matrix-product speed: an honest CPU attacker's speed."""
    a = np.ones((1024, 1024), dtype=np.float32)
    a @ a  # warm up
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12


def offers(client: TestClient) -> list[dict[str, Any]]:
    return list(client.get(f"{API}/offers", headers=auth("tok-ann")).json())


def reserve_h100(client: TestClient) -> Any:
    return client.post(
        f"{API}/reservations",
        json={"gpu_count": 1, "gpu_model": H100, "user": "ann", "server_name": ""},
        headers=auth("tok-spawner"),
    )


def verification_of(portal: Portal, identity: Identity) -> tuple[str, bool]:
    with portal_db.transaction(portal.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        assert node is not None
        return node.verification, node.demo


# --- the challenge's sizes and deadlines (pure) -------------------------------------------


@pytest.mark.parametrize("count", [1, 8])
@pytest.mark.parametrize("model", [*workload.PEAK_FP16_TFLOPS, "Mystery-GPU-9000"])
def test_a_realistic_cpu_misses_every_models_deadline(model: str, count: int) -> None:
    spec = workload.spec_for(demo=False)
    deadline = workload.deadline_seconds([model] * count, spec)
    assert workload.cpu_seconds(count, spec) > deadline
    # The claimed GPUs, at a quarter of their peak, finish inside it.
    assert count * spec.work_per_gpu / (workload.peak_tflops(model) * 1e12 * 0.25) < deadline


def test_the_node_chain_matches_the_portal_reference() -> None:
    # More rows than one block of S, and not a multiple of it.
    spec = workload.Spec(rows=workload.ROW_BLOCK + 24, size=48, steps=3, demo=True)
    sample = {"GPU-a": [0, 511, 512, spec.groups - 1], "GPU-b": [7]}
    want = workload.expected_groups(42, spec, sample)
    width = workload.FINGERPRINT_BYTES
    for uuid, groups in sample.items():
        prints = workload.run_cpu(42, spec, uuid)
        assert len(prints) == spec.groups * width
        for group in groups:
            assert prints[group * width : (group + 1) * width] == want[uuid][group]
    # Bound to the UUID: another GPU's rows are other rows.
    assert workload.run_cpu(42, spec, "GPU-a") != workload.run_cpu(42, spec, "GPU-b")


def test_the_gpu_chain_is_exact_in_fp16() -> None:
    """The largest sum of one link stays where fp16 holds every integer (2^11)."""
    spec = workload.spec_for(demo=False)
    assert workload.SEED_WIDTH < 2**11 and spec.size < 2**24
    # Sums are of spec.size terms in -1..1; a sum beyond 2^11 is > 40 standard deviations.
    sigma = (spec.size * 4 / 9) ** 0.5
    assert 2**11 / sigma > 40


# --- a fake H100 node answering from a CPU --------------------------------------------------


@pytest.mark.parametrize(
    ("answered_by", "passed"),
    [
        ("this machine's CPU, measured", False),
        ("the documented realistic CPU", False),
        # Hand-written, not recorded: no GPU here. An H100 runs the 35 TFLOP chain in
        # about 0.05 s; with drawing and hashing the rows, 4 GPUs answer in about 4 s.
        ("a real H100 (hand-written timing)", True),
    ],
)
def test_a_fake_h100_answering_from_a_cpu_is_never_placed(
    portal: Portal, client: TestClient, clock: Clock, tmp_path: Path, answered_by: str, passed: bool
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, H100, 4, demo=False)
    challenge = register(client, body)["challenge"]
    assert (challenge["rows"], challenge["size"], challenge["steps"], challenge["demo"]) == (
        131072,
        2048,
        32,
        False,
    )
    assert "sample" not in challenge  # the groups the portal checks stay secret
    spec = workload.spec_for(demo=False)
    allowed = workload.deadline_seconds([H100] * 4, spec)
    assert datetime.fromisoformat(challenge["deadline"]) == clock.now + timedelta(seconds=allowed)

    answer = sampled_answer(portal, challenge, body)  # right where the portal looks
    took = {
        "this machine's CPU, measured": workload.cpu_seconds(4, spec, measured_cpu_tflops()),
        "the documented realistic CPU": workload.cpu_seconds(4, spec),
        "a real H100 (hand-written timing)": 4.0,
    }[answered_by]
    clock.advance(took)
    verdict = node_call(client, identity, "verification", answer, clock).json()
    assert verdict["passed"] is passed, verdict
    if not passed:
        assert verdict["detail"] == (
            f"the answer arrived {took:.1f}s after the challenge was issued; "
            f"the claimed GPUs answer within {allowed:.1f}s"
        )
    beat = {"gpus": [{"uuid": g["uuid"]} for g in body["node"]["gpus"]]}
    node_call(client, identity, "heartbeat", beat, clock)  # online either way
    placed = reserve_h100(client)
    h100_offers = [o for o in offers(client) if o["gpu_model"] == H100]
    if passed:
        assert placed.status_code == 201, placed.text
        assert [o["demo"] for o in h100_offers] == [False]
    else:
        assert placed.status_code == 409, placed.text
        assert h100_offers == []


def test_a_wrong_row_or_another_gpus_rows_fail(
    portal: Portal, client: TestClient, clock: Clock, tmp_path: Path
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, H100, 2, demo=False)
    challenge = register(client, body)["challenge"]
    answer = sampled_answer(portal, challenge, body)
    # GPU 1 answers with GPU 0's rows (one GPU doing the work of two).
    answer["results"][1]["rows"] = answer["results"][0]["rows"]
    verdict = node_call(client, identity, "verification", answer, clock).json()
    assert (verdict["passed"], verdict["detail"]) == (
        False,
        "GPU 1: the workload result is wrong",
    )
    assert verification_of(portal, identity) == ("failed", False)


# --- claims ---------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["demo", "model", "count", "memory", "jobs_url"])
def test_any_change_to_a_claim_resets_verification(
    portal: Portal, client: TestClient, tmp_path: Path, change: str
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, H100, 2, demo=True)
    challenge = register(client, body)["challenge"]
    assert (challenge["rows"], challenge["size"], challenge["demo"]) == (256, 64, True)
    verdict = node_call(client, identity, "verification", honest_demo_answer(challenge, body))
    assert verdict.json()["passed"] is True, verdict.text
    node_call(
        client, identity, "heartbeat", {"gpus": [{"uuid": g["uuid"]} for g in body["node"]["gpus"]]}
    )
    # A demo node's GPUs are offered, and placed, only as demo.
    assert [o["demo"] for o in offers(client) if o["gpu_model"] == H100] == [True]
    assert verification_of(portal, identity) == ("verified", True)

    gpus = body["node"]["gpus"]
    if change == "demo":  # escaping demo status by flipping the flag
        body["node"]["demo"] = False
    elif change == "model":
        for g in gpus:
            g["model"] = "A100-80GB"
    elif change == "count":
        body["node"]["gpus"] = gpus[:1]
    elif change == "memory":
        gpus[0]["vram_mib"] = 40960
    else:
        body["jobs_url"] = "http://127.0.0.1:10"
    again = register(client, body)
    assert again["verification"] == "changed"
    assert verification_of(portal, identity)[0] == "changed"
    assert offers(client) == []
    if change == "demo":  # now it must pass the full-size GPU challenge
        assert (again["challenge"]["rows"], again["challenge"]["demo"]) == (131072, False)


def test_a_verified_node_is_challenged_again_at_random_and_silence_fails(
    portal: Portal, client: TestClient, clock: Clock, tmp_path: Path
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, "L4", 1, demo=True, vram=23034)
    challenge = register(client, body)["challenge"]
    answer = honest_demo_answer(challenge, body)
    assert node_call(client, identity, "verification", answer, clock).json()["passed"]
    interval = portal.settings.verification_interval_seconds
    with portal_db.transaction(portal.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        assert node is not None and node.next_challenge_at is not None
        due = (node.next_challenge_at - clock.now).total_seconds()
    assert interval * 0.25 - 1 <= due <= interval
    # Before it is due, heartbeats carry no challenge; after, they do.
    beat = {"gpus": [{"uuid": body["node"]["gpus"][0]["uuid"]}]}
    reply = node_call(client, identity, "heartbeat", beat, clock).json()
    assert reply["challenge"] is None
    clock.advance(due + 1)
    reply = node_call(client, identity, "heartbeat", beat, clock).json()
    assert reply["challenge"] is not None and reply["verification"] == "verified"
    assert [o["free_gpus"] for o in offers(client)] == [1]  # still listed while it runs
    # The node never answers: after the deadline it is not verified, and off offer.
    clock.advance(portal.settings.challenge_deadline_seconds + 1)
    with portal_db.transaction(portal.sessions) as session:
        assert nodes.lapse_challenges(
            session, nodes.NodeRules.from_settings(portal.settings), clock.now
        ) == [identity.node_id]
    assert verification_of(portal, identity)[0] == "failed"
    assert offers(client) == []


# --- cheap refusals -------------------------------------------------------------------------


def test_an_unsigned_verification_is_refused_before_the_work(
    portal: Portal, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    body = registration(identity, H100, 8, demo=False)
    challenge = register(client, body)["challenge"]
    work: list[int] = []
    monkeypatch.setattr(workload, "expected_groups", lambda *a: work.append(1) or {})
    answer = json.dumps({"nonce": challenge["nonce"], "inventory": inventory(body), "results": []})
    reply = client.post(
        f"{API}/nodes/{identity.node_id}/verification",
        content=answer,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 401
    assert reply.json()["error"]["message"].startswith("Node request rejected (unsigned)")
    assert work == []


def _push(
    portal: Portal, client: TestClient, path: str, chunks: int, declare: bool
) -> tuple[int, int]:
    """POST ``chunks`` x 64 KiB to the real app, counting the chunks it pulled."""
    pulled = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    headers = [(b"content-type", b"application/json")]
    if declare:
        headers.append((b"content-length", str(chunks * 65536).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8002),
    }
    asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    return status[0], pulled


@pytest.mark.parametrize("declare", [True, False])
@pytest.mark.parametrize("what", ["verification", "heartbeat"])
def test_an_oversized_body_is_refused_before_it_is_read(
    portal: Portal, client: TestClient, tmp_path: Path, what: str, declare: bool
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    register(client, registration(identity, "L4", 1, demo=True, vram=23034))
    chunks = 160  # 10 MiB
    status, pulled = _push(
        portal, client, f"{API}/nodes/{identity.node_id}/{what}", chunks, declare
    )
    assert status == 413
    cap = provider_routes.MAX_VERIFICATION_BODY if what == "verification" else 65536
    if declare:
        assert pulled == 0  # refused on its Content-Length alone
    else:
        assert pulled <= cap // 65536 + 1  # refused once the cap is passed


@pytest.mark.parametrize("counter", [2**70, 2**63, 0, -1])
def test_a_heartbeat_counter_out_of_range_is_a_4xx(
    client: TestClient, tmp_path: Path, counter: int
) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    register(client, registration(identity, "L4", 1, demo=True, vram=23034))
    reply = node_call(client, identity, "heartbeat", {"gpus": []}, counter=counter)
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["message"] == (
        f"Node request rejected (unsigned): the counter must be an integer from 1 to {2**63 - 1}."
    )


def test_huge_heartbeat_metrics_are_clamped(client: TestClient, tmp_path: Path) -> None:
    identity = Identity.create_or_load(tmp_path / "mallory")
    register(client, registration(identity, "L4", 1, demo=True, vram=23034))
    huge = {"uuid": "x", "memory_used_mib": 10**30, "temperature_c": 1e300, "power_w": "nan"}
    reply = node_call(client, identity, "heartbeat", {"gpus": [huge]})
    assert reply.status_code == 200, reply.text


def test_the_documented_deadlines_are_the_ones_used() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "providers.md").read_text()
    spec = workload.spec_for(demo=False)
    for model, peak in workload.PEAK_FP16_TFLOPS.items():
        row = (
            f"| {model} | {peak:.0f} | {workload.gpu_seconds(model, spec):.2f} | "
            f"{workload.deadline_seconds([model], spec):.1f} | "
            f"{workload.deadline_seconds([model] * 8, spec):.1f} |"
        )
        assert row in doc
    assert f"{spec.work_per_gpu / 1e12:.1f} TFLOP per GPU" in doc


def test_the_house_node_passes_its_demo_challenge_through_the_agent(
    portal: Portal, client: TestClient, tmp_path: Path
) -> None:
    """The embedded default without Ray: the control plane registers the house node
    (demo GPUs, loopback jobs_url), and the real provider agent verifies it over
    the portal's HTTP API, on this GPU-less machine."""
    from gpuportal.hub.stack.house import house_identity, register_house
    from gpuportal.hub.stack.localray import GpuPlan
    from gpuportal.provider.agent import Agent, inventory
    from gpuportal.provider.agent import Portal as AgentPortal

    plan = GpuPlan({"A100-80GB": 2}, True, "no NVML here")
    identity = house_identity(portal.settings, plan, "http://testserver")
    register_house(portal.settings, portal.engine, identity, "http://127.0.0.1:9", None)
    gpus, _driver = inventory(True, identity.state.demo_gpus, identity.node_id)
    agent_portal = AgentPortal("http://testserver", identity)
    agent_portal.client = client  # the agent's HTTP client, pointed at the app in-process
    agent = Agent(agent_portal, identity, gpus, True)
    verdict = agent.verify()
    assert (verdict["passed"], verdict["demo"]) == (True, True), verdict
    assert agent.heartbeat()["verification"] == "verified"
    assert [(o["gpu_model"], o["free_gpus"], o["demo"]) for o in offers(client)] == [
        ("A100-80GB", 2, True)
    ]
