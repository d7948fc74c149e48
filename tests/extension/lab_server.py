"""Run JupyterLab (a real jupyter-server with gpuportal's extensions) on recorded NVML data.

``python lab_server.py RECORDING.json [jupyter lab options]``: the browser tests start
this in a subprocess. These machines have no GPU, so the GPU readings are the
hand-written device data of tests/extension/data, served through NVML's recorded-data
seam (``nvml.use_recording``) for the whole life of the server. The data's training
process (PID 4242) becomes the first kernel this server starts, once it runs, so the
panel shows that kernel's GPU use.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from jupyterlab.labapp import LabApp

from gpuportal.provider import nvml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.extension.recordings import TRAINING_PID, a100_kernels

MAPPED: list[Any] = []


def first_kernel_pid() -> int | None:
    for child in psutil.Process().children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def map_the_first_kernel() -> None:
    """Once a kernel runs, serve the same data with 4242 rewritten to its PID."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # bounded: the server lives minutes in a test
        pid = first_kernel_pid()
        if pid is not None:
            # Kept referenced: a collected context would close and restore the old data.
            MAPPED.append(nvml.use_recording(a100_kernels({TRAINING_PID: pid})))
            MAPPED[-1].__enter__()
            return
        time.sleep(0.5)


if __name__ == "__main__":
    with nvml.use_recording(Path(sys.argv[1])):
        threading.Thread(target=map_the_first_kernel, daemon=True).start()
        LabApp.launch_instance(sys.argv[2:])
