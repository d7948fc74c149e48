"""Ledger invariants under random operations and replays (hypothesis state machine, SQLite)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger
from gpuportal.hub.db.models import Account
from gpuportal.hub.settings import load_settings

USERS = ("a", "b", "c")
KEYS = st.sampled_from([f"k{i}" for i in range(6)])


class LedgerMachine(RuleBasedStateMachine):
    """Grants, transfers and replays with reused keys; the model says what must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.engine = portal_db.make_engine(
            load_settings(data_dir=Path(self.tmp.name)).database_url
        )
        portal_db.upgrade(self.engine)
        self.sessions = portal_db.session_factory(self.engine)
        with portal_db.transaction(self.sessions) as session:
            for name in USERS:
                session.add(Account(hub_name=name, role="customer"))
        self.model: dict[str, int] = dict.fromkeys(USERS, 0)
        self.seen: dict[str, tuple] = {}

    def teardown(self) -> None:
        self.engine.dispose()
        self.tmp.cleanup()

    def _post(self, key: str, request: tuple, legs_of) -> None:
        try:
            with portal_db.transaction(self.sessions) as session:
                ids = {n: ledger.wallet(session, i + 1).id for i, n in enumerate(USERS)}
                ids["ext"] = ledger.external(session, "grants").id
                _, created = ledger.post(session, key, request[0], legs_of(ids))
        except ledger.IdempotencyConflict:
            assert key in self.seen and self.seen[key] != request
            return
        if key in self.seen:
            assert not created and self.seen[key] == request
            return
        assert created
        self.seen[key] = request
        for name, delta in request[1]:
            self.model[name] += delta

    @rule(key=KEYS, user=st.sampled_from(USERS), amount=st.integers(1, 10**9))
    def grant(self, key: str, user: str, amount: int) -> None:
        self._post(
            key,
            ("grant", ((user, amount),)),
            lambda ids: [ledger.Leg(ids[user], amount), ledger.Leg(ids["ext"], -amount)],
        )

    @rule(
        key=KEYS,
        src=st.sampled_from(USERS),
        dst=st.sampled_from(USERS),
        amount=st.integers(1, 10**6),
    )
    def transfer(self, key: str, src: str, dst: str, amount: int) -> None:
        if src == dst:
            return
        self._post(
            key,
            ("transfer", ((src, -amount), (dst, amount))),
            lambda ids: [ledger.Leg(ids[src], -amount), ledger.Leg(ids[dst], amount)],
        )

    @invariant()
    def balances_match_and_ledger_sums_to_zero(self) -> None:
        with portal_db.transaction(self.sessions) as session:
            assert ledger.ledger_total(session) == 0
            for i, name in enumerate(USERS):
                assert ledger.balance_by_key(session, f"wallet:{i + 1}") == self.model[name]


LedgerMachine.TestCase.settings = hsettings(max_examples=15, stateful_step_count=12, deadline=None)
TestLedgerInvariants = LedgerMachine.TestCase
