"""One meter tick at fleet size: the set-based meter against its baselines, in the same run.

    python benchmarks/metering.py [--sizes 1000,10000,50000] [--reference-max 10000]
                                  [--naive-max 2000] [--repeat 3] [--pg URL] [--no-sqlite]

For each size N, N open allocations (one payer each, funded) are each one
interval behind, and one tick charges all of them: N ledger transactions and
3N postings, then the runway check of N payers. Measured in the same database,
one tick after another (each tick is one interval later, so each does the same
work):

* **ours**: ``metering.tick``, the set-based meter (bulk Core statements);
* **reference**: ``metering_reference.tick``, the ORM meter it replaced (one
  ``LedgerTransaction`` and three ``Posting`` objects per interval through the
  unit of work), up to ``--reference-max`` allocations;
* **naive**: one ORM row inserted and committed per usage event, no ledger (the
  shape of a per-event usage log), timed on ``--naive-max`` events and scaled
  to N (its cost per event does not depend on N).

Ours and the reference alternate, ``--repeat`` times each; the table shows the
minimum and median tick in seconds and the ratios of the medians. Runs on a
fresh SQLite file and on a scratch PostgreSQL database (created and dropped).
Only 127.0.0.1 is contacted. Numbers vary by machine; nothing asserts them.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import BigInteger, Engine, Integer, MetaData, String, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import metering, metering_reference
from gpuportal.hub.db.ledger_models import (
    Allocation,
    LedgerAccount,
    LedgerTransaction,
    Posting,
)
from gpuportal.hub.db.models import Account, UTCDateTime
from gpuportal.hub.settings import load_settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = 30


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


def prepare(engine: Engine, n: int) -> None:
    """N funded customers with one open allocation each, written in bulk."""
    portal_db.upgrade(engine)
    _NaiveBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(Account.__table__),
            [{"hub_name": f"user{i}", "role": "customer"} for i in range(n)],
        )
        ids = list(conn.execute(select(Account.id).order_by(Account.id)).scalars())
        conn.execute(
            insert(LedgerAccount.__table__),
            [
                {"key": "external:grants", "kind": "external", "account_id": None},
                *({"key": f"wallet:{a}", "kind": "customer_wallet", "account_id": a} for a in ids),
            ],
        )
        wallets = dict(
            conn.execute(
                select(LedgerAccount.account_id, LedgerAccount.id).where(
                    LedgerAccount.kind == "customer_wallet"
                )
            ).all()
        )
        external = conn.execute(
            select(LedgerAccount.id).where(LedgerAccount.key == "external:grants")
        ).scalar_one()
        txn = conn.execute(
            insert(LedgerTransaction.__table__).returning(LedgerTransaction.id),
            {
                "idempotency_key": "bench-grants",
                "params_hash": "bench",
                "kind": "grant",
                "memo": "",
                "created_by": "bench",
            },
        ).scalar_one()
        each = 10**12
        conn.execute(
            insert(Posting.__table__),
            [
                {"transaction_id": txn, "ledger_account_id": external, "amount": -each * n},
                *(
                    {"transaction_id": txn, "ledger_account_id": wallets[a], "amount": each}
                    for a in ids
                ),
            ],
        )
        conn.execute(
            insert(Allocation.__table__),
            [
                {
                    "account_id": a,
                    "user_name": f"user{i}",
                    "server_name": "",
                    "gpu_count": 1,
                    "price_per_gpu_hour": 2_000_000,
                    "platform_fee_bps": 1000,
                    "status": "running",
                    "started_at": T0,
                    "last_charged_at": T0,
                }
                for i, a in enumerate(ids)
            ],
        )


def naive(engine: Engine, events: int) -> float:
    """Seconds for ``events`` ORM inserts, each in its own commit."""
    start = time.perf_counter()
    for i in range(events):
        with Session(engine) as session:
            session.add(UsageEvent(allocation_id=i, user_name=f"user{i}", amount=16_666, at=T0))
            session.commit()
    return time.perf_counter() - start


def timed_tick(tick: Callable[..., metering.TickResult], engine: Engine, k: int, n: int) -> float:
    sessions = portal_db.session_factory(engine)
    settings = load_settings(meter_interval_seconds=INTERVAL)
    start = time.perf_counter()
    result = tick(sessions, settings, T0 + timedelta(seconds=INTERVAL * k))
    took = time.perf_counter() - start
    assert result.intervals == n, (result.intervals, n)
    return took


def run(label: str, engine: Engine, n: int, args: argparse.Namespace) -> dict[str, object]:
    prepare(engine, n)
    ours: list[float] = []
    reference: list[float] = []
    k = 0
    for _ in range(args.repeat):
        k += 1
        ours.append(timed_tick(metering.tick, engine, k, n))
        if n <= args.reference_max:
            k += 1
            reference.append(timed_tick(metering_reference.tick, engine, k, n))
    events = min(n, args.naive_max)
    naive_tick = naive(engine, events) * n / events
    row: dict[str, object] = {
        "db": label,
        "n": n,
        "ours_min": min(ours),
        "ours_med": statistics.median(ours),
        "ref_med": statistics.median(reference) if reference else None,
        "naive": naive_tick,
        "naive_events": events,
    }
    ref = row["ref_med"]
    print(
        f"{label:8s} {n:>7,} | ours {min(ours):7.3f} / {statistics.median(ours):7.3f} s"
        f" | reference ORM meter "
        + (f"{ref:7.3f} s ({ref / statistics.median(ours):5.1f}x)" if ref else "   (skipped)  ")
        + f" | naive insert+commit {naive_tick:7.2f} s"
        f" ({naive_tick / statistics.median(ours):6.1f}x; {events} events timed)",
        flush=True,
    )
    return row


def pg_engine(admin: str) -> tuple[Engine, Callable[[], None]] | None:
    try:
        import psycopg

        name = f"gpuportal_bench_{secrets.token_hex(4)}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        print(f"postgres skipped: {exc}")
        return None
    base = admin.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = portal_db.make_engine(
        load_settings(db_url=base.rsplit("/", 1)[0] + "/" + name).database_url
    )

    def drop() -> None:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return engine, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--reference-max", type=int, default=10_000)
    parser.add_argument("--naive-max", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL admin URL; a scratch database is made and dropped per size.",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("one tick, min / median of --repeat, seconds; ratios are of medians, same run")
    for n in sizes:
        found = pg_engine(args.pg)
        if found is not None:
            engine, drop = found
            try:
                run("postgres", engine, n, args)
            finally:
                drop()
        if not args.no_sqlite:
            with tempfile.TemporaryDirectory() as tmp:
                engine = portal_db.make_engine(load_settings(data_dir=Path(tmp)).database_url)
                run("sqlite", engine, n, args)
                engine.dispose()


if __name__ == "__main__":
    main()
