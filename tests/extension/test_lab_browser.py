"""The JupyterLab front end in a real browser: headless Debian Chromium (Playwright with
``executable_path``) against a real JupyterLab server with gpuportal's extensions, as
``make install`` enables them (the prebuilt bundle, no Node.js).

The portal is faked at the HTTP level (lab_fixtures.FakePortal, a real HTTP server on
127.0.0.1). There is no GPU on these machines: the GPU readings are hand-written device
data (tests/extension/data) served through NVML's recorded-data seam. The browser may
reach 127.0.0.1 only. The screenshots go to ``$TEST_SCREENSHOTS_DIR`` when it is set
(``TEST_SCREENSHOTS_DIR=docs/img`` refreshes the README's), else to a temporary folder,
so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from .lab_fixtures import (
    FakePortal,
    Lab,
    allocation,
    balance,
    lab_in,
    notebook,
    only_local,
    utcnow,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: The multiplication sign in "GPU x2" as the status bar writes it.
TIMES = "\u00d7"
IMG = Path(os.environ.get("TEST_SCREENSHOTS_DIR") or tempfile.mkdtemp(prefix="lab-screens-"))
IMG.mkdir(parents=True, exist_ok=True)
#: Bounded waits for what the page shows (the front end polls every 5 s).
WAIT_MS = 60_000
#: 2 GPUs at 0.06 credits per GPU-hour: 0.12/h, one hundredth every 5 minutes, so the
#: spend shown stays 0.34 from 170 to 175 minutes after the start; the allocation
#: started SPAN ago when the server is up.
PRICE = 60_000
SPAN = timedelta(minutes=170, seconds=10)
RUNWAY = 3 * 3600 + 12 * 60 + 30
LOW = (
    "Your credit runs out in about 8 min; your servers stop when it does. "
    "Add credits to keep them running."
)
#: A notebook name that is also markup: it must show as text.
HOSTILE = '<img src=x onerror="window.injected=1">.ipynb'


@pytest.fixture(scope="module")
def portal() -> Iterator[FakePortal]:
    fake = FakePortal()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, portal: FakePortal) -> Iterator[Lab]:
    # Idle culling on (the panel shows its timer), checked hourly: no cull in a test.
    yield from lab_in(
        tmp_path_factory.mktemp("lab"), portal, idle_timeout_seconds=1800, idle_check_seconds=3600
    )


@pytest.fixture
def page(browser_page: Any, portal: FakePortal, lab: Lab) -> Any:
    """After the server is up, so the spend shown is the same for minutes (SPAN)."""
    only_local(browser_page)
    browser_page.set_viewport_size({"width": 1280, "height": 800})
    portal.allocation = allocation(utcnow() - SPAN, gpu_count=2, price_per_gpu_hour=PRICE)
    portal.balance = balance(4_000_000, RUNWAY)
    return browser_page


def status(page: Any) -> Any:
    return page.locator(".jp-gpuportal-status")


def test_the_status_bar_shows_the_figures_of_a_known_allocation(
    page: Any, lab: Lab, portal: FakePortal
) -> None:
    from playwright.sync_api import expect

    page.goto(lab.lab_url())
    expect(status(page)).to_have_text(
        f"GPU {TIMES}2 · 0.12/h · spent 0.34 · 3 h 12 min left", timeout=WAIT_MS
    )
    assert status(page).get_attribute("data-stale") == "false"
    IMG.mkdir(parents=True, exist_ok=True)
    page.locator(".jp-StatusBar-Widget").screenshot(path=str(IMG / "statusbar.png"))

    # The portal goes away: the last figures stay, marked stale.
    portal.stop()
    try:
        expect(status(page)).to_have_text(
            f"GPU {TIMES}2 · 0.12/h · spent 0.34 · 3 h 12 min left (stale)", timeout=WAIT_MS
        )
        assert "Portal unreachable" in (status(page).get_attribute("title") or "")
    finally:
        portal.start()


def test_a_cpu_only_server_shows_cpu_free(page: Any, lab: Lab, portal: FakePortal) -> None:
    from playwright.sync_api import expect

    portal.allocation = None
    portal.balance = balance(4_000_000, None)
    page.goto(lab.lab_url())
    expect(status(page)).to_have_text("CPU · free", timeout=WAIT_MS)


def test_a_click_opens_the_panel_listing_kernels_with_their_notebooks(page: Any, lab: Lab) -> None:
    from playwright.sync_api import expect

    notebook(lab.root / HOSTILE, "x = 1")
    page.goto(lab.lab_url(quote(HOSTILE)))  # opens the notebook; its kernel starts
    expect(page.locator(".jp-Notebook")).to_be_visible(timeout=WAIT_MS)
    expect(status(page)).to_contain_text(f"GPU {TIMES}2", timeout=WAIT_MS)
    status(page).click()
    panel = page.locator("#gpuportal-panel")
    expect(panel).to_be_visible(timeout=WAIT_MS)
    # Each GPU of the recorded data, with its charts.
    expect(panel.locator(".jp-gpuportal-gpu")).to_have_count(2, timeout=WAIT_MS)
    expect(panel.locator(".jp-gpuportal-gpu").first).to_contain_text("GPU 0: 91%")
    # The kernel, with its notebook's name shown as text, not markup.
    row = panel.locator(".jp-gpuportal-kernel")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    expect(row.locator(".jp-gpuportal-kernel-path")).to_have_text(HOSTILE, timeout=WAIT_MS)
    # Its GPU use, from the recorded data's training process (mapped to this kernel).
    expect(row.locator(".jp-gpuportal-kernel-use")).to_have_text(
        "GPU memory 21.0 GiB · GPU use 87% · busy", timeout=WAIT_MS
    )
    assert panel.locator("img").count() == 0
    assert page.evaluate("() => window.injected") is None
    # The recorded GPUs compute, so the idle timer stays at its full 30 minutes.
    expect(panel.locator(".jp-gpuportal-idle")).to_have_text(
        re.compile(r"This server stops in (29|30) min if the GPU stays idle\.")
    )
    # Two readings make a line.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gpuportal-panel polyline')]"
        ".every(l => l.getAttribute('points').split(' ').length >= 2)",
        timeout=WAIT_MS,
    )
    panel.screenshot(path=str(IMG / "panel.png"))

    # It follows JupyterLab's theme: dark colours under the dark theme.
    def background() -> str:
        return str(panel.evaluate("node => getComputedStyle(node).backgroundColor"))

    light = background()
    page.evaluate(
        "() => { window.jupyterapp.commands.execute("
        "'apputils:change-theme', {theme: 'JupyterLab Dark'}); }"
    )
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=WAIT_MS)
    page.wait_for_function(
        "light => getComputedStyle(document.querySelector('#gpuportal-panel'))"
        ".backgroundColor !== light",
        arg=light,
        timeout=WAIT_MS,
    )
    assert background() != light
    panel.screenshot(path=str(IMG / "panel-dark.png"))
    page.evaluate(  # the theme is a saved setting: back to light for the next tests
        "() => { window.jupyterapp.commands.execute("
        "'apputils:change-theme', {theme: 'JupyterLab Light'}); }"
    )
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'", timeout=WAIT_MS)


def test_a_low_runway_opens_the_dialog_with_a_top_up_link(
    page: Any, lab: Lab, portal: FakePortal
) -> None:
    from playwright.sync_api import expect

    portal.balance = balance(16_000, 480.0, LOW)
    page.goto(lab.lab_url())
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Credit running low", timeout=WAIT_MS)
    expect(dialog).to_contain_text(LOW)
    expect(dialog).to_contain_text("Time left: 8 min.")
    link = dialog.get_by_role("link", name="Add credits")
    assert link.get_attribute("href") == portal.url + "docs"
    page.locator(".jp-Dialog-content").screenshot(path=str(IMG / "dialog.png"))
    page.keyboard.press("Enter")  # keyboard: the dialog closes
    expect(dialog).to_have_count(0, timeout=WAIT_MS)


def test_a_credit_stop_saves_the_modified_notebook_before_the_server_goes_away(
    tmp_path: Path, browser_page: Any
) -> None:
    """A separate server, since this one stops for good."""
    from playwright.sync_api import expect

    portal = FakePortal()
    portal.start()
    page = browser_page
    only_local(page)
    labs = lab_in(tmp_path, portal, save_lead_seconds=60, save_wait_seconds=30)
    lab = next(labs)
    started = utcnow() - SPAN
    portal.allocation = allocation(started, gpu_count=2, price_per_gpu_hour=PRICE)
    portal.balance = balance(4_000_000, RUNWAY)
    try:
        notebook(lab.root / "work.ipynb", "x = 1")
        page.goto(lab.lab_url("work.ipynb"))
        editor = page.locator(".jp-Cell .cm-content").first
        expect(editor).to_be_visible(timeout=WAIT_MS)
        editor.click()
        page.keyboard.press("End")
        page.keyboard.type("  # unsaved work")
        expect(page.locator(".jp-mod-dirty")).not_to_have_count(0, timeout=WAIT_MS)
        on_disk = json.loads((lab.root / "work.ipynb").read_text())
        assert on_disk["cells"][0]["source"] == "x = 1"

        # The portal schedules the credit stop 20 s from now.
        stop_at = utcnow() + timedelta(seconds=20)
        portal.allocation = allocation(
            started,
            gpu_count=2,
            price_per_gpu_hour=PRICE,
            status="stopping",
            stopping_at=stop_at.isoformat(),
            stop_reason="out_of_credit",
        )
        portal.balance = balance(0, 0.0, "Out of credits: your servers stop soon.")
        expect(page.locator(".jp-gpuportal-banner")).to_contain_text(
            "Your work is saved (1 file).", timeout=WAIT_MS
        )
        page.screenshot(path=str(IMG / "saving.png"))
        # The server stops itself at the stop time (the hub would stop it there too).
        assert lab.process.wait(timeout=120) == 0
        saved = json.loads((lab.root / "work.ipynb").read_text())
        assert "".join(saved["cells"][0]["source"]) == "x = 1  # unsaved work"
        stopped = page.locator(".jp-gpuportal-stopped")
        expect(stopped).to_contain_text("Your server stopped", timeout=WAIT_MS)
        expect(stopped).to_contain_text("Your credit ran out.")
        expect(stopped).to_contain_text("This session cost 0.34 credits.")
        page.screenshot(path=str(IMG / "stopped.png"))
        assert "stops (out_of_credit); documents saved: 1" in lab.log.read_text()
    finally:
        labs.close()
        portal.stop()
