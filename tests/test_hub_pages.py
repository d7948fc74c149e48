"""What a newcomer sees, in headless Chromium against the real stack (issue 11).

One stack for the module (``gpuportal up`` with two demo A100s and short
billing periods), one browser per test. Each test is a step of the README's
walkthrough and saves its screenshot: into ``$TEST_SCREENSHOTS_DIR`` when set
(``TEST_SCREENSHOTS_DIR=docs/img`` refreshes the README's), else a temporary
folder.

The browser reaches 127.0.0.1 only: every other request is aborted.

Timing: no assertion bounds how long anything takes. Progress events are
compared with each other (the last arrives later than the first), and every
wait is a bounded loop.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .portal_stack import (
    Stack,
    call,
    grant,
    hub_login,
    password_of,
    server_of,
    start_stack,
    stop_stack,
    token_for,
    wait_free_gpus,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.browser]
PORTAL = "/services/portal/api/v1"
#: A launch needs credit for this long (s); the meter charges every second.
MIN_BILLABLE = 20
#: 1.00 credit per GPU-hour (the house price): 278 micro-credits per GPU-second.
HOUSE_PRICE = 1_000_000
#: The one user whose servers stop after this many idle seconds (the others keep the
#: default 30 minutes, so no other step is culled under it).
IDLER, IDLER_TIMEOUT = "idler", 5
#: A hub config file loaded last: the GPU-aware idle limit of IDLER's servers, and the
#: spawn form handing over to the progress page at once (JupyterHub first waits up to 10 s
#: for the spawn by default), so that the page follows a spawn from its start and the
#: test can tell a live stream from a finished spawn's events replayed in one piece.
IDLE_CONFIG = f"""
c.Spawner.environment.update({{
    "GPUPORTAL_IDLE_TIMEOUT_SECONDS":
        lambda spawner: "{IDLER_TIMEOUT}" if spawner.user.name == "{IDLER}" else "",
}})
c.JupyterHub.tornado_settings.update({{"slow_spawn_timeout": 0}})
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("pages")
    (folder / "idle_config.py").write_text(IDLE_CONFIG)
    running = start_stack(
        folder / "data",
        GPUPORTAL_HUB_EXTRA_CONFIG=str(folder / "idle_config.py"),
        GPUPORTAL_DEMO_GPUS="2xA100-80GB",
        # The default under open sign-up: an admin approves the sign-up credit,
        # so each test grants exactly what its user should have.
        GPUPORTAL_SIGNUP_CREDIT_POLICY="approved",
        GPUPORTAL_METER_INTERVAL_SECONDS="1",
        GPUPORTAL_MIN_BILLABLE_SECONDS=str(MIN_BILLABLE),
        GPUPORTAL_GRACE_SECONDS="3",
    )
    yield running
    stop_stack(running)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("TEST_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser_page: Any) -> Any:
    """The test's Chromium page, which can reach 127.0.0.1 and nothing else."""
    from urllib.parse import urlsplit

    def local_only(route: Any) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", None):
            route.continue_()
        else:
            route.abort()

    browser_page.route("**/*", local_only)
    return browser_page


def wait_server(stack: Stack, token: str, user: str, *, ready: bool) -> None:
    """Until ``user``'s default server is ready (``ready``) or gone; bounded."""
    for _ in range(400):
        server = server_of(stack, token, user)
        if (server is not None and server.get("ready")) if ready else server is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"{user}'s server never got {'ready' if ready else 'stopped'}")


def spawn_gpu(stack: Stack, token: str, user: str) -> None:
    reply = call(
        stack,
        token,
        "POST",
        f"/hub/api/users/{user}/server",
        json={"profile": "gpu", "gpu_count": 1},
    )
    assert reply.status_code in (201, 202), reply.text
    wait_server(stack, token, user, ready=True)


def browser_login(page: Any, stack: Stack, name: str) -> None:
    page.goto(f"{stack.base_url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", password_of(stack, name))
    page.click("#login_submit")
    page.wait_for_url("**/hub/home", timeout=30_000)


