"""Team billing through the reservation and the allocation (SQLite and PostgreSQL).

A member who launches "for the team" reserves with ``team``: the team's wallet and
budget pay, at the reservation's locked price, and the member's own balance does not
move. A team without budget left, or a crafted team the user is not in, is refused
with a sentence, and the GPUs go straight back.

Mutant checked by hand: ``reservation_billing._terms`` without the reservation's team
(the member pays) fails ``test_a_team_paid_session_moves_exactly_the_team_balance``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account, Team
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import load_settings
from gpuportal.provider import money

from ..fakes import Clock, FakeHub
from .conftest import Market

API = "/services/portal/api/v1"
PRICE = 3_600_000  # 3.60 credits per GPU-hour: 1000 micro-credits per GPU-second
USERS = {
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-eve": {"name": "eve", "kind": "user", "admin": False, "groups": []},
}
ANN_OWN = 5_000_000
#: The rules run on SQLite; the money path (the first test) on both backends.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
TEAM_FUNDS = 50_000_000


@pytest.fixture
def client(tmp_path: Path, db_url: str, market: Market, clock: Clock) -> Iterator[TestClient]:
    market.add_node("house-admin", "node-a", {"A100-80GB": 2}, price=PRICE, region="local")
    settings = load_settings(
        data_dir=tmp_path,
        db_url=db_url,
        ray_dashboard_url="http://127.0.0.1:9",
        signup_credits=0,
    )
    portal = Portal(settings, cache=MemoryCache(), hub=FakeHub(USERS))
    with TestClient(
        create_app(settings, portal, background=False), raise_server_exceptions=False
    ) as made:
        admin(made, "POST", "/teams", {"name": "ml"})
        admin(made, "POST", "/teams/ml/members", {"user": "ann"})
        admin(made, "POST", "/credits/grants", {"team": "ml", "amount": TEAM_FUNDS})
        admin(made, "POST", "/credits/grants", {"user": "ann", "amount": ANN_OWN})
        admin(made, "GET", "/me")
        yield made


def admin(client: TestClient, method: str, path: str, body: Any = None) -> Any:
    reply = client.request(
        method, API + path, json=body, headers={"Authorization": "token tok-admin"}
    )
    assert reply.status_code < 300, reply.text
    return reply.json()


def spawner(client: TestClient, method: str, path: str, body: Any = None) -> Any:
    return client.request(
        method, API + path, json=body, headers={"Authorization": "token tok-spawner"}
    )


def balances(market: Market) -> tuple[int, int]:
    """(the team's wallet, ann's own wallet)."""
    with portal_db.transaction(market.sessions) as session:
        team = session.scalars(select(Team).where(Team.hub_group == "ml")).one()
        ann = session.scalars(select(Account).where(Account.hub_name == "ann")).one()
        return (
            ledger.balance_by_key(session, f"team:{team.id}"),
            ledger.balance_by_key(session, f"wallet:{ann.id}"),
        )


def free(client: TestClient) -> int:
    return sum(o["free_gpus"] for o in spawner(client, "GET", "/offers").json())


def test_a_team_paid_session_moves_exactly_the_team_balance(
    client: TestClient, market: Market, clock: Clock
) -> None:
    assert balances(market) == (TEAM_FUNDS, ANN_OWN)
    body = {"user": "ann", "server_name": "gpu", "gpu_count": 2, "team": "ml"}
    made = spawner(client, "POST", "/reservations", body)
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    assert spawner(client, "POST", f"/reservations/{rid}/activate").status_code == 200
    clock.advance(1234.5)
    assert spawner(client, "DELETE", f"/reservations/{rid}").status_code == 200
    with portal_db.transaction(market.sessions) as session:
        alloc = session.scalars(select(Allocation)).one()
        assert (alloc.status, alloc.price_per_gpu_hour, alloc.gpu_count) == ("closed", PRICE, 2)
        assert alloc.team_id is not None and alloc.ended_at is not None
        charge = money.accrued(2, PRICE, alloc.started_at, alloc.ended_at)
    assert charge == 2 * 1_234_500, "1234.5 s of two GPUs at 1000 micro-credits per GPU-second"
    assert balances(market) == (TEAM_FUNDS - charge, ANN_OWN)
    assert free(client) == 2


#: Crafted bills: (token, body, status, words of the sentence).
CRAFTED = [
    # The spawner passes a crafted bill_to along: the portal checks membership.
    (
        "tok-spawner",
        {"user": "eve", "team": "ml"},
        403,
        "Team 'ml' cannot pay for this server: eve is not",
    ),
    # Eve, for herself, with her own token.
    ("tok-eve", {"user": "eve", "team": "ml"}, 403, "eve is not a member"),
    ("tok-spawner", {"user": "ann", "team": "nope"}, 404, "no team named 'nope'"),
    ("tok-spawner", {"user": "ann", "team": ""}, 422, ""),
    ("tok-spawner", {"user": "ann", "team": "x" * 256}, 422, ""),
]


@SQLITE_ONLY
def test_refusals_and_personal_launches_leave_the_team_wallet_alone(
    client: TestClient, market: Market, clock: Clock
) -> None:
    """A personal launch bills the member; a crafted bill_to (a team the user is not
    in, an unknown or malformed team) and a team without budget or money left are
    refused with a sentence, and the GPUs go straight back."""
    made = spawner(
        client, "POST", "/reservations", {"user": "ann", "server_name": "", "gpu_count": 1}
    )
    rid = made.json()["id"]
    assert spawner(client, "POST", f"/reservations/{rid}/activate").status_code == 200
    clock.advance(100)
    assert spawner(client, "DELETE", f"/reservations/{rid}").status_code == 200
    assert balances(market) == (TEAM_FUNDS, ANN_OWN - 100_000)
    for token, body, status, words in CRAFTED:
        reply = client.post(
            f"{API}/reservations",
            json={"server_name": "", "gpu_count": 2, **body},
            headers={"Authorization": f"token {token}"},
        )
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.json()["error"]["message"] and "Traceback" not in reply.text
        assert free(client) == 2
    admin(client, "PUT", "/teams/ml/budget", {"window": "day", "gpu_hours": 0.1})  # 360 GPU-s
    body = {"user": "ann", "server_name": "", "gpu_count": 1, "team": "ml"}
    refused = spawner(client, "POST", "/reservations", body)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "Team ml's GPU-hour budget of 0.1 GPU-h per day" in error["message"]
    # A team with no money in its wallet: 402, with what to do.
    admin(client, "POST", "/teams", {"name": "broke"})
    admin(client, "POST", "/teams/broke/members", {"user": "ann"})
    body["team"] = "broke"
    poor = spawner(client, "POST", "/reservations", body)
    assert poor.status_code == 402, poor.text
    assert "Add credits" in poor.json()["error"]["message"]
    assert free(client) == 2
    assert balances(market) == (TEAM_FUNDS, ANN_OWN - 100_000)
