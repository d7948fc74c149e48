"""Node trust on the real portal DB (SQLite and PostgreSQL): signed requests,
verification results, GPU changes, liveness and reliability."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import HeartbeatRollup, Node, NodeChallenge
from gpuportal.hub.market import marketplace, nodes
from gpuportal.hub.market.marketplace import NoCapacity
from gpuportal.hub.market.placement import Request
from gpuportal.hub.market.providers import GpuClaim, register_node, upsert_cluster, upsert_provider
from gpuportal.hub.timeutil import utcnow
from gpuportal.provider import signing, workload
from gpuportal.provider.identity import Identity

from .conftest import Market

PATH = "/services/portal/api/v1/nodes/{}/heartbeat"
RULES = nodes.NodeRules(heartbeat_seconds=10, heartbeat_missed=3)


def join(
    market: Market,
    tmp_path: Path,
    name: str = "acme",
    demo: bool = True,
    model: str = "L4",
    count: int = 2,
) -> Identity:
    """A node with a real key, registered (unverified) like the join endpoint does."""
    identity = Identity.create_or_load(tmp_path / name)
    claims = [GpuClaim(i, f"GPU-{name}-{i}", model, 23034) for i in range(count)]
    with portal_db.transaction(market.sessions) as session:
        from gpuportal.hub.db import accounts

        account = accounts.upsert_account(session, {"name": name, "groups": ["providers"]})
        provider = upsert_provider(
            session, account.id, display_name=name, region="eu-west", price=500_000
        )
        cluster = upsert_cluster(session, provider, name="c", jobs_url="http://127.0.0.1:1")
        register_node(
            session,
            cluster,
            identity.node_id,
            claims,
            demo=demo,
            reliability_start=0.9,
            public_key=identity.public_key,
        )
    return identity


def signed(
    identity: Identity,
    body: bytes,
    *,
    node_id: str | None = None,
    timestamp: int | None = None,
    counter: int | None = None,
    key: Ed25519PrivateKey | None = None,
) -> dict[str, str]:
    return signing.sign(
        key or identity.key,
        "POST",
        PATH.format(identity.node_id),
        node_id or identity.node_id,
        timestamp or int(time.time()),
        counter or identity.next_counter(),
        body,
    )


def authenticate(
    market: Market,
    identity: Identity,
    headers: dict[str, str],
    body: bytes,
    path_node: str | None = None,
) -> Node:
    with portal_db.transaction(market.sessions) as session:
        return nodes.authenticate(
            session,
            headers,
            "POST",
            PATH.format(identity.node_id),
            body,
            path_node or identity.node_id,
            utcnow(),
            60,
        )


def test_the_key_file_is_private(tmp_path: Path) -> None:
    identity = Identity.create_or_load(tmp_path / "node")
    assert (tmp_path / "node" / "node.key").stat().st_mode & 0o777 == 0o600
    assert Identity.load(tmp_path / "node").public_key == identity.public_key
    assert identity.node_id == signing.node_id_for(identity.public_key)
    counters = [identity.next_counter() for _ in range(100)]
    assert counters == sorted(set(counters))


def test_a_signed_request_passes_once(market: Market, tmp_path: Path) -> None:
    identity = join(market, tmp_path)
    body = b'{"gpus": []}'
    headers = signed(identity, body)
    assert authenticate(market, identity, headers, body).node_id == identity.node_id
    with pytest.raises(nodes.NodeAuthError) as replay:
        authenticate(market, identity, headers, body)
    assert replay.value.reason == "replayed"


@pytest.mark.parametrize(
    "attack", ["unsigned", "forged", "wrong-node", "stale", "replayed", "unknown", "other-key"]
)
def test_bad_requests_are_rejected(market: Market, tmp_path: Path, attack: str) -> None:
    identity = join(market, tmp_path)
    other = join(market, tmp_path, "beta")
    body = b'{"gpus": []}'
    path_node = None
    expected = attack
    if attack == "unsigned":
        headers: dict[str, str] = {}
    elif attack == "forged":  # a valid signature, over another body
        headers = signed(identity, b'{"gpus": [{"uuid": "x"}]}')
    elif attack == "wrong-node":  # beta's valid request sent to acme's endpoint
        path_node = identity.node_id
        headers = signing.sign(
            other.key,
            "POST",
            PATH.format(identity.node_id),
            other.node_id,
            int(time.time()),
            other.next_counter(),
            body,
        )
    elif attack == "stale":
        headers = signed(identity, body, timestamp=int(time.time()) - 3600)
    elif attack == "replayed":
        headers = signed(identity, body, counter=5)
        authenticate(market, identity, signed(identity, body, counter=10), body)
    elif attack == "unknown":
        headers = signed(identity, body, node_id="n-0000000000000000")
        path_node = "n-0000000000000000"
    else:  # signed with a key that is not the node's
        headers, expected = signed(identity, body, key=Ed25519PrivateKey.generate()), "forged"
    with pytest.raises(nodes.NodeAuthError) as info:
        authenticate(market, identity, headers, body, path_node)
    assert info.value.reason == expected


def _challenge(market: Market, node_id: str) -> tuple[Node, NodeChallenge]:
    with portal_db.transaction(market.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == node_id))
        assert node is not None
        return node, nodes.issue_challenge(session, node, RULES)


def _verify(
    market: Market,
    node_id: str,
    inventory: list[dict],
    results: list[dict],
) -> dict:
    with portal_db.transaction(market.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == node_id))
        assert node is not None
        ch = session.scalar(
            select(NodeChallenge).where(
                NodeChallenge.node_id == node.id, NodeChallenge.status == "pending"
            )
        )
        assert ch is not None
        spec = nodes.challenge_spec(ch)
        want = workload.expected_groups(ch.seed, spec, dict(ch.sample or {}))
        failure = nodes.check_inventory(node, inventory) or nodes.check_results(
            node, ch, results, want
        )
        return nodes.record_verification(session, node, ch, failure, RULES)


def run(ch: NodeChallenge, count: int = 2) -> list[dict]:
    """The demo agent's answer: the small chain on the CPU, per GPU UUID."""
    gpus = [(i, f"GPU-acme-{i}") for i in range(count)]
    return workload.run_challenge(nodes.challenge_public(ch), gpus)


