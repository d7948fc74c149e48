"""What the hub pages show about money, computed from the portal's answers.

Pure functions over the JSON of ``GET /api/v1/balance`` and ``/api/v1/allocations``,
so the home page, the navigation bar, the banner and the billing page say the
same thing, and tests can check every case without a hub. Amounts are integers
of micro-credits; display goes through ``provider/money.py``'s one rounding
rule (floor: a debt always shows as one).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gpuportal.provider.money import accrued, format_credits
from gpuportal.provider.stopmarker import duration

#: Why the meter stopped a server (its allocation's ``stop_reason``), after "because".
STOP_REASONS = {
    "out_of_credit": "your credit ran out",
    "quota_exhausted": "your GPU-hour quota was used up",
    "spend_cap": "your servers cost more per hour than the payer's spend cap allows",
}

__all__ = ["STOP_REASONS", "duration", "finished_session", "running_server", "summary"]


def server_label(name: str) -> str:
    return name or "default server"


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def running_server(alloc: dict[str, Any], now: datetime, currency: str) -> dict[str, Any]:
    """One running server: GPUs, price per hour and what it has cost so far."""
    started = _when(alloc["started_at"]) or now
    spent = accrued(alloc["gpu_count"], alloc["price_per_gpu_hour"], started, now)
    stopping = _when(alloc.get("stopping_at"))
    return {
        "server": alloc["server"],
        "label": server_label(alloc["server"]),
        "gpus": alloc["gpu_count"],
        "price": format_credits(alloc["gpu_count"] * alloc["price_per_gpu_hour"], currency) + "/h",
        "spent": format_credits(max(spent, alloc.get("charged", 0)), currency),
        "running_for": duration((now - started).total_seconds()),
        "stopping_at": stopping.strftime("%H:%M UTC") if stopping else None,
    }


def finished_session(alloc: dict[str, Any], currency: str) -> dict[str, Any]:
    """A stopped session: what it cost, how long it ran, and why it stopped."""
    started = _when(alloc["started_at"])
    ended = _when(alloc.get("ended_at")) or _when(alloc.get("stopping_at"))
    seconds = (ended - started).total_seconds() if started and ended else 0.0
    return {
        "server": alloc["server"],
        "label": server_label(alloc["server"]),
        "gpus": alloc["gpu_count"],
        "cost": format_credits(alloc.get("charged", 0), currency),
        "ran_for": duration(seconds),
        "ended": ended.strftime("%Y-%m-%d %H:%M UTC") if ended else "",
        "reason": STOP_REASONS.get(alloc.get("stop_reason") or ""),
    }


def summary(
    balance: dict[str, Any] | None,
    allocations: list[dict[str, Any]] | None,
    now: datetime,
) -> dict[str, Any]:
    """Everything the navigation bar, banner and home page show, as plain values.

    ``balance`` is the portal's ``/balance`` answer (None: no account yet),
    ``allocations`` its ``/allocations`` answer (newest first).
    """
    if balance is None:
        return {"known": False, "warnings": [], "running": [], "recent": []}
    currency = balance["currency"]
    micro = int(balance["balance"])
    available = int(balance["available"])
    runway = balance.get("runway_seconds")
    running = [running_server(a, now, currency) for a in balance.get("allocations", [])]
    warnings: list[str] = []
    if balance.get("warning"):
        warnings.append(str(balance["warning"]))
    if available <= 0:
        owed = format_credits(-available, currency)
        warnings.append(
            f"You owe {owed}. Add credit to start a GPU server again."
            if available < 0
            else f"You have no {currency} left. Add credit to start a GPU server."
        )
    running_names = {r["server"] for r in running}
    recent: list[dict[str, Any]] = []
    seen: set[str] = set()
    for alloc in allocations or []:
        if alloc["status"] in ("running", "stopping") or alloc["server"] in seen:
            continue
        seen.add(alloc["server"])
        if alloc["server"] not in running_names:
            recent.append(finished_session(alloc, currency))
    return {
        "known": True,
        "currency": currency,
        "balance": format_credits(micro, currency),
        "available": format_credits(available, currency),
        "in_debt": micro < 0,
        "debt": format_credits(-micro, currency) if micro < 0 else None,
        "rate": format_credits(int(balance.get("rate_per_hour", 0)), currency) + "/h",
        "runway": duration(runway) if runway is not None else None,
        "runway_seconds": runway,
        "warnings": warnings,
        "running": running,
        "recent": recent[:5],
    }
