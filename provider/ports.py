"""Free TCP ports: the one helper every part of gpuportal uses to pick one.

Pure standard library, so node-side code (the provider agent, the singleuser
wrapper), the control plane, tests and benchmarks may all import it.

A port is free when it is picked and may be taken before its server binds it.
Three precautions narrow that window:

* a port is handed out once per process, so two servers started one after the
  other never get the same one;
* ``avoid``: ports someone will bind later (free until then) are never handed out;
* ``span``: pick from a range instead of letting the kernel choose. A port below the
  kernel's ephemeral range cannot be taken by anything that binds port 0 (Ray's
  processes, HTTP clients) between now and when its server binds it; tests use
  :data:`BELOW_EPHEMERAL` for that.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection

#: Below Linux's ephemeral range (32768+) and above Ray's worker ports (10002-19999).
BELOW_EPHEMERAL = range(20000, 32001)

_handed_out: set[int] = set()


def free_port(
    ip: str = "127.0.0.1", avoid: Collection[int] = frozenset(), span: range | None = None
) -> int:
    """A port on ``ip`` that nobody listens on now, not in ``avoid`` and not handed
    out before by this process.

    ``ip``: the address the port is for (IPv6 when it has a ``:``; ``0.0.0.0`` or
    ``""`` for every IPv4 address). ``span``: pick at random from this range; by
    default the kernel picks one of its ephemeral ports (an address that is not
    this machine's raises the kernel's :class:`OSError`).
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(500):
        with socket.socket(family) as sock:
            if span is None:
                sock.bind((ip, 0))
            else:
                try:
                    sock.bind((ip, random.choice(span)))  # noqa: S311 (not a secret)
                except OSError:
                    continue
            port = int(sock.getsockname()[1])
        if port not in avoid and port not in _handed_out:
            _handed_out.add(port)
            return port
    where = "" if span is None else f" in {span.start}-{span.stop - 1}"
    raise OSError(f"no free TCP port on {ip or '0.0.0.0'}{where}")
