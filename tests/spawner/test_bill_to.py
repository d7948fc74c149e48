"""The spawn form's "Bill to": the user's teams (never role groups) are offered, the
choice travels as the ``bill_to`` option, and a crafted team the user is not in is
refused before anything is reserved (the portal checks membership again)."""

from __future__ import annotations

from typing import Any

import pytest
from jupyterhub.spawner import SpawnException

from gpuportal.spawners import form, profiles
from gpuportal.spawners.profiles import default_profile_list
from gpuportal.spawners.spawner import RaySpawner

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
