"""The spawn form's "Bill to": the user's teams (never role groups) are offered, the
choice travels as the ``bill_to`` option, and a crafted team the user is not in is
refused before anything is reserved (the portal checks membership again)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jupyterhub.spawner import SpawnException

from gpuportal.spawners import form, profiles
from gpuportal.spawners.profiles import default_profile_list
from gpuportal.spawners.spawner import RaySpawner

from .contract_portal import ContractPortal, Node, Served, create_app
from .raynodes import free_port

PROFILES = profiles.check_profile_list(default_profile_list(models=["RTX-4090"]))


class Group:
    def __init__(self, name: str) -> None:
        self.name = name


class TeamUser:
    name = "ann"
    url = "/user/ann/"
    groups = [Group("customers"), Group("ml"), Group("<b>cv</b>")]


def spawner_with(options: dict[str, Any]) -> RaySpawner:
    spawner = RaySpawner(user=TeamUser(), profile_list=PROFILES)  # type: ignore[arg-type]
    spawner.user_options = options
    return spawner


def test_the_form_offers_the_users_teams_and_keeps_the_choice_as_an_option() -> None:
    spawner = spawner_with({})
    assert spawner.user_teams() == ["<b>cv</b>", "ml"], "role groups are not teams"
    html = form.render(PROFILES, None, {"bill_to": "ml"}, teams=spawner.user_teams())
    assert 'name="bill_to"' in html and "My own wallet" in html
    assert '<option value="ml" selected>Team ml' in html
    assert "&lt;b&gt;cv&lt;/b&gt;" in html and "<b>cv</b>" not in html
    assert 'name="bill_to"' not in form.render(PROFILES, None, {}, teams=[])
    chosen = profiles.options_from_form({"profile": ["cpu"], "bill_to": ["ml"]})
    assert chosen == {"profile": "cpu", "bill_to": "ml"}
    assert profiles.select(PROFILES, chosen).profile == "cpu"


def test_billing_to_a_team_of_the_user_is_passed_on_and_empty_means_the_user() -> None:
    spawner = spawner_with({"profile": "cpu", "bill_to": "ml"})
    spawner._apply_options()
    assert spawner.bill_to == "ml"
    spawner.user_options = {"profile": "cpu", "bill_to": ""}
    spawner._apply_options()
    assert spawner.bill_to is None


@pytest.mark.parametrize("crafted", ["ops", "customers", "admins", 7, ["ml"], "ml "])
def test_a_crafted_team_is_refused_with_a_sentence(crafted: Any) -> None:
    spawner = spawner_with({"profile": "cpu", "bill_to": crafted})
    with pytest.raises(SpawnException) as refused:
        spawner._apply_options()
    assert "You are not a member of team" in str(refused.value)
    assert getattr(refused.value, "status_code", None) == 403


def test_bill_to_marks_teams_that_cannot_pay_and_a_teams_profile_is_preselected() -> None:
    """Through the spawner's portal client: the portal's word on each team reaches the
    form; a team that cannot pay is disabled with why; a team's default profile is
    what its option selects, and what the form starts with when billing it."""
    portal = ContractPortal(token="t0k3n")
    portal.billing_teams["ann"] = [
        {"name": "ml", "default_profile": "gpu", "can_pay": True, "why": ""},
        {"name": "<b>cv</b>", "default_profile": None, "can_pay": False, "why": "no credit left"},
    ]
    portal.nodes.append(Node("n1", 2, "RTX-4090", "local", 1_000_000, "http://ray"))
    port = free_port()

    async def run(options: dict[str, Any]) -> str:
        spawner = RaySpawner(
            user=TeamUser(),  # type: ignore[arg-type]
            profile_list=PROFILES,
            portal_url=f"http://127.0.0.1:{port}/services/portal",
            portal_token="t0k3n",
        )
        spawner.user_options = options
        return await RaySpawner._render_options_form(spawner)

    with Served(create_app(portal), port):
        page = asyncio.run(run({}))
        billing = asyncio.run(run({"bill_to": "ml"}))
        broke = asyncio.run(run({"bill_to": "<b>cv</b>"}))
    assert '<option value="ml" data-profile="gpu">Team ml' in page
    assert (
        '<option value="&lt;b&gt;cv&lt;/b&gt;" disabled>Team &lt;b&gt;cv&lt;/b&gt;: cannot pay '
        "now (no credit left)</option>"
    ) in page
    assert 'value="cpu" checked' in page
    assert 'value="gpu" checked' not in page
    assert (
        'value="gpu" checked' in billing
        and '<option value="ml" data-profile="gpu" selected>' in billing
    )
    # A team that cannot pay is never preselected: the user's own wallet is.
    assert "selected>Team" not in broke and '<option value="" selected>My own wallet' in broke


def test_without_the_portals_word_every_team_is_offered_as_before() -> None:
    spawner = spawner_with({})
    choices = spawner.bill_to_choices(RuntimeError("portal down"))
    assert [(c["name"], c["can_pay"]) for c in choices] == [("<b>cv</b>", True), ("ml", True)]
    # A team the portal does not list (not synced yet) is offered; one it lists for a
    # group the user is not in is not.
    said = [{"name": "ops", "can_pay": True}, {"name": "ml", "can_pay": False, "why": "x"}]
    choices = spawner.bill_to_choices(said)
    assert [(c["name"], c["can_pay"], c["why"]) for c in choices] == [
        ("<b>cv</b>", True, ""),
        ("ml", False, "x"),
    ]
