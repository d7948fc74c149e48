"""Offers and reservations through the real stack: `gpuportal up` with 2 demo A100-80GB.

The suite's shared default stack (``tests/conftest.py``): the hub service
``ray-spawner`` (trusted by default) acts with the token the hub keeps in the data
dir, and an untrusted one (``other-service``) is added through
GPUPORTAL_HUB_EXTRA_CONFIG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .. import portal_stack

pytestmark = [pytest.mark.slow, pytest.mark.ray]

API = "/services/portal/api/v1"
OTHER_TOKEN = portal_stack.OTHER_SERVICE_TOKEN


@pytest.fixture(scope="module")
def market_stack(stack: portal_stack.Stack) -> portal_stack.Stack:
    """The shared default stack (``tests/conftest.py``)."""
    return stack


class Portal:
    """An API client for one identity (a hub user's token or a service token)."""

    def __init__(self, base_url: str, token: str | None) -> None:
        headers = {"Authorization": f"token {token}"} if token else {}
        self.client = httpx.Client(base_url=base_url + API, headers=headers, timeout=30)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.client.post(path, json=body)

    def delete(self, path: str) -> httpx.Response:
        return self.client.delete(path)


def as_user(stack: Any, name: str) -> Portal:
    password = f"pw-{name}-12345"
    browser = portal_stack.hub_login(stack.base_url, name, password)
    try:
        token = portal_stack.hub_token(browser, name)
    finally:
        browser.close()
    return Portal(stack.base_url, token)


@pytest.fixture(scope="module")
def users(market_stack: Any) -> dict[str, Portal]:
    return {name: as_user(market_stack, name) for name in ("ann", "bob", "cy")}


def error(reply: httpx.Response) -> tuple[str, str]:
    body = reply.json()["error"]
    return body["code"], body["message"]


def test_unauthenticated_is_401(market_stack: Any) -> None:
    anonymous = Portal(market_stack.base_url, None)
    assert anonymous.get("/offers").status_code == 401
    reply = anonymous.post("/reservations", {"gpu_count": 1, "user": "ann"})
    assert reply.status_code == 401
    assert error(reply)[0] == "unauthenticated"
    assert Portal(market_stack.base_url, "not-a-token").get("/offers").status_code == 401


def test_house_node_is_declared_to_ray(market_stack: Any) -> None:
    node_id = json.loads((Path(market_stack.data_dir) / "house-node" / "node.json").read_text())[
        "node_id"
    ]
    jobs = f"http://127.0.0.1:{market_stack.env['GPUPORTAL_RAY_DASHBOARD_PORT']}"
    token = (Path(market_stack.data_dir) / "ray-auth-token").read_text().strip()
    assert httpx.get(f"{jobs}/api/v0/nodes", timeout=30).status_code == 401  # token auth
    nodes = httpx.get(
        f"{jobs}/api/v0/nodes",
        params={"detail": "1"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    # The Ray node that carries the house node's resource (whatever else has joined).
    (resources,) = [
        n["resources_total"]
        for n in nodes["data"]["result"]["result"]
        if f"gpuportal/node:{node_id}" in n.get("resources_total", {})
    ]
    assert resources[f"gpuportal/node:{node_id}"] == 2
    assert resources["GPU"] == 2
    # `gpuportal up` prints the house node's verification after the portal answers its
    # health check: wait for the line (bounded), then it must say verified.
    said = f"house node {node_id}: "
    deadline = time.monotonic() + 180
    while said not in market_stack.read_output() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{said}verified" in market_stack.read_output()


def test_offers_show_the_house_demo_gpus(users: dict[str, Portal]) -> None:
    reply = users["ann"].get("/offers")
    assert reply.status_code == 200
    assert reply.json() == [
        {
            "gpu_model": "A100-80GB",
            "vram_gb": 80,
            "region": "local",
            "price_per_gpu_hour": 1_000_000,
            "price_per_gpu_hour_display": "1.00",
            "free_gpus": 2,
            "largest_free_gpus": 2,
            "total_gpus": 2,
            "reliability": 0.9,
            "demo": True,
            "provider": "house",
            "exclusive": False,  # the house node runs as root: an account per customer
        }
    ]


def test_reserve_until_full_then_release(users: dict[str, Portal]) -> None:
    ann, bob, cy = users["ann"], users["bob"], users["cy"]
    first = ann.post(
        "/reservations",
        {"gpu_model": "A100-80GB", "gpu_count": 1, "user": "ann", "server_name": ""},
    )
    assert first.status_code == 201, first.text
    held = first.json()
    assert held["status"] == "held"
    assert held["gpu_count"] == 1 and held["gpu_model"] == "A100-80GB"
    # A customer gets no internal URL and no cluster detail (only the spawner does).
    assert not {"jobs_url", "cluster_id", "node_resource"} & held.keys()
    assert held["price_per_gpu_hour"] == 1_000_000 and held["demo"] is True
    assert held["region"] == "local" and held["expires_at"]

    second = bob.post("/reservations", {"gpu_count": 1, "user": "bob", "server_name": "x"})
    assert second.status_code == 201, second.text
    assert sorted(held["gpu_indices"] + second.json()["gpu_indices"]) == [0, 1]

    third = cy.post(
        "/reservations",
        {
            "gpu_model": "A100-80GB",
            "gpu_count": 1,
            "user": "cy",
            "region": "local",
            "max_price": 2_000_000,
        },
    )
    assert third.status_code == 409
    assert error(third) == ("no_capacity", "no A100-80GB free in local under 2.00/h.")
    assert ann.get("/offers").json()[0]["free_gpus"] == 0

    # Another user can neither see nor release ann's reservation.
    assert bob.delete(f"/reservations/{held['id']}").status_code == 403
    assert bob.get(f"/reservations/{held['id']}").status_code == 403
    assert bob.post(f"/reservations/{held['id']}/activate").status_code == 403

    released = ann.delete(f"/reservations/{held['id']}")
    assert released.status_code == 200 and released.json()["status"] == "released"
    again = ann.delete(f"/reservations/{held['id']}")
    assert again.status_code == 200 and again.json()["status"] == "released"
    assert ann.get("/offers").json()[0]["free_gpus"] == 1

    now = cy.post("/reservations", {"gpu_count": 1, "user": "cy"})
    assert now.status_code == 201
    assert now.json()["gpu_indices"] == held["gpu_indices"]
    for who, res in ((bob, second.json()), (cy, now.json())):
        assert who.delete(f"/reservations/{res['id']}").status_code == 200


def test_users_reserve_only_for_themselves(users: dict[str, Portal]) -> None:
    reply = users["bob"].post("/reservations", {"gpu_count": 1, "user": "ann"})
    assert reply.status_code == 403
    assert error(reply) == (
        "forbidden",
        "You may reserve GPUs only for yourself (bob), not for 'ann'.",
    )


def test_trusted_service_acts_for_users(market_stack: Any, users: dict[str, Portal]) -> None:
    spawner_token = (market_stack.data_dir / "ray-spawner-token").read_text().strip()
    spawner = Portal(market_stack.base_url, spawner_token)
    reply = spawner.post("/reservations", {"gpu_count": 2, "user": "ann", "server_name": "big"})
    assert reply.status_code == 201, reply.text
    res = reply.json()
    assert res["user"] == "ann" and res["gpu_indices"] == [0, 1]
    # A retried spawn gets the same reservation back.
    retry = spawner.post("/reservations", {"gpu_count": 2, "user": "ann", "server_name": "big"})
    assert retry.status_code == 200 and retry.json()["id"] == res["id"]
    active = spawner.post(f"/reservations/{res['id']}/activate")
    assert active.status_code == 200 and active.json()["status"] == "active"
    assert spawner.post(f"/reservations/{res['id']}/activate").json()["status"] == "active"
    # The owner sees it too; the service releases it.
    assert users["ann"].get(f"/reservations/{res['id']}").json()["status"] == "active"
    assert [r["id"] for r in users["ann"].get("/reservations").json()] == [res["id"]]
    assert spawner.delete(f"/reservations/{res['id']}").json()["status"] == "released"
    assert spawner.post(f"/reservations/{res['id']}/activate").status_code == 409

    ghost = spawner.post("/reservations", {"gpu_count": 1, "user": "nobody-here"})
    assert ghost.status_code == 422
    assert error(ghost)[1] == "There is no hub user named 'nobody-here'."


def test_untrusted_service_is_refused(market_stack: Any) -> None:
    other = Portal(market_stack.base_url, OTHER_TOKEN)
    reply = other.post("/reservations", {"gpu_count": 1, "user": "ann"})
    assert reply.status_code == 403
    assert other.get("/offers").status_code == 403


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"gpu_count": 0, "user": "ann"},
            422,
            "gpu_count: Input should be greater than or equal to 1",
        ),
        (
            {"gpu_count": 3, "user": "ann"},
            422,
            "gpu_count 3 is more than the largest node offers (2 GPUs); ask for at most 2.",
        ),
        (
            {"gpu_count": 1, "gpu_model": "B200", "user": "ann"},
            422,
            "unknown GPU model 'B200'; the marketplace has: A100-80GB.",
        ),
        (
            {"gpu_count": 1, "user": "ann", "max_price": -5},
            422,
            "max_price: Input should be greater than or equal to 1",
        ),
        (
            {"gpu_count": 1, "user": "ann", "colour": "red"},
            422,
            "colour: Extra inputs are not permitted",
        ),
        (
            {"gpu_count": 1, "user": "ann", "server_name": "x" * 20_000},
            413,
            "The request body is larger than 16384 bytes.",
        ),
    ],
)
def test_bad_requests_get_sentences(
    users: dict[str, Portal], body: dict[str, Any], status: int, message: str
) -> None:
    reply = users["ann"].post("/reservations", body)
    assert reply.status_code == status, reply.text
    assert error(reply)[1] == message


def test_unknown_reservation_is_404(users: dict[str, Portal]) -> None:
    reply = users["ann"].get("/reservations/does-not-exist")
    assert reply.status_code == 404
    assert error(reply) == ("not_found", "no reservation 'does-not-exist'.")
