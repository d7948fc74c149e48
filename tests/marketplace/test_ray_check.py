"""Ray's own node state, cross-checked against the marketplace.

The pure part reads state-API answers; the real part runs a local Ray cluster
(a head declaring ``gpuportal/node:n-alive`` and a worker declaring
``gpuportal/node:n-dead``, all on 127.0.0.1), removes the worker, and lets the
portal's housekeeping find out from Ray's dashboard.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from seed import Market
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db.marketplace_models import Node
from gpuportal.hub.market import nodes
from gpuportal.hub.market.marketplace import rules_of
from gpuportal.hub.market.raystatus import marketplace_node_states
from gpuportal.hub.portal import loops
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.portal.hubapi import HubAPI
from gpuportal.hub.settings import load_settings
from gpuportal.hub.timeutil import utcnow
from gpuportal.provider.ports import free_port


def ray_node(state: str, *node_ids: str) -> dict[str, Any]:
    resources = {"CPU": 1.0, **{f"gpuportal/node:{n}": 1.0 for n in node_ids}}
    return {"state": state, "resources_total": resources}


@pytest.mark.parametrize(
    ("listing", "states"),
    [
        ([], {}),
        ([ray_node("ALIVE", "a"), ray_node("DEAD", "b")], {"a": "ALIVE", "b": "DEAD"}),
        # A restarted node: its old Ray node is DEAD, the new one ALIVE; either order.
        ([ray_node("DEAD", "a"), ray_node("ALIVE", "a")], {"a": "ALIVE"}),
        ([ray_node("ALIVE", "a"), ray_node("DEAD", "a")], {"a": "ALIVE"}),
        ([{"state": "ALIVE", "resources_total": None}, {"state": "ALIVE"}], {}),
    ],
)
def test_marketplace_node_states(listing: list[dict[str, Any]], states: dict[str, str]) -> None:
    assert marketplace_node_states(listing) == states


# --- against a real local Ray cluster ----------------------------------------------------


@dataclass
class RayPair:
    jobs_url: str
    cluster: Any  # ray.cluster_utils.Cluster
    worker: Any  # the Ray node declaring n-dead


class NoHub(HubAPI):
    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1/hub/api", "service-token")


def ray_states(jobs_url: str) -> dict[str, str]:
    reply = httpx.get(f"{jobs_url}/api/v0/nodes", params={"detail": "1"}, timeout=10)
    return marketplace_node_states(reply.json()["data"]["result"]["result"])


def wait_for(jobs_url: str, node_id: str, state: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ray_states(jobs_url).get(node_id) == state:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"Ray never reported {node_id} {state}: {ray_states(jobs_url)}")


@pytest.fixture(scope="module")
def ray_pair() -> Iterator[RayPair]:
    """A Ray head (node ``n-alive``) and one worker (node ``n-dead``), both on 127.0.0.1.

    Ray's in-process test cluster, with its own temp dir so the machine-wide
    ``ray_current_cluster`` file of any other Ray is left alone.
    """
    from ray.cluster_utils import Cluster

    small = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 << 20}
    dashboard = free_port()
    with pytest.MonkeyPatch.context() as patch:
        temp = Path(tempfile.mkdtemp(prefix="gp-ray-", dir="/tmp"))  # short: Ray's socket paths
        (temp / "ray").mkdir()
        patch.setenv("RAY_TMPDIR", str(temp))
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **small,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                "temp_dir": str(temp / "ray"),
                "resources": {"gpuportal/node:n-alive": 1},
            },
        )
        try:
            worker = cluster.add_node(**small, resources={"gpuportal/node:n-dead": 1})
            jobs_url = f"http://127.0.0.1:{dashboard}"
            wait_for(jobs_url, "n-dead", "ALIVE")
            yield RayPair(jobs_url, cluster, worker)
        finally:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def statuses(portal: Portal) -> dict[str, tuple[str, str | None]]:
    with portal_db.transaction(portal.sessions) as session:
        return {
            n.node_id: (n.status, n.offline_reason)
            for n in session.scalars(select(Node).order_by(Node.node_id))
        }


@pytest.mark.ray
async def test_ray_dead_or_missing_nodes_go_offline_despite_heartbeats(
    ray_pair: RayPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        heartbeat_seconds=10,
        heartbeat_missed=3,
        provider_networks_allowed="127.0.0.0/8",  # these test clusters are on loopback
    )
    portal = Portal(settings, cache=MemoryCache(), hub=NoHub())
    portal_db.upgrade(portal.engine)
    await portal.start()
    market = Market(portal.sessions, rules_of(settings), {})
    for node_id in ("n-alive", "n-dead", "n-missing"):
        market.add_node("house", node_id, {"A100-80GB": 1}, jobs_url=ray_pair.jobs_url)
    silent = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    market.add_node("far", "n-far", {"A100-80GB": 1}, jobs_url=silent)
    caplog.set_level(logging.INFO)

    # Ray runs n-alive and n-dead; n-missing declares nothing in its cluster.
    assert await loops.check_ray(portal) == ["n-missing"]
    assert statuses(portal) == {
        "n-alive": ("online", None),
        "n-dead": ("online", None),
        "n-far": ("online", None),  # one missed check so far
        "n-missing": ("offline", "ray"),
    }
    assert (
        "node n-missing: Ray reports its resource gpuportal/node:n-missing missing from its "
        "cluster although heartbeats still arrive; offline" in caplog.messages
    )

    # The worker stops: Ray keeps it in its list, DEAD.
    ray_pair.cluster.remove_node(ray_pair.worker)
    wait_for(ray_pair.jobs_url, "n-dead", "DEAD")
    assert await loops.check_ray(portal) == ["n-dead"]
    assert statuses(portal)["n-dead"] == ("offline", "ray")
    assert (
        "node n-dead: Ray reports its resource gpuportal/node:n-dead on a DEAD Ray node "
        "although heartbeats still arrive; offline" in caplog.messages
    )
    # Its agent keeps sending heartbeats: that does not bring it back.
    with portal_db.transaction(portal.sessions) as session:
        dead = session.scalar(select(Node).where(Node.node_id == "n-dead"))
        assert dead is not None
        nodes.record_heartbeat(session, dead, [], utcnow())
    assert statuses(portal)["n-dead"] == ("offline", "ray")

    # The silent dashboard: logged each time, offline after K missed checks in a row.
    assert await loops.check_ray(portal) == ["n-far"]
    assert statuses(portal)["n-far"] == ("offline", "ray-unreachable")
    assert any(
        m.startswith("Ray dashboard of cluster") and "(3 missed checks in a row)" in m
        for m in caplog.messages
    )

    # Placement follows: only the node Ray runs is offered.
    assert {c.node_id for c in portal.capacity.candidates()} == {"n-alive"}

    # A node the cross-check took offline comes back once Ray reports it alive.
    with portal_db.transaction(portal.sessions) as session:
        alive = session.scalar(select(Node).where(Node.node_id == "n-alive"))
        assert alive is not None
        alive.status, alive.offline_reason = "offline", "ray"
    assert await loops.check_ray(portal) == ["n-alive"]
    assert statuses(portal)["n-alive"] == ("online", None)
    assert {c.node_id for c in portal.capacity.candidates()} == {"n-alive"}
    await portal.close()
