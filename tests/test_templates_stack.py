"""The template gallery through the real hub, portal and RaySpawner of the shared stack.

A team admin publishes a team template; the outsider neither sees it in the gallery nor
can open it (404); a member clicks through login → Templates → **Open on GPU** in
headless Chromium, which starts a GPU server through the RaySpawner, copies the
notebook in through the server's contents API, and opens it in JupyterLab. The
notebook is then read back from the server, and a second Open on GPU reuses the running
server. The screenshot goes to ``$TEST_SCREENSHOTS_DIR`` when set, else a temporary
folder (never the checkout).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub.db import accounts
from gpuportal.hub.db.models import Account, Team
from gpuportal.hub.settings import load_settings

from .portal_stack import (
    PORTAL_API,
    Stack,
    call,
    hub_login,
    hub_token,
    password_of,
    server_of,
    token_for,
    wait_free_gpus,
)

TEAM = "tpl-team"
#: What the admin grants the team, micro-credits (100 credits).
TEAM_FUNDS = 100_000_000
LEAD, MEMBER, OUTSIDER = "tpl-lead", "tpl-member", "tpl-outsider"
TITLE = "Team fine-tune on an A100"


def notebook() -> str:
    return json.dumps(
        {
            "cells": [
                {
                    "cell_type": "code",
                    "id": "c0",
                    "metadata": {},
                    "source": "print('hello from the team template')",
                    "outputs": [],
                    "execution_count": None,
                }
            ],
            "metadata": {
                "gpuportal": {
                    "template": {
                        "title": TITLE,
                        "description": "Published by the team admin in a test.",
                        "gpu_model": "A100-80GB",
                        "gpu_count": 1,
                        "min_vram_gb": 40,
                        "expected_minutes": 10,
                    }
                },
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )


def set_role(stack: Stack, name: str, role: str) -> None:
    """Make ``name`` a team admin (or member) of TEAM in the portal DB: the teams work
    adds the page and API for it."""
    engine = portal_db.make_engine(load_settings(data_dir=stack.data_dir).database_url)
    try:
        with portal_db.transaction(portal_db.session_factory(engine)) as session:
            group = session.scalar(select(Team).where(Team.hub_group == TEAM))
            account = session.scalar(select(Account).where(Account.hub_name == name))
            assert group is not None and account is not None
            accounts.set_team_role(session, group, account, role)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def team(stack: Stack) -> dict[str, str]:
    """Three users; a hub group with the lead (a team admin) and the member."""
    tokens = {name: token_for(stack, name) for name in ("admin", LEAD, MEMBER, OUTSIDER)}
    made = call(
        stack, tokens["admin"], "POST", f"/hub/api/groups/{TEAM}", json={"users": [LEAD, MEMBER]}
    )
    assert made.status_code == 201, made.text
    synced = call(stack, tokens["admin"], "POST", f"{PORTAL_API}/sync")
    assert synced.status_code == 200, synced.text
    set_role(stack, LEAD, "admin")
    # The team pays for its members' Open on GPU of its templates.
    funded = call(
        stack,
        tokens["admin"],
        "POST",
        f"{PORTAL_API}/credits/grants",
        json={"team": TEAM, "amount": TEAM_FUNDS},
    )
    assert funded.status_code == 201, funded.text
    return tokens


@pytest.fixture(scope="module")
def published(stack: Stack, team: dict[str, str]) -> dict[str, Any]:
    body = {"team": TEAM, "notebook": notebook()}
    reply = call(stack, team[LEAD], "POST", f"{PORTAL_API}/templates", json=body)
    assert reply.status_code == 201, reply.text
    refused = call(stack, team[MEMBER], "POST", f"{PORTAL_API}/templates", json=body)
    assert refused.status_code == 403, refused.text
    return dict(reply.json())


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("TEST_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_an_outsider_neither_sees_nor_opens_a_teams_template(
    stack: Stack, team: dict[str, str], published: dict[str, Any]
) -> None:
    outsider = hub_login(stack.base_url, OUTSIDER, password_of(stack, OUTSIDER))
    member = hub_login(stack.base_url, MEMBER, password_of(stack, MEMBER))
    try:
        gallery = outsider.get("/hub/templates")
        assert gallery.status_code == 200
        assert "PyTorch training on one GPU" in gallery.text
        assert TITLE not in gallery.text
        assert 'id="gp-nav-templates"' in gallery.text
        xsrf = {"X-XSRFToken": outsider.cookies.get("_xsrf", path="/hub/") or ""}
        for step in ("open", "copy"):
            refused = outsider.post(f"/hub/templates/{step}/{published['id']}", headers=xsrf)
            assert refused.status_code == 404, refused.text
            assert refused.json() == {"message": "There is no such template."}
        # ...nor through the portal with their own token.
        direct = call(stack, team[OUTSIDER], "GET", f"{PORTAL_API}/templates/{published['id']}")
        assert direct.status_code == 404
        # Without the XSRF token, a cookie-only POST is refused by the hub.
        assert outsider.post("/hub/templates/open/global/pytorch-training").status_code == 403
        assert server_of(stack, team[OUTSIDER], OUTSIDER) is None

        # A template no provider can host: Open on GPU says why, in the spawner's words,
        # and the page's check afterwards repeats it without starting again.
        h100 = json.loads(notebook())
        h100["metadata"]["gpuportal"]["template"].update(
            title="Needs an H100", gpu_model="H100-80GB"
        )
        made = call(
            stack,
            team[LEAD],
            "POST",
            f"{PORTAL_API}/templates",
            json={"team": TEAM, "notebook": json.dumps(h100)},
        )
        assert made.status_code == 201, made.text
        assert made.json()["estimated_cost_display"] == "no provider offers this GPU now"
        lead = hub_login(stack.base_url, LEAD, password_of(stack, LEAD))
        try:
            lead_xsrf = {"X-XSRFToken": lead.cookies.get("_xsrf", path="/hub/") or ""}
            opened = lead.post(f"/hub/templates/open/{made.json()['id']}", headers=lead_xsrf)
            if opened.status_code == 200:  # refused after the first second: the events say so
                assert opened.json()["state"] == "starting", opened.text
                with lead.stream("GET", opened.json()["progress_url"]) as events:
                    failed = next(
                        json.loads(line[len("data:") :])
                        for line in events.iter_lines()
                        if line.startswith("data:") and '"failed": true' in line
                    )
                said = failed["message"]
                check = lead.post(
                    f"/hub/templates/open/{made.json()['id']}?check=1", headers=lead_xsrf
                )
                assert check.status_code == 409 and "did not start" in check.json()["message"]
            else:
                assert opened.status_code in (409, 422), opened.text
                said = opened.json()["message"]
            assert "H100-80GB" in said, said
            assert server_of(stack, team[LEAD], LEAD) is None
        finally:
            lead.close()

        seen = member.get("/hub/templates").text
        assert TITLE in seen and "1x A100-80GB (40 GB+)" in seen
        # 1 A100 at the house price for 10 minutes
        assert "for 10 min" in seen
    finally:
        outsider.close()
        member.close()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.browser
def test_open_on_gpu_in_a_browser_lands_the_notebook_in_jupyterlab(
    stack: Stack, team: dict[str, str], published: dict[str, Any], browser_page: Any, shots: Path
) -> None:
    token = team[MEMBER]
    wait_free_gpus(stack, token, 2)
    own_before = call(stack, token, "GET", f"{PORTAL_API}/balance").json()["balance"]
    member = hub_login(stack.base_url, MEMBER, password_of(stack, MEMBER))
    try:
        page = browser_page
        page.route(
            "**/*",
            lambda route: (
                route.continue_() if route.request.url.startswith(stack.base_url) else route.abort()
            ),
        )
        page.goto(f"{stack.base_url}/hub/login")
        page.fill("#username_input", MEMBER)
        page.fill("#password_input", password_of(stack, MEMBER))
        page.click("#login_submit")
        page.wait_for_url("**/hub/home", timeout=30_000)
        page.click("#gp-nav-templates")
        page.wait_for_url("**/hub/templates", timeout=30_000)
        card = page.locator(".gp-template", has_text=TITLE)
        card.locator(".gp-open").click()
        page.wait_for_selector("#gp-open-status:not([hidden])", timeout=30_000)
        page.wait_for_url(f"**/user/{MEMBER}/lab/tree/**", timeout=150_000)
        page.wait_for_selector(".jp-NotebookPanel", timeout=120_000)
        cell = page.locator(".jp-Cell", has_text="hello from the team template")
        cell.first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "templates-open-on-gpu.png"))

        server = server_of(stack, token, MEMBER)
        assert server is not None and server.get("ready")
        # The team's template runs on the team's money ("Bill to" the team).
        assert server["user_options"]["bill_to"] == TEAM, server
        path = page.url.split("/lab/tree/", 1)[1]
        landed = call(stack, token, "GET", f"/user/{MEMBER}/api/contents/{path}")
        assert landed.status_code == 200, landed.text
        meta = landed.json()["content"]["metadata"]["gpuportal"]["template"]
        assert meta["title"] == TITLE

        # A second Open on GPU reuses the running server (it fits) and the identical copy.
        # (The hub's pages take the login cookie with the XSRF token, not API tokens.)
        xsrf = {"X-XSRFToken": member.cookies.get("_xsrf", path="/hub/") or ""}
        again = member.post(f"/hub/templates/open/{published['id']}", headers=xsrf)
        assert again.json() == {"state": "ready"}, again.text
        copied = member.post(f"/hub/templates/copy/{published['id']}", headers=xsrf)
        assert copied.json()["path"] == path, copied.text
        # A template that needs more than the running server has is refused with a sentence.
        bigger = member.post("/hub/templates/open/global/ray-train", headers=xsrf)
        assert bigger.status_code == 409
        needs = "does not have what this template needs (2x any GPU (8 GB+))"
        assert needs in bigger.json()["message"]

        # Publishing from the server: a member who is no team admin is refused with the
        # portal's sentence; made a team admin, the same form publishes the notebook.
        form = {
            "team": TEAM,
            "path": path,
            "title": "Republished from a server",
            "gpu_model": "",
            "gpu_count": "1",
            "min_vram_gb": "0",
            "expected_minutes": "5",
        }
        form["_xsrf"] = xsrf["X-XSRFToken"]
        refused = member.post("/hub/templates/publish", data=form)
        assert refused.status_code == 400, refused.text[:300]
        assert f"Only an admin of team &#39;{TEAM}&#39;" in refused.text
        set_role(stack, MEMBER, "admin")
        done = member.post("/hub/templates/publish", data=form)
        assert done.status_code == 200 and "/hub/templates?done=" in str(done.url)
        assert 'id="gp-gallery-done"' in done.text and "Republished from a server" in done.text
        listed = call(stack, team[OUTSIDER], "GET", f"{PORTAL_API}/templates").json()
        assert "Republished from a server" not in [t["title"] for t in listed]
        listed = call(stack, team[LEAD], "GET", f"{PORTAL_API}/templates").json()
        mine = [t for t in listed if t["title"] == "Republished from a server"]
        assert len(mine) == 1 and mine[0]["gpu_model"] is None and mine[0]["expected_minutes"] == 5

        share_a_running_server(stack, team, member, xsrf["X-XSRFToken"])

        # Stopped, the session is charged to the team; the member's own wallet is not.
        call(stack, token, "DELETE", f"/hub/api/users/{MEMBER}/server")
        deadline = time.monotonic() + 60
        while team_balance(stack, team["admin"]) >= TEAM_FUNDS:
            assert time.monotonic() < deadline, "the team was not charged for the session"
            time.sleep(1)
        assert call(stack, token, "GET", f"{PORTAL_API}/balance").json()["balance"] == own_before
    finally:
        member.close()
        # Leave the shared stack as found: no server of this test runs on.
        call(stack, token, "DELETE", f"/hub/api/users/{MEMBER}/server")


def team_balance(stack: Stack, token: str) -> int:
    reply = call(stack, token, "GET", f"{PORTAL_API}/teams/{TEAM}")
    assert reply.status_code == 200, reply.text
    return int(reply.json()["balance"])


def share_a_running_server(
    stack: Stack, team: dict[str, str], member: httpx.Client, xsrf: str
) -> None:
    """The member's running server, shared with a teammate through the home page's
    share box: the teammate's own token reaches it through the proxy; after the
    teammate leaves the team, it does not. An outsider is never shared with.

    The single-user server caches the hub's answer for a token for
    ``RaySpawner.token_check_seconds`` (1 s on the test stack), so each step asks with a
    token it has not seen yet, and the token that reached the server while it was shared
    is refused, too, once the cache has expired.
    """
    lead = hub_login(stack.base_url, LEAD, password_of(stack, LEAD))
    try:
        before, during, after = (hub_token(lead, LEAD) for _ in range(3))
    finally:
        lead.close()
    status = f"/user/{MEMBER}/api/status"
    assert call(stack, before, "GET", status).status_code in (401, 403)
    form = {"action": "share", "server": "", "user": LEAD, "_xsrf": xsrf}
    assert 'id="gp-home-share-box"' in member.get("/hub/home").text
    shared = member.post("/hub/teams/act", data=form)
    assert 'id="gp-teams-done"' in shared.text, shared.text[-800:]
    reached = call(stack, during, "GET", status)
    assert reached.status_code == 200 and "started" in reached.json(), reached.text
    # An outsider: the page says why, the portal refuses, the hub holds no share.
    crafted = member.post("/hub/teams/act", data={**form, "user": OUTSIDER})
    assert 'id="gp-teams-failed"' in crafted.text and "only with a teammate" in crafted.text
    direct = call(
        stack, team[MEMBER], "POST", f"{PORTAL_API}/shares", json={"server": "", "user": OUTSIDER}
    )
    assert direct.status_code == 403, direct.text
    assert call(stack, team[OUTSIDER], "GET", status).status_code in (401, 403)
    # The teammate leaves the team: the share ends with it.
    left = call(stack, team[LEAD], "DELETE", f"{PORTAL_API}/teams/{TEAM}/members/{LEAD}")
    assert left.status_code == 200 and left.json()["revoked"] == 1, left.text
    assert call(stack, after, "GET", status).status_code in (401, 403)
    # The token the server already knew stops working within the re-check time.
    deadline = time.monotonic() + 15
    while call(stack, during, "GET", status).status_code == 200:
        assert time.monotonic() < deadline, "a revoked share still reached the server"
        time.sleep(0.5)
