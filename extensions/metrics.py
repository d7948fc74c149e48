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

    def put(name: str, doc: str, value: float | None) -> None:
        """A plain gauge only when its value is known: an absent series, never a false 0."""
        if value is not None:
            gauge(name, doc).set(value)

    put(
        "gpuportal_portal_reachable_bool",
        "1 when the portal answered the last read.",
        1 if report["portal"]["reachable"] else 0,
    )
    put(
        "gpuportal_price_locked_microcredits_per_hour",
        "Price of this server's allocation per hour (all its GPUs), locked at start.",
        report.get("price_per_hour"),
    )
    put(
        "gpuportal_session_spent_microcredits",
        "What this session has cost so far by the portal's rounding rule (information).",
        report.get("spent"),
    )
    put(
        "gpuportal_session_charged_microcredits",
        "What the portal's ledger has charged so far.",
        report.get("charged"),
    )
    put("gpuportal_balance_held_microcredits", "The owner's wallet balance.", report.get("balance"))
    put(
        "gpuportal_balance_available_microcredits",
        "Balance less what running servers owe since their last charge.",
        report.get("available"),
    )
    put(
        "gpuportal_runway_remaining_seconds",
        "Seconds until the credit runs out.",
        report.get("runway_seconds"),
    )
    stop_at = parse_time(report.get("stopping_at"))
    put(
        "gpuportal_stop_scheduled_timestamp_seconds",
        "When the portal stops this server for lack of credit (Unix time).",
        stop_at.timestamp() if stop_at else None,
    )
    put(
        "gpuportal_server_idle_seconds",
        "Seconds this server's GPUs and kernels have idled.",
        report["idle"].get("idle_seconds"),
    )
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

    for gpu in report["gpus"]:
        gpu_util.labels(gpu=str(gpu["index"])).set(gpu["utilization_pct"] / 100)
        gpu_mem.labels(gpu=str(gpu["index"])).set(gpu["memory_used_mib"] * MIB)
    for kernel in report["kernels"]:
        for use in kernel["gpus"]:
            labels = {"kernel_id": kernel["id"], "gpu": str(use["index"])}
            k_util.labels(**labels).set(use["utilization_pct"] / 100)
            k_mem.labels(**labels).set(use["memory_used_mib"] * MIB)
    return generate_latest(registry)
