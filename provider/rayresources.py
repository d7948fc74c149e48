"""The names of the custom Ray resources a gpuportal node declares.

Pure constants, shared by the node side (``raynode`` declares them) and the control
plane (the marketplace tables pin a server to its node; ``raystatus`` reads them
back), so the hub never imports a module that runs processes for a string.
"""

from __future__ import annotations

#: ``gpuportal/node:<node id>``: one unit per GPU of that marketplace node, so a job
#: asking for one unit lands on exactly that node.
NODE_RESOURCE_PREFIX = "gpuportal/node:"
#: ``gpuportal/demo``: the logical GPUs of a demo node (no NVML GPUs behind them).
DEMO_RESOURCE = "gpuportal/demo"
