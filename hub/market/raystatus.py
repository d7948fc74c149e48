"""Status of a Ray cluster, read over its dashboard HTTP API (the Jobs API server).

The portal is never a node or a driver of a provider's cluster; it only asks
the cluster's HTTP endpoint what it has. Demo GPUs carry the custom resource
``gpuportal/demo`` and are reported as such.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gpuportal.provider.raynode import auth_headers
from gpuportal.provider.rayresources import DEMO_RESOURCE, NODE_RESOURCE_PREFIX

ACCELERATOR_PREFIX = "accelerator_type:"
#: Most Ray nodes one state API answer lists (the API's default is 100).
NODES_LIMIT = 10_000


class RayUnreachable(Exception):
    """The cluster's dashboard did not answer, or answered something unreadable."""


def summarize_nodes(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Reduce the state API's node list to what health and offers need."""
    alive = [n for n in nodes if n.get("state") == "ALIVE"]
    gpus_total = 0
    demo_total = 0
    models: dict[str, int] = {}
    for node in alive:
        resources = node.get("resources_total") or {}
        gpus_total += int(resources.get("GPU", 0))
        demo_total += int(resources.get(DEMO_RESOURCE, 0))
        for name, amount in resources.items():
            if name.startswith(ACCELERATOR_PREFIX):
                model = name[len(ACCELERATOR_PREFIX) :]
                models[model] = models.get(model, 0) + int(amount)
    return {
        "nodes_alive": len(alive),
        "nodes_dead": len(nodes) - len(alive),
        "gpus": gpus_total,
        "gpu_models": models,
        "demo_gpus": demo_total,
        "demo": gpus_total > 0 and demo_total >= gpus_total,
    }


async def cluster_status(
    jobs_url: str, timeout: float = 5.0, token: str | None = None
) -> dict[str, Any]:
    """``{"status": "ok", ...summary}`` or ``{"status": "unreachable", "detail": ...}``.
    ``token``: the cluster's Ray token."""
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=auth_headers(token)) as client:
            version = (await client.get(f"{jobs_url}/api/version")).json()
            reply = await client.get(f"{jobs_url}/api/v0/nodes", params={"detail": "1"})
            reply.raise_for_status()
            nodes = reply.json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return {"status": "unreachable", "address": jobs_url, "detail": type(exc).__name__}
    return {
        "status": "ok",
        "address": jobs_url,
        "ray_version": version.get("ray_version"),
        **summarize_nodes(nodes),
    }


def marketplace_node_states(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """``{marketplace node id: "ALIVE" | "DEAD"}`` from the state API's node list.

    A marketplace node is the Ray node(s) declaring ``gpuportal/node:<id>``.
    A restarted node leaves its old Ray node behind as DEAD next to the new
    ALIVE one, so ALIVE wins.
    """
    states: dict[str, str] = {}
    for node in nodes:
        alive = node.get("state") == "ALIVE"
        for name in node.get("resources_total") or {}:
            if name.startswith(NODE_RESOURCE_PREFIX):
                node_id = name[len(NODE_RESOURCE_PREFIX) :]
                if alive or states.get(node_id) != "ALIVE":
                    states[node_id] = "ALIVE" if alive else "DEAD"
    return states


async def node_states(
    client: httpx.AsyncClient, jobs_url: str, timeout: float = 5.0, token: str | None = None
) -> dict[str, str]:
    """Ask one cluster which marketplace nodes its Ray runs; :class:`RayUnreachable` if it
    cannot say. Bounded by ``timeout`` seconds in all. ``token``: the cluster's Ray token."""
    try:
        reply = await asyncio.wait_for(
            client.get(
                f"{jobs_url.rstrip('/')}/api/v0/nodes",
                params={"detail": "1", "limit": str(NODES_LIMIT)},
                timeout=timeout,
                headers=auth_headers(token),
            ),
            timeout=timeout,
        )
        reply.raise_for_status()
        nodes = reply.json()["data"]["result"]["result"]
        return marketplace_node_states(list(nodes))
    except (httpx.HTTPError, ValueError, KeyError, TypeError, TimeoutError) as exc:
        raise RayUnreachable(f"{type(exc).__name__}: {str(exc)[:200]}") from None