def demo_inventory(identity: Identity, count: int = 2, model: str = "L4") -> list[dict]:
    return [
        {"index": i, "uuid": f"GPU-acme-{i}", "model": model, "memory_total_mib": 23034}
        for i in range(count)
    ]


def test_demo_verification_makes_a_node_schedulable(market: Market, tmp_path: Path) -> None:
    identity = join(market, tmp_path)
    account = market.customer("ann")
    with pytest.raises(NoCapacity):  # a claim is not capacity
        marketplace.reserve(
            market.sessions,
            Request(1),
            account_id=account,
            user_name="ann",
            server_name="",
            rules=market.rules,
        )
    _node, ch = _challenge(market, identity.node_id)
    verdict = _verify(market, identity.node_id, demo_inventory(identity), run(ch))
    assert verdict == {
        "passed": True,
        "detail": "verified",
        "verification": "verified",
        "demo": True,
    }
    with portal_db.transaction(market.sessions) as session:  # heartbeat → online
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        nodes.record_heartbeat(
            session, node, [{"uuid": "GPU-acme-0"}, {"uuid": "GPU-acme-1"}], utcnow()
        )
    answer, _ = marketplace.reserve(
        market.sessions,
        Request(1),
        account_id=account,
        user_name="ann",
        server_name="",
        rules=market.rules,
    )
    assert answer["node_id"] == identity.node_id and answer["demo"] is True


