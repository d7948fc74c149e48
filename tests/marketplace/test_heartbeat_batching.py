"""Batched heartbeats through the real portal app, with real Redis (SQLite and PostgreSQL).

A routine heartbeat is accepted without SQL and written with the next flush; a
portal that dies mid-batch loses at most that batch's rollups, never a node's
status, and counts nothing twice; a replayed heartbeat is refused after a
restart; a silent node goes offline from Redis's last-seen set and comes back
through the direct path; Redis down is a 503 with a sentence.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import HeartbeatRollup, Node, NodeChallenge
from gpuportal.hub.market import heartbeats as batching
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.portal.heartbeats import Heartbeats, Liveness
from gpuportal.provider import signing
from gpuportal.provider.identity import Identity

from ..fakes import Clock, FakeHub, PortalClientFactory
from .test_verification import API, USERS, register, registration

pytestmark = pytest.mark.usefixtures("redis_url")
#: Rules that need no second backend run on SQLite only (the flush's SQL, which
#: differs by backend, runs on both in the mid-batch test).
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class Killed(Exception):
    """The portal process dies here."""


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own, removed afterwards."""
    import redis

    name = f"test-hb-{secrets.token_hex(4)}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def start(portal_client: PortalClientFactory, redis_url: str, prefix: str) -> TestClient:
    client = portal_client(
        hub=FakeHub(USERS),
        provider_networks_allowed="127.0.0.0/8",
        redis_url=redis_url,
        heartbeat_batch_seconds=2,
    )
    portal = portal_of(client)
    assert portal.heartbeats is not None
    # This test's own keys, so that no other test's last-seen set is touched.
    portal.heartbeats.liveness = Liveness(redis_url, prefix=prefix)
    return client


def portal_of(client: TestClient) -> Portal:
    return client.app.state.portal  # type: ignore[no-any-return]


def batched(client: TestClient) -> Heartbeats:
    found = portal_of(client).heartbeats
    assert found is not None
    return found


def verified_node(client: TestClient, tmp_path: Path, clock: Clock) -> tuple[Identity, int]:
    """A registered node made online and verified (its challenge answered), and its pk."""
    identity = Identity.create_or_load(tmp_path / f"node-{secrets.token_hex(3)}")
    register(client, registration(identity, "H100-80GB", 2, demo=True))
    with portal_db.transaction(portal_of(client).sessions) as session:
        node = session.scalars(select(Node).where(Node.node_id == identity.node_id)).one()
        session.execute(update(NodeChallenge).values(status="passed"))
        node.status, node.verification = "online", "verified"
        node.verified_at = clock.now
        node.next_challenge_at = clock.now + timedelta(hours=1)
        return identity, node.id


def signed(
    identity: Identity, clock: Clock, util: float = 50.0, counter: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "gpus": [
                {"uuid": f"GPU-{identity.node_id}-{i}", "utilization_pct": util} for i in range(2)
            ]
        }
    ).encode()
    path = f"{API}/nodes/{identity.node_id}/heartbeat"
    headers = signing.sign(
        identity.key,
        "POST",
        path,
        identity.node_id,
        int(clock.now.timestamp()),
        counter if counter is not None else identity.next_counter(),
        body,
    )
    return body, {**headers, "Content-Type": "application/json"}


def send(client: TestClient, identity: Identity, raw: tuple[bytes, dict[str, str]]) -> Any:
    body, headers = raw
    return client.post(f"{API}/nodes/{identity.node_id}/heartbeat", content=body, headers=headers)


def beat(client: TestClient, identity: Identity, clock: Clock, util: float = 50.0) -> Any:
    reply = send(client, identity, signed(identity, clock, util))
    assert reply.status_code == 200, reply.text
    return reply.json()


