"""The extension against the real portal: the embedded stack (``gpuportal up``) with
its real hub, proxy and portal service, and a jupyter-server in this process whose
extension calls the portal over HTTP with a hub token carrying exactly the scopes
JupyterHub gives a server's ``JUPYTERHUB_API_TOKEN`` (the ``server`` role).

The stack's meter ticks hourly here, so nothing is charged during the test and the
numbers are exact; the extension's clock is set one minute after the allocation
started. The allocation is opened for a reservation of the house node's two GPUs at
the house price (a bill opens only for a reservation). No GPU is involved (NVML is
unavailable or unused here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from tornado.httpclient import HTTPClientError

from gpuportal.extensions.app import GpuPortalExtension

from ..portal_stack import Stack, hub_login, hub_token, start_stack, stop_stack

pytestmark = pytest.mark.slow
API = "/services/portal/api/v1"


@pytest.fixture(scope="module")
def hourly_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        Path(tmp_path_factory.mktemp("ext")) / "data",
        GPUPORTAL_DEMO_GPUS="2xA100-80GB",
        GPUPORTAL_METER_INTERVAL_SECONDS="3600",
        GPUPORTAL_SIGNUP_CREDITS="0",  # exact balances
        GPUPORTAL_HOUSE_PRICE="1234567",  # 1.234567 credits per GPU-hour: rounding shows
    )
    yield running
    stop_stack(running)


def server_token(client: httpx.Client, user: str) -> str:
    """A hub token with the ``server`` role's scopes, as a spawned server gets."""
    reply = client.post(
        f"/hub/api/users/{user}/tokens",
        json={
            "note": "as a server",
            "expires_in": 3600,
            "scopes": [f"access:servers!server={user}/", f"users:activity!user={user}"],
        },
        headers={"X-XSRFToken": client.cookies.get("_xsrf", path="/hub/") or ""},
    )
    reply.raise_for_status()
    return str(reply.json()["token"])


@pytest.fixture(scope="module")
def world(hourly_stack: Stack) -> Iterator[dict[str, Any]]:
    """meg with 10 credits and an open 2-GPU allocation; ned, another user."""
    base = hourly_stack.base_url
    admin = hub_login(base, "admin", hourly_stack.admin_password)
    meg = hub_login(base, "meg", "a-long-password")
    ned = hub_login(base, "ned", "a-long-password")
    admin_token = hub_token(admin, "admin")
    tokens = {
        "admin": admin_token,
        "meg": hub_token(meg, "meg"),
        "meg-server": server_token(meg, "meg"),
        "ned-server": server_token(ned, "ned"),
    }
    headers = {"Authorization": f"token {admin_token}"}
    # The portal knows meg once she has called it.
    assert (
        httpx.get(
            f"{base}{API}/balance", headers={"Authorization": f"token {tokens['meg']}"}, timeout=30
        ).status_code
        == 200
    )
    granted = httpx.post(
        f"{base}{API}/credits/grants",
        json={"user": "meg", "amount": 10_000_000, "idempotency_key": "ext-meg"},
        headers=headers,
        timeout=30,
    )
    assert granted.status_code in (200, 201), granted.text
    # A bill opens only for a reservation (issue 8): meg holds the house node's two GPUs.
    meg_headers = {"Authorization": f"token {tokens['meg']}"}
    for _ in range(240):  # bounded: the house node verifies within seconds
        offers = httpx.get(f"{base}{API}/offers", headers=meg_headers, timeout=30).json()
        if sum(o["free_gpus"] for o in offers) == 2:
            break
        time.sleep(0.5)
    reserved = httpx.post(
        f"{base}{API}/reservations",
        json={"user": "meg", "server_name": "", "gpu_count": 2},
        headers=meg_headers,
        timeout=30,
    )
    assert reserved.status_code == 201, reserved.text
    opened = httpx.post(
        f"{base}{API}/allocations",
        json={"reservation_id": reserved.json()["id"]},
        headers=headers,
        timeout=30,
    )
    assert opened.status_code in (200, 201), opened.text
    yield {"base": base, "tokens": tokens, "allocation": opened.json()}
    for client in (admin, meg, ned):
        client.close()


def portal_config(world: dict[str, Any], token: str) -> dict[str, Any]:
    return {
        "portal_url": f"{world['base']}/services/portal/",
        "api_token": world["tokens"][token],
        "hub_user": "meg",
        "server_name": "",
        "portal_timeout_seconds": 10.0,
        "portal_cache_seconds": 0.0,
        "idle_timeout_seconds": 0,
    }


def ext_of(serverapp: Any) -> GpuPortalExtension:
    for point in serverapp.extension_manager.extension_points.values():
        if isinstance(point.app, GpuPortalExtension):
            return point.app
    raise AssertionError("the gpuportal extension is not loaded")


