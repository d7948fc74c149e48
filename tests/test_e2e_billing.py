"""Issue 5's "done when", through the real stack: hub, RaySpawner, marketplace, meter.

A user with 10 granted credits spawns a 1-GPU server at the house price, it
runs, it stops: the balance falls by exactly price x billed time, the
provider's earnings plus the platform's revenue equal the charge, and the
ledger sums to zero. A user with credit for less than the minimum billable
period is refused at spawn, with the reason. A user whose credit runs out is
stopped by the meter through the real hub, the GPU goes back on offer, and the
balance never goes below zero (issue 9).

The minimum billable period (20 s) and the grace period (3 s) are short here so
that running out of credit takes seconds, not a quarter of an hour.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from gpuportal.provider.money import accrued

from .portal_stack import (
    Stack,
    call,
    grant,
    server_of,
    start_stack,
    stop_stack,
    token_for,
    wait_free_gpus,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]
PORTAL = "/services/portal/api/v1"
HOUSE_PRICE = 1_000_000  # 1.00 credit per GPU-hour (GPUPORTAL_HOUSE_PRICE default)
MIN_BILLABLE = 20  # seconds: a launch needs credit for this long


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("e2e") / "data",
        GPUPORTAL_DEMO_GPUS="2xA100-80GB",
        GPUPORTAL_SIGNUP_CREDITS="0",  # exact balances
        GPUPORTAL_METER_INTERVAL_SECONDS="1",  # the meter loop charges while it runs
        GPUPORTAL_MIN_BILLABLE_SECONDS=str(MIN_BILLABLE),
        GPUPORTAL_GRACE_SECONDS="3",
    )
    yield running
    stop_stack(running)


def test_per_second_billing_through_a_real_spawn(stack: Stack) -> None:
    admin = token_for(stack, "admin", meet_portal=True)
    pat = token_for(stack, "pat", meet_portal=True)
    grant(stack, "pat", 10_000_000, admin)
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
    admin = token_for(stack, "admin", meet_portal=True)
    rae = token_for(stack, "rae", meet_portal=True)
    grant(stack, "rae", HOUSE_PRICE * 5 // 3600, admin)  # credit for 5 seconds of one GPU
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
    assert f"needs credit for at least {MIN_BILLABLE} s" in message, message
    assert "Traceback" not in message
    assert server_of(stack, rae, "rae") is None or not server_of(stack, rae, "rae").get("ready")
    wait_free_gpus(stack, rae, 2)  # nothing stays reserved


def spawn_and_wait(stack: Stack, token: str, user: str) -> None:
    spawned = call(
        stack,
        token,
        "POST",
        f"/hub/api/users/{user}/server",
        json={"profile": "gpu", "gpu_count": 1},
    )
    assert spawned.status_code in (201, 202), spawned.text
    for _ in range(300):  # bounded
        server = server_of(stack, token, user)
        if server and server.get("ready"):
            return
        assert server is not None, stack.read_output()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"{user}'s server never became ready")


def stop_and_wait(stack: Stack, token: str, user: str) -> None:
    call(stack, token, "DELETE", f"/hub/api/users/{user}/server")
    for _ in range(240):
        if server_of(stack, token, user) is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"{user}'s server did not stop")


def test_a_server_out_of_credit_is_stopped_by_the_meter_and_its_gpu_freed(stack: Stack) -> None:
    """Issue 9: the meter's out-of-credit stop through a real hub and RaySpawner. The
    reservation is released in the step that ends the bill, the hub stops the server,
    the GPU is back on offer, and the user is left with no debt."""
    admin = token_for(stack, "admin", meet_portal=True)
    uma = token_for(stack, "uma", meet_portal=True)
    credit = -(-HOUSE_PRICE * MIN_BILLABLE // 3600)  # exactly the minimum billable period
    grant(stack, "uma", credit, admin)
    wait_free_gpus(stack, uma, 2)
    spawn_and_wait(stack, uma, "uma")
    wait_free_gpus(stack, uma, 1)
    for _ in range(240):  # bounded: the credit lasts 20 s, the stop follows within seconds
        if server_of(stack, uma, "uma") is None:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the meter never stopped uma's server: " + stack.read_output()[-3000:])
    wait_free_gpus(stack, uma, 2)
    (alloc,) = call(stack, uma, "GET", f"{PORTAL}/allocations").json()
    assert (alloc["status"], alloc["stop_reason"]) == ("closed", "out_of_credit"), alloc
    balance = call(stack, uma, "GET", f"{PORTAL}/balance").json()
    assert 0 <= balance["balance"] < credit
    assert balance["balance"] == credit - alloc["charged"]
    reservations = call(stack, uma, "GET", f"{PORTAL}/reservations").json()
    assert reservations == [], "nothing stays held"


def portal_process(stack: Stack) -> psutil.Process:
    for proc in stack.descendants():
        try:
            if "gpuportal.hub.portal.service" in " ".join(proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no portal service process")


def test_killing_the_portal_mid_session_charges_every_second_once(stack: Stack) -> None:
    """Crash recovery: SIGKILL the portal service while a server is billed; the hub
    restarts it, the meter resumes from the last charged moment."""
    admin = token_for(stack, "admin", meet_portal=True)
    sam = token_for(stack, "sam", meet_portal=True)
    grant(stack, "sam", 10_000_000, admin)
    wait_free_gpus(stack, sam, 2)
    spawn_and_wait(stack, sam, "sam")
    time.sleep(2.5)  # a few one-second charges
    victim = portal_process(stack)
    victim.kill()
    victim.wait(30)
    for _ in range(240):  # bounded: JupyterHub restarts a managed service that died
        try:
            health = httpx.get(f"{stack.base_url}{PORTAL}/health", timeout=5)
            if health.status_code == 200 and portal_process(stack).pid != victim.pid:
                break
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(0.5)
    else:
        raise AssertionError("the portal service did not come back")
    time.sleep(2.5)  # charged again by the restarted meter
    stop_and_wait(stack, sam, "sam")

    (alloc,) = call(stack, sam, "GET", f"{PORTAL}/allocations").json()
    started = datetime.fromisoformat(alloc["started_at"])
    ended = datetime.fromisoformat(alloc["ended_at"])
    billed = accrued(1, HOUSE_PRICE, started, ended)
    assert alloc["status"] == "closed"
    assert alloc["charged"] == billed, "no second charged twice or missed"
    balance = call(stack, sam, "GET", f"{PORTAL}/balance").json()
    assert balance["balance"] == 10_000_000 - billed


@pytest.mark.browser
def test_a_person_spawns_a_gpu_from_the_form(stack: Stack, browser_page: Any) -> None:
    """In Chromium: log in, pick the GPU profile and 1 GPU, watch progress, land in
    JupyterLab; stopping gives the GPU back."""
    admin = token_for(stack, "admin", meet_portal=True)
    ivy = token_for(stack, "ivy", meet_portal=True)
    grant(stack, "ivy", 10_000_000, admin)
    wait_free_gpus(stack, ivy, 2)
    page = browser_page
    page.goto(f"{stack.base_url}/hub/login")
    page.fill("input[name=username]", "ivy")
    page.fill("input[name=password]", "pw-ivy-12345")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/hub/home", timeout=30_000)
    page.goto(f"{stack.base_url}/hub/spawn")
    form = page.content()
    assert "free" in form and "GPU-hour" in form, "the form shows availability and price"
    page.check("input[type=radio][value=gpu]")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/user/ivy/lab**", timeout=150_000)
    page.wait_for_selector(".jp-LabShell, #jp-main-dock-panel", timeout=60_000)
    wait_free_gpus(stack, ivy, 1)
    stop_and_wait(stack, ivy, "ivy")
    wait_free_gpus(stack, ivy, 2)