def stored(client: TestClient, pk: int) -> tuple[str, int, float, int]:
    """(status, heartbeats in rollups, utilisation summed, counter) as the DB holds them."""
    with portal_db.transaction(portal_of(client).sessions) as session:
        node = session.get(Node, pk)
        assert node is not None
        beats, util = session.execute(
            select(
                func.coalesce(func.sum(HeartbeatRollup.heartbeats), 0),
                func.coalesce(func.sum(HeartbeatRollup.gpu_util_sum), 0.0),
            ).where(HeartbeatRollup.node_id == pk)
        ).one()
        return node.status, int(beats), float(util), node.heartbeat_counter


async def flush(client: TestClient) -> int:
    return await batched(client).flush()


def run_flush(client: TestClient) -> int:
    return int(client.portal.call(flush, client))  # type: ignore[union-attr]


@sqlite_only
def test_routine_heartbeats_skip_the_db_until_the_flush_writes_them_once(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
) -> None:
    client = start(portal_client, redis_url, prefix)
    identity, pk = verified_node(client, tmp_path, clock)
    first = beat(client, identity, clock, util=10.0)  # unseen: the direct path
    assert (first["status"], first["verification"], first["challenge"]) == (
        "online",
        "verified",
        None,
    )
    assert stored(client, pk)[:3] == ("online", 1, 20.0)
    direct_counter = stored(client, pk)[3]
    for _ in range(3):
        assert beat(client, identity, clock, util=30.0)["status"] == "online"
    # Accepted, but nothing written yet.
    assert stored(client, pk) == ("online", 1, 20.0, direct_counter)
    assert run_flush(client) == 1
    status, beats, util, counter = stored(client, pk)
    assert (status, beats, util) == ("online", 4, 20.0 + 3 * 60.0)
    assert counter > direct_counter
    assert run_flush(client) == 0  # an empty batch writes nothing more
    assert stored(client, pk)[1] == 4


@sqlite_only
def test_a_restarted_portal_reads_the_online_nodes_facts_and_batches_their_first_heartbeat(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
) -> None:
    client = start(portal_client, redis_url, prefix)
    identity, pk = verified_node(client, tmp_path, clock)
    beat(client, identity, clock)  # direct: online, in the last-seen set
    old = signed(identity, clock)
    assert send(client, identity, old).status_code == 200  # batched
    run_flush(client)

    # A new process (a restart, or another worker) reads the facts before any heartbeat.
    restarted = start(portal_client, redis_url, prefix)

    async def warm(client: TestClient) -> int:
        return await batched(client).warm()

    assert restarted.portal.call(warm, restarted) == 1  # type: ignore[union-attr]
    before = stored(restarted, pk)
    beat(restarted, identity, clock)  # routine at once: batched, nothing written yet
    assert stored(restarted, pk) == before
    # The floor is the DB's counter: with Redis's counter lost, a replay is still refused.
    liveness = batched(restarted).liveness
    liveness._sync.delete(liveness.counter_key(identity.node_id))
    replay = send(restarted, identity, old)
    assert replay.json()["error"]["code"] == "node_replayed", replay.text
    run_flush(restarted)
    assert stored(restarted, pk)[1] == before[1] + 1


