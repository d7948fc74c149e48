"""Hand-written NVML data for the extension's tests (not captured from a GPU; see the
"provenance" field of each file in data/), with PIDs rewritten to the test's own."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
TRAINING_PID, CHILD_PID, OTHER_PID = 4242, 4243, 5150


def a100_kernels(pids: dict[int, int] | None = None) -> dict[str, Any]:
    """The hand-written 2xA100 readings; ``pids`` maps their PIDs to this test's processes."""
    raw = json.loads((DATA / "nvml_a100_kernels.json").read_text())
    mapping = pids or {}
    for metric in raw["metrics"]:
        for proc in metric["processes"]:
            proc["pid"] = mapping.get(proc["pid"], proc["pid"])
    for proc in raw["processes"]:
        proc["pid"] = mapping.get(proc["pid"], proc["pid"])
    return raw


def idle(raw: dict[str, Any]) -> dict[str, Any]:
    """The same machine with every GPU idle and no GPU process."""
    quiet = copy.deepcopy(raw)
    for metric in quiet["metrics"]:
        metric.update(utilization_pct=0, memory_used_mib=0, processes=[])
    quiet["processes"] = []
    return quiet