def wait_text(page: Any, selector: str, words: str, tries: int = 120) -> str:
    """The text of ``selector`` once it contains ``words``; bounded (the page polls)."""
    text = ""
    for _ in range(tries):
        locator = page.locator(selector)
        if locator.count() and locator.first.is_visible():
            text = locator.first.inner_text()
            if words in text:
                return str(text)
        page.wait_for_timeout(500)
    raise AssertionError(f"{selector} never said {words!r}; it said {text!r}")


def test_sign_up_is_an_explicit_action_and_a_typo_makes_no_account(
    stack: Stack, page: Any, shots: Path
) -> None:
    page.goto(f"{stack.base_url}/hub/login")
    brand = page.inner_text("#gp-brand")
    assert "gpuportal" in brand and "GPU" in brand, "the login page says what this is"
    page.screenshot(path=str(shots / "01-login.png"), full_page=True)

    page.click("#gp-signup-link")
    page.wait_for_url("**/hub/signup")
    assert "10.00 credits" in page.inner_text("#gp-signup-credit"), "a word on the credit"
    page.fill("#username_input", "ana")
    page.fill("#password_input", "pw-ana-12345")
    page.fill("#password_again_input", "pw-ana-54321")
    page.click("#signup_submit")
    assert "differ" in page.inner_text("#gp-signup-error"), "two different passwords"
    page.fill("#password_input", "pw-ana-12345")
    page.fill("#password_again_input", "pw-ana-12345")
    page.screenshot(path=str(shots / "02-signup.png"), full_page=True)
    page.click("#signup_submit")
    page.wait_for_url("**/hub/home", timeout=30_000)

    admin = token_for(stack, "admin")
    ana = call(stack, admin, "GET", "/hub/api/users/ana").json()
    assert "customers" in ana["groups"], "sign-ups are customers in the hub, as in the portal"
    admin_groups = call(stack, admin, "GET", "/hub/api/users/admin").json()["groups"]
    assert "customers" not in admin_groups
    role = call(stack, admin, "GET", f"{PORTAL}/accounts", params={"role": "customer"}).json()
    assert "ana" in [a["name"] for a in role]

    # A typo at login: a sentence, and no second account.
    page.click("#logout")
    page.goto(f"{stack.base_url}/hub/login")
    page.fill("#username_input", "anna")
    page.fill("#password_input", "pw-ana-12345")
    page.click("#login_submit")
    assert "Sign up first" in page.inner_text(".login_error")
    assert call(stack, admin, "GET", "/hub/api/users/anna").status_code == 404


def progress_on_screen(page: Any, seconds: float) -> bool:
    """Open the pending page's event log and wait for two events in it: True. False when
    the spawn was done first and the page went on to the server (a fast spawn can beat
    the screen; the events the page received are checked either way)."""
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + seconds
    opened = False
    while time.monotonic() < deadline:
        if "/spawn-pending/" not in page.url:
            return False
        try:
            if not opened:
                page.click("#progress-details summary", timeout=2_000)  # the event log
                opened = True
            if page.locator("#progress-log .progress-log-event").count() >= 2:
                return True
            page.wait_for_timeout(100)
        except PlaywrightError:  # the page moved on while it was read
            continue
    raise AssertionError(f"no progress on screen in {seconds} s, and no server: {page.url}")


