"""Notebook templates without a stack: metadata rules, cost from live prices, and who
sees, fetches and publishes a team template (the portal app on SQLite, a fake hub).

The whole flow through the real hub, the RaySpawner and Chromium is in
``tests/test_templates_stack.py``; the shipped notebooks' CPU runs in
``tests/test_template_notebooks.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpuportal.hub import db as portal_db
from gpuportal.hub.db import accounts, audit
from gpuportal.hub.db.models import Team
from gpuportal.hub.market import templates
from gpuportal.hub.market.marketplace import Rules
from gpuportal.hub.pages import gallery

from .fakes import FakeHub, PortalClientFactory
from .marketplace.conftest import Market

API = "/services/portal/api/v1"
USERS = {
    "tok-tess": {"name": "tess", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-mo": {"name": "mo", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-olga": {"name": "olga", "kind": "user", "admin": False, "groups": ["bio"]},
    # The same user with a user server's own token: no access to the portal service.
    "tok-tess-server": {
        "name": "tess",
        "kind": "user",
        "admin": False,
        "groups": ["ml"],
        "scopes": ["read:users:name!user=tess"],
    },
}
GROUPS = [{"name": "ml", "users": ["tess", "mo"]}, {"name": "bio", "users": ["olga"]}]


def notebook(**meta: Any) -> dict[str, Any]:
    template = {"title": "Fine-tune", "gpu_count": 1, "expected_minutes": 30, **meta}
    return {
        "cells": [{"cell_type": "code", "metadata": {}, "source": "print(1)", "outputs": []}],
        "metadata": {"gpuportal": {"template": template}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """Rule tests run on SQLite only."""
    yield f"sqlite:///{tmp_path / 'portal.sqlite'}"


@pytest.fixture
def client(portal_client: PortalClientFactory) -> TestClient:
    client = portal_client(hub=FakeHub(USERS, GROUPS), ray_dashboard_url="http://127.0.0.1:9")
    sessions = client.app.state.portal.sessions
    with portal_db.transaction(sessions) as session:
        accounts.sync(session, [{"name": u, "groups": []} for u in ("tess", "mo", "olga")], GROUPS)
        ml = session.query(Team).filter_by(hub_group="ml").one()
        tess = accounts.upsert_account(session, {"name": "tess", "groups": ["ml"]})
        accounts.set_team_role(session, ml, tess, "admin")
    return client


def publish(client: TestClient, token: str, team: str = "ml", **meta: Any) -> Any:
    body = {"team": team, "notebook": json.dumps(notebook(**meta))}
    return client.post(f"{API}/templates", json=body, headers=auth(token))


# --- metadata ----------------------------------------------------------------------


def test_every_shipped_template_declares_valid_metadata() -> None:
    found = templates.global_templates()
    assert set(found) == {
        "gpu-quickstart",
        "pytorch-training",
        "ray-train",
        "dask-analytics",
        "voila-app",
    }
    for meta, _text in found.values():
        assert meta.expected_minutes > 0 and meta.title


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        (None, "has no template metadata"),
        ({"gpu_count": 1, "expected_minutes": 5}, "needs a title"),
        ({"title": " ", "gpu_count": 1, "expected_minutes": 5}, "needs a title"),
        ({"title": "x" * 81, "gpu_count": 1, "expected_minutes": 5}, "longer than 80"),
        ({"title": "t", "gpu_count": 9, "expected_minutes": 5}, "between 0 and 8"),
        ({"title": "t", "gpu_count": -1, "expected_minutes": 5}, "between 0 and 8"),
        ({"title": "t", "gpu_count": True, "expected_minutes": 5}, "whole number"),
        ({"title": "t", "gpu_count": "2", "expected_minutes": 5}, "whole number"),
        ({"title": "t", "gpu_count": 2**63, "expected_minutes": 5}, "between 0 and 8"),
        ({"title": "t", "gpu_count": 1}, "expected to run"),
        ({"title": "t", "gpu_count": 1, "expected_minutes": 0}, "between 1 and"),
        ({"title": "t", "gpu_count": 1, "expected_minutes": 5, "min_vram_gb": 2000}, "VRAM"),
        ({"title": "t", "gpu_count": 1, "expected_minutes": 5, "gpu_model": "<b>"}, "model"),
        ({"title": "t", "gpu_count": 0, "expected_minutes": 5, "gpu_model": "L4"}, "CPU"),
        ({"title": "t", "gpu_count": 1, "expected_minutes": 5, "price": 0}, "unknown fields"),
    ],
)
def test_bad_template_metadata_is_refused_with_a_sentence(meta: Any, says: str) -> None:
    with pytest.raises(templates.InvalidTemplate) as refused:
        templates.check_metadata(meta)
    assert says in refused.value.message
    assert refused.value.message.endswith(".")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "not JSON"),
        ("[]", "format 4"),
        (json.dumps({"cells": [], "metadata": {}, "nbformat": 3}), "format 4"),
        (json.dumps({"cells": [], "metadata": {}, "nbformat": 4}), "no template metadata"),
        ("x" * (templates.MAX_NOTEBOOK_BYTES + 1), "at most 1024 KiB"),
    ],
)
def test_a_file_that_is_not_a_template_notebook_is_refused(text: str, says: str) -> None:
    with pytest.raises(templates.InvalidTemplate) as refused:
        templates.parse_notebook(text)
    assert says in refused.value.message


# --- cost ----------------------------------------------------------------------------

OFFERS = [
    {"gpu_model": "L4", "vram_gb": 24, "price_per_gpu_hour": 900_000, "total_gpus": 4,
     "largest_free_gpus": 0},
    {"gpu_model": "L4", "vram_gb": 24, "price_per_gpu_hour": 1_200_000, "total_gpus": 2,
     "largest_free_gpus": 1},
    {"gpu_model": "A100-80GB", "vram_gb": 80, "price_per_gpu_hour": 3_000_000,
     "total_gpus": 8, "largest_free_gpus": 8},
]  # fmt: skip


@pytest.mark.parametrize(
    ("meta", "cost", "price", "free_now"),
    [
        # 2 GPUs x 0.90/h x 20 min = 0.60 at the cheapest L4, though none is free now
        ({"gpu_model": "L4", "gpu_count": 2, "expected_minutes": 20}, 600_000, 900_000, False),
        # any model: the cheapest fitting offer, wherever it is
        ({"gpu_model": None, "gpu_count": 1, "expected_minutes": 60}, 900_000, 900_000, True),
        # 40 GB of VRAM: only the A100 fits
        (
            {"gpu_model": None, "gpu_count": 1, "min_vram_gb": 40, "expected_minutes": 1},
            50_000,
            3_000_000,
            True,
        ),
        # 8 GPUs on one node: only the A100 node has that many
        ({"gpu_model": None, "gpu_count": 8, "expected_minutes": 60}, 24_000_000, 3_000_000, True),
        # 7 min of one L4 at 0.90/h = 105,000 micro exactly; 1 min of 0.90/h = 15,000
        ({"gpu_model": "L4", "gpu_count": 1, "expected_minutes": 7}, 105_000, 900_000, True),
        # no such model: no estimate
        ({"gpu_model": "H100-80GB", "gpu_count": 1, "expected_minutes": 5}, None, None, False),
        # CPU: free
        ({"gpu_model": None, "gpu_count": 0, "expected_minutes": 500}, 0, 0, True),
    ],
)
def test_the_estimate_is_the_cheapest_offer_that_fits(
    meta: dict[str, Any], cost: int | None, price: int | None, free_now: bool
) -> None:
    meta = {"min_vram_gb": 0, **meta}
    got = templates.estimate(meta, OFFERS)
    assert (got["cost"], got["price_per_gpu_hour"]) == (cost, price)
    assert got["free_now"] is free_now


def test_the_estimate_rounds_up_to_the_micro_credit() -> None:
    offer = {**OFFERS[0], "price_per_gpu_hour": 1_000_001}
    meta = {"gpu_model": None, "gpu_count": 1, "min_vram_gb": 0, "expected_minutes": 1}
    # 1,000,001 / 60 = 16,666.68...: the estimate never says less than the meter charges
    assert templates.estimate(meta, [offer])["cost"] == 16_667


# --- who sees and publishes --------------------------------------------------------


def ids(client: TestClient, token: str) -> list[str]:
    reply = client.get(f"{API}/templates", headers=auth(token))
    assert reply.status_code == 200, reply.text
    return [t["id"] for t in reply.json()]


def test_a_team_admin_publishes_a_member_sees_it_and_an_outsider_does_not(
    client: TestClient,
) -> None:
    reply = publish(client, "tok-tess", title="Fine-tune", gpu_model="L4", min_vram_gb=16)
    assert reply.status_code == 201, reply.text
    published = reply.json()
    tid = published["id"]
    assert published["team"] == "ml" and published["gpu_model"] == "L4"

    assert tid in ids(client, "tok-mo")
    fetched = client.get(f"{API}/templates/{tid}", headers=auth("tok-mo")).json()
    stored = json.loads(fetched["notebook"])
    assert stored["metadata"]["gpuportal"]["template"]["min_vram_gb"] == 16
    assert stored["cells"][0]["source"] == "print(1)"

    # The outsider neither lists it nor fetches it: 404, as for an id nobody has.
    assert tid not in ids(client, "tok-olga")
    assert "global/pytorch-training" in ids(client, "tok-olga")
    for token in ("tok-olga",):
        missing = client.get(f"{API}/templates/{tid}", headers=auth(token))
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "There is no such template."
        gone = client.delete(f"{API}/templates/{tid}", headers=auth(token))
        assert gone.status_code == 404
    # Crafted ids: 404 like any id nobody has.
    for path in ("team/999999", "team/abc", "team/-1", "team/1e3", "global/..%2Fx", "other/1"):
        assert client.get(f"{API}/templates/{path}", headers=auth("tok-mo")).status_code == 404


#: (token, team, what the 403 says): a member who is not a team admin, an outsider, a
#: team that does not exist, a user server's read-only token, the admin of another team.
REFUSED_PUBLISHERS = [
    ("tok-mo", "ml", "Only an admin of team 'ml'"),
    ("tok-olga", "ml", "Only an admin of team 'ml'"),
    ("tok-olga", "nosuch", "Only an admin of team 'nosuch'"),
    ("tok-tess-server", "ml", "can only read"),
    ("tok-tess", "bio", "Only an admin of team 'bio'"),
]


def test_only_a_team_admin_with_a_full_token_may_publish(client: TestClient) -> None:
    for token, team, says in REFUSED_PUBLISHERS:
        reply = publish(client, token, team=team)
        assert reply.status_code == 403, (token, team, reply.text)
        assert says in reply.json()["error"]["message"]
    assert [i for i in ids(client, "tok-tess") if i.startswith("team/")] == []
    # The publish form offers the teams the caller is a team admin of, and no other.
    assert client.get(f"{API}/templates-teams", headers=auth("tok-tess")).json() == ["ml"]
    assert client.get(f"{API}/templates-teams", headers=auth("tok-mo")).json() == []


def test_publishing_refuses_bad_notebooks_and_oversized_bodies_with_sentences(
    client: TestClient,
) -> None:
    bad = publish(client, "tok-tess", gpu_count=99)
    assert bad.status_code == 422
    assert "between 0 and 8" in bad.json()["error"]["message"]
    huge = {"team": "ml", "notebook": "x" * (templates.MAX_NOTEBOOK_BYTES + 70 * 1024)}
    too_big = client.post(f"{API}/templates", json=huge, headers=auth("tok-tess"))
    assert too_big.status_code == 413
    assert "at most 1024 KiB" in too_big.json()["error"]["message"]
    extra = client.post(
        f"{API}/templates",
        json={"team": "ml", "notebook": "{}", "owner": "mo"},
        headers=auth("tok-tess"),
    )
    assert extra.status_code == 422


def test_publishing_the_same_title_again_replaces_the_template(client: TestClient) -> None:
    first = publish(client, "tok-tess", title="Fine-tune", expected_minutes=10).json()
    second = publish(client, "tok-tess", title="Fine-tune", expected_minutes=90).json()
    assert first["id"] == second["id"]
    team_ids = [i for i in ids(client, "tok-mo") if i.startswith("team/")]
    assert team_ids == [first["id"]]
    listed = client.get(f"{API}/templates/{first['id']}", headers=auth("tok-mo")).json()
    assert listed["expected_minutes"] == 90


def test_a_team_admin_removes_a_template_and_a_member_may_not(client: TestClient) -> None:
    tid = publish(client, "tok-tess").json()["id"]
    refused = client.delete(f"{API}/templates/{tid}", headers=auth("tok-mo"))
    assert refused.status_code == 403
    assert client.delete(f"{API}/templates/{tid}", headers=auth("tok-tess")).status_code == 204
    assert tid not in ids(client, "tok-mo")
    # The admin panel's audit log has both actions, by the team admin; the refused
    # removal left no record.
    with portal_db.transaction(client.app.state.portal.sessions) as session:
        records = audit.search(session, action="template.")
    assert [(r["actor"], r["action"], r["target"], r["detail"]["template"]) for r in records] == [
        ("tess", "template.remove", "ml", tid),
        ("tess", "template.publish", "ml", tid),
    ]


def test_the_estimate_follows_the_live_prices(client: TestClient) -> None:
    portal = client.app.state.portal
    market = Market(portal.sessions, Rules(hold_seconds=600), {})
    market.add_node("acme", "node-l4", {"L4": 2}, price=2_400_000)
    tid = publish(client, "tok-tess", gpu_model="L4", gpu_count=2, expected_minutes=15).json()
    listed = {t["id"]: t for t in client.get(f"{API}/templates", headers=auth("tok-mo")).json()}
    # 2 GPUs x 2.40/h x 15 min = 1.20
    assert listed[tid["id"]]["estimated_cost"] == 1_200_000
    assert listed[tid["id"]]["free_now"] is True
    a100 = publish(client, "tok-tess", title="Big", gpu_model="A100-80GB").json()
    assert a100["estimated_cost"] is None
    assert a100["estimated_cost_display"] == "no provider offers this GPU now"


# --- the gallery's rules (hub side) --------------------------------------------------


@pytest.mark.parametrize(
    ("template", "options"),
    [
        ({"gpu_count": 0, "gpu_model": None}, {"profile": "cpu"}),
        (
            {"gpu_count": 2, "gpu_model": "L4"},
            {"profile": "gpu", "gpu_model": "L4", "gpu_count": "2"},
        ),
        (
            {"gpu_count": 1, "gpu_model": None},
            {"profile": "gpu", "gpu_model": "any", "gpu_count": "1"},
        ),
    ],
)
def test_a_template_opens_with_the_spawn_forms_options(
    template: dict[str, Any], options: dict[str, str]
) -> None:
    from gpuportal.spawners import profiles

    assert gallery.user_options(template) == options
    # ...which the spawner's own validation of the default profile list accepts
    selection = profiles.select(
        profiles.check_profile_list(profiles.default_profile_list(["L4"])), options
    )
    assert selection.overrides["gpu_count"] == template["gpu_count"]


def test_a_team_template_opened_by_a_member_is_billed_to_the_team() -> None:
    """Open on GPU of a team's template bills the team (the spawn form's Bill to) when
    the user is in it; a global template, or a team the user is not in, bills the
    user's own wallet (the spawner refuses a crafted team anyway)."""
    team_template = {"gpu_count": 1, "gpu_model": "L4", "team": "ml"}
    assert gallery.user_options(team_template, ["ml", "customers"])["bill_to"] == "ml"
    assert "bill_to" not in gallery.user_options(team_template, ["bio"])
    assert "bill_to" not in gallery.user_options({**team_template, "team": None}, ["ml"])
    cpu = {"gpu_count": 0, "gpu_model": None, "team": "ml"}
    assert gallery.user_options(cpu, ["ml"]) == {"profile": "cpu"}  # CPU servers are free


