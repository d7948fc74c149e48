"""Run JupyterLab (a real jupyter-server with gpuportal's extensions) on recorded NVML data.

``python lab_server.py RECORDING.json [jupyter lab options]``: the browser tests start
this in a subprocess. These machines have no GPU, so the GPU readings are the
hand-written device data of tests/extension/data, served through NVML's recorded-data
seam (``nvml.use_recording``) for the whole life of the server.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jupyterlab.labapp import LabApp

from gpuportal.provider import nvml

if __name__ == "__main__":
    with nvml.use_recording(Path(sys.argv[1])):
        LabApp.launch_instance(sys.argv[2:])
