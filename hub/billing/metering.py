"""Metering: the control plane charges running servers, per second, exactly once.

The billing authority is allocation time * the locked price (DESIGN.md, trust
boundaries); nothing a node or a user server reports can raise a charge.

How a second is charged exactly once:

* An allocation's time is cut on a fixed grid, ``started_at + k * interval``.
  The meter charges each complete grid interval once, as one ledger
  transaction keyed ``usage:<allocation>:<interval end>``; closing charges the
  last, partial interval up to ``ended_at``.
* The charge and the move of ``allocations.last_charged_at`` happen in one
  database transaction, so after a crash the meter resumes from the last
  charged moment. Two meters racing on the same allocation compute the same
  keys; the loser hits the unique key, rolls back, and finds nothing left to do.

Rounding (documented in docs/billing.md): the cumulative charge of an
allocation up to moment *t* is
``floor(gpu_count * price_per_gpu_hour * elapsed_us / 3_600_000_000)``
and an interval is charged the difference of two cumulative values, so
rounding never accumulates across intervals; the platform fee is
``floor(cumulative charge * fee_bps / 10_000)`` the same way, and the
provider gets the rest. The customer is never charged more than the exact
price, and by less than one micro-credit over a whole allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Row,
    String,
    Table,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.provider.money import US_PER_HOUR, accrued

from .. import timeutil
from ..db import transaction
from ..db.ledger_models import (
    OPEN_STATES,
    QUOTA_WINDOWS,
    Allocation,
    LedgerAccount,
    LedgerBalance,
    LedgerTransaction,
    Posting,
    Quota,
)
from ..db.marketplace_models import LIVE_STATUSES, Reservation
from ..market import marketplace
from ..settings import Settings
from . import ledger

log = logging.getLogger(__name__)

#: An allocation as the meter reads it: an ORM object, or a row of the ``allocations``
#: table (the set-based paths read rows; the arithmetic needs only the attributes).
Billed = Allocation | Row[Any]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
#: The most intervals one allocation is charged in one tick; the rest waits for the next.
MAX_INTERVALS_PER_TICK = 10_000


# --- pure charge arithmetic ------------------------------------------------------


def fee_of(cumulative_charge: int, fee_bps: int) -> int:
    return cumulative_charge * fee_bps // 10_000


@dataclass(frozen=True)
class Split:
    """One interval's charge: what the payer pays, and who receives it."""

    charge: int
    fee: int
    provider: int


def split(alloc: Billed, a: datetime, b: datetime) -> Split:
    """The charge for ``[a, b)`` of ``alloc`` as a difference of cumulative values."""
    ca = accrued(alloc.gpu_count, alloc.price_per_gpu_hour, alloc.started_at, a)
    cb = accrued(alloc.gpu_count, alloc.price_per_gpu_hour, alloc.started_at, b)
    fee = fee_of(cb, alloc.platform_fee_bps) - fee_of(ca, alloc.platform_fee_bps)
    return Split(cb - ca, fee, cb - ca - fee)


def periods_due(
    started_at: datetime,
    last_charged_at: datetime,
    now: datetime,
    interval: timedelta,
    ended_at: datetime | None = None,
    limit: int = MAX_INTERVALS_PER_TICK,
) -> list[tuple[datetime, datetime]]:
    """The uncharged periods to charge now: whole grid intervals, then the last partial one.

    Nothing before ``started_at`` (the server being ready) and nothing after
    ``ended_at`` is ever returned.
    """
    stop = now if ended_at is None else min(now, ended_at)
    out: list[tuple[datetime, datetime]] = []
    a = max(last_charged_at, started_at)
    k = (a - started_at) // interval + 1
    while len(out) < limit:
        b = started_at + k * interval
        if b > stop:
            break
        out.append((a, b))
        a, k = b, k + 1
    if ended_at is not None and len(out) < limit and a < ended_at <= now:
        out.append((a, ended_at))
    return out


def usage_key(allocation_id: int, period_end: datetime) -> str:
    """The idempotency key of one charge: (allocation, interval end)."""
    return f"usage:{allocation_id}:{(period_end - EPOCH) // US}"


def hourly_rate(alloc: Billed) -> int:
    return alloc.gpu_count * alloc.price_per_gpu_hour


def runway_seconds(available: int, rate_per_hour: int) -> float | None:
    """Seconds the ``available`` micro-credits last at ``rate_per_hour``; None when free."""
    if rate_per_hour <= 0:
        return None
    return max(0.0, available * 3600 / rate_per_hour)


# --- payers ------------------------------------------------------------------------


def payer_ledger_account(session: Session, alloc: Allocation) -> int:
    if alloc.team_id is not None:
        return ledger.team_budget(session, alloc.team_id).id
    return ledger.wallet(session, alloc.account_id).id


def payer_account_key(alloc: Billed) -> tuple[str, tuple[str, int | None, int | None]]:
    """The payer's ledger account as ``(key, (kind, account_id, team_id))``."""
    if alloc.team_id is not None:
        return f"team:{alloc.team_id}", ("team_budget", None, alloc.team_id)
    return f"wallet:{alloc.account_id}", ("customer_wallet", alloc.account_id, None)


def earnings_account_key(alloc: Billed) -> tuple[str, tuple[str, int | None, int | None]]:
    if alloc.provider_account_id is None:
        return "earnings:house", ("provider_earnings", None, None)
    return f"earnings:{alloc.provider_account_id}", (
        "provider_earnings",
        alloc.provider_account_id,
        None,
    )


