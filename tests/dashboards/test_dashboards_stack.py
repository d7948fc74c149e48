"""The dashboards through the real stack: hub login, the Voila service behind hub OAuth,
its kernels reading the portal as the logged-in user, rendered in headless Chromium.

One stack for the whole module (``gpuportal up``, module-scoped), seeded once with two
providers, a customer and two weeks of usage (``seed.py``); every rendering and every
isolation check shares it. The browser may reach 127.0.0.1 only: anything else it asks
for is blocked and recorded, and a page that asked for anything is a failure (the
dashboards must render offline). Each dashboard's screenshot is saved to
``TEST_SCREENSHOTS_DIR`` (default: the test's temporary folder); the README's come from
``TEST_SCREENSHOTS_DIR=docs/screenshots``.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from gpuportal.dashboards.catalog import BY_NOTEBOOK
from gpuportal.hub import db as portal_db
from gpuportal.hub.settings import load_settings
from gpuportal.provider.money import format_credits

from ..portal_stack import Stack, free_port, hub_login, hub_token, start_stack, stop_stack
from .seed import CUSTOMER, Seeded, seed

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PASSWORD = "dashboards-pw-123"
PROVIDER_A, PROVIDER_B = "prov-alpha", "prov-bravo"
#: Long enough for a first kernel on a busy 2-core machine; a bound, not a measurement.
RENDER_TIMEOUT_MS = 90_000
#: Voila preheats a kernel per dashboard when the service starts.
POOL_TIMEOUT_S = 240
ERROR_MARKERS = ("Traceback", "There was an error when executing", "could not be drawn")


@dataclass
class SeededStack:
    stack: Stack
    seeded: Seeded
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded stack for this module, without a local Ray head: the dashboards
    read seeded data, and no server is spawned (the Ray URL answers nothing)."""
    running = start_stack(
        tmp_path_factory.mktemp("dashboards") / "data",
        timeout=300,
        GPUPORTAL_RAY_DASHBOARD_URL=f"http://127.0.0.1:{free_port()}",
    )
    yield running
    stop_stack(running)


def _sign_up(stack: Stack, name: str) -> str:
    client = hub_login(stack.base_url, name, PASSWORD)
    try:
        return hub_token(client, name)
    finally:
        client.close()


@pytest.fixture(scope="module")
def market(stack: Stack) -> Iterator[SeededStack]:
    """The module's stack with real hub users (providers in the ``providers`` group)
    and the seeded marketplace in its portal DB."""
    tokens = {name: _sign_up(stack, name) for name in (PROVIDER_A, PROVIDER_B, CUSTOMER)}
    admin = hub_login(stack.base_url, "admin", stack.admin_password)
    tokens["admin"] = hub_token(admin, "admin")
    admin.close()
    reply = httpx.post(
        f"{stack.base_url}/hub/api/groups/providers/users",
        json={"users": [PROVIDER_A, PROVIDER_B]},
        headers={"Authorization": f"token {tokens['admin']}"},
        timeout=30,
    )
    reply.raise_for_status()
    settings = load_settings(data_dir=stack.data_dir)
    engine = portal_db.make_engine(settings.database_url)
    try:
        seeded = seed(engine)
    finally:
        engine.dispose()
    wait_pools_filled(stack)
    yield SeededStack(stack, seeded, tokens)


def service_log(stack: Stack) -> str:
    """The hub's log (its managed services, Voila among them, write to it)."""
    path = stack.data_dir / "logs" / "jupyterhub.log"
    return path.read_text(errors="replace") if path.exists() else ""


def voila_lines(stack: Stack, last: int = 60) -> str:
    """The dashboards service's part of the log, for a failure's message."""
    lines = [
        line
        for line in service_log(stack).splitlines()
        if "DashboardsVoila" in line or "dashboards" in line or "Traceback" in line
    ]
    return "\n".join(lines[-last:])


def wait_pools_filled(stack: Stack) -> None:
    """Wait until Voila has a preheated kernel for every dashboard, so each test's
    render timeout counts its own page, not three kernels starting on a busy machine
    (bounded; a pool that never fills fails here, with Voila's log)."""
    deadline = time.monotonic() + POOL_TIMEOUT_S
    while time.monotonic() < deadline:
        text = service_log(stack)
        if all(f"Kernel pool of {nb} is filled" in text for nb in BY_NOTEBOOK):
            return
        time.sleep(0.5)
    raise AssertionError(
        f"Voila's kernel pools did not fill in {POOL_TIMEOUT_S} s:\n{voila_lines(stack)}"
    )


