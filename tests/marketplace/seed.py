"""A seeded marketplace on the real portal DB, for the marketplace tests."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import accounts
from gpuportal.hub import db as portal_db
from gpuportal.hub.marketplace import Rules
from gpuportal.hub.providers import (
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
    ) -> None:
        with portal_db.transaction(self.sessions) as session:
            account = accounts.upsert_account(session, {"name": provider, "groups": ["providers"]})
            p = upsert_provider(
                session, account.id, display_name=provider, region=region, price=price
            )
            cluster = upsert_cluster(session, p, name="main", jobs_url="http://127.0.0.1:1")
            register_node(
                session,
                cluster,
                node_id,
                demo_claims(node_id, gpus),
                demo=True,
                reliability_start=reliability,
                verified=verified,
            )

    def customer(self, name: str) -> int:
        with portal_db.transaction(self.sessions) as session:
            account = accounts.upsert_account(session, {"name": name, "groups": []})
            self.accounts[name] = account.id
            return account.id


@pytest.fixture(name="market")
def market_fixture(db: Engine) -> Market:
    """An empty marketplace on the ``db`` fixture's engine (SQLite and PostgreSQL)."""
    return Market(portal_db.session_factory(db), Rules(hold_seconds=600), {})


def root_conftest() -> ModuleType:
    """tests/conftest.py as a module, for its stack and login helpers.

    Loaded by path: several conftest.py files share the module name
    ``conftest``, so ``from conftest import ...`` depends on collection order.
    """
    name = "gpuportal_tests_root_conftest"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
