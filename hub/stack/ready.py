"""Waiting for a server of the stack to answer its health endpoint.

``gpuportal up`` waits for the hub and the portal this way, and so do the tests and
the benchmarks that start ``gpuportal up``: readiness is what the health endpoint
says, never a line of console text, so changing a message cannot break a test.
"""

from __future__ import annotations

import subprocess
import time

import httpx

from ..errors import ConfigError


class NotReady(ConfigError):
    """The server did not answer 200 in time, or the process behind it exited."""


def wait_ready(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
    interval: float = 0.5,
) -> None:
    """Poll ``GET url`` until it answers 200; raise :class:`NotReady` after ``timeout`` s.

    ``proc``, when given, is the process that serves ``url`` (or starts what does):
    once it has exited nothing will ever answer, so the wait ends at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"the process exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise NotReady(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(interval)