def _screenshots() -> Path:
    folder = Path(os.environ.get("TEST_SCREENSHOTS_DIR") or "")
    return folder


def offline_page(browser_page: Any) -> list[str]:
    """Block every request that is not for 127.0.0.1; returns the list of those blocked."""
    blocked: list[str] = []

    def route(r: Any) -> None:
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    browser_page.route("**/*", route)
    return blocked


def browser_login(page: Any, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(re.compile(r".*/hub/(home|spawn|dashboards).*"))


def render(page: Any, stack: Stack, notebook: str, expect: str) -> str:
    """Open a dashboard and wait until ``expect`` is on the page; returns the page's text.

    A page that has not loaded in ``RENDER_TIMEOUT_MS`` is reloaded once, as its user
    would, and the stalled attempt's service log is shown as a warning. Seen twice, only in the
    full two-worker suite: a preheated kernel redeemed its ticket and its call to the
    portal never arrived, so Voila never finished the page (cause not found). A page
    that stalls twice fails the test with both logs.
    """
    url = f"{stack.base_url}/services/dashboards/voila/render/{notebook}"
    stalled: list[str] = []
    for _attempt in range(2):
        try:
            # Voila streams the page while the kernel runs it: "load" comes when it has run.
            reply = page.goto(url, timeout=RENDER_TIMEOUT_MS)
        except PlaywrightTimeout:
            stalled.append(voila_lines(stack))
            warnings.warn(
                f"{notebook} stalled; reloading. The dashboards log:\n{stalled[-1]}",
                stacklevel=2,
            )
            continue
        assert reply is not None and reply.status == 200, reply and reply.status
        return rendered(page, notebook, expect)
    raise AssertionError(
        f"{notebook} did not finish loading in {RENDER_TIMEOUT_MS // 1000} s, twice; "
        "the dashboards service's log:\n" + "\n---\n".join(stalled)
    )


def rendered(page: Any, notebook: str, expect: str) -> str:
    """Wait until the open dashboard shows ``expect``, then check it shows no error."""
    page.get_by_text(expect, exact=False).first.wait_for(timeout=RENDER_TIMEOUT_MS)
    # Let the remaining widgets render (bounded: the last section's heading or grid).
    page.wait_for_load_state("networkidle", timeout=RENDER_TIMEOUT_MS)
    text: str = page.inner_text("body")
    for marker in ERROR_MARKERS:
        assert marker not in text, f"{notebook} shows an error:\n{text[:3000]}"
    assert page.locator(".gp-problem").count() == 0, text[:3000]
    return text


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    folder = _screenshots() if os.environ.get("TEST_SCREENSHOTS_DIR") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


# --- rendering and isolation, in Chromium ------------------------------------------------------


def test_a_provider_sees_their_earnings_and_nothing_of_another_provider(
    market: SeededStack, browser_page: Any, tmp_path: Path
) -> None:
    page, base, seeded = browser_page, market.stack.base_url, market.seeded
    blocked = offline_page(page)
    browser_login(page, base, PROVIDER_A, PASSWORD)
    page.goto(f"{base}/hub/home")
    page.get_by_role("link", name="Dashboards").first.click()
    page.get_by_text("Provider earnings").first.click()
    page.wait_for_url(re.compile(r".*/services/dashboards/voila/render/provider_earnings.ipynb"))
    rendered(page, "provider_earnings.ipynb", "Earned, all time")
    page.get_by_text(format_credits(seeded.earnings[PROVIDER_A])).first.wait_for(
        timeout=RENDER_TIMEOUT_MS
    )
    text = page.inner_text("body")
    for node in seeded.nodes[PROVIDER_A]:
        assert node in text
    for node in seeded.nodes[PROVIDER_B]:
        assert node not in text
    assert format_credits(seeded.earnings[PROVIDER_B]) not in text
    assert "Bravo" not in text
    assert "offline" in text  # alpha-node-2's alert
    assert blocked == []


def test_provider_b_sees_their_own_total_earnings(
    market: SeededStack, browser_page: Any, tmp_path: Path
) -> None:
    page, base, seeded = browser_page, market.stack.base_url, market.seeded
    blocked = offline_page(page)
    browser_login(page, base, PROVIDER_B, PASSWORD)
    render(page, market.stack, "provider_earnings.ipynb", "Earned, all time")
    page.get_by_text(format_credits(seeded.earnings[PROVIDER_B])).first.wait_for(
        timeout=RENDER_TIMEOUT_MS
    )
    text = page.inner_text("body")
    assert all(node not in text for node in seeded.nodes[PROVIDER_A])
    assert "failed verification" in text
    screenshot(page, "provider_earnings", tmp_path)
    assert blocked == []


def test_a_customer_sees_their_usage(
    market: SeededStack, browser_page: Any, tmp_path: Path
) -> None:
    page, base, seeded = browser_page, market.stack.base_url, market.seeded
    blocked = offline_page(page)
    browser_login(page, base, CUSTOMER, PASSWORD)
    page.goto(f"{base}/hub/dashboards")
    assert page.get_by_text("Provider earnings").count() == 0
    assert page.get_by_text("Marketplace analytics").count() == 0
    render(page, market.stack, "usage.ipynb", "Spent, last 30 days")
    page.get_by_text(format_credits(seeded.spend[CUSTOMER])).first.wait_for(
        timeout=RENDER_TIMEOUT_MS
    )
    text = page.inner_text("body")
    assert "idle" in text
    screenshot(page, "usage", tmp_path)
    assert blocked == []


def test_an_admin_sees_the_marketplace_analytics(
    market: SeededStack, browser_page: Any, tmp_path: Path
) -> None:
    page, base, seeded = browser_page, market.stack.base_url, market.seeded
    blocked = offline_page(page)
    browser_login(page, base, "admin", market.stack.admin_password)
    page.goto(f"{base}/hub/dashboards")
    for title in ("Provider earnings", "Usage", "Marketplace analytics"):
        assert page.get_by_text(title).count() >= 1
    render(page, market.stack, "analytics.ipynb", "Platform fee")
    page.get_by_text(format_credits(seeded.fee)).first.wait_for(timeout=RENDER_TIMEOUT_MS)
    text = page.inner_text("body")
    assert PROVIDER_A in text and PROVIDER_B in text
    screenshot(page, "analytics", tmp_path)
    # The period drives every figure: the last 24 hours hold only a day of the fortnight.
    page.select_option("select", label="Last 24 hours")
    page.get_by_text(format_credits(seeded.fee)).first.wait_for(
        state="detached", timeout=RENDER_TIMEOUT_MS
    )
    page.get_by_text("Platform fee").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert "Traceback" not in page.inner_text("body")
    assert blocked == []


def test_a_customer_gets_403_from_the_analytics_and_provider_dashboards(
    market: SeededStack, browser_page: Any
) -> None:
    page, base = browser_page, market.stack.base_url
    offline_page(page)
    browser_login(page, base, CUSTOMER, PASSWORD)
    for notebook, sentence in (
        (
            "analytics.ipynb",
            "The marketplace analytics dashboard is for admins; you are a customer.",
        ),
        ("provider_earnings.ipynb", "is for providers and admins; you are a customer."),
    ):
        # Voila streams the page while the kernel runs it: "load" comes when it has run.
        reply = page.goto(
            f"{base}/services/dashboards/voila/render/{notebook}", timeout=RENDER_TIMEOUT_MS
        )
        assert reply is not None and reply.status == 403
        text = page.inner_text("body")
        assert sentence in text and "Traceback" not in text


# --- the portal API behind the dashboards ------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        pytest.param(CUSTOMER, "analytics", 403, id="customer-analytics"),
        pytest.param(CUSTOMER, "provider", 403, id="customer-provider"),
        pytest.param(PROVIDER_A, "analytics", 403, id="provider-analytics"),
        pytest.param(CUSTOMER, "usage", 200, id="customer-usage"),
        pytest.param(PROVIDER_A, "provider", 200, id="provider-provider"),
        pytest.param("admin", "analytics", 200, id="admin-analytics"),
    ],
)
def test_the_dashboard_api_answers_by_role(
    market: SeededStack, who: str, path: str, status: int
) -> None:
    reply = httpx.get(
        f"{market.stack.base_url}/services/portal/api/v1/dashboards/{path}",
        headers={"Authorization": f"token {market.tokens[who]}"},
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    if status == 403:
        assert reply.json()["error"]["message"].startswith("This needs the")


def test_the_provider_api_returns_only_the_callers_nodes(market: SeededStack) -> None:
    reply = httpx.get(
        f"{market.stack.base_url}/services/portal/api/v1/dashboards/provider",
        headers={"Authorization": f"token {market.tokens[PROVIDER_B]}"},
        timeout=60,
    )
    body = reply.json()
    assert [n["node"] for n in body["nodes"]] == market.seeded.nodes[PROVIDER_B]
    assert body["earnings_total"] == market.seeded.earnings[PROVIDER_B]
    assert [p["signature"] for p in body["payouts"]] == [market.seeded.payouts[PROVIDER_B]]


# --- nothing else through the service -----------------------------------------------------------


@pytest.fixture(scope="module")
def dashboards_client(market: SeededStack) -> Iterator[httpx.Client]:
    """A browser-like client that went through the service's hub OAuth flow (on a path
    that is no dashboard, so no kernel is used)."""
    client = hub_login(market.stack.base_url, CUSTOMER, PASSWORD)
    reply = client.get("/services/dashboards/voila/render/none.ipynb")
    assert reply.status_code == 404 and "There is no such dashboard." in reply.text
    assert "/services/dashboards/" in str(reply.url)
    yield client
    client.close()


@pytest.mark.parametrize(
    "path",
    [
        "voila/files/service.py",
        "voila/files/..%2F..%2Fpyproject.toml",
        "voila/files/%2e%2e/%2e%2e/pyproject.toml",
        "voila/render/..%2F..%2Fpyproject.toml",
        "voila/render/service.py",
        "voila/render/tickets.py",
        "voila/render/..%2Fnotebooks%2Fhello.ipynb",
        "voila/tree",
        "voila/api/contents/",
        "voila/api/contents/..",
        "voila/templates/..%2F..%2F..%2F..%2Fpyproject.toml",
        "voila/static/..%2F..%2F..%2Fpyproject.toml",
        "voila/labextensions/..%2F..%2F..%2Fpyproject.toml",
        "api/contents/",
        "api/kernels",
        "files/pyproject.toml",
        "gpuportal/ticket",
    ],
)
def test_no_file_outside_the_dashboards_is_served(
    dashboards_client: httpx.Client, path: str
) -> None:
    reply = dashboards_client.get(
        f"/services/dashboards/{path}",
        headers={"Authorization": "ticket anything"} if "ticket" in path else {},
        follow_redirects=True,
    )
    assert "build-backend" not in reply.text  # pyproject.toml
    assert "from __future__" not in reply.text  # any of our Python modules
    if reply.status_code == 200:
        # Only the hub's own page (the service's index redirects there).
        assert urlparse(str(reply.url)).path == "/hub/dashboards", (path, reply.url)
    assert "Traceback" not in reply.text


def test_gpuportal_up_prints_the_dashboards_url(market: SeededStack) -> None:
    assert f"Dashboards:  {market.stack.base_url}/hub/dashboards" in market.stack.read_output()


def test_dashboard_kernels_hold_no_secret_of_the_control_plane(market: SeededStack) -> None:
    """The service keeps its hub token out of the environment its kernels inherit, and
    the hub gives it no setting of the control plane (DB, Redis, keys)."""
    import psutil

    services = [
        p
        for p in market.stack.descendants()
        if "gpuportal.dashboards.service" in " ".join(p.cmdline())
    ]
    assert len(services) == 1
    kernels = services[0].children()
    assert kernels, "the service keeps preheated kernels"
    for kernel in kernels:
        try:
            env = kernel.environ()
        except psutil.NoSuchProcess:  # a kernel that ended meanwhile
            continue
        assert "JUPYTERHUB_API_TOKEN" not in env
        assert not [
            k
            for k in env
            if k.startswith("GPUPORTAL_")
            and "PORTAL_URL" not in k
            and k != "GPUPORTAL_DASHBOARDS_URL"
        ], sorted(env)
        assert all(token not in env.values() for token in market.tokens.values())
