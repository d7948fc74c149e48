"""A user server's environment and fate, the same for a cold start and a warm slot.

A cold start (``spawners/singleuser.py``, the Ray job's entrypoint) and a warm slot
(``provider/warmslot.py``, claimed from a node's pool) build a server's whole
environment from the same allow-list and ask Linux to end the server with its
parent. Node-side code, pure standard library: a sandboxed warm slot sees only
``gpuportal.provider`` (and the server's other packages), never ``gpuportal.hub``.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path

from gpuportal.provider import isolation

_PR_SET_PDEATHSIG = 1
#: Besides this server's JUPYTERHUB_* variables (and the token it claimed), all a
#: user server's environment may hold: where the portal is, the idle limit, its
#: GPUs, locale, and the CPU quirks older OpenBLAS builds need.
SERVER_ENV_ALLOW = frozenset(
    {
        "GPUPORTAL_PORTAL_URL",
        "GPUPORTAL_IDLE_TIMEOUT_SECONDS",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "LANG",
        "LC_ALL",
        "TZ",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    }
)
#: Never passed on, even under an allowed prefix: the token is claimed instead.
_TOKEN_VARS = frozenset({"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN"})


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def server_env(
    source: dict[str, str], token: str, account: isolation.Account, service_url: str
) -> dict[str, str]:
    """A user server's whole environment: its JUPYTERHUB_* variables, the allow-list
    and its account's identity. Nothing else of ``source`` (Ray's variables, the
    Ray token's path, whatever the node's Ray was started with) is passed on."""
    env = {
        k: v
        for k, v in source.items()
        if (k.startswith("JUPYTERHUB_") or k in SERVER_ENV_ALLOW) and k not in _TOKEN_VARS
    }
    bindir = str(Path(sys.executable).parent)
    env.update(
        JUPYTERHUB_API_TOKEN=token,
        JUPYTERHUB_SERVICE_URL=service_url,
        JUPYTERHUB_ROOT_DIR=str(account.home),
        HOME=str(account.home),
        USER=account.name,
        LOGNAME=account.name,
        SHELL="/bin/bash",
        PATH=f"{bindir}:/usr/local/bin:/usr/bin:/bin",
    )
    return env
