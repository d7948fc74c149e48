"""Billing through the real embedded stack: hub tokens, the proxy, the portal's meter loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from .. import portal_stack
from ..portal_stack import Stack, hub_login, hub_token, start_stack, stop_stack

pytestmark = pytest.mark.slow
API = "/services/portal/api/v1"


@pytest.fixture(scope="module")
def billing_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack with a one-second meter, so the loop itself charges within the test."""
    running = start_stack(
        Path(tmp_path_factory.mktemp("billing")) / "data",
        GPUPORTAL_DEMO_GPUS="2xA100-80GB",
        GPUPORTAL_METER_INTERVAL_SECONDS="1",
        GPUPORTAL_SIGNUP_CREDITS="0",  # exact balances
    )
    yield running
    stop_stack(running)


def call(stack: Stack, method: str, path: str, token: str, **kwargs: object) -> httpx.Response:
    """A portal API call (``path`` under ``/api/v1``) through the stack's front door."""
    return portal_stack.call(stack, token, method, f"{API}{path}", **kwargs)


def test_grant_meter_close_balance_usage(billing_stack: Stack) -> None:
    admin = hub_login(billing_stack.base_url, "admin", billing_stack.admin_password)
    admin_token = hub_token(admin, "admin")
    user = hub_login(billing_stack.base_url, "meg", "a-long-password")
    token = hub_token(user, "meg")
    other = hub_login(billing_stack.base_url, "ned", "a-long-password")
    other_token = hub_token(other, "ned")
    for t in (token, other_token):
        assert call(billing_stack, "GET", "/me", t).status_code == 200

    granted = call(
        billing_stack,
        "POST",
        "/credits/grants",
        admin_token,
        json={"user": "meg", "amount": 10_000_000, "idempotency_key": "meg-1"},
    )
    assert granted.status_code == 201, granted.text
    assert (
        call(
            billing_stack, "POST", "/credits/grants", token, json={"user": "meg", "amount": 1}
        ).status_code
        == 403
    )
    balance = call(billing_stack, "GET", "/balance", token).json()
    assert (balance["balance"], balance["display"]) == (10_000_000, "10.00 credits")

    # A bill opens only for a reservation (issue 8): meg holds two GPUs of the house node.
    for _ in range(240):  # bounded: the house node verifies within seconds
        offers = call(billing_stack, "GET", "/offers", token).json()
        if sum(o["free_gpus"] for o in offers) == 2:
            break
        time.sleep(0.5)
    reserved = call(
        billing_stack,
        "POST",
        "/reservations",
        token,
        json={"user": "meg", "server_name": "gpu", "gpu_count": 2},
    )
    assert reserved.status_code == 201, reserved.text
    opened = call(
        billing_stack,
        "POST",
        "/allocations",
        admin_token,
        json={"reservation_id": reserved.json()["id"]},
    )
    assert opened.status_code == 201, opened.text
    price = opened.json()["price_per_gpu_hour"]
    alloc_id = opened.json()["id"]
    charged = 0
    for _ in range(60):  # bounded: the one-second meter charges within a few seconds
        charged = call(billing_stack, "GET", f"/allocations/{alloc_id}", token).json()["charged"]
        if charged >= 1000:
            break
        time.sleep(0.5)
    assert charged >= 1000, "the meter loop charged nothing"
    closed = call(billing_stack, "POST", f"/allocations/{alloc_id}/close", admin_token)
    assert closed.status_code == 200, closed.text
    final = closed.json()
    held = datetime.fromisoformat(final["ended_at"]) - datetime.fromisoformat(final["started_at"])
    # Exactly price x time held, by the documented rounding rule, to the microsecond.
    assert final["charged"] == 2 * price * (held // timedelta(microseconds=1)) // 3_600_000_000
    after = call(billing_stack, "GET", "/balance", token).json()
    assert after["balance"] == 10_000_000 - final["charged"]
    rows = call(billing_stack, "GET", "/usage", token).json()["rows"]
    assert [(r["server"], r["charged"]) for r in rows] == [("gpu", final["charged"])]
    assert call(billing_stack, "GET", "/usage?user=meg", other_token).status_code == 403
    for client in (admin, user, other):
        client.close()