def test_spawn_progress_is_live_and_the_starter_notebook_is_there(
    stack: Stack, page: Any, shots: Path
) -> None:
    ana = token_for(stack, "ana")
    grant(stack, "ana", 10_000_000)
    wait_free_gpus(stack, ana, 2)
    events: list[tuple[float, str]] = []
    page.expose_function("gpProgress", lambda at, data: events.append((float(at), str(data))))
    # Note when each progress event reaches the page (the page's own EventSource).
    page.add_init_script(
        """(() => {
          const Original = window.EventSource;
          if (!Original) { return; }
          window.EventSource = function (url, options) {
            const source = new Original(url, options);
            source.addEventListener("message", (e) => window.gpProgress(Date.now(), e.data));
            return source;
          };
          window.EventSource.prototype = Original.prototype;
        })();"""
    )
    browser_login(page, stack, "ana")
    page.goto(f"{stack.base_url}/hub/spawn")
    page.check("input[type=radio][value=gpu]")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/spawn-pending/**", timeout=30_000)
    if progress_on_screen(page, seconds=60):
        page.screenshot(path=str(shots / "03-progress.png"), full_page=True)
    page.wait_for_url("**/user/ana/lab**", timeout=150_000)

    assert len(events) >= 3, events
    first, last = events[0][0], events[-1][0]
    assert '"ready": true' in events[-1][1]
    # Streamed, not buffered: "ready" reached the page after the first event did.
    # (A buffered stream hands every event over in one piece, at the same moment.)
    assert last - first > 500, events

    # The starter notebook, in the file browser of the new server.
    item = page.locator(".jp-DirListing-itemText", has_text="gpu-quickstart.ipynb")
    item.first.wait_for(timeout=90_000)
    page.screenshot(path=str(shots / "04-lab-starter.png"))


def test_balance_runway_and_spend_on_home_and_billing_pages(
    stack: Stack, page: Any, shots: Path
) -> None:
    ana = token_for(stack, "ana")
    if server_of(stack, ana, "ana") is None:
        spawn_gpu(stack, ana, "ana")
    browser_login(page, stack, "ana")
    nav = wait_text(page, "#gp-nav-money", "credits")
    assert "runway" in nav, nav
    line = wait_text(page, "#gp-home-balance-line", "lasts about")
    assert "credits" in line and "1.00 credits/h" in line, line
    row = wait_text(page, "#gp-home-running tbody tr", "1.00 credits/h")
    assert "default server" in row, row
    assert page.locator("#gp-banner").is_hidden(), "10 credits at 1/h: no warning"
    page.screenshot(path=str(shots / "05-home-running.png"), full_page=True)

    page.goto(f"{stack.base_url}/hub/billing")
    assert "credits" in page.inner_text("#gp-billing-amount")
    assert "credits" in page.inner_text("#gp-billing-available")
    assert "lasts about" in page.inner_text("#gp-billing-rate")
    assert page.inner_text("#gp-deposit-address").strip()
    assert page.get_attribute("#gp-deposit-qr", "src").startswith("data:image/svg+xml")
    assert "10.00 credits" in page.inner_text("#gp-billing-history"), "the grant is listed"
    page.screenshot(path=str(shots / "06-billing.png"), full_page=True)
    reply = page.request.get(f"{stack.base_url}/hub/billing/usage.csv?by=day")
    assert reply.status == 200
    header = next(csv.reader(io.StringIO(reply.text())))
    assert header == ["day", "server", "allocations", "gpu_hours", "charged_micro_credits"]


def test_stop_asks_first_and_shows_what_the_session_cost(
    stack: Stack, page: Any, shots: Path
) -> None:
    ana = token_for(stack, "ana")
    if server_of(stack, ana, "ana") is None:
        spawn_gpu(stack, ana, "ana")
    browser_login(page, stack, "ana")
    wait_text(page, "#gp-home-running tbody tr", "1.00 credits/h")
    questions: list[str] = []

    def answer(dialog: Any) -> None:
        questions.append(dialog.message)
        # The first time the user thinks again; the second time they stop it.
        dialog.dismiss() if len(questions) == 1 else dialog.accept()

    page.on("dialog", answer)
    page.click("#stop")
    assert len(questions) == 1 and "cost" in questions[0] and "Stop" in questions[0], questions
    page.wait_for_timeout(1500)
    assert server_of(stack, ana, "ana") is not None, "dismissing the question stops nothing"
    page.click("#stop")
    assert len(questions) == 2
    summary = wait_text(page, ".gp-stop-summary", "cost")
    assert "has ended" in summary and "credits" in summary, summary
    page.screenshot(path=str(shots / "07-stop-summary.png"), full_page=True)
    wait_server(stack, ana, "ana", ready=False)


