"""Each node's warm slots, as the hub knows them, for the portal's health and admin API.

The warm pools live in the hub (``spawners/warm.py``); the portal reads the hub's
view, ``GET /hub/api/gpuportal/warm``, with its own service token, which holds the
read-only custom scope :data:`READ_SCOPE` for it (``jupyterhub_config.py``, role
``portal-service``).

The health is public and must stay quick, so:

- the hub is asked with a short bound (:data:`HUB_TIMEOUT`), and its answer, or
  why there is none, is kept in the portal's cache for :data:`CACHE_SECONDS`
  (a hub that is down costs one bounded call per period, not one per health check);
- :func:`hub_view` never raises: a hub that is down, refuses the portal's token or
  runs without warm pools gives ``{"available": False, "reason": ...}``;
- :func:`public` keeps, per node, its id, its pool's state and the slot counts.
  The pool's Ray job id and why a pool is out (which may name the node's address)
  are for admins only (:func:`for_node`, the admin node list). The hub's view holds
  no user, token, key or claim id to begin with.
"""

from __future__ import annotations

import json
import logging
from contextlib import suppress
from typing import Any

from redis.exceptions import RedisError

from .context import Portal
from .hubapi import HubRefused, HubUnavailable

log = logging.getLogger(__name__)

#: The hub's read-only scope for its warm-pool view (``spawners.warm.READ_SCOPE``;
#: the portal never imports the spawner, a test keeps the two equal).
READ_SCOPE = "custom:gpuportal-warm:read"
#: How long one hub answer (or its absence) is reused, seconds.
CACHE_SECONDS = 5.0
#: The bound on asking the hub, seconds: the hub asks its pools at once, each within 3 s.
HUB_TIMEOUT = 4.0
CACHE_KEY = "hub:warm-pools"
#: The slot counts a ready pool reports (``ready`` slots are waiting for a claim).
COUNTS = ("ready", "starting", "claimed")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _row(pool: Any) -> dict[str, Any]:
    """One pool of the hub's answer, its fields checked (strings capped, counts ints)."""
    if not isinstance(pool, dict) or not isinstance(pool.get("node_id"), str):
        raise ValueError("a pool without a node id")
    row: dict[str, Any] = {
        "node_id": pool["node_id"][:64],
        "state": str(pool.get("state") or "unknown")[:32],
        **{name: _count(pool.get(name)) for name in COUNTS},
    }
    row["job_id"] = str(pool.get("job_id") or "")[:64]
    if pool.get("why"):
        row["why"] = str(pool["why"])[:300]
    return row


def _parse(answer: dict[str, Any]) -> dict[str, Any]:
    if not answer.get("enabled"):
        return {
            "available": False,
            "reason": "Warm pools are off on the hub (c.RaySpawner.warm_pools).",
        }
    pools = answer.get("pools")
    if not isinstance(pools, list):
        raise ValueError("no list of pools")
    return {"available": True, "pools": [_row(pool) for pool in pools]}


async def _ask_hub(portal: Portal) -> dict[str, Any]:
    try:
        return _parse(await portal.hub.warm_pools(timeout=HUB_TIMEOUT))
    except HubRefused:
        log.warning("the hub refused the portal's token its warm-pool view (%s)", READ_SCOPE)
        return {
            "available": False,
            "reason": f"The hub refused the portal's token: it needs the {READ_SCOPE} scope "
            "(role portal-service).",
        }
    except HubUnavailable as exc:
        log.info("no warm-pool view from the hub: %s", exc)
        return {"available": False, "reason": "The hub did not answer in time."}
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("the hub's warm-pool view was not understood: %s", exc)
        return {"available": False, "reason": "The hub's answer was not understood."}


async def hub_view(portal: Portal) -> dict[str, Any]:
    """The hub's warm pools with every field admins see, or why there are none;
    cached for :data:`CACHE_SECONDS` (the answer and its absence alike). Never raises."""
    try:
        cached = await portal.cache.get(CACHE_KEY)
    except (RedisError, OSError):
        cached = None  # the cache is down: the health says so, this asks the hub
    if cached is not None:
        view: dict[str, Any] = json.loads(cached)
        return view
    view = await _ask_hub(portal)
    with suppress(RedisError, OSError):  # the cache is down: the next check asks again
        await portal.cache.set(CACHE_KEY, json.dumps(view), ttl=CACHE_SECONDS)
    return view


#: How much of a node id the public health shows.
PUBLIC_ID_CHARS = 12


def public(view: dict[str, Any]) -> dict[str, Any]:
    """What anyone may read (the health): per node, its pool's state and slot counts."""
    if not view.get("available"):
        return {"available": False, "reason": view.get("reason", "")}
    # A node is named as spawn progress names it to customers (the first 12
    # characters): offers never show node ids, and the health is public.
    nodes = [
        {"node_id": str(pool.get("node_id", ""))[:PUBLIC_ID_CHARS]}
        | {k: pool.get(k) for k in ("state", *COUNTS)}
        for pool in view["pools"]
    ]
    return {"available": True, "nodes": sorted(nodes, key=lambda n: n["node_id"])}


def for_node(view: dict[str, Any], node_id: str) -> dict[str, Any] | None:
    """One node's pool as admins see it (its job id, state, counts, why it is out);
    None when the node has no pool; ``{"state": "unknown", "why": ...}`` when the hub
    gave no view."""
    if not view.get("available"):
        return {"state": "unknown", "why": view.get("reason", "")}
    for pool in view["pools"]:
        if pool["node_id"] == node_id:
            return {k: v for k, v in pool.items() if k != "node_id"}
    return None