@pytest.fixture
def jp_server_config(world: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    token = getattr(request, "param", "meg-server")
    return {
        "ServerApp": {"jpserver_extensions": {"gpuportal.extensions": True}},
        "GpuPortalExtension": portal_config(world, token),
    }


def test_usage_shows_the_portals_numbers_exactly(
    world: dict[str, Any], jp_serverapp: Any, jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    started = datetime.fromisoformat(world["allocation"]["started_at"])
    ext_of(jp_serverapp).clock = lambda: started + timedelta(seconds=60)
    reply = jp_asyncio_loop.run_until_complete(jp_fetch("api", "gpuportal", "usage"))
    body = json.loads(reply.body)
    assert body["portal"]["reachable"] is True and body["portal"]["error"] is None
    alloc = world["allocation"]
    assert body["allocation"]["id"] == alloc["id"]
    assert (body["allocation"]["gpu_count"], body["allocation"]["price_per_gpu_hour"]) == (
        2,
        1_234_567,
    )
    assert body["price_per_hour"] == 2_469_134
    # 60 s of 2 GPUs at 1.234567 credits/GPU-hour, by the portal's rounding rule.
    assert body["spent"] == 41_152
    assert body["charged"] == 0  # the hourly meter has charged nothing yet
    assert (body["balance"], body["currency"]) == (10_000_000, "credits")
    assert 0 < body["available"] < 10_000_000
    assert body["runway_seconds"] == pytest.approx(body["available"] * 3600 / 2_469_134)
    assert body["stopping_at"] is None and body["warning"] is None
    assert world["tokens"]["meg-server"] not in reply.body.decode()


@pytest.mark.parametrize("jp_server_config", ["ned-server"], indirect=True)
def test_another_users_token_is_403(
    world: dict[str, Any], jp_serverapp: Any, jp_fetch: Any, jp_asyncio_loop: Any
) -> None:
    with pytest.raises(HTTPClientError) as refused:
        jp_asyncio_loop.run_until_complete(jp_fetch("api", "gpuportal", "usage"))
    assert refused.value.code == 403
    # The metrics still serve, without the portal's numbers.
    metrics = jp_asyncio_loop.run_until_complete(jp_fetch("api", "gpuportal", "metrics"))
    assert b"gpuportal_portal_reachable_bool 1.0" in metrics.body
    assert b"gpuportal_balance_available_microcredits " not in metrics.body


def test_portal_takes_a_server_token_read_only(world: dict[str, Any]) -> None:
    base, tokens = world["base"], world["tokens"]

    def call(method: str, path: str, token: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{base}{API}{path}",
            headers={"Authorization": f"token {tokens[token]}"},
            timeout=30,
            **kw,
        )

    mine = call("GET", "/allocations?user=meg&server=&open_only=true", "meg-server")
    assert mine.status_code == 200 and [a["id"] for a in mine.json()] == [world["allocation"]["id"]]
    assert call("GET", "/balance?user=meg", "ned-server").status_code == 403
    assert call("GET", "/allocations?user=meg", "ned-server").status_code == 403
    ask = {"user": "meg", "gpu_count": 1, "price_per_gpu_hour": 1}
    refused = call("POST", "/authorize", "meg-server", json=ask)
    assert refused.status_code == 403 and "can only read" in refused.text
    assert call("POST", "/authorize", "meg", json=ask).status_code == 200


def test_spawned_server_shows_its_cost_through_the_proxy(world: dict[str, Any]) -> None:
    """A server the hub spawns (a Ray job of the CPU profile) loads the extension from the installed
    enabling file and reads the portal with its own JUPYTERHUB_API_TOKEN."""
    base, token = world["base"], world["tokens"]["meg"]
    headers = {"Authorization": f"token {token}"}
    # The CPU profile: no reservation, so the allocation opened by hand above is
    # the one the server shows (a GPU spawn would open its own from its reservation).
    spawned = httpx.post(
        f"{base}/hub/api/users/meg/server", headers=headers, json={"profile": "cpu"}, timeout=60
    )
    assert spawned.status_code in (201, 202), spawned.text
    try:
        for _ in range(120):  # bounded: a local server starts in seconds
            model = httpx.get(f"{base}/hub/api/users/meg", headers=headers, timeout=30).json()
            if model["servers"].get("", {}).get("ready"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("meg's server never became ready")
        reply = httpx.get(f"{base}/user/meg/api/gpuportal/usage", headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["portal"]["reachable"] is True, body["portal"]
        assert (body["allocation"]["id"], body["price_per_hour"]) == (
            world["allocation"]["id"],
            2_469_134,
        )
        assert body["balance"] == 10_000_000 and body["spent"] > 0
        ned = {"Authorization": f"token {world['tokens']['ned-server']}"}
        other = httpx.get(f"{base}/user/meg/api/gpuportal/usage", headers=ned, timeout=30)
        assert other.status_code in (403, 404)  # the hub refuses ned's token on meg's server
    finally:
        httpx.delete(f"{base}/hub/api/users/meg/server", headers=headers, timeout=60)
