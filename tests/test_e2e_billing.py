"""Issue 5's "done when", through the real stack: hub, RaySpawner, marketplace, meter.

A user with 10 granted credits spawns a 1-GPU server at the house price, it
runs, it stops: the balance falls by exactly price x billed time, the
provider's earnings plus the platform's revenue equal the charge, and the
ledger sums to zero. A user with credit for less than the minimum billable
period is refused at spawn, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from gpuportal.hub.metering import accrued

from .portal_stack import Stack, hub_login, hub_token, start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.ray]
PORTAL = "/services/portal/api/v1"
HOUSE_PRICE = 1_000_000  # 1.00 credit per GPU-hour (GPUPORTAL_HOUSE_PRICE default)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("e2e") / "data",
        GPUPORTAL_DEMO_GPUS="2xA100-80GB",
        GPUPORTAL_SIGNUP_CREDITS="0",  # exact balances
        GPUPORTAL_METER_INTERVAL_SECONDS="1",  # the meter loop charges while it runs
    )
    yield running
    stop_stack(running)


def token_for(stack: Stack, name: str) -> str:
    """Sign up (first login), get a hub token, and meet the portal once (/me)."""
    password = stack.admin_password if name == "admin" else f"pw-{name}-12345"
    browser = hub_login(stack.base_url, name, password)
    try:
        token = hub_token(browser, name)
    finally:
        browser.close()
    me = httpx.get(
        f"{stack.base_url}{PORTAL}/me", headers={"Authorization": f"token {token}"}, timeout=60
    )
    assert me.status_code == 200, me.text
    return token


def call(stack: Stack, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.base_url}{path}",
        timeout=90,
        headers={"Authorization": f"token {token}"},
        **kw,
    )


def grant(stack: Stack, admin: str, user: str, amount: int) -> None:
    reply = call(
        stack, admin, "POST", f"{PORTAL}/credits/grants", json={"user": user, "amount": amount}
    )
    assert reply.status_code == 201, reply.text


def server_of(stack: Stack, token: str, user: str) -> dict[str, Any] | None:
    model = call(stack, token, "GET", f"/hub/api/users/{user}").json()
    return (model.get("servers") or {}).get("")


def wait_free_gpus(stack: Stack, token: str, count: int) -> None:
    for _ in range(240):  # bounded: the house node verifies within seconds
        offers = call(stack, token, "GET", f"{PORTAL}/offers").json()
        if sum(o["free_gpus"] for o in offers) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"never {count} free GPUs: {offers}")


def test_per_second_billing_through_a_real_spawn(stack: Stack) -> None:
    admin = token_for(stack, "admin")
    pat = token_for(stack, "pat")
    grant(stack, admin, "pat", 10_000_000)
    wait_free_gpus(stack, pat, 2)

    spawned = call(
        stack,
        pat,
        "POST",
        "/hub/api/users/pat/server",
        json={"profile": "gpu", "gpu_model": "A100-80GB", "gpu_count": 1},
    )
    assert spawned.status_code in (201, 202), spawned.text
    for _ in range(300):  # bounded: a Ray job and a Jupyter server start in well under 150 s
        server = server_of(stack, pat, "pat")
        if server and server.get("ready"):
            break
        assert server is not None, stack.read_output()[-3000:]
        time.sleep(0.5)
    else:
        raise AssertionError("pat's server never became ready")
    wait_free_gpus(stack, pat, 1)
    time.sleep(3)  # let it run (and the one-second meter charge it)
    stopped = call(stack, pat, "DELETE", "/hub/api/users/pat/server")
    assert stopped.status_code in (202, 204), stopped.text
    for _ in range(240):
        if server_of(stack, pat, "pat") is None:
            break
        time.sleep(0.5)
    wait_free_gpus(stack, pat, 2)  # stopping puts the GPU back on offer

    (alloc,) = call(stack, pat, "GET", f"{PORTAL}/allocations").json()
    assert (alloc["status"], alloc["gpu_count"], alloc["price_per_gpu_hour"]) == (
        "closed",
        1,
        HOUSE_PRICE,
    )
    started = datetime.fromisoformat(alloc["started_at"])
    ended = datetime.fromisoformat(alloc["ended_at"])
    billed = accrued(1, HOUSE_PRICE, started, ended)
    assert billed > 0 and alloc["charged"] == billed
    balance = call(stack, pat, "GET", f"{PORTAL}/balance").json()
    assert balance["balance"] == 10_000_000 - billed

    engine = create_engine(f"sqlite:///{stack.data_dir / 'portal.sqlite'}")
    with engine.connect() as conn:

        def total(kind: str | None = None) -> int:
            query = (
                "SELECT COALESCE(SUM(p.amount), 0) FROM ledger_postings p "
                "JOIN ledger_accounts a ON a.id = p.ledger_account_id "
                "WHERE :kind IS NULL OR a.kind = :kind"
            )
            return int(conn.execute(text(query), {"kind": kind}).scalar_one())

        earnings = total("provider_earnings")
        revenue = total("platform_revenue")
        assert earnings + revenue == billed
        assert revenue == billed * alloc["platform_fee_bps"] // 10_000
        assert total() == 0, "the ledger sums to zero"
    engine.dispose()


def test_spawn_without_runway_is_refused_with_the_reason(stack: Stack) -> None:
    admin = token_for(stack, "admin")
    rae = token_for(stack, "rae")
    grant(stack, admin, "rae", HOUSE_PRICE * 5 // 60)  # credit for 5 minutes of one GPU
    wait_free_gpus(stack, rae, 2)
    reply = call(
        stack, rae, "POST", "/hub/api/users/rae/server", json={"profile": "gpu", "gpu_count": 1}
    )
    message = reply.text
    if reply.status_code == 202:  # the hub may answer before the refusal: read the events
        with httpx.stream(
            "GET",
            f"{stack.base_url}/hub/api/users/rae/server/progress",
            headers={"Authorization": f"token {rae}"},
            timeout=60,
        ) as events:
            message = "".join(line for line in events.iter_lines() if "failed" in line)
    assert "needs credit for at least 15 min" in message, message
    assert "Traceback" not in message
    assert server_of(stack, rae, "rae") is None or not server_of(stack, rae, "rae").get("ready")
    wait_free_gpus(stack, rae, 2)  # nothing stays reserved