def test_a_portal_killed_mid_batch_loses_no_status_counts_nothing_twice_and_refuses_replays(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = start(portal_client, redis_url, prefix)
    identity, pk = verified_node(client, tmp_path, clock)
    beat(client, identity, clock)  # direct: online, one rollup
    beat(client, identity, clock)
    run_flush(client)
    assert stored(client, pk)[:2] == ("online", 2)
    # Two more heartbeats in the batch, then the flush dies between its two
    # statements (the last-seen update ran, the rollups did not).
    beat(client, identity, clock)
    last = signed(identity, clock)
    assert send(client, identity, last).status_code == 200

    real_flush = batching.flush

    def dying(session: Any, batch: batching.Batch) -> None:
        def no_rollups(*_: Any, **__: Any) -> Any:
            raise Killed("portal killed mid-batch")

        monkeypatch.setattr(batching, "_upsert", no_rollups)
        real_flush(session, batch)

    monkeypatch.setattr(batching, "flush", dying)
    with pytest.raises(Killed):
        run_flush(client)
    monkeypatch.undo()
    # The whole batch rolled back: the status stands, nothing was half written.
    assert stored(client, pk)[:2] == ("online", 2)

    # The portal restarts (a new process: no facts, no batch; Redis and the DB remain).
    restarted = start(portal_client, redis_url, prefix)
    replay = send(restarted, identity, last)
    assert replay.status_code == 401, replay.text
    assert replay.json()["error"]["code"] == "node_replayed"
    assert stored(restarted, pk)[:2] == ("online", 2)
    beat(restarted, identity, clock)  # unseen by this process: the direct path
    beat(restarted, identity, clock)  # routine again: batched
    run_flush(restarted)
    run_flush(restarted)
    assert stored(restarted, pk)[:2] == ("online", 4)
    replay = send(restarted, identity, last)
    assert replay.json()["error"]["code"] == "node_replayed"


@sqlite_only
def test_a_silent_node_goes_offline_from_the_last_seen_set_and_comes_back_directly(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
) -> None:
    client = start(portal_client, redis_url, prefix)
    quiet, quiet_pk = verified_node(client, tmp_path, clock)
    loud, loud_pk = verified_node(client, tmp_path, clock)
    for identity in (quiet, loud):
        beat(client, identity, clock)
        beat(client, identity, clock)
    clock.advance(25)
    beat(client, loud, clock)
    clock.advance(10)  # quiet: 35 s silent (3 x 10 s missed); loud: 10 s

    async def detect() -> list[str]:
        return await batched(client).mark_offline(clock.now)

    assert client.portal.call(detect) == [quiet.node_id]  # type: ignore[union-attr]
    assert client.portal.call(detect) == []  # type: ignore[union-attr]  # O(changes): once
    assert stored(client, quiet_pk)[0] == "offline"
    assert stored(client, loud_pk)[0] == "online"
    # Its next heartbeat takes the direct path, which brings it back at once.
    assert beat(client, quiet, clock)["status"] == "online"
    assert stored(client, quiet_pk)[0] == "online"


@sqlite_only
def test_with_redis_down_a_heartbeat_is_refused_with_a_sentence_and_nothing_recorded(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
) -> None:
    client = start(portal_client, redis_url, prefix)
    unseen, unseen_pk = verified_node(client, tmp_path, clock)  # would take the direct path
    seen, seen_pk = verified_node(client, tmp_path, clock)  # would take the fast path
    beat(client, seen, clock)
    before = stored(client, unseen_pk), stored(client, seen_pk)
    batched(client).liveness = Liveness("redis://127.0.0.1:9/0", prefix=prefix)
    for identity in (unseen, seen):
        reply = send(client, identity, signed(identity, clock))
        assert reply.status_code == 503, reply.text
        assert "Redis" in reply.json()["error"]["message"]
    assert (stored(client, unseen_pk), stored(client, seen_pk)) == before
    assert len(batched(client).batch.take()) == 0


@sqlite_only
def test_the_fast_path_refuses_forged_stale_and_replayed_heartbeats(
    portal_client: PortalClientFactory,
    redis_url: str,
    prefix: str,
    clock: Clock,
    tmp_path: Path,
) -> None:
    client = start(portal_client, redis_url, prefix)
    identity, _ = verified_node(client, tmp_path, clock)
    beat(client, identity, clock)
    ok = signed(identity, clock)
    assert send(client, identity, ok).status_code == 200
    body, headers = signed(identity, clock)
    forged = body.replace(b"50.0", b"99.0")
    stale = signed(identity, clock)
    for attack, raw in (("replayed", ok), ("forged", (forged, headers)), ("stale", stale)):
        if attack == "stale":
            clock.advance(3600)
        reply = send(client, identity, raw)
        assert reply.status_code == 401, (attack, reply.text)
        assert reply.json()["error"]["code"] == f"node_{attack}"
    assert len(batched(client).batch.take()) == 1
