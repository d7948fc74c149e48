"""Fixtures for the marketplace tests: a seeded marketplace on the real portal DB."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.db import accounts
from gpuportal.hub.market.marketplace import Rules
from gpuportal.hub.market.providers import (
    demo_claims,
    register_node,
    upsert_cluster,
    upsert_provider,
)


@dataclass
class Market:
    sessions: sessionmaker[Session]
    rules: Rules
    accounts: dict[str, int]

    def add_node(
        self,
        provider: str,
        node_id: str,
        gpus: dict[str, int],
        *,
        price: int = 1_000_000,
        region: str = "eu-west",
        verified: bool = True,
        reliability: float = 0.9,
        jobs_url: str = "http://127.0.0.1:1",
        cluster: str = "main",
        isolation: str = "user",
    ) -> None:
        with portal_db.transaction(self.sessions) as session:
            account = accounts.upsert_account(session, {"name": provider, "groups": ["providers"]})
            p = upsert_provider(
                session, account.id, display_name=provider, region=region, price=price
            )
            cluster_ = upsert_cluster(session, p, name=cluster, jobs_url=jobs_url)
            register_node(
                session,
                cluster_,
                node_id,
                demo_claims(node_id, gpus),
                demo=True,
                reliability_start=reliability,
                verified=verified,
                isolation=isolation,
            )

    def customer(self, name: str) -> int:
        with portal_db.transaction(self.sessions) as session:
            account = accounts.upsert_account(session, {"name": name, "groups": []})
            self.accounts[name] = account.id
            return account.id


@pytest.fixture
def market(db: Engine) -> Market:
    """An empty marketplace on the ``db`` fixture's engine (SQLite and PostgreSQL)."""
    return Market(portal_db.session_factory(db), Rules(hold_seconds=600), {})
