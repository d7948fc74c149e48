"""The usage report: the portal's numbers, this server's GPUs and its kernels, in one dict.

Both endpoints are built from this one report (``/api/gpuportal/usage`` as
JSON, ``/api/gpuportal/metrics`` as Prometheus text), so they never disagree.
All of it is information: the portal bills allocation time at the locked price.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gpuportal.provider.money import accrued

from .gpuuse import GpuSample
from .portal import PortalReading

NOTE = (
    "Information only: the portal bills allocation time at the locked price; "
    "nothing shown here raises a charge."
)


def parse_time(value: Any) -> datetime | None:
    """An ISO time from the portal, as aware UTC (a naive one is UTC)."""
    if not value:
        return None
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def build_report(
    *,
    user: str,
    server: str,
    portal_url: str,
    reading: PortalReading,
    sample: GpuSample,
    kernels: list[dict[str, Any]],
    idle: dict[str, Any],
    now: datetime,
    save: dict[str, Any] | None = None,
    topup_url: str = "",
) -> dict[str, Any]:
    """The JSON of ``GET /api/gpuportal/usage`` (documented in docs/extension.md)."""
    alloc = reading.allocation
    balance = reading.balance or {}
    allocation = None
    price_per_hour = spent = charged = None
    stopping_at = None
    if alloc:
        started = parse_time(alloc.get("started_at"))
        gpu_count, price = int(alloc["gpu_count"]), int(alloc["price_per_gpu_hour"])
        price_per_hour = gpu_count * price
        spent = accrued(gpu_count, price, started, now) if started else None
        charged = int(alloc.get("charged") or 0)
        stopping_at = alloc.get("stopping_at")
        allocation = {
            key: alloc.get(key)
            for key in (
                "id",
                "gpu_count",
                "price_per_gpu_hour",
                "status",
                "started_at",
                "last_charged_at",
                "stopping_at",
                "stop_reason",
            )
        }
    return {
        "user": user,
        "server": server,
        "note": NOTE,
        "currency": balance.get("currency"),
        "price_per_hour": price_per_hour,
        "spent": spent,
        "charged": charged,
        "balance": balance.get("balance"),
        "available": balance.get("available"),
        "runway_seconds": balance.get("runway_seconds"),
        "warning": balance.get("warning"),
        "stopping_at": stopping_at,
        "allocation": allocation,
        "portal": {
            "url": portal_url,
            "reachable": reading.reachable,
            "error": reading.error,
            "stale": reading.stale,
            "fetched_at": reading.fetched_at.isoformat() if reading.fetched_at else None,
        },
        "nvml": {"available": sample.available, "error": sample.error},
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "utilization_pct": g.utilization_pct,
                "memory_used_mib": g.memory_used_mib,
                "memory_total_mib": g.memory_total_mib,
            }
            for g in sample.gpus
        ],
        "kernels": kernels,
        "idle": idle,
        "save": save,
        "topup_url": topup_url,
        "at": now.isoformat(),
    }
