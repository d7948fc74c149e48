"""The sign-up credit cannot be farmed (issue 9): only vouched-for accounts get it, and all
sign-ups of a day together get at most the daily budget (SQLite and PostgreSQL).

Under open sign-up (``firstuse``, the default) anyone can make an account by logging in
with a new name, so the default policy gives the credit only to accounts an admin
approves; with an identity provider (OAuth) every account is vouched for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import credits, ledger
from gpuportal.hub.db.ledger_models import LedgerAccount, Posting
from gpuportal.hub.db.models import Account
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import Settings, load_settings

from ..fakes import FakeHub
from .conftest import CREDIT, Clock

API = "/services/portal/api/v1"
SIGNUPS = 1000


def given_to_customers(sessions: sessionmaker[Session]) -> int:
    with portal_db.transaction(sessions) as session:
        return int(
            session.scalar(
                select(func.coalesce(func.sum(Posting.amount), 0))
                .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
                .where(LedgerAccount.kind == "customer_wallet")
            )
            or 0
        )


def scripted_signups(sessions: sessionmaker[Session], settings: Settings, count: int) -> None:
    """``count`` new names, each meeting the portal once, as a login script would."""
    with portal_db.transaction(sessions) as session:
        ids = []
        for n in range(count):
            account = Account(hub_name=f"farm{n:04d}", role="customer")
            session.add(account)
            session.flush()
            ids.append(account.id)
    for start in range(0, len(ids), 100):  # a hundred sign-ups per transaction: fast
        with portal_db.transaction(sessions) as session:
            for account_id in ids[start : start + 100]:
                credits.welcome(session, settings, account_id)


@pytest.mark.parametrize(
    ("policy", "authenticator", "budget", "signups", "expected"),
    [
        # The default under open sign-up: nobody is vouched for until an admin approves.
        ("auto", "firstuse", 100 * CREDIT, SIGNUPS, 0),
        ("approved", "oauthenticator.github.GitHubOAuthenticator", 100 * CREDIT, 100, 0),
        # With an identity provider each account is vouched for: the budget caps the day.
        ("auto", "oauthenticator.github.GitHubOAuthenticator", 100 * CREDIT, SIGNUPS, 100 * CREDIT),
        ("identity", "firstuse", 35 * CREDIT, 100, 30 * CREDIT),  # three 10-credit shares fit
        ("identity", "firstuse", 0, 100, 0),
    ],
)
def test_a_thousand_scripted_signups_get_no_more_than_the_budget(
    sessions: sessionmaker[Session],
    settings: Settings,
    clock: Clock,
    policy: str,
    authenticator: str,
    budget: int,
    signups: int,
    expected: int,
) -> None:
    s = settings.model_copy(
        update={
            "signup_credits": 10 * CREDIT,
            "signup_credit_policy": policy,
            "signup_credit_daily_budget": budget,
            "authenticator": authenticator,
        }
    )
    scripted_signups(sessions, s, signups)
    assert given_to_customers(sessions) == expected
    with portal_db.transaction(sessions) as session:
        assert ledger.ledger_total(session) == 0


def test_the_budget_is_per_day_and_each_account_is_welcomed_once(
    sessions: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    s = settings.model_copy(
        update={
            "signup_credits": 10 * CREDIT,
            "signup_credit_policy": "identity",
            "signup_credit_daily_budget": 20 * CREDIT,
        }
    )
    scripted_signups(sessions, s, 5)
    assert given_to_customers(sessions) == 20 * CREDIT
    clock.advance(86_400)  # a new UTC day: a new budget, for new accounts only
    with portal_db.transaction(sessions) as session:
        for account in session.scalars(select(Account).order_by(Account.id)):
            credits.welcome(session, s, account.id)
    assert given_to_customers(sessions) == 40 * CREDIT


def test_the_default_is_safe_under_open_signup() -> None:
    settings = load_settings()
    assert settings.authenticator == "firstuse"
    assert credits.signup_policy(settings) == "approved"


# --- through the portal API: a handful of sign-ups, and an admin's approval -------------------

USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    **{
        f"tok-new{n}": {"name": f"new{n}", "kind": "user", "admin": False, "groups": []}
        for n in range(5)
    },
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def client_for(tmp_path: Path, db_url: str, **overrides: Any) -> Iterator[TestClient]:
    settings = load_settings(
        data_dir=tmp_path, db_url=db_url, ray_dashboard_url="http://127.0.0.1:9", **overrides
    )
    portal = Portal(settings, cache=MemoryCache(), hub=FakeHub(USERS))
    with TestClient(create_app(settings, portal, background=False)) as client:
        yield client


def balance(client: TestClient, token: str) -> int:
    reply = client.get(f"{API}/balance", headers=auth(token))
    assert reply.status_code == 200, reply.text
    return int(reply.json()["balance"])


def test_open_signups_through_the_portal_get_nothing_until_an_admin_approves(
    tmp_path: Path, db_url: str
) -> None:
    for client in client_for(tmp_path, db_url, signup_credit_daily_budget=20 * CREDIT):
        for n in range(5):
            assert balance(client, f"tok-new{n}") == 0
        for n in range(3):
            approved = client.post(
                f"{API}/credits/signup", json={"user": f"new{n}"}, headers=auth("tok-admin")
            )
            assert approved.status_code == 200, approved.text
        # Two fit in the day's budget; the third approval gets nothing today.
        assert [balance(client, f"tok-new{n}") for n in range(5)] == [
            10 * CREDIT,
            10 * CREDIT,
            0,
            0,
            0,
        ]
        again = client.post(
            f"{API}/credits/signup", json={"user": "new0"}, headers=auth("tok-admin")
        )
        assert again.json()["credited"] == 0, "once per account"
        refused = client.post(
            f"{API}/credits/signup", json={"user": "new4"}, headers=auth("tok-new4")
        )
        assert refused.status_code == 403


def test_signups_with_an_identity_provider_share_the_budget(tmp_path: Path, db_url: str) -> None:
    for client in client_for(
        tmp_path,
        db_url,
        signup_credit_policy="identity",
        signup_credit_daily_budget=30 * CREDIT,
    ):
        got = [balance(client, f"tok-new{n}") for n in range(5)]
        assert sum(got) == 30 * CREDIT and sorted(got) == [
            0,
            0,
            10 * CREDIT,
            10 * CREDIT,
            10 * CREDIT,
        ]
