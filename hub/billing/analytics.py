"""What the dashboards show: earnings, utilisation, usage and marketplace analytics, in SQL.

Each report is one function over a session, scoped by its caller's identity: a
provider's report reads only rows reached through that provider's own nodes and
earnings account; a customer's usage only that account's allocations. The portal's
routes (``portal/api/dashboards.py``) decide who may ask for which report; nothing
here trusts a name that came from a dashboard.

Aggregation happens in the database (``GROUP BY`` day, hour, node, model, payer);
Python only computes what SQL cannot say portably (medians, a projection) and turns
rows into plain dicts that the dashboards shape with pandas. Money is integer
micro-credits; every time is aware UTC, bucketed by its UTC day or hour.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, select
from sqlalchemy.orm import Session

from ..db.ledger_models import Allocation, LedgerAccount, LedgerTransaction, Posting
from ..db.marketplace_models import (
    Cluster,
    Gpu,
    GpuAllocation,
    HeartbeatRollup,
    Node,
    NodeChallenge,
    Provider,
    Reservation,
)
from ..db.models import Account, Team
from ..db.payout_models import Payout
from . import usage as usage_rows

USAGE_KINDS = ("usage", "usage_reversal")
#: What money reports count: usage, its reversals, and refunds (which give a customer
#: back part of an allocation's charges, from the provider's earnings and the fee).
MONEY_KINDS = (*USAGE_KINDS, "refund")


def money_time() -> Any:
    """When a charge counts: the start of its interval; a refund, when it was made."""
    return func.coalesce(LedgerTransaction.period_start, LedgerTransaction.created_at)


#: A node-minute whose mean GPU utilisation is below this share counts as idle.
IDLE_BELOW = 0.10
#: A node below this reliability score gets an alert (placement stops well before 0).
LOW_RELIABILITY = 0.7


# --- buckets ------------------------------------------------------------------------------


def bucket(session: Session, column: Any, unit: str) -> ColumnElement[str]:
    """``column``'s UTC day (``YYYY-MM-DD``) or hour (``YYYY-MM-DDTHH``), as text, in SQL.

    SQLite keeps these timestamps as UTC text (``YYYY-MM-DD HH:MM:SS...``), so a prefix is
    the bucket; PostgreSQL formats the instant in UTC.
    """
    if session.get_bind().dialect.name == "postgresql":
        pattern = "YYYY-MM-DD" if unit == "day" else 'YYYY-MM-DD"T"HH24'
        return func.to_char(func.timezone("UTC", column), pattern)
    if unit == "day":
        return func.substr(column, 1, 10)
    return func.substr(column, 1, 10) + literal("T") + func.substr(column, 12, 2)


def _util(
    util_sum: Any, samples: Any
) -> ColumnElement[Any]:  # mean utilisation (percent), NULL-safe
    return func.coalesce(func.sum(util_sum), 0.0) / func.nullif(func.sum(samples), 0)


def _share(value: float | None) -> float | None:
    """GPU utilisation as a share 0..1 (heartbeats report percent)."""
    if value is None:
        return None
    return round(value / 100.0 if value > 1.0 else value, 4)


# --- payouts (wired to the payouts table when it lands) --------------------------------------


def payouts(
    session: Session, provider_account_id: int | None, since: datetime
) -> list[dict[str, Any]]:
    """Payouts to one provider (or all, for ``None``) since ``since``, newest first.

    Each row: ``id``, ``provider``, ``amount`` (micro-credits), ``asset`` (SOL or USDC),
    ``units`` (lamports or token base units), ``status``, ``signature`` (the Solana
    transaction, once signed), ``chain`` and ``created_at``. Never the signed bytes.
    """
    query = (
        select(
            Payout.id,
            Account.hub_name.label("provider"),
            Payout.amount,
            Payout.asset,
            Payout.units,
            Payout.status,
            Payout.signature,
            Payout.chain,
            Payout.created_at,
        )
        .join(Account, Account.id == Payout.provider_account_id)
        .where(Payout.created_at >= since)
        .order_by(Payout.created_at.desc(), Payout.id.desc())
    )
    if provider_account_id is not None:
        query = query.where(Payout.provider_account_id == provider_account_id)
    return [dict(row._mapping) for row in session.execute(query)]


# --- the provider's earnings dashboard -----------------------------------------------------


def provider_nodes(session: Session, account_id: int) -> list[dict[str, Any]]:
    """The provider's nodes with status, verification, reliability, price and GPUs."""
    gpus = (
        select(
            Gpu.node_id.label("node_pk"),
            func.min(Gpu.model).label("model"),
            func.count(Gpu.id).label("gpus"),
        )
        .group_by(Gpu.node_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Node.node_id,
            Node.status,
            Node.blocked,
            Node.verification,
            Node.reliability,
            Node.offline_reason,
            Node.last_heartbeat_at,
            Node.failed_verifications,
            Node.demo,
            Provider.price_per_gpu_hour,
            Provider.region,
            Provider.status.label("listing"),
            gpus.c.model,
            gpus.c.gpus,
        )
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Provider, Provider.id == Cluster.provider_id)
        .outerjoin(gpus, gpus.c.node_pk == Node.id)
        .where(Provider.account_id == account_id, Node.status != "left")
        .order_by(Node.node_id)
    )
    return [
        {
            "node": r.node_id,
            "status": "blocked" if r.blocked else r.status,
            "verification": r.verification,
            "reliability": round(r.reliability, 3),
            "price_per_gpu_hour": r.price_per_gpu_hour,
            "gpu_model": r.model or "",
            "gpus": r.gpus or 0,
            "region": r.region,
            "listing": r.listing,
            "last_heartbeat_at": r.last_heartbeat_at,
            "offline_reason": r.offline_reason,
            "failed_verifications": r.failed_verifications,
            "demo": r.demo,
        }
        for r in rows
    ]