def test_low_runway_banner_then_the_reason_after_a_forced_stop(
    stack: Stack, page: Any, shots: Path
) -> None:
    bo = token_for(stack, "bo")
    # Enough for the minimum billable period and half a minute more: the runway
    # is under the warning time from the start, and the meter stops the server.
    grant(stack, "bo", -(-HOUSE_PRICE * (MIN_BILLABLE + 30) // 3600))
    wait_free_gpus(stack, bo, 2)
    spawn_gpu(stack, bo, "bo")
    browser_login(page, stack, "bo")
    banner = wait_text(page, "#gp-banner", "credit")
    assert "runs out" in banner or "stop" in banner, banner
    page.screenshot(path=str(shots / "08-low-runway-banner.png"), full_page=True)
    page.goto(f"{stack.base_url}/hub/token")
    wait_text(page, "#gp-banner", "credit")  # on every hub page

    wait_server(stack, bo, "bo", ready=False)  # the meter's stop
    page.goto(f"{stack.base_url}/hub/home")
    reason = wait_text(page, ".gp-stop-reason", "credit ran out")
    assert "default server" in reason, reason
    page.screenshot(path=str(shots / "09-forced-stop-reason.png"), full_page=True)
    # Where JupyterLab sends a user whose server is gone.
    page.goto(f"{stack.base_url}/hub/user/bo/lab")
    said = wait_text(page, "#gp-not-running-reason", "credit ran out")
    assert "cost" in said, said


def test_an_idle_culled_cpu_server_says_why_on_the_home_and_not_running_pages(
    stack: Stack, page: Any, shots: Path
) -> None:
    idler = token_for(stack, IDLER)
    reply = call(stack, idler, "POST", f"/hub/api/users/{IDLER}/server", json={"profile": "cpu"})
    assert reply.status_code in (201, 202), reply.text
    wait_server(stack, idler, IDLER, ready=True)
    # An open JupyterLab tab, where nobody works: the extension's idle check (a quarter
    # of the 5 s limit) culls the server, the tab saves and acknowledges (or, without
    # one, the stop waits the 30 s bound), the server writes its stop marker and exits.
    browser_login(page, stack, IDLER)
    page.goto(f"{stack.base_url}/hub/user/{IDLER}/lab")
    for _ in range(600):  # bounded: five minutes
        if server_of(stack, idler, IDLER) is None:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the idle server was never culled")
    page.goto(f"{stack.base_url}/hub/home")
    said = wait_text(page, ".gp-self-stop", "idle")
    assert said.startswith("Your default server stopped because it was idle for"), said
    assert "no kernel or GPU was busy" in said, said
    assert page.locator(".gp-stop-reason").count() == 0, "no credit reason for a CPU server"
    page.screenshot(path=str(shots / "10-idle-stop-reason.png"), full_page=True)
    page.goto(f"{stack.base_url}/hub/user/{IDLER}/lab")
    own = wait_text(page, "#gp-not-running-self-stop", "idle")
    assert own.startswith("It stopped because it was idle for"), own


def test_a_crafted_user_name_is_shown_as_text(stack: Stack, page: Any) -> None:
    name = "<b>evil<b>"
    client = hub_login(stack.base_url, name, "pw-evil-12345")
    try:
        # Only your own money: the summary has no way to name another user.
        mine = client.get("/hub/billing/summary", params={"user": "ana"}).json()
        assert mine["known"] and mine["balance"] == "0.00 credits", mine
    finally:
        client.close()
    admin = token_for(stack, "admin")
    memo = {"user": name, "amount": 1_000_000, "memo": "<b>thanks</b>"}
    assert call(stack, admin, "POST", f"{PORTAL}/credits/grants", json=memo).status_code == 201
    page.goto(f"{stack.base_url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", "pw-evil-12345")
    page.click("#login_submit")
    page.wait_for_url("**/hub/home", timeout=30_000)
    wait_text(page, "#gp-nav-money", "credits")
    for path in ("/hub/home", "/hub/billing"):
        page.goto(f"{stack.base_url}{path}")
        assert name in page.inner_text("#login_widget")
        assert page.locator("body b").count() == 0, f"{path} made markup of a user name"
    assert "<b>thanks</b>" in page.inner_text("#gp-billing-history"), "a memo is text too"