@pytest.mark.parametrize(
    ("tamper", "detail"),
    [
        ("rows", "GPU 0: the workload result is wrong"),
        ("uuid", "GPU 1: UUID GPU-fake differs from the registered GPU-acme-1"),
        ("model", "GPU 0: model 'H100-80GB' differs from the registered 'L4'"),
        ("count", "the node reports GPUs [0] but registered [0, 1]"),
        ("missing", "GPU 1: no workload result for GPU-acme-1"),
        ("short", "GPU 0: the result is not 32 group fingerprints"),
    ],
)
def test_failed_verification_is_recorded(
    market: Market, tmp_path: Path, tamper: str, detail: str
) -> None:
    identity = join(market, tmp_path)
    _node, ch = _challenge(market, identity.node_id)
    inventory = demo_inventory(identity)
    results = run(ch)
    if tamper == "rows":  # every row wrong (each fingerprint flipped)
        spec = nodes.challenge_spec(ch)
        raw = bytes(b ^ 0xFF for b in workload.decode(results[0]["rows"], spec) or b"")
        results[0]["rows"] = workload.encode(raw)
    elif tamper == "short":
        results[0]["rows"] = results[0]["rows"][:-8]
    elif tamper == "uuid":
        inventory[1]["uuid"] = "GPU-fake"
    elif tamper == "model":
        inventory[0]["model"] = "H100-80GB"
    elif tamper == "count":
        inventory = inventory[:1]
    else:
        results = results[:1]
    verdict = _verify(market, identity.node_id, inventory, results)
    assert verdict["passed"] is False
    assert verdict["detail"] == detail
    with portal_db.transaction(market.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        assert node is not None
        assert (node.verification, node.failed_verifications) == ("failed", 1)
        assert node.reliability == pytest.approx(0.8)


def test_changed_gpus_make_a_node_unschedulable(market: Market, tmp_path: Path) -> None:
    identity = join(market, tmp_path)
    _node, ch = _challenge(market, identity.node_id)
    assert _verify(market, identity.node_id, demo_inventory(identity), run(ch))["passed"]
    with portal_db.transaction(market.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        assert node is not None
        nodes.record_heartbeat(
            session, node, [{"uuid": "GPU-acme-0"}, {"uuid": "GPU-swap"}], utcnow()
        )
        assert node.verification == "changed"
        assert nodes.due_challenge(session, node, RULES) is not None
    with pytest.raises(NoCapacity):
        marketplace.reserve(
            market.sessions,
            Request(1),
            account_id=market.customer("ann"),
            user_name="ann",
            server_name="",
            rules=market.rules,
        )


def test_missed_heartbeats_make_a_node_offline(market: Market, tmp_path: Path) -> None:
    identity = join(market, tmp_path)
    now = utcnow()
    with portal_db.transaction(market.sessions) as session:
        node = session.scalar(select(Node).where(Node.node_id == identity.node_id))
        assert node is not None
        nodes.record_heartbeat(
            session,
            node,
            [
                {
                    "uuid": "GPU-acme-0",
                    "utilization_pct": 50,
                    "memory_used_mib": 100,
                    "temperature_c": 60,
                    "power_w": 70.5,
                }
            ],
            now,
        )
        assert node.status == "online"
        # Within K intervals: still online. After: offline.
        assert nodes.mark_offline(session, RULES, now + timedelta(seconds=29)) == []
        assert nodes.mark_offline(session, RULES, now + timedelta(seconds=31)) == [identity.node_id]
        rollup = session.scalar(select(HeartbeatRollup))
        assert rollup is not None
        assert (rollup.heartbeats, rollup.gpu_util_sum, rollup.temperature_c_max) == (1, 50, 60)
        assert rollup.minute == nodes.minute_of(now)


@pytest.mark.parametrize(
    ("uptime", "failed_starts", "failed_verifications", "score"),
    [
        (None, 0, 0, 0.9),
        (1.0, 0, 0, 1.0),
        (0.99, 2, 0, 0.89),
        (0.95, 0, 1, 0.85),
        (0.3, 10, 10, 0.0),
    ],
)
def test_reliability_formula(
    uptime: float | None, failed_starts: int, failed_verifications: int, score: float
) -> None:
    node = Node(failed_starts=failed_starts, failed_verifications=failed_verifications)
    assert nodes.score(node, uptime, 0.9) == pytest.approx(score)


def test_signing_covers_the_path(tmp_path: Path) -> None:
    identity = Identity.create_or_load(tmp_path / "n")
    body = json.dumps({"gpus": []}).encode()
    headers = identity.sign("POST", "/services/portal/api/v1/nodes/x/heartbeat", body)
    node_id, ts, counter, sig = signing.read_headers(headers)
    signing.verify(
        identity.public_key, "POST", "/api/v1/nodes/x/heartbeat", node_id, ts, counter, body, sig
    )
    with pytest.raises(signing.BadSignature):
        signing.verify(
            identity.public_key,
            "POST",
            "/api/v1/nodes/x/verification",
            node_id,
            ts,
            counter,
            body,
            sig,
        )