def provider_utilisation(
    session: Session, account_id: int, since: datetime
) -> list[dict[str, Any]]:
    """Mean GPU utilisation per node and UTC hour, from the heartbeat rollups."""
    hour = bucket(session, HeartbeatRollup.minute, "hour")
    rows = session.execute(
        select(
            Node.node_id,
            hour.label("hour"),
            _util(HeartbeatRollup.gpu_util_sum, HeartbeatRollup.gpu_samples).label("util"),
            func.sum(HeartbeatRollup.heartbeats).label("heartbeats"),
        )
        .join(Node, Node.id == HeartbeatRollup.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Provider, Provider.id == Cluster.provider_id)
        .where(Provider.account_id == account_id, HeartbeatRollup.minute >= since)
        .group_by(Node.node_id, hour)
        .order_by(hour, Node.node_id)
    )
    return [
        {
            "node": r.node_id,
            "hour": r.hour,
            "utilisation": _share(r.util),
            "heartbeats": r.heartbeats,
        }
        for r in rows
    ]


def provider_earnings(session: Session, account_id: int, since: datetime) -> list[dict[str, Any]]:
    """Earnings per UTC day, node and GPU model: the provider's own earnings postings.

    Reversals and refunds count negative, so the sum is what the provider's
    earnings account gained. An interval belongs to the day on which it starts, a
    refund to the day it was made.
    """
    day = bucket(session, money_time(), "day")
    rows = session.execute(
        select(
            day.label("day"),
            func.coalesce(Node.node_id, "").label("node"),
            func.coalesce(Reservation.gpu_model, "").label("gpu_model"),
            func.sum(Posting.amount).label("earned"),
        )
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .join(Allocation, Allocation.id == LedgerTransaction.allocation_id)
        .outerjoin(Reservation, Reservation.id == Allocation.reservation_id)
        .outerjoin(Node, Node.id == Reservation.node_id)
        .where(
            LedgerAccount.kind == "provider_earnings",
            LedgerAccount.account_id == account_id,
            LedgerTransaction.kind.in_(MONEY_KINDS),
            money_time() >= since,
        )
        .group_by(day, Node.node_id, Reservation.gpu_model)
        .order_by(day, Node.node_id)
    )
    return [
        {"day": r.day, "node": r.node, "gpu_model": r.gpu_model, "earned": int(r.earned)}
        for r in rows
    ]


def market_medians(session: Session) -> dict[str, int]:
    """The median listed price per GPU-hour of each GPU model, over every listed node."""
    rows = session.execute(
        select(Gpu.model, Node.id, Provider.price_per_gpu_hour)
        .join(Node, Node.id == Gpu.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Provider, Provider.id == Cluster.provider_id)
        .where(Provider.status == "listed", Node.status != "left", Node.blocked.is_(False))
        .group_by(Gpu.model, Node.id, Provider.price_per_gpu_hour)
    )
    prices: dict[str, list[int]] = {}
    for model, _node, price in rows:
        prices.setdefault(model, []).append(price)
    return {model: int(statistics.median(values)) for model, values in sorted(prices.items())}


