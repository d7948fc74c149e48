"""Teams through the portal API: created and managed by admins and team admins, kept in
step with hub groups both ways, audited; servers shared only between teammates, and
the share revoked when a member leaves. Every refusal is a 4xx with a sentence.

The hub is the suite's double (``FakeHub``), which holds groups and shares as the hub
would; the real hub's side (group and share calls) is in ``test_teams_stack.py``-free
form here on purpose: the rules are the portal's, and run on SQLite in-process.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from gpuportal.hub.pages import teams as teams_page
from gpuportal.hub.portal import api
from gpuportal.hub.portal.api.plumbing import full_admin
from gpuportal.hub.portal.hubapi import HubUnavailable
from gpuportal.hub.portal.loops import sync_from_hub

from .fakes import FakeHub, PortalClientFactory

API = "/services/portal/api/v1"
USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-lea": {"name": "lea", "kind": "user", "admin": False, "groups": []},
    "tok-max": {"name": "max", "kind": "user", "admin": False, "groups": []},
    "tok-eve": {"name": "eve", "kind": "user", "admin": False, "groups": []},
    "tok-prov": {"name": "pat", "kind": "user", "admin": False, "groups": ["providers"]},
}
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def call(client: TestClient, token: str, method: str, path: str, body: Any = None) -> Any:
    return client.request(
        method, API + path, json=body, headers={"Authorization": f"token {token}"}
    )


def message(reply: Any) -> str:
    return str(reply.json()["error"]["message"])


def actions(client: TestClient) -> list[tuple[str, str, str]]:
    reply = call(client, "tok-admin", "GET", "/admin/audit?target_kind=team")
    assert reply.status_code == 200, reply.text
    return [(r["actor"], r["action"], r["target"]) for r in reversed(reply.json())]


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub(USERS)


@pytest.fixture
def client(portal_client: PortalClientFactory, hub: FakeHub) -> TestClient:
    made: TestClient = portal_client(hub=hub)
    return made


def members_in_hub(hub: FakeHub, team: str) -> list[str]:
    return next(g["users"] for g in hub.group_models if g["name"] == team)


@SQLITE_ONLY
def test_an_admin_creates_a_team_and_a_team_admin_runs_it(client: TestClient, hub: FakeHub) -> None:
    made = call(client, "tok-admin", "POST", "/teams", {"name": "ml", "reason": "new lab"})
    assert made.status_code == 201, made.text
    assert members_in_hub(hub, "ml") == [], "the hub group exists"
    added = call(client, "tok-admin", "POST", "/teams/ml/members", {"user": "lea", "role": "admin"})
    assert added.status_code == 201, added.text
    # Lea, a team admin, adds Max; the hub group and the portal agree.
    assert call(client, "tok-lea", "POST", "/teams/ml/members", {"user": "max"}).status_code == 201
    assert members_in_hub(hub, "ml") == ["lea", "max"]
    team = call(client, "tok-max", "GET", "/teams/ml").json()
    assert [(m["name"], m["role"]) for m in team["members"]] == [
        ("lea", "admin"),
        ("max", "member"),
    ]
    assert (team["role"], team["manage"], team["balance"]) == ("member", False, 0)
    # Budget, default profile and credits to the team wallet.
    budget = {"window": "week", "gpu_hours": 10, "spend_cap_per_hour": 5_000_000}
    assert call(client, "tok-lea", "PUT", "/teams/ml/budget", budget).status_code == 200
    profile = call(
        client, "tok-lea", "PUT", "/teams/ml/default-profile", {"default_profile": "a100"}
    )
    assert profile.json()["default_profile"] == "a100"
    grant = {"team": "ml", "amount": 7_000_000}
    assert call(client, "tok-admin", "POST", "/credits/grants", grant).status_code == 201
    seen = call(client, "tok-max", "GET", "/teams").json()
    assert [(t["name"], t["balance"], t["budget"]["spend_cap_per_hour"]) for t in seen] == [
        ("ml", 7_000_000, 5_000_000)
    ]
    assert call(
        client, "tok-lea", "PUT", "/teams/ml/members/max/role", {"role": "admin"}
    ).is_success
    # A provider who is also a customer is a member like anyone else.
    assert call(client, "tok-lea", "POST", "/teams/ml/members", {"user": "pat"}).status_code == 201
    assert [t["name"] for t in call(client, "tok-prov", "GET", "/teams").json()] == ["ml"]
    assert call(client, "tok-prov", "POST", "/shares", {"server": "", "user": "max"}).is_success
    assert actions(client) == [
        ("admin", "team.create", "ml"),
        ("admin", "team.member.add", "ml"),
        ("lea", "team.member.add", "ml"),
        ("lea", "team.budget", "ml"),
        ("lea", "team.profile", "ml"),
        ("admin", "credits.grant", "ml"),
        ("lea", "team.role", "ml"),
        ("lea", "team.member.add", "ml"),
    ]


@SQLITE_ONLY
def test_members_outsiders_and_crafted_requests_are_refused_with_a_sentence(
    client: TestClient, hub: FakeHub
) -> None:
    call(client, "tok-admin", "POST", "/teams", {"name": "ml"})
    call(client, "tok-admin", "POST", "/teams/ml/members", {"user": "max"})
    refusals = [
        ("tok-max", "POST", "/teams", {"name": "mine"}, 403, "Only portal admins"),
        ("tok-prov", "POST", "/teams", {"name": "mine"}, 403, "Only portal admins"),
        ("tok-max", "POST", "/teams/ml/members", {"user": "eve"}, 403, "Only a team admin"),
        ("tok-max", "PUT", "/teams/ml/budget", {"gpu_hours": 99}, 403, "Only a team admin"),
        ("tok-max", "PUT", "/teams/ml/members/max/role", {"role": "admin"}, 403, "team admin"),
        ("tok-max", "DELETE", "/teams/ml/members/admin", None, 403, "Only a team admin"),
        ("tok-eve", "GET", "/teams/ml", None, 404, "You are not in a team named 'ml'"),
        ("tok-eve", "POST", "/teams/ml/members", {"user": "eve"}, 404, "not in a team"),
        ("tok-eve", "GET", "/teams/nope", None, 404, "not in a team"),
        ("tok-admin", "POST", "/teams", {"name": "admins"}, 422, "is a role group"),
        ("tok-admin", "POST", "/teams", {"name": "../x"}, 422, "is not a team name"),
        ("tok-admin", "POST", "/teams/ml/members", {"user": "ghost"}, 422, "no hub user"),
        ("tok-admin", "PUT", "/teams/ml/members/eve/role", {"role": "admin"}, 422, "not a member"),
        ("tok-admin", "PUT", "/teams/ml/members/max/role", {"role": "owner"}, 422, ""),
        ("tok-admin", "PUT", "/teams/ml/budget", {"spend_cap_per_hour": -1}, 422, ""),
        ("tok-admin", "PUT", "/teams/ml/budget", {"spend_cap_per_hour": 2**63}, 422, ""),
    ]
    for token, method, path, body, status, words in refusals:
        reply = call(client, token, method, path, body)
        assert reply.status_code == status, (token, method, path, reply.text)
        assert words in message(reply) and "Traceback" not in reply.text
    assert members_in_hub(hub, "ml") == ["max"], "nothing changed in the hub"
    assert [a for _, a, _ in actions(client)] == ["team.create", "team.member.add"]

    # A hub that does not answer the group call changes nothing, and says so.
    async def refused(group: str, users: list[str]) -> None:
        raise HubUnavailable("connection refused")

    hub.add_group_users = refused  # type: ignore[method-assign]
    down = call(client, "tok-admin", "POST", "/teams/ml/members", {"user": "lea"})
    assert down.status_code == 503 and "nothing was changed" in message(down)
    assert [m["name"] for m in call(client, "tok-admin", "GET", "/teams/ml").json()["members"]] == [
        "max"
    ]


@SQLITE_ONLY
def test_shares_go_only_to_teammates_and_end_when_a_member_leaves(
    client: TestClient, hub: FakeHub
) -> None:
    call(client, "tok-admin", "POST", "/teams", {"name": "ml"})
    for user in ("lea", "max"):
        call(client, "tok-admin", "POST", "/teams/ml/members", {"user": user})
    outsider = call(client, "tok-lea", "POST", "/shares", {"server": "gpu", "user": "eve"})
    assert outsider.status_code == 403 and "only with a teammate" in message(outsider)
    assert call(client, "tok-lea", "POST", "/shares", {"server": "gpu", "user": "max"}).is_success
    assert call(client, "tok-max", "POST", "/shares", {"server": "", "user": "lea"}).is_success
    assert hub.shares == {("lea", "gpu", "max"), ("max", "", "lea")}
    listed = call(client, "tok-lea", "GET", "/shares").json()
    assert listed == {"teammates": ["max"], "shares": [{"server": "gpu", "user": "max"}]}
    # Max leaves: both shares between him and his former teammate are revoked.
    left = call(client, "tok-max", "DELETE", "/teams/ml/members/max")
    assert left.status_code == 200, left.text
    assert (left.json()["removed"], left.json()["revoked"]) == (True, 2)
    assert hub.shares == set()
    assert members_in_hub(hub, "ml") == ["lea"]
    again = call(client, "tok-lea", "POST", "/shares", {"server": "gpu", "user": "max"})
    assert again.status_code == 403


@SQLITE_ONLY
def test_a_member_removed_in_the_hub_leaves_the_team_and_its_shares(
    client: TestClient, hub: FakeHub
) -> None:
    """The other direction: the hub group changes, the next sync follows."""
    hub.group_models.append({"name": "cv", "users": ["lea", "max"]})
    portal = client.app.state.portal  # type: ignore[attr-defined]
    asyncio.run(sync_from_hub(portal))
    assert [t["name"] for t in call(client, "tok-max", "GET", "/teams").json()] == ["cv"]
    assert call(client, "tok-lea", "POST", "/shares", {"server": "", "user": "max"}).is_success
    hub.group_models[-1]["users"] = ["lea"]
    asyncio.run(sync_from_hub(portal))
    assert call(client, "tok-max", "GET", "/teams").json() == []
    assert hub.shares == set()


@SQLITE_ONLY
def test_the_spawn_forms_bill_to_learns_which_teams_can_pay(client: TestClient) -> None:
    """``GET /billing-teams``: each team of the user with its default profile, and
    whether it can pay now (credit in its wallet, GPU-hours left), with why not."""
    for team in ("ml", "cv"):
        call(client, "tok-admin", "POST", "/teams", {"name": team})
        call(
            client, "tok-admin", "POST", f"/teams/{team}/members", {"user": "lea", "role": "admin"}
        )
    call(client, "tok-lea", "PUT", "/teams/ml/default-profile", {"default_profile": "gpu"})

    def said(who: str = "tok-lea", query: str = "") -> list[tuple[Any, ...]]:
        reply = call(client, who, "GET", f"/billing-teams{query}")
        assert reply.status_code == 200, reply.text
        return [(t["name"], t["default_profile"], t["can_pay"], t["why"]) for t in reply.json()]

    assert said() == [("cv", None, False, "no credit left"), ("ml", "gpu", False, "no credit left")]
    grant = {"team": "ml", "amount": 1}
    assert call(client, "tok-admin", "POST", "/credits/grants", grant).status_code == 201
    assert said()[1] == ("ml", "gpu", True, "")
    # A budget of no GPU-hours has none left.
    budget = {"gpu_hours": 0}
    assert call(client, "tok-lea", "PUT", "/teams/ml/budget", budget).status_code == 200
    assert said()[1] == ("ml", "gpu", False, "its GPU-hour budget is used up")
    assert said("tok-admin", "?user=lea") == said()
    assert said("tok-max") == [] and said("tok-admin", "?user=nobody") == []
    outsider = call(client, "tok-max", "GET", "/billing-teams?user=lea")
    assert outsider.status_code == 403 and "yourself" in message(outsider)


@SQLITE_ONLY
def test_a_share_the_hub_could_not_revoke_at_leave_time_ends_at_the_next_sync(
    client: TestClient, hub: FakeHub
) -> None:
    """The hub is down while Max leaves: the leave is made, the share revocation is
    only logged; the next sync revokes it, and keeps the shares between teammates."""
    call(client, "tok-admin", "POST", "/teams", {"name": "ml"})
    for user in ("lea", "max", "pat"):
        call(client, "tok-admin", "POST", "/teams/ml/members", {"user": user})
    for owner, mate in (("lea", "max"), ("max", "lea"), ("lea", "pat")):
        shared = call(client, f"tok-{owner}", "POST", "/shares", {"server": "", "user": mate})
        assert shared.is_success, shared.text

    async def down(user: str) -> list[dict[str, Any]]:
        raise HubUnavailable("connection refused")

    hub.shared_with = down  # type: ignore[method-assign]
    left = call(client, "tok-max", "DELETE", "/teams/ml/members/max")
    assert left.status_code == 200 and left.json()["revoked"] == 0, left.text
    assert ("lea", "", "max") in hub.shares and ("max", "", "lea") in hub.shares
    del hub.shared_with  # the hub answers again
    portal = client.app.state.portal  # type: ignore[attr-defined]
    counts = asyncio.run(sync_from_hub(portal))
    assert counts["shares_revoked"] == 2
    assert hub.shares == {("lea", "", "pat")}
    assert asyncio.run(sync_from_hub(portal))["shares_revoked"] == 0


def _admin_only(route: APIRoute) -> bool:
    def walk(dependant: Any) -> bool:
        return any(d.call is full_admin or walk(d) for d in dependant.dependencies)

    return walk(route.dependant)


@SQLITE_ONLY
def test_every_admin_route_of_the_app_refuses_a_non_admin(client: TestClient) -> None:
    """Walks the app's own routes (a new admin route is covered without listing it):
    a customer, a provider, and a team admin, also with crafted bodies naming the admin."""
    call(client, "tok-admin", "POST", "/teams", {"name": "ml"})
    call(client, "tok-admin", "POST", "/teams/ml/members", {"user": "lea", "role": "admin"})
    routes = [
        r
        for module in pkgutil.iter_modules(api.__path__)
        for r in getattr(
            importlib.import_module(f"{api.__name__}.{module.name}"), "router", APIRouter()
        ).routes
        if isinstance(r, APIRoute) and _admin_only(r)
    ]
    assert len(routes) >= 10, [r.path for r in routes]
    for route in routes:
        path = route.path.replace("/api/v1", "")
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", "1")
        for method in route.methods:
            for token in ("tok-lea", "tok-prov"):
                for body in (None, {"user": "admin", "team": "ml", "amount": 1, "reason": "x"}):
                    reply = call(client, token, method, path, body)
                    assert reply.status_code == 403, (token, method, path, reply.text)
                    assert message(reply)


@pytest.mark.parametrize(
    ("form", "call_made"),
    [
        (
            {"action": "add", "team": "ml", "user": "max", "role": "admin"},
            ("POST", "teams/ml/members", {"user": "max", "role": "admin", "reason": ""}),
        ),
        (
            {"action": "remove", "team": "ml", "user": "a b"},
            ("DELETE", "teams/ml/members/a%20b", None),
        ),
        (
            {"action": "budget", "team": "ml", "gpu_hours": "2.5", "spend_cap": "1.5"},
            (
                "PUT",
                "teams/ml/budget",
                {
                    "window": "month",
                    "gpu_hours": 2.5,
                    "spend_cap_per_hour": 1_500_000,
                    "reason": "",
                },
            ),
        ),
        (
            {"action": "share", "server": "", "user": "max"},
            ("POST", "shares", {"server": "", "user": "max"}),
        ),
    ],
)
def test_each_teams_page_form_makes_one_portal_call(
    form: dict[str, str], call_made: tuple[Any, ...]
) -> None:
    assert teams_page.action_request(form)[:3] == call_made


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"action": "add", "team": "../admin/x", "user": "max"}, "without '/'"),
        ({"action": "add", "team": "", "user": "max"}, "Say which team"),
        ({"action": "budget", "team": "ml", "gpu_hours": "lots"}, "not a number of GPU-hours"),
        ({"action": "budget", "team": "ml", "spend_cap": "1e99"}, "is not an amount"),
        ({"action": "share", "server": "", "user": ""}, "Choose a teammate"),
        ({"action": "grant", "team": "ml"}, "no such action"),
    ],
)
def test_a_bad_teams_page_form_is_refused_with_a_sentence(form: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        teams_page.action_request(form)
