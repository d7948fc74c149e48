"""The meter's one-statement charge (PostgreSQL) on moments the property test does not draw.

The property test (``test_meter_sets.py``) holds the set-based ledger equal to the
reference meter's on whole seconds; here allocations start and end on microsecond
fractions, so the fingerprint's ``isoformat`` with a fraction, the grid and the
last partial interval are checked against the Python arithmetic, and a price at
the ledger's edge is refused with no money moved. Both backends run it.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger, metering
from gpuportal.hub.db.ledger_models import Allocation, LedgerTransaction, Posting
from gpuportal.provider.money import accrued

from .conftest import CREDIT, T0, allocation, grant, open_alloc, total


def usage(sessions, alloc_id):
    with portal_db.transaction(sessions) as session:
        txns = session.scalars(
            select(LedgerTransaction)
            .where(LedgerTransaction.allocation_id == alloc_id)
            .order_by(LedgerTransaction.period_end)
        ).all()
        return [
            (
                txn.idempotency_key,
                txn.params_hash,
                txn.period_start,
                txn.period_end,
                [
                    (p.ledger_account_id, p.amount)
                    for p in session.scalars(
                        select(Posting).where(Posting.transaction_id == txn.id)
                    )
                ],
            )
            for txn in txns
        ]


def test_fractional_moments_are_charged_and_fingerprinted_as_python_does(
    sessions, settings, ann
) -> None:
    grant(sessions, ann, 1_000 * CREDIT, "g")
    start = T0 + timedelta(microseconds=123_457)
    s = settings.model_copy(update={"meter_interval_seconds": 7})
    alloc_id = open_alloc(
        sessions, s, "ann", gpus=3, price=7_777_777, fee_bps=1234, started_at=start, now=start
    )
    metering.tick(sessions, s, start + timedelta(seconds=30, microseconds=5))
    ended = start + timedelta(seconds=33, microseconds=900_001)
    with portal_db.transaction(sessions) as session:
        session.execute(
            update(Allocation)
            .where(Allocation.id == alloc_id)
            .values(status="closed", ended_at=ended)
        )
    metering.tick(sessions, s, ended + timedelta(seconds=100))
    rows = usage(sessions, alloc_id)
    assert [(a, b) for _, _, a, b, _ in rows] == metering.periods_due(
        start, start, ended, timedelta(seconds=7), ended
    )
    assert rows[-1][3] == ended and ended.microsecond == 23_458
    for key, fingerprint, a, b, legs in rows:
        assert key == metering.usage_key(alloc_id, b)
        assert fingerprint == ledger.charge_params_hash("usage", legs, alloc_id, a, b)
        assert sum(amount for _, amount in legs) == 0
    charged = -sum(min(amount for _, amount in legs) for *_, legs in rows)
    assert charged == accrued(3, 7_777_777, start, ended)
    assert allocation(sessions, alloc_id).last_charged_at == ended


def test_a_price_past_the_ledgers_largest_posting_is_refused_and_moves_nothing(
    sessions, settings, ann
) -> None:
    grant(sessions, ann, 1_000 * CREDIT, "g")
    alloc_id = open_alloc(sessions, settings, "ann")
    with portal_db.transaction(sessions) as session:
        session.execute(
            update(Allocation)
            .where(Allocation.id == alloc_id)
            .values(gpu_count=2**31 - 1, price_per_gpu_hour=2**62)
        )
    before = total(sessions)
    result = metering.tick(sessions, settings, T0 + timedelta(hours=1))
    assert result.failed == [alloc_id] and result.intervals == 0
    assert usage(sessions, alloc_id) == []
    assert total(sessions) == before
    assert allocation(sessions, alloc_id).last_charged_at == T0