def _alerts(nodes: list[dict[str, Any]]) -> list[dict[str, str]]:
    alerts = []
    for node in nodes:
        name = node["node"]
        if node["status"] == "offline":
            why = f" ({node['offline_reason']})" if node["offline_reason"] else ""
            alerts.append(
                {"node": name, "level": "error", "message": f"Node {name} is offline{why}."}
            )
        if node["status"] == "blocked":
            alerts.append(
                {"node": name, "level": "error", "message": f"Node {name} is blocked by an admin."}
            )
        if node["verification"] in ("failed", "changed"):
            alerts.append(
                {
                    "node": name,
                    "level": "error",
                    "message": f"Node {name} failed verification; its GPUs are not offered.",
                }
            )
        if node["reliability"] < LOW_RELIABILITY:
            alerts.append(
                {
                    "node": name,
                    "level": "warning",
                    "message": f"Node {name} has a low reliability score "
                    f"({node['reliability']:.2f}); it is placed last, then not at all.",
                }
            )
    return alerts


def provider_report(
    session: Session, account_id: int, now: datetime, days: int, fee_bps: int
) -> dict[str, Any]:
    """Everything on the provider's earnings dashboard, for the last ``days`` days."""
    since = now - timedelta(days=days)
    nodes = provider_nodes(session, account_id)
    medians = market_medians(session)
    for node in nodes:
        node["market_median"] = medians.get(node["gpu_model"])
    # Projection: each node's mean utilisation over the last day, at its price, for 30 days.
    recent = {
        r.node_id: _share(r.util)
        for r in session.execute(
            select(
                Node.node_id,
                _util(HeartbeatRollup.gpu_util_sum, HeartbeatRollup.gpu_samples).label("util"),
            )
            .join(Node, Node.id == HeartbeatRollup.node_id)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .join(Provider, Provider.id == Cluster.provider_id)
            .where(
                Provider.account_id == account_id, HeartbeatRollup.minute >= now - timedelta(days=1)
            )
            .group_by(Node.node_id)
        )
    }
    projected = []
    for node in nodes:
        util = recent.get(node["node"]) or 0.0
        gross_per_day = util * node["gpus"] * node["price_per_gpu_hour"] * 24
        per_day = int(gross_per_day * (10_000 - fee_bps) // 10_000)
        projected.append(
            {
                "node": node["node"],
                "utilisation": util,
                "per_day": per_day,
                "per_month": per_day * 30,
            }
        )
    total = session.scalar(
        select(func.coalesce(func.sum(Posting.amount), 0))
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .where(LedgerAccount.kind == "provider_earnings", LedgerAccount.account_id == account_id)
    )
    return {
        "since": since,
        "now": now,
        "nodes": nodes,
        "utilisation": provider_utilisation(session, account_id, since),
        "earnings": provider_earnings(session, account_id, since),
        "earnings_total": int(total or 0),
        "projected": projected,
        "market_median": medians,
        "payouts": payouts(session, account_id, since),
        "alerts": _alerts(nodes),
    }


# --- the customer's usage dashboard --------------------------------------------------------


def session_utilisation(
    session: Session, account_id: int, now: datetime, since: datetime
) -> list[dict[str, Any]]:
    """Each server session (allocation) since ``since`` with its node's GPU utilisation.

    Utilisation is the node's, per minute, while the session ran; a minute below
    ``IDLE_BELOW`` is idle, and its cost is that minute of the session's GPUs at the
    locked price. (A node shared by several sessions reports one figure for all.)
    """
    end = func.coalesce(Allocation.ended_at, now)
    idle = case(
        (
            HeartbeatRollup.gpu_util_sum
            < literal(IDLE_BELOW * 100) * func.nullif(HeartbeatRollup.gpu_samples, 0),
            1,
        ),
        else_=0,
    )
    rows = session.execute(
        select(
            Allocation.id,
            Allocation.server_name,
            Allocation.gpu_count,
            Allocation.price_per_gpu_hour,
            Allocation.started_at,
            Allocation.ended_at,
            Allocation.status,
            func.coalesce(Reservation.gpu_model, "").label("gpu_model"),
            _util(HeartbeatRollup.gpu_util_sum, HeartbeatRollup.gpu_samples).label("util"),
            func.count(HeartbeatRollup.minute).label("minutes"),
            func.coalesce(func.sum(idle), 0).label("idle_minutes"),
        )
        .outerjoin(Reservation, Reservation.id == Allocation.reservation_id)
        .outerjoin(
            HeartbeatRollup,
            and_(
                HeartbeatRollup.node_id == Reservation.node_id,
                HeartbeatRollup.minute >= Allocation.started_at,
                HeartbeatRollup.minute < end,
            ),
        )
        .where(Allocation.account_id == account_id, end > since)
        .group_by(Allocation.id, Reservation.gpu_model)
        .order_by(Allocation.started_at)
    )
    out = []
    for r in rows:
        idle_cost = r.idle_minutes * r.gpu_count * r.price_per_gpu_hour // 60
        out.append(
            {
                "allocation": r.id,
                "server": r.server_name or "(default)",
                "gpu_model": r.gpu_model,
                "gpus": r.gpu_count,
                "started_at": r.started_at,
                "ended_at": r.ended_at,
                "status": r.status,
                "utilisation": _share(r.util),
                "measured_minutes": r.minutes,
                "idle_minutes": int(r.idle_minutes),
                "idle_cost": int(idle_cost),
            }
        )
    return out


def usage_report(session: Session, account_id: int, now: datetime, days: int) -> dict[str, Any]:
    """Spend per server and per day, and each session's GPU utilisation and idle cost."""
    since = now - timedelta(days=days)
    return {
        "since": since,
        "now": now,
        "by_server": usage_rows.usage(session, account_id, "server", since=since),
        "by_day": usage_rows.usage(session, account_id, "day", since=since),
        "sessions": session_utilisation(session, account_id, now, since),
    }


# --- the admin's analytics dashboard -------------------------------------------------------


def capacity(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Verified, unblocked GPUs by model and region, how many are held now, and their
    mean utilisation since ``since``."""
    schedulable = and_(
        Node.verification == "verified", Node.blocked.is_(False), Node.status != "left"
    )
    counts = session.execute(
        select(
            Gpu.model,
            Provider.region,
            func.count(Gpu.id).label("gpus"),
            func.count(GpuAllocation.gpu_id).label("in_use"),
            func.sum(case((Node.status == "online", 1), else_=0)).label("online"),
        )
        .join(Node, Node.id == Gpu.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Provider, Provider.id == Cluster.provider_id)
        .outerjoin(GpuAllocation, GpuAllocation.gpu_id == Gpu.id)
        .where(schedulable)
        .group_by(Gpu.model, Provider.region)
    )
    per_node_model = (
        select(Gpu.node_id.label("node_pk"), func.min(Gpu.model).label("model"))
        .group_by(Gpu.node_id)
        .subquery()
    )
    utils = {
        (r.model, r.region): _share(r.util)
        for r in session.execute(
            select(
                per_node_model.c.model,
                Provider.region,
                _util(HeartbeatRollup.gpu_util_sum, HeartbeatRollup.gpu_samples).label("util"),
            )
            .join(Node, Node.id == HeartbeatRollup.node_id)
            .join(per_node_model, per_node_model.c.node_pk == Node.id)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .join(Provider, Provider.id == Cluster.provider_id)
            .where(schedulable, HeartbeatRollup.minute >= since)
            .group_by(per_node_model.c.model, Provider.region)
        )
    }
    return [
        {
            "gpu_model": r.model,
            "region": r.region,
            "gpus": r.gpus,
            "online": int(r.online or 0),
            "in_use": r.in_use,
            "utilisation": utils.get((r.model, r.region)),
        }
        for r in sorted(counts, key=lambda r: (r.model, r.region))
    ]


def _usage_postings(session: Session, since: datetime, until: datetime) -> Any:
    return and_(
        LedgerTransaction.kind.in_(MONEY_KINDS),
        money_time() >= since,
        money_time() < until,
    )


def revenue_by_day(session: Session, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Per UTC day: what customers and teams paid, what providers earned, and the fee
    (net of refunds, on the day each refund was made)."""
    day = bucket(session, money_time(), "day")
    kind = LedgerAccount.kind
    rows = session.execute(
        select(
            day.label("day"),
            func.sum(
                case((kind.in_(("customer_wallet", "team_budget")), -Posting.amount), else_=0)
            ).label("spend"),
            func.sum(case((kind == "provider_earnings", Posting.amount), else_=0)).label(
                "earnings"
            ),
            func.sum(case((kind == "platform_revenue", Posting.amount), else_=0)).label("fee"),
        )
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .where(_usage_postings(session, since, until))
        .group_by(day)
        .order_by(day)
    )
    return [
        {
            "day": r.day,
            "spend": int(r.spend or 0),
            "earnings": int(r.earnings or 0),
            "fee": int(r.fee or 0),
        }
        for r in rows
    ]


def spend_by_payer(session: Session, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Spend per user wallet and per team budget, largest first."""
    rows = session.execute(
        select(
            LedgerAccount.kind,
            func.coalesce(Account.hub_name, Team.hub_group, LedgerAccount.key).label("name"),
            (-func.sum(Posting.amount)).label("spend"),
        )
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .outerjoin(Account, Account.id == LedgerAccount.account_id)
        .outerjoin(Team, Team.id == LedgerAccount.team_id)
        .where(
            _usage_postings(session, since, until),
            LedgerAccount.kind.in_(("customer_wallet", "team_budget")),
        )
        .group_by(LedgerAccount.kind, Account.hub_name, Team.hub_group, LedgerAccount.key)
        .order_by(-func.sum(Posting.amount).desc())
    )
    return [
        {
            "payer": "team" if r.kind == "team_budget" else "user",
            "name": r.name,
            "spend": int(r.spend),
        }
        for r in rows
    ]


def top_providers(
    session: Session, since: datetime, until: datetime, limit: int = 10
) -> list[dict[str, Any]]:
    """Providers by earnings in the range (the house provider as ``house``)."""
    rows = session.execute(
        select(
            func.coalesce(Account.hub_name, "house").label("provider"),
            func.sum(Posting.amount).label("earned"),
        )
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .outerjoin(Account, Account.id == LedgerAccount.account_id)
        .where(_usage_postings(session, since, until), LedgerAccount.kind == "provider_earnings")
        .group_by(Account.hub_name)
        .order_by(func.sum(Posting.amount).desc())
        .limit(limit)
    )
    return [{"provider": r.provider, "earned": int(r.earned)} for r in rows]


def spawns(session: Session, since: datetime, until: datetime) -> dict[str, Any]:
    """Spawn outcomes (reservations made in the range) and the time to a running server."""
    outcome = case(
        (Reservation.failed_at.is_not(None), "failed"),
        (Reservation.activated_at.is_not(None), "started"),
        (Reservation.status == "expired", "expired"),
        else_="pending",
    )
    window = and_(Reservation.created_at >= since, Reservation.created_at < until)
    counts = {
        r.outcome: r.n
        for r in session.execute(
            select(outcome.label("outcome"), func.count(Reservation.id).label("n"))
            .where(window)
            .group_by(outcome)
        )
    }
    latencies = sorted(
        (activated - created).total_seconds()
        for created, activated in session.execute(
            select(Reservation.created_at, Reservation.activated_at).where(
                window, Reservation.activated_at.is_not(None)
            )
        )
        if activated is not None
    )
    total = sum(counts.values())

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {
        "total": total,
        "started": counts.get("started", 0),
        "failed": counts.get("failed", 0),
        "expired": counts.get("expired", 0),
        "pending": counts.get("pending", 0),
        "success_rate": round(counts.get("started", 0) / total, 4) if total else None,
        "latency_p50_seconds": pct(0.5),
        "latency_p90_seconds": pct(0.9),
    }


def faults(session: Session, since: datetime, until: datetime) -> dict[str, Any]:
    """Offline nodes now; failed jobs (spawns) and failed verifications in the range."""
    offline = [
        {"node": r.node_id, "reason": r.offline_reason or "", "provider": r.display_name}
        for r in session.execute(
            select(Node.node_id, Node.offline_reason, Provider.display_name)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .join(Provider, Provider.id == Cluster.provider_id)
            .where(Node.status == "offline")
            .order_by(Node.node_id)
        )
    ]
    failed_jobs = session.scalar(
        select(func.count(Reservation.id)).where(
            Reservation.failed_at >= since, Reservation.failed_at < until
        )
    )
    failed_verifications = session.scalar(
        select(func.count(NodeChallenge.id)).where(
            NodeChallenge.status == "failed",
            NodeChallenge.issued_at >= since,
            NodeChallenge.issued_at < until,
        )
    )
    return {
        "offline_nodes": offline,
        "failed_jobs": int(failed_jobs or 0),
        "failed_verifications": int(failed_verifications or 0),
    }


def analytics_report(session: Session, since: datetime, until: datetime) -> dict[str, Any]:
    """Everything on the admin's analytics dashboard, for ``[since, until)``."""
    revenue = revenue_by_day(session, since, until)
    return {
        "since": since,
        "until": until,
        "capacity": capacity(session, since),
        "revenue": revenue,
        "totals": {
            "spend": sum(r["spend"] for r in revenue),
            "earnings": sum(r["earnings"] for r in revenue),
            "fee": sum(r["fee"] for r in revenue),
        },
        "spend_by_payer": spend_by_payer(session, since, until),
        "spawns": spawns(session, since, until),
        "faults": faults(session, since, until),
        "top_providers": top_providers(session, since, until),
        "payouts": payouts(session, None, since),
    }
