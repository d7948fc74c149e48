"""The usage report as Prometheus text, names ``gpuportal_<noun>_<verb>_<unit>``.

A fresh registry per scrape holds only this server's numbers (jupyter-server's
own metrics live in the global registry and are left alone). Money is in
micro-credits, time in seconds, memory in bytes, utilisation as a 0-1 ratio.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from .usage import parse_time

MIB = 1024 * 1024
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(report: dict[str, Any]) -> bytes:
    """Prometheus exposition text for one usage report."""
    registry = CollectorRegistry(auto_describe=True)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    portal = gauge("gpuportal_portal_reachable_bool", "1 when the portal answered the last read.")
    price = gauge(
        "gpuportal_price_locked_microcredits_per_hour",
        "Price of this server's allocation per hour (all its GPUs), locked at start.",
    )
    spent = gauge(
        "gpuportal_session_spent_microcredits",
        "What this session has cost so far by the portal's rounding rule (information).",
    )
    charged = gauge(
        "gpuportal_session_charged_microcredits", "What the portal's ledger has charged so far."
    )
    balance = gauge("gpuportal_balance_held_microcredits", "The owner's wallet balance.")
    available = gauge(
        "gpuportal_balance_available_microcredits",
        "Balance less what running servers owe since their last charge.",
    )
    runway = gauge("gpuportal_runway_remaining_seconds", "Seconds until the credit runs out.")
    stopping = gauge(
        "gpuportal_stop_scheduled_timestamp_seconds",
        "When the portal stops this server for lack of credit (Unix time).",
    )
    idle = gauge("gpuportal_server_idle_seconds", "Seconds this server's GPUs and kernels idled.")
    gpu_util = gauge("gpuportal_gpu_utilized_ratio", "GPU utilisation, 0-1.", ("gpu",))
    gpu_mem = gauge("gpuportal_gpu_memory_used_bytes", "GPU memory in use.", ("gpu",))
    k_util = gauge(
        "gpuportal_kernel_gpu_utilized_ratio",
        "A kernel's SM utilisation on a GPU (its process tree), 0-1.",
        ("kernel_id", "gpu"),
    )
    k_mem = gauge(
        "gpuportal_kernel_gpu_memory_used_bytes",
        "GPU memory held by a kernel's process tree.",
        ("kernel_id", "gpu"),
    )

    portal.set(1 if report["portal"]["reachable"] else 0)
    for metric, key in (
        (price, "price_per_hour"),
        (spent, "spent"),
        (charged, "charged"),
        (balance, "balance"),
        (available, "available"),
        (runway, "runway_seconds"),
    ):
        if report.get(key) is not None:
            metric.set(report[key])
    stop_at = parse_time(report.get("stopping_at"))
    if stop_at is not None:
        stopping.set(stop_at.timestamp())
    if report["idle"].get("idle_seconds") is not None:
        idle.set(report["idle"]["idle_seconds"])
    for gpu in report["gpus"]:
        gpu_util.labels(gpu=str(gpu["index"])).set(gpu["utilization_pct"] / 100)
        gpu_mem.labels(gpu=str(gpu["index"])).set(gpu["memory_used_mib"] * MIB)
    for kernel in report["kernels"]:
        for use in kernel["gpus"]:
            labels = {"kernel_id": kernel["id"], "gpu": str(use["index"])}
            k_util.labels(**labels).set(use["utilization_pct"] / 100)
            k_mem.labels(**labels).set(use["memory_used_mib"] * MIB)
    return generate_latest(registry)
