"""RaySpawner in the embedded stack (`gpuportal up`): real portal, real marketplace,
the house node's two demo A100-80GB GPUs, a user driving the hub as in the issue."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.portal_stack import Stack, call, hub_login, token_for

from .kernel import run_code

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def api(stack: Stack, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A hub REST API call (``path`` under ``/hub/api``)."""
    return call(stack, token, method, f"/hub/api{path}", **kwargs)


def free_a100(stack: Stack, token: str) -> int:
    reply = httpx.get(
        f"{stack.base_url}/services/portal/api/v1/offers",
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    reply.raise_for_status()
    return sum(o["free_gpus"] for o in reply.json() if o["gpu_model"] == "A100-80GB")


def wait_ready(stack: Stack, token: str, name: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = (api(stack, token, "GET", f"/users/{name}").json().get("servers") or {}).get("")
        if server and server.get("ready"):
            return
        if not server:
            raise AssertionError(f"{name}'s server failed:\n{stack.read_output()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{name}'s server not ready in {timeout}s")


def wait_gone(stack: Stack, token: str, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not api(stack, token, "GET", f"/users/{name}").json().get("servers"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name}'s server still listed after {timeout}s")


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {name: token_for(stack, name) for name in ("dana", "eve", "finn", "gus")}


def wait_house_verified(stack: Stack, token: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if free_a100(stack, token) == 2:
            return
        time.sleep(1)
    raise AssertionError("the house GPUs never became offerable")


def test_form_shows_live_availability_and_price(stack: Stack, tokens: dict[str, str]) -> None:
    wait_house_verified(stack, tokens["dana"])
    browser = hub_login(stack.base_url, "dana", "pw-dana-12345")
    try:
        page = browser.get("/hub/spawn").text
    finally:
        browser.close()
    assert 'name="profile" value="gpu"' in page
    assert "NVIDIA A100 80GB (2 free, from" in page
    assert "/GPU-hour" in page
    assert "gpuportal-cost-gpu" in page  # cost per hour of the chosen size
    # The real portal answers the spawner's balance call: balance and minimum period.
    assert 'id="gpuportal-balance">10.00 credits<' in page
    assert 'id="gpuportal-min-billable">15 minutes<' in page
    assert 'name="profile" value="cpu" checked' in page
    assert 'id="gpuportal-demo"' in page


def test_spawn_on_the_house_gpu_and_give_it_back(stack: Stack, tokens: dict[str, str]) -> None:
    token = tokens["dana"]
    wait_house_verified(stack, token)
    reply = api(
        stack,
        token,
        "POST",
        "/users/dana/server",
        json={"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1},
    )
    assert reply.status_code in (201, 202), reply.text
    wait_ready(stack, token, "dana")
    assert free_a100(stack, token) == 1
    out = run_code(
        f"{stack.base_url}/user/dana/",
        token,
        "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))",
    )
    assert out.strip() in {"0", "1"}
    reply = api(stack, token, "DELETE", "/users/dana/server")
    assert reply.status_code in (202, 204), reply.text
    wait_gone(stack, token, "dana")
    assert free_a100(stack, token) == 2


def test_concurrent_spawns_for_the_last_house_gpu(stack: Stack, tokens: dict[str, str]) -> None:
    wait_house_verified(stack, tokens["dana"])
    gpu = {"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1}
    reply = api(stack, tokens["dana"], "POST", "/users/dana/server", json=gpu)
    assert reply.status_code in (201, 202), reply.text
    wait_ready(stack, tokens["dana"], "dana")
    racers = ["eve", "finn", "gus"]
    with ThreadPoolExecutor(len(racers)) as pool:
        replies = list(
            pool.map(
                lambda n: api(stack, tokens[n], "POST", f"/users/{n}/server", json=gpu), racers
            )
        )
    won = [n for n, r in zip(racers, replies, strict=True) if r.status_code in (201, 202)]
    assert len(won) == 1, [(r.status_code, r.text) for r in replies]
    for reply in replies:
        if reply.status_code not in (201, 202):
            assert reply.status_code == 409, reply.text
            assert "Traceback" not in reply.text and reply.json()["message"]
    for name in ["dana", *won]:
        wait_ready(stack, tokens[name], name)
        api(stack, tokens[name], "DELETE", f"/users/{name}/server")
        wait_gone(stack, tokens[name], name)
    assert free_a100(stack, tokens["dana"]) == 2