def payer_key(alloc: Billed) -> tuple[str, int]:
    if alloc.team_id is not None:
        return ("team", alloc.team_id)
    return ("account", alloc.account_id)


# --- charging ------------------------------------------------------------------------


@dataclass
class TickResult:
    """What one meter tick did; the loop logs it and acts on ``stops_due``."""

    intervals: int = 0
    charged: int = 0
    warned: list[int] = field(default_factory=list)
    stopping: list[int] = field(default_factory=list)
    stops_due: list[int] = field(default_factory=list)
    payers: set[int] = field(default_factory=set)
    #: Allocations and payers that failed this tick (logged, skipped, retried next tick).
    failed: list[int] = field(default_factory=list)
    failed_payers: list[tuple[str, int]] = field(default_factory=list)


def cast_table(model: type[Any]) -> Table:
    """The Core table of a mapped class (typed as a ``Table`` for bulk statements)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


#: The allocation columns the meter reads; rows of these stand in for ORM objects
#: wherever the pure arithmetic (``split``, ``payer_state``) reads an allocation.
_ALLOC = cast_table(Allocation)
_TXN = cast_table(LedgerTransaction)
_POSTING = cast_table(Posting)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def charge_allocations(
    session: Session, ids: Iterable[int], now: datetime, interval: timedelta, result: TickResult
) -> None:
    """Charge every due period of these allocations, in the caller's DB transaction.

    Set-based: the allocations are read as rows in one statement (locked on
    PostgreSQL), every due interval's transaction and its three postings are
    computed in Python, then written by three bulk statements: the
    transactions (``INSERT ... RETURNING id``, in pages), their postings, and
    the moves of ``last_charged_at``. No ORM object is built per row. The
    ledger is exactly the one the one-by-one meter wrote
    (:mod:`.metering_reference`; a property test holds them equal): the same
    keys, fingerprints, legs and memos. A racing meter's duplicate still fails
    on the unique key and rolls this whole batch back.
    """
    query = (
        select(_ALLOC).where(ledger.among(session, _ALLOC.c.id, list(ids))).order_by(_ALLOC.c.id)
    )
    if _is_postgres(session):
        query = query.with_for_update()
    allocs = session.execute(query).all()
    if not allocs:
        return
    wanted: dict[str, tuple[str, int | None, int | None]] = {
        "platform:revenue": ("platform_revenue", None, None)
    }
    #: Each allocation's (payer key, earnings key), named once for the lookup and the charge.
    keys: dict[int, tuple[str, str]] = {}
    for alloc in allocs:
        by_payer, by_earnings = payer_account_key(alloc), earnings_account_key(alloc)
        wanted.update([by_payer, by_earnings])
        keys[alloc.id] = (by_payer[0], by_earnings[0])
    with session.no_autoflush:
        accounts = ledger.ledger_accounts(session, wanted)
    platform = accounts["platform:revenue"]
    created_at = timeutil.utcnow()
    if _is_postgres(session) and _sql_safe(allocs, interval):
        for alloc in allocs:
            if (
                alloc.status == "stopping"
                and alloc.stopping_at is not None
                and alloc.stopping_at <= now
            ):
                _stop_now(session, alloc, result)
        _charge_in_sql(session, keys, accounts, platform, now, interval, created_at, result)
        _expire_loaded(session, {alloc.id for alloc in allocs})
        return
    txns: list[dict[str, object]] = []
    legs: list[list[tuple[int, int]]] = []
    moves: list[dict[str, object]] = []
    for alloc in allocs:
        ended_at = alloc.ended_at
        if (
            alloc.status == "stopping"
            and alloc.stopping_at is not None
            and alloc.stopping_at <= now
        ):
            ended_at = _stop_now(session, alloc, result)
        due = periods_due(alloc.started_at, alloc.last_charged_at, now, interval, ended_at)
        if not due:
            continue
        payer, earnings = (accounts[key] for key in keys[alloc.id])
        memo = f"{alloc.user_name}/{alloc.server_name}: {alloc.gpu_count} GPU"[:500]
        for a, b in due:
            part = split(alloc, a, b)
            these = [(payer, -part.charge), (earnings, part.provider), (platform, part.fee)]
            ledger.validate_legs([ledger.Leg(account, amount) for account, amount in these])
            txns.append(
                {
                    "idempotency_key": usage_key(alloc.id, b),
                    "params_hash": ledger.charge_params_hash("usage", these, alloc.id, a, b),
                    "kind": "usage",
                    "memo": memo,
                    "reference": None,
                    "allocation_id": alloc.id,
                    "period_start": a,
                    "period_end": b,
                    "created_by": "meter",
                    "created_at": created_at,
                }
            )
            legs.append(these)
            result.intervals += 1
            result.charged += part.charge
        moves.append({"alloc_id": alloc.id, "charged_to": due[-1][1]})
        result.payers.add(payer)
    if txns and _is_postgres(session):
        _copy_charges(session, txns, legs, moves)
    elif txns:
        _write_charges(session, txns, legs, moves)
    _expire_loaded(session, {alloc.id for alloc in allocs})


#: Each interval's periods, charge and fingerprint, computed by PostgreSQL from the
#: allocation rows (``:ids`` with their payer and earnings accounts); timestamps as
#: microseconds since the epoch, so the grid and the amounts are exact integers. The
#: same arithmetic as :func:`periods_due`, :func:`split` and
#: :func:`ledger.charge_params_hash` (the property test holds the ledgers equal);
#: a moment is written as ``datetime.isoformat()`` writes an aware UTC one.
_CHARGE_SQL = """
WITH a0 AS (
  SELECT al.id, al.gpu_count::numeric * al.price_per_gpu_hour AS rate,
         al.platform_fee_bps AS bps,
         left(al.user_name || '/' || al.server_name || ': ' || al.gpu_count || ' GPU', 500)
           AS memo,
         v.payer, v.earnings, x.s, x.a0, x.e,
         LEAST(:now_us, COALESCE(x.e, :now_us)) AS stop, (x.a0 - x.s) / :iv + 1 AS k0
  FROM unnest(CAST(:ids AS integer[]), CAST(:payers AS integer[]),
              CAST(:earnings AS integer[])) AS v(id, payer, earnings)
  JOIN allocations AS al ON al.id = v.id
  CROSS JOIN LATERAL (
    SELECT (extract(epoch FROM al.started_at) * 1000000)::bigint AS s,
           (extract(epoch FROM GREATEST(al.last_charged_at, al.started_at)) * 1000000)::bigint
             AS a0,
           (extract(epoch FROM al.ended_at) * 1000000)::bigint AS e
  ) AS x
), a AS (
  SELECT a0.*,
         LEAST(GREATEST(floor((a0.stop - a0.s)::numeric / :iv)::bigint - a0.k0 + 1, 0), :lim)
           AS nwhole
  FROM a0
), p AS (
  SELECT a.*, CASE WHEN k = a.k0 THEN a.a0 ELSE a.s + (k - 1) * :iv END AS pa,
         a.s + k * :iv AS pb
  FROM a CROSS JOIN LATERAL generate_series(a.k0, a.k0 + a.nwhole - 1) AS k
  UNION ALL
  SELECT a.*, w.last_a AS pa, a.e AS pb
  FROM a CROSS JOIN LATERAL (
    SELECT CASE WHEN a.nwhole > 0 THEN a.s + (a.k0 + a.nwhole - 1) * :iv ELSE a.a0 END
      AS last_a
  ) AS w
  WHERE a.e IS NOT NULL AND a.nwhole < :lim AND w.last_a < a.e AND a.e <= :now_us
), c AS (
  SELECT p.*, floor(p.rate * GREATEST(p.pa - p.s, 0) / 3600000000) AS ca,
         floor(p.rate * GREATEST(p.pb - p.s, 0) / 3600000000) AS cb
  FROM p
), m AS (
  SELECT c.id AS alloc_id, c.payer, c.earnings, c.memo, c.pa, c.pb,
         (c.cb - c.ca)::bigint AS charge,
         (floor(c.cb * c.bps / 10000) - floor(c.ca * c.bps / 10000))::bigint AS fee
  FROM c ORDER BY c.id, c.pb
), n AS (
  SELECT nextval((SELECT pg_get_serial_sequence('ledger_transactions', 'id')::regclass))
           AS txn_id, m.*,
         'epoch'::timestamptz + m.pa * interval '1 microsecond' AS ta,
         'epoch'::timestamptz + m.pb * interval '1 microsecond' AS tb
  FROM m
), t AS (
  INSERT INTO ledger_transactions (id, idempotency_key, params_hash, kind, memo, reference,
    allocation_id, period_start, period_end, created_by, created_at)
  SELECT n.txn_id, 'usage:' || n.alloc_id || ':' || n.pb,
    encode(sha256(convert_to(
      '{"extra": {"allocation_id": ' || n.alloc_id
      || ', "period_end": "' || to_char(n.tb AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN n.pb % 1000000 = 0 THEN ''
                ELSE '.' || lpad((n.pb % 1000000)::text, 6, '0') END || '+00:00'
      || '", "period_start": "' || to_char(n.ta AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN n.pa % 1000000 = 0 THEN ''
                ELSE '.' || lpad((n.pa % 1000000)::text, 6, '0') END || '+00:00'
      || '", "reference": null}, "kind": "usage", "legs": ['
      || (SELECT string_agg('[' || l.acc || ', ' || l.amt || ']', ', ' ORDER BY l.acc, l.amt)
          FROM (VALUES (n.payer, -n.charge), (n.earnings, n.charge - n.fee),
                       (:platform, n.fee)) AS l(acc, amt))
      || ']}', 'UTF8')), 'hex'),
    'usage', n.memo, NULL, n.alloc_id, n.ta, n.tb, 'meter', :created_at
  FROM n ORDER BY n.txn_id
), q AS (
  INSERT INTO ledger_postings (transaction_id, ledger_account_id, amount)
  SELECT n.txn_id, l.acc, l.amt
  FROM n CROSS JOIN LATERAL (VALUES (1, n.payer, -n.charge), (2, n.earnings, n.charge - n.fee),
                                    (3, :platform, n.fee)) AS l(ord, acc, amt)
  ORDER BY n.txn_id, l.ord
), mv AS (
  UPDATE allocations AS al SET last_charged_at = g.tb
  FROM (SELECT alloc_id, max(tb) AS tb FROM n GROUP BY alloc_id) AS g
  WHERE al.id = g.alloc_id
)
SELECT count(*), COALESCE(sum(charge), 0), COALESCE(array_agg(DISTINCT payer), '{}')
FROM n
"""


def _sql_safe(allocs: Sequence[Row[Any]], interval: timedelta) -> bool:
    """Whether no interval of these allocations can exceed the most one posting moves.

    An interval's charge is at most ``rate * interval / hour`` plus one micro-credit;
    when that could pass ``ledger.MAX_AMOUNT`` the batch takes the Python path, whose
    validation refuses the charge with its sentence.
    """
    iv_us = interval // US
    bound = ledger.MAX_AMOUNT * US_PER_HOUR // max(1, iv_us)
    return all(a.gpu_count * a.price_per_gpu_hour < bound for a in allocs)


def _charge_in_sql(
    session: Session,
    keys: dict[int, tuple[str, str]],
    accounts: dict[str, int],
    platform: int,
    now: datetime,
    interval: timedelta,
    created_at: datetime,
    result: TickResult,
) -> None:
    """PostgreSQL: every due interval of these allocations charged by one statement.

    ``keys``: each allocation's id with its payer's and its earnings' ledger keys.

    The periods (``generate_series`` over the grid), amounts, keys and
    fingerprints are computed by the database from the locked allocation rows;
    the transactions, their postings (the balance trigger fires once) and the
    moves of ``last_charged_at`` are written by the same statement. No Python
    runs per interval. A racing meter's duplicate fails on the unique key and
    rolls the batch back, as any insert does.
    """
    ids = list(keys)
    payers = [accounts[payer] for payer, _ in keys.values()]
    earnings = [accounts[earning] for _, earning in keys.values()]
    # The planner cannot know generate_series yields one or two rows per allocation; its
    # guess (1,000) makes the plan look costly enough to JIT-compile, which takes longer
    # than running it. JIT is off for this one statement (restored after it).
    jit = session.execute(
        text("SELECT current_setting('jit'), set_config('jit', 'off', true)")
    ).scalar()
    count, charged, paying = session.execute(
        text(_CHARGE_SQL),
        {
            "ids": ids,
            "payers": payers,
            "earnings": earnings,
            "platform": platform,
            "iv": interval // US,
            "lim": MAX_INTERVALS_PER_TICK,
            "now_us": (now - EPOCH) // US,
            "created_at": created_at,
        },
    ).one()
    session.execute(text("SELECT set_config('jit', :jit, true)"), {"jit": jit})
    result.intervals += int(count)
    result.charged += int(charged)
    result.payers.update(paying)


def _stop_now(session: Session, alloc: Row[Any], result: TickResult) -> datetime:
    """Out of credit and past the grace period: the allocation ends at ``stopping_at``."""
    stopping_at: datetime = alloc.stopping_at
    session.execute(
        update(_ALLOC)
        .where(_ALLOC.c.id == alloc.id)
        .values(ended_at=stopping_at, status="stop_due")
    )
    # The GPUs go back on offer in this same step; the hub stops the server next.
    release_reservation(session, alloc.reservation_id)
    result.stops_due.append(alloc.id)
    log.warning(
        "allocation %s of %s/%s stops now (%s)",
        alloc.id,
        alloc.user_name,
        alloc.server_name,
        alloc.stop_reason,
    )
    return stopping_at


def _write_charges(
    session: Session,
    txns: list[dict[str, object]],
    legs: list[list[tuple[int, int]]],
    moves: list[dict[str, object]],
) -> None:
    """Three bulk statements: the transactions, their postings, the allocations' progress.

    ``RETURNING`` with ``sort_by_parameter_order`` gives the new ids in the
    order of ``txns`` (SQLAlchemy pages the rows into multi-row INSERTs, which
    also fires the balance trigger once per page on PostgreSQL).
    """
    ids = session.execute(
        insert(_TXN).returning(_TXN.c.id, sort_by_parameter_order=True), txns
    ).scalars()
    postings = [
        {"transaction_id": txn_id, "ledger_account_id": account, "amount": amount}
        for txn_id, these in zip(ids, legs, strict=True)
        for account, amount in these
    ]
    session.execute(insert(_POSTING).returning(_POSTING.c.id), postings).close()
    session.execute(
        update(_ALLOC)
        .where(_ALLOC.c.id == bindparam("alloc_id"))
        .values(last_charged_at=bindparam("charged_to")),
        moves,
    )


_TXN_COLUMNS = (
    "idempotency_key",
    "params_hash",
    "kind",
    "memo",
    "reference",
    "allocation_id",
    "period_start",
    "period_end",
    "created_by",
    "created_at",
)


def _copy_charges(
    session: Session,
    txns: list[dict[str, object]],
    legs: list[list[tuple[int, int]]],
    moves: list[dict[str, object]],
) -> None:
    """PostgreSQL: the same three writes as :func:`_write_charges`, by ``COPY``.

    The transactions' ids are drawn from their sequence first (one query), so
    the postings can name them without ``RETURNING``; both tables are then
    filled by ``COPY`` (which fires the balance trigger once per table, and the
    unique key as any insert does), and the allocations move by one ``UPDATE``
    over two arrays. Nothing here is a long query text for psycopg to parse.
    """
    import psycopg

    ids = list(
        session.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('ledger_transactions', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": len(txns)},
        ).scalars()
    )
    raw = session.connection().connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cur:
            columns = ", ".join(("id", *_TXN_COLUMNS))
            with cur.copy(f"COPY ledger_transactions ({columns}) FROM STDIN") as copy:
                for txn_id, txn in zip(ids, txns, strict=True):
                    copy.write_row((txn_id, *(txn[c] for c in _TXN_COLUMNS)))
            with cur.copy(
                "COPY ledger_postings (transaction_id, ledger_account_id, amount) FROM STDIN"
            ) as copy:
                for txn_id, these in zip(ids, legs, strict=True):
                    for account, amount in these:
                        copy.write_row((txn_id, account, amount))
    except psycopg.errors.IntegrityError as exc:
        # What an INSERT would raise through SQLAlchemy: the caller's race handling applies.
        raise IntegrityError("COPY ledger_transactions", None, exc) from exc
    session.execute(
        text(
            "UPDATE allocations AS a SET last_charged_at = v.t "
            "FROM unnest(CAST(:ids AS integer[]), CAST(:ts AS timestamptz[])) AS v(id, t) "
            "WHERE a.id = v.id"
        ),
        {"ids": [m["alloc_id"] for m in moves], "ts": [m["charged_to"] for m in moves]},
    )


def _expire_loaded(session: Session, alloc_ids: set[int]) -> None:
    """Allocations this session already holds as ORM objects (a close) re-read their rows.

    Refreshed now, not expired: callers hand the object on after the session ends.
    """
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Allocation) and obj.id in alloc_ids:
            session.refresh(obj)


def tick(
    sessions: sessionmaker[Session],
    settings: Settings,
    now: datetime | None = None,
    batch: int = 10_000,
) -> TickResult:
    """One pass of the meter: charge what is due, then check every payer's runway.

    Allocations are charged ``batch`` at a time, one database transaction per
    batch; when a batch loses a race (a concurrent meter), each of its
    allocations is retried alone and finds its periods already charged. (At
    10,000 open allocations one batch of 10,000 ticks in half the time of five
    batches of 2,000 on PostgreSQL: each batch pays for its row locks, account
    lookups and statement plan once.)
    """
    now = now or timeutil.utcnow()
    interval = timedelta(seconds=settings.meter_interval_seconds)
    result = TickResult()
    with transaction(sessions) as session:
        ids = list(
            session.scalars(
                select(Allocation.id)
                .where(
                    or_(
                        Allocation.status.in_(OPEN_STATES),
                        (Allocation.ended_at.is_not(None))
                        & (Allocation.last_charged_at < Allocation.ended_at),
                    )
                )
                .order_by(Allocation.id)
            )
        )
    for chunk in _chunks(ids, batch):
        try:
            part = TickResult()
            with transaction(sessions) as session:
                charge_allocations(session, chunk, now, interval, part)
            _merge(result, part)
        except Exception as exc:
            if isinstance(exc, (IntegrityError, OperationalError)):
                log.info("meter: batch of %d lost a race; charging one by one", len(chunk))
            else:
                log.warning("meter: batch of %d failed (%s); charging one by one", len(chunk), exc)
            for alloc_id in chunk:
                _charge_one(sessions, alloc_id, now, interval, result)
    _check_every_payer(sessions, settings, now, result)
    if result.intervals:
        log.info("meter: charged %d intervals, %d micro-credits", result.intervals, result.charged)
    return result


def _charge_one(
    sessions: sessionmaker[Session],
    alloc_id: int,
    now: datetime,
    interval: timedelta,
    result: TickResult,
) -> None:
    """Charge one allocation alone; a failure is logged and skipped until the next tick.

    One bad allocation (or its payer's bad account) never stops the meter from
    charging, warning and stopping everyone else.
    """
    part = TickResult()

    def one(session: Session) -> None:
        charge_allocations(session, [alloc_id], now, interval, part)

    try:
        ledger.with_retry(sessions, one)
    except Exception as exc:
        log.warning("meter: allocation %s skipped this tick: %s", alloc_id, exc)
        log.debug("meter: allocation %s failed", alloc_id, exc_info=True)
        result.failed.append(alloc_id)
        return
    _merge(result, part)


def _check_every_payer(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, result: TickResult
) -> None:
    """The runway check of every payer: all in one transaction, else payer by payer."""
    part = TickResult()
    try:
        ledger.with_retry(sessions, lambda s: check_runway(s, settings, now, part))
        _merge(result, part)
        return
    except Exception as exc:
        log.warning("meter: the runway check failed (%s); checking payer by payer", exc)
    with transaction(sessions) as session:
        keys = sorted(
            {
                payer_key(a)
                for a in session.scalars(
                    select(Allocation).where(Allocation.status.in_(OPEN_STATES))
                )
            }
        )
    for key in keys:
        part = TickResult()

        def one(session: Session, key: tuple[str, int] = key, part: TickResult = part) -> None:
            check_runway(session, settings, now, part, only=key)

        try:
            ledger.with_retry(sessions, one)
        except Exception as exc:
            log.warning("meter: payer %s:%s skipped this tick: %s", key[0], key[1], exc)
            log.debug("meter: payer %s failed", key, exc_info=True)
            result.failed_payers.append(key)
            continue
        _merge(result, part)


def _merge(into: TickResult, part: TickResult) -> None:
    into.intervals += part.intervals
    into.charged += part.charged
    into.warned += part.warned
    into.stopping += part.stopping
    into.stops_due += part.stops_due
    into.payers |= part.payers


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


# --- runway and quotas -----------------------------------------------------------------


def gpu_seconds_used(allocs: Iterable[Allocation], since: datetime, now: datetime) -> int:
    """GPU-seconds held in ``[since, now]`` by these allocations (from their time, not cash)."""
    total = 0
    for alloc in allocs:
        start = max(alloc.started_at, since)
        end = min(alloc.ended_at or now, now)
        if end > start:
            total += alloc.gpu_count * int((end - start).total_seconds())
    return total


def quota_for(
    session: Session, *, account_id: int | None = None, team_id: int | None = None
) -> Quota | None:
    if account_id is not None:
        return session.scalar(select(Quota).where(Quota.account_id == account_id))
    return session.scalar(select(Quota).where(Quota.team_id == team_id))


def quota_allocations(session: Session, quota: Quota, since: datetime) -> list[Allocation]:
    """Allocations a quota counts: all of a user's, or those billed to a team."""
    owner = (
        Allocation.account_id == quota.account_id
        if quota.account_id is not None
        else Allocation.team_id == quota.team_id
    )
    return list(
        session.scalars(
            select(Allocation).where(
                owner, or_(Allocation.ended_at.is_(None), Allocation.ended_at > since)
            )
        )
    )


def quota_left(session: Session, quota: Quota, now: datetime) -> int | None:
    """GPU-seconds left in the quota's rolling window; None when it has no GPU-hour limit."""
    if quota.gpu_seconds is None:
        return None
    since = now - timedelta(seconds=QUOTA_WINDOWS[quota.rolling_window])
    return quota.gpu_seconds - gpu_seconds_used(
        quota_allocations(session, quota, since), since, now
    )


def uncharged(alloc: Billed, now: datetime) -> int:
    """What ``alloc`` owes for time since its last charge (not yet in the ledger)."""
    end = now if alloc.ended_at is None else min(now, alloc.ended_at)
    if end <= alloc.last_charged_at:
        return 0
    return split(alloc, alloc.last_charged_at, end).charge


@dataclass
class PayerState:
    """A payer's money and runway right now, across all its open allocations."""

    balance: int
    available: int
    rate_per_hour: int
    runway: float | None
    reason: str


def payer_state(
    session: Session,
    payer_ledger_id: int,
    open_allocs: list[Allocation] | list[Row[Any]],
    now: datetime,
    *,
    known_balance: int | None = None,
    quotas: dict[tuple[str, int], Quota] | None = None,
) -> PayerState:
    """Balance, what is left after uncharged time, the burn rate and the runway.

    The runway is the shorter of the money runway and any GPU-hour quota runway
    (the user's own quota, and the team's when the team pays). The meter passes
    balances and quotas it read in bulk; other callers let this read them.
    """
    bal = ledger.balance(session, payer_ledger_id) if known_balance is None else known_balance
    available = bal - sum(uncharged(a, now) for a in open_allocs)
    rate = sum(hourly_rate(a) for a in open_allocs)
    runway, reason = runway_seconds(available, rate), "out_of_credit"
    gpus = sum(a.gpu_count for a in open_allocs)
    if open_allocs and gpus:
        owners: list[Quota | None] = []
        first = open_allocs[0]
        if first.team_id is not None:
            owners.append(
                quotas.get(("team", first.team_id))
                if quotas is not None
                else quota_for(session, team_id=first.team_id)
            )
        for account_id in sorted({a.account_id for a in open_allocs}):
            owners.append(
                quotas.get(("account", account_id))
                if quotas is not None
                else quota_for(session, account_id=account_id)
            )
        for quota in owners:
            if quota is None:
                continue
            left = quota_left(session, quota, now)
            if left is not None:
                quota_runway = max(0.0, left / gpus)
                if runway is None or quota_runway < runway:
                    runway, reason = quota_runway, "quota_exhausted"
    return PayerState(bal, available, rate, runway, reason)


def stop_threshold_seconds(settings: Settings) -> int:
    """Runway (seconds) at or under which the meter schedules a payer's stop.

    The grace period plus one meter interval: the stop is scheduled at the
    last tick before the runway falls under the grace period, so the grace
    period is paid for by what is left and the balance never goes below zero.
    """
    return settings.grace_seconds + settings.meter_interval_seconds


def warning_threshold_seconds(settings: Settings) -> int:
    """Runway (seconds) under which a payer is warned: the warning time before the stop."""
    return settings.runway_warning_seconds + settings.grace_seconds


def seconds_to_zero_us(available: int, rate_per_hour: int, allocations: int) -> int:
    """Microseconds until ``available`` is spent at ``rate_per_hour``, rounded down.

    Each allocation's charges are differences of rounded-down cumulative
    values, so together they may exceed the exact price by less than one
    micro-credit per allocation; keeping that much back makes the stop land
    at or before zero, never after.
    """
    if rate_per_hour <= 0:
        return 0
    return max(0, available - allocations) * US_PER_HOUR // rate_per_hour


#: PostgreSQL: the payers whose runway check can change anything, by a bound that never
#: misses one. A payer is left out only when every open allocation of it is ``running``
#: and unwarned, no quota row names it (or, for a team, any of its allocations' users), and
#: even if each allocation owed ``rate * (now - last charge) / hour + 1`` (more than the
#: meter can charge it for that time) its money would last longer than ``:horizon``
#: seconds. For such a payer :func:`_runway_change` changes nothing; every other payer is
#: checked exactly, in Python, as before.
_PAYERS_TO_CHECK_SQL = """
WITH o AS (
  SELECT CASE WHEN al.team_id IS NOT NULL THEN 'team:' || al.team_id
              ELSE 'wallet:' || al.account_id END AS payer,
         al.gpu_count::numeric * al.price_per_gpu_hour AS rate,
         GREATEST(extract(epoch FROM (CAST(:now AS timestamptz) - al.last_charged_at)), 0)
           AS owed_seconds,
         (al.status <> 'running' OR al.runway_warned_at IS NOT NULL OR EXISTS (
            SELECT 1 FROM quotas AS q
            WHERE q.account_id = al.account_id OR q.team_id = al.team_id)) AS attention
  FROM allocations AS al
  WHERE al.status IN ('running', 'stopping')
), p AS (
  SELECT payer, bool_or(attention) AS attention, sum(rate) AS rate,
         sum(rate * owed_seconds / 3600 + 1) AS owed
  FROM o GROUP BY payer
)
SELECT p.payer FROM p
LEFT JOIN ledger_accounts AS a ON a.key = p.payer
LEFT JOIN ledger_balances AS b ON b.ledger_account_id = a.id
WHERE p.attention
   OR (p.rate > 0 AND (COALESCE(b.balance, 0) - p.owed) * 3600 <= (:horizon + 1) * p.rate)
"""


def _payer_key_sql() -> Any:
    """The payer's ledger key of an allocation row, in SQL (as :func:`payer_account_key`)."""
    return case(
        (
            _ALLOC.c.team_id.is_not(None),
            literal("team:") + cast(_ALLOC.c.team_id, String),
        ),
        else_=literal("wallet:") + cast(_ALLOC.c.account_id, String),
    )


def _open_allocations_with_balances(
    session: Session, payers: list[str] | None = None
) -> list[Row[Any]]:
    """Every open allocation with its payer's ledger account and balance: one query.

    The payer's ledger account is joined by its key (``wallet:<account>`` or
    ``team:<team>``, as :func:`payer_account_key` names it) and its balance
    read from the maintained ``ledger_balances``; a payer with no ledger
    account yet has ``payer_ledger_id`` None and a balance of 0. ``payers``:
    only the allocations of these payer keys.
    """
    acct = cast_table(LedgerAccount)
    bal = cast_table(LedgerBalance)
    payer_key_sql = _payer_key_sql()
    query = (
        select(
            _ALLOC,
            acct.c.id.label("payer_ledger_id"),
            func.coalesce(bal.c.balance, 0).label("payer_balance"),
        )
        .select_from(_ALLOC)
        .outerjoin(acct, acct.c.key == payer_key_sql)
        .outerjoin(bal, bal.c.ledger_account_id == acct.c.id)
        .where(_ALLOC.c.status.in_(OPEN_STATES))
        .order_by(_ALLOC.c.id)
    )
    if payers is not None:
        query = query.where(ledger.among(session, payer_key_sql, payers))
    return list(session.execute(query).all())


def _payers_to_check(session: Session, settings: Settings, now: datetime) -> list[str] | None:
    """PostgreSQL: the payer keys whose runway check may change something; None elsewhere
    (SQLite, the embedded default, checks every payer)."""
    if not _is_postgres(session):
        return None
    assert set(OPEN_STATES) == {"running", "stopping"}  # as _PAYERS_TO_CHECK_SQL names them
    horizon = max(stop_threshold_seconds(settings), warning_threshold_seconds(settings))
    return list(
        session.execute(text(_PAYERS_TO_CHECK_SQL), {"now": now, "horizon": horizon}).scalars()
    )


def check_runway(
    session: Session,
    settings: Settings,
    now: datetime,
    result: TickResult,
    only: tuple[str, int] | None = None,
    *,
    every_payer: bool = False,
) -> None:
    """Warn before the stop; schedule the stop so the grace period ends at zero at the latest.

    The thresholds count the spend rate through the runway (seconds left at
    the current rate): a payer is warned ``runway_warning_seconds`` before its
    servers stop, and the stop is scheduled when the runway falls to the grace
    period (plus one meter interval), at ``now + min(grace, runway)``, so the
    balance is never driven below zero by the meter. A payer whose runway
    recovers (a top-up, a raised quota) before the stop gets its servers back
    to ``running``. ``only``: check this one payer (``payer_key``) alone.

    Set-based: one query reads every open allocation with its payer's
    maintained balance, one reads the quotas, and only the allocations whose
    state changes are written back (one executemany). On PostgreSQL one more
    query first names the payers that need a look (:data:`_PAYERS_TO_CHECK_SQL`:
    a bound that never leaves out a payer whose state could change), so a tick
    reads only those; ``every_payer`` reads them all (the tests compare the two).
    """
    groups: dict[tuple[str, int], list[Row[Any]]] = {}
    payers = None if only is not None or every_payer else _payers_to_check(session, settings, now)
    for alloc in _open_allocations_with_balances(session, payers):
        key = payer_key(alloc)
        if only is None or key == only:
            groups.setdefault(key, []).append(alloc)
    grace = timedelta(seconds=settings.grace_seconds)
    limits: dict[tuple[str, int], Quota] = {}
    for quota in session.scalars(select(Quota)):
        if quota.account_id is not None:
            limits[("account", quota.account_id)] = quota
        elif quota.team_id is not None:
            limits[("team", quota.team_id)] = quota
    stop_at_or_below = stop_threshold_seconds(settings)
    warn_below = warning_threshold_seconds(settings)
    changes: list[dict[str, Any]] = []
    for key, group in groups.items():
        first = group[0]
        state = payer_state(
            session,
            first.payer_ledger_id or 0,
            group,
            now,
            known_balance=int(first.payer_balance),
            quotas=limits,
        )
        runway = state.runway
        if state.reason == "out_of_credit":
            left = timedelta(
                microseconds=seconds_to_zero_us(state.available, state.rate_per_hour, len(group))
            )
        else:
            left = timedelta(seconds=runway or 0.0)
        capped = over_spend_cap(group, limits.get(key))
        for alloc in group:
            if alloc.id in capped:
                changes.append(_spend_cap_stop(alloc, now + min(grace, left), now, result))
                continue
            change = _runway_change(
                alloc,
                runway,
                state.reason,
                now,
                now + min(grace, left),
                stop_at_or_below,
                warn_below,
                result,
            )
            if change:
                changes.append(change)
    if changes:
        session.execute(
            update(_ALLOC)
            .where(_ALLOC.c.id == bindparam("alloc_id"))
            .values(
                status=bindparam("new_status"),
                stopping_at=bindparam("new_stopping_at"),
                stop_reason=bindparam("new_stop_reason"),
                runway_warned_at=bindparam("new_warned_at"),
            ),
            changes,
        )
        _expire_loaded(session, {change["alloc_id"] for change in changes})


def over_spend_cap(group: list[Row[Any]], quota: Quota | None) -> set[int]:
    """The running allocations of one payer to stop so its hourly spend fits its cap.

    The cap is checked at launch; during the session it can be exceeded when an
    admin or team admin lowers it. The newest servers stop first, until the
    summed hourly price of the rest is within the cap. Those already stopping
    are on their way out and count for nothing.
    """
    if quota is None or quota.spend_cap_per_hour is None:
        return set()
    running = sorted(
        (a for a in group if a.status == "running"),
        key=lambda a: (a.started_at, a.id),
        reverse=True,
    )
    rate = sum(hourly_rate(a) for a in running)
    stop: set[int] = set()
    for alloc in running:
        if rate <= quota.spend_cap_per_hour:
            break
        stop.add(alloc.id)
        rate -= hourly_rate(alloc)
    return stop


def _spend_cap_stop(
    alloc: Row[Any], stop_at: datetime, now: datetime, result: TickResult
) -> dict[str, Any]:
    """Stop one server over its payer's spend cap at ``stop_at`` (after the grace
    period, or sooner if the payer's money runs out first; its notebooks are saved
    meanwhile), with the stop reason ``spend_cap``."""
    result.stopping.append(alloc.id)
    log.warning(
        "allocation %s of %s/%s: over the payer's spend cap, stopping at %s",
        alloc.id,
        alloc.user_name,
        alloc.server_name,
        stop_at.isoformat(),
    )
    return {
        "alloc_id": alloc.id,
        "new_status": "stopping",
        "new_stopping_at": stop_at,
        "new_stop_reason": "spend_cap",
        "new_warned_at": alloc.runway_warned_at or now,
    }


def _runway_change(
    alloc: Row[Any],
    runway: float | None,
    reason: str,
    now: datetime,
    stop_at: datetime,
    stop_at_or_below: int,
    warn_below: int,
    result: TickResult,
) -> dict[str, Any] | None:
    """The new state of one allocation after its payer's runway check; None when unchanged."""
    status, stopping_at = alloc.status, alloc.stopping_at
    stop_reason, warned_at = alloc.stop_reason, alloc.runway_warned_at
    if runway is not None and runway <= stop_at_or_below:
        if status == "running":
            status, stopping_at, stop_reason = "stopping", stop_at, reason
            result.stopping.append(alloc.id)
            log.warning(
                "allocation %s of %s/%s: %s, stopping at %s",
                alloc.id,
                alloc.user_name,
                alloc.server_name,
                reason,
                stop_at.isoformat(),
            )
    elif status == "stopping" and stop_reason in ("out_of_credit", "quota_exhausted"):
        status, stopping_at, stop_reason, warned_at = "running", None, None, None
        log.info(
            "allocation %s of %s/%s: runway restored, stop cancelled",
            alloc.id,
            alloc.user_name,
            alloc.server_name,
        )
    if runway is not None and runway < warn_below:
        if warned_at is None:
            warned_at = now
            result.warned.append(alloc.id)
            log.warning(
                "allocation %s of %s/%s: runway %.0f s (%s)",
                alloc.id,
                alloc.user_name,
                alloc.server_name,
                runway,
                reason,
            )
    elif warned_at is not None and status == "running":
        warned_at = None
    if (status, stopping_at, stop_reason, warned_at) == (
        alloc.status,
        alloc.stopping_at,
        alloc.stop_reason,
        alloc.runway_warned_at,
    ):
        return None
    return {
        "alloc_id": alloc.id,
        "new_status": status,
        "new_stopping_at": stopping_at,
        "new_stop_reason": stop_reason,
        "new_warned_at": warned_at,
    }


def release_reservation(session: Session, reservation_id: str | None) -> None:
    """Give back the GPUs of an allocation's reservation, if it still holds them.

    Called in the same database transaction that ends the allocation (the
    meter's out-of-credit stop, a close), so the GPUs go straight back on offer.
    """
    if reservation_id is None:
        return
    res = session.get(Reservation, reservation_id)
    if res is not None and res.status in LIVE_STATUSES:
        marketplace.release(session, reservation_id)