class Running:
    def __init__(self, gpu_count: int, gpu_model: str) -> None:
        self.gpu_count, self.gpu_model = gpu_count, gpu_model


@pytest.mark.parametrize(
    ("server", "template", "fits"),
    [
        (Running(1, "L4"), {"gpu_count": 1, "gpu_model": None}, True),
        (Running(2, "L4"), {"gpu_count": 1, "gpu_model": "L4"}, True),
        (Running(1, "L4"), {"gpu_count": 2, "gpu_model": None}, False),
        (Running(1, "L4"), {"gpu_count": 1, "gpu_model": "A100-80GB"}, False),
        (Running(0, ""), {"gpu_count": 1, "gpu_model": None}, False),
        (Running(0, ""), {"gpu_count": 0, "gpu_model": None}, True),
    ],
)
def test_a_running_server_is_reused_only_when_it_fits(
    server: Running, template: dict[str, Any], fits: bool
) -> None:
    assert gallery.server_fits(server, template) is fits


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("train.ipynb", True),
        ("work/my train.ipynb", True),
        ("../etc/passwd.ipynb", False),
        ("work/../../x.ipynb", False),
        ("/abs.ipynb", False),
        ("notes.txt", False),
        ("a\x00b.ipynb", False),
    ],
)
def test_the_publish_form_takes_only_notebook_paths_inside_the_home(path: str, ok: bool) -> None:
    assert bool(gallery.NOTEBOOK_PATH.fullmatch(path)) is ok
