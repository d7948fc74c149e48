"""Customer usage: what each server cost, per server and per day, from the ledger.

Numbers come from the usage transactions themselves (charges and reversals),
so the usage report and the balance can never disagree. A charged interval
belongs to the UTC day on which it starts; intervals are at most the meter
interval long (30 s by default), so a day boundary moves at most that much.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ..db.ledger_models import Allocation, LedgerAccount, LedgerTransaction, Posting

PAYER_KINDS = ("customer_wallet", "team_budget")


def usage(
    session: Session,
    account_id: int,
    by: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Rows of usage for one account, grouped ``by`` ``server`` or ``day``."""
    query = (
        select(
            Allocation.id,
            Allocation.server_name,
            Allocation.gpu_count,
            LedgerTransaction.period_start,
            LedgerTransaction.period_end,
            Posting.amount,
        )
        .join(LedgerTransaction, LedgerTransaction.allocation_id == Allocation.id)
        .join(Posting, Posting.transaction_id == LedgerTransaction.id)
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .where(
            Allocation.account_id == account_id,
            LedgerAccount.kind.in_(PAYER_KINDS),
            LedgerTransaction.kind.in_(("usage", "usage_reversal")),
        )
        .order_by(LedgerTransaction.period_start)
    )
    if since is not None:
        query = query.where(LedgerTransaction.period_end > since)
    if until is not None:
        query = query.where(LedgerTransaction.period_start < until)
    groups: dict[tuple[str, ...], dict[str, Any]] = defaultdict(
        lambda: {"gpu_seconds": 0, "charged": 0, "allocations": set()}
    )
    for alloc_id, server, gpus, start, end, amount in session.execute(query):
        if start is None or end is None:  # pragma: no cover - usage rows always have a period
            continue
        seconds = (end - start).total_seconds()
        sign = 1 if amount <= 0 else -1  # a reversal gives time and money back
        key: tuple[str, ...] = (server,) if by == "server" else (start.date().isoformat(), server)
        row = groups[key]
        row["gpu_seconds"] += sign * gpus * seconds
        row["charged"] += -amount
        row["allocations"].add(alloc_id)
    out = []
    for group, row in sorted(groups.items()):
        key = group
        item: dict[str, Any] = {"server": key[-1]}
        if by == "day":
            item["day"] = key[0]
        item.update(
            allocations=len(row["allocations"]),
            gpu_hours=round(row["gpu_seconds"] / 3600, 6),
            charged=row["charged"],
        )
        out.append(item)
    return out


def to_csv(rows: list[dict[str, Any]], by: str) -> str:
    columns = (["day"] if by == "day" else []) + [
        "server",
        "allocations",
        "gpu_hours",
        "charged_micro_credits",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = {**row, "charged_micro_credits": row["charged"]}
        writer.writerow([_cell(values[c]) for c in columns])
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """Server names are user input: never let a spreadsheet read one as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def top_ups(session: Session, account_id: int, limit: int = 200) -> list[dict[str, Any]]:
    """Money that came into one account's wallet: grants, promo and sign-up credit,
    deposits (and any correction of them), and an admin's refund of a session,
    newest first.

    These are the wallet's postings that belong to no allocation, and refunds;
    charges and their reversals are the usage report's business.
    """
    query = (
        select(
            LedgerTransaction.kind,
            LedgerTransaction.memo,
            LedgerTransaction.created_at,
            Posting.amount,
        )
        .join(Posting, Posting.transaction_id == LedgerTransaction.id)
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .where(
            LedgerAccount.account_id == account_id,
            LedgerAccount.kind == "customer_wallet",
            or_(LedgerTransaction.allocation_id.is_(None), LedgerTransaction.kind == "refund"),
        )
        .order_by(LedgerTransaction.created_at.desc(), LedgerTransaction.id.desc())
        .limit(limit)
    )
    return [
        {"kind": kind, "memo": memo or "", "created_at": created_at, "amount": int(amount)}
        for kind, memo, created_at, amount in session.execute(query)
    ]
