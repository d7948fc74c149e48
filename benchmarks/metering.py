"""How fast the meter charges, against the naive way, in the same run.

    python benchmarks/metering.py [--allocations 200] [--intervals 10] [--pg URL]

Ours: ``metering.tick`` charges every open allocation for each elapsed
interval, one balanced three-posting ledger transaction per (allocation,
interval), committed in batches. Naive: one ORM row inserted and committed per
usage event (the shape of a per-event usage log). Both run on a fresh SQLite
file and, when reachable, a fresh PostgreSQL database; the ratio is ours per
second over naive per second. Numbers vary by machine; nothing asserts them.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import BigInteger, Engine, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import ledger, metering
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account, Base, UTCDateTime
from gpuportal.hub.settings import load_settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _NaiveBase(DeclarativeBase):
    metadata = MetaData()


class UsageEvent(_NaiveBase):
    """The naive design: a row per usage event, no ledger."""

    __tablename__ = "bench_usage_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    allocation_id: Mapped[int] = mapped_column(Integer)
    user_name: Mapped[str] = mapped_column(String(255))
    amount: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime())


def prepare(engine: Engine, allocations: int) -> None:
    portal_db.upgrade(engine)
    _NaiveBase.metadata.create_all(engine)
    sessions = portal_db.session_factory(engine)
    with portal_db.transaction(sessions) as session:
        for i in range(allocations):
            account = Account(hub_name=f"user{i}", role="customer")
            session.add(account)
            session.flush()
            ledger.post(
                session,
                f"bench-grant-{i}",
                "grant",
                [
                    ledger.Leg(ledger.wallet(session, account.id).id, 10**12),
                    ledger.Leg(ledger.external(session, "grants").id, -(10**12)),
                ],
            )
            session.add(
                Allocation(
                    account_id=account.id,
                    user_name=account.hub_name,
                    server_name="",
                    gpu_count=1,
                    price_per_gpu_hour=2_000_000,
                    platform_fee_bps=1000,
                    started_at=T0,
                    last_charged_at=T0,
                )
            )


def ours(engine: Engine, intervals: int) -> tuple[int, float]:
    sessions = portal_db.session_factory(engine)
    settings = load_settings(meter_interval_seconds=30)
    charged, start = 0, time.perf_counter()
    for k in range(1, intervals + 1):
        charged += metering.tick(sessions, settings, T0 + timedelta(seconds=30 * k)).intervals
    return charged, time.perf_counter() - start


def naive(engine: Engine, allocations: int, intervals: int) -> tuple[int, float]:
    events, start = 0, time.perf_counter()
    for k in range(1, intervals + 1):
        for i in range(allocations):
            with Session(engine) as session:
                session.add(
                    UsageEvent(
                        allocation_id=i,
                        user_name=f"user{i}",
                        amount=16_666,
                        at=T0 + timedelta(seconds=30 * k),
                    )
                )
                session.commit()
            events += 1
    return events, time.perf_counter() - start


def run(label: str, engine: Engine, allocations: int, intervals: int) -> None:
    prepare(engine, allocations)
    n_ours, t_ours = ours(engine, intervals)
    n_naive, t_naive = naive(engine, allocations, intervals)
    rate_ours, rate_naive = n_ours / t_ours, n_naive / t_naive
    print(
        f"{label:10s} meter: {n_ours} intervals in {t_ours:.2f} s = {rate_ours:,.0f}/s "
        f"(ledger: 1 transaction + 3 postings each) | naive ORM insert+commit: {n_naive} "
        f"events in {t_naive:.2f} s = {rate_naive:,.0f}/s | ratio {rate_ours / rate_naive:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocations", type=int, default=200)
    parser.add_argument("--intervals", type=int, default=10)
    parser.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL admin URL; a scratch database is made and dropped.",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = load_settings(data_dir=Path(tmp)).database_url
        engine = portal_db.make_engine(url)
        run("sqlite", engine, args.allocations, args.intervals)
        engine.dispose()
    try:
        import psycopg

        name = f"gpuportal_bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.pg, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        print(f"postgres   skipped: {exc}")
        return
    try:
        base = args.pg.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = portal_db.make_engine(
            load_settings(db_url=base.rsplit("/", 1)[0] + "/" + name).database_url
        )
        run("postgres", engine, args.allocations, args.intervals)
        engine.dispose()
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    Base  # noqa: B018  (the portal models are registered before upgrade)
    main()
