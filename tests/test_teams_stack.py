"""Teams through the real hub and portal of the shared stack (no browser, no server
started): the portal's team API makes the hub group and its members with its real
hub scopes, the teams page shows the team, and a share made through the portal is a
real JupyterHub share that is revoked when the member leaves."""

from __future__ import annotations

from .portal_stack import PORTAL_API, Stack, call, hub_login, password_of, token_for


def shared_with(stack: Stack, token: str, user: str) -> list[tuple[str, str]]:
    reply = call(stack, token, "GET", f"/hub/api/users/{user}/shared")
    assert reply.status_code == 200, reply.text
    return [(s["server"]["user"]["name"], s["server"]["name"]) for s in reply.json()["items"]]


def test_a_team_made_through_the_portal_is_a_hub_group_and_shares_end_with_membership(
    stack: Stack,
) -> None:
    admin = token_for(stack, "admin")
    tina, tom = (token_for(stack, name, meet_portal=True) for name in ("tina", "tom"))
    made = call(stack, admin, "POST", f"{PORTAL_API}/teams", json={"name": "lab"})
    assert made.status_code == 201, made.text
    add = {"user": "tina", "role": "admin"}
    assert (
        call(stack, admin, "POST", f"{PORTAL_API}/teams/lab/members", json=add).status_code == 201
    )
    # Tina, a team admin, adds Tom through the teams page's form (the hub's XSRF check,
    # then the portal as Tina): the hub group holds both.
    browser = hub_login(stack.base_url, "tina", password_of(stack, "tina"))
    try:
        xsrf = browser.cookies.get("_xsrf", path="/hub/") or ""
        form = {"action": "add", "team": "lab", "user": "tom", "_xsrf": xsrf}
        done = browser.post("/hub/teams/act", data=form)
        assert done.status_code == 200 and 'id="gp-teams-done"' in done.text, done.text[-800:]
        assert 'data-team="lab"' in done.text and 'data-member="tom"' in done.text
        assert 'id="gp-nav-teams"' in done.text
        assert "gp-team-add" in done.text, "Tina manages the team"
        crafted = browser.post("/hub/teams/act", data={**form, "team": "other"})
        assert 'id="gp-teams-failed"' in crafted.text
        assert browser.post("/hub/teams/act", data={**form, "_xsrf": ""}).status_code == 403
        assert 'id="gp-home-share-box"' in browser.get("/hub/home").text
    finally:
        browser.close()
    group = call(stack, admin, "GET", "/hub/api/groups/lab").json()
    assert sorted(group["users"]) == ["tina", "tom"]

    # A real JupyterHub share of Tina's server with Tom, and only with a teammate.
    shared = call(stack, tina, "POST", f"{PORTAL_API}/shares", json={"server": "", "user": "tom"})
    assert shared.status_code == 201, shared.text
    assert shared_with(stack, tom, "tom") == [("tina", "")]
    outsider = call(
        stack, tina, "POST", f"{PORTAL_API}/shares", json={"server": "", "user": "admin"}
    )
    assert outsider.status_code == 403, outsider.text
    # Tom leaves the team: his hub group membership and the share end.
    left = call(stack, tina, "DELETE", f"{PORTAL_API}/teams/lab/members/tom")
    assert left.status_code == 200 and left.json()["revoked"] == 1, left.text
    assert shared_with(stack, tom, "tom") == []
    assert call(stack, admin, "GET", "/hub/api/groups/lab").json()["users"] == ["tina"]
