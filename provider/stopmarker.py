"""The line a user server writes to its log when it stops itself, and how the hub reads it.

A server that stops on its own (the extension's GPU-aware idle cull) writes one
line to stderr, which is its Ray job's log, before it stops::

    gpuportal-stop: idle for 1800 s

The spawner reads the tail of that log when ``poll()`` finds the job ended without
the hub asking, and turns the **last** marker line into a short sentence for the
hub's pages. The log is the user's own: code in a notebook can print a fake
marker. So the sentence is built here from a small allow-list, never copied from
the log: an idle duration (digits only, bounded) or "it stopped on its own". A
marker cannot claim a credit stop (those come from the portal), and it only ever
speaks about the server whose log it is in.

Node-side and hub-side code share this module (``gpuportal.provider``); it has no
imports of either.
"""

from __future__ import annotations

import re

#: The marker's prefix, at the start of a line.
MARKER = "gpuportal-stop:"
#: A marker line longer than this is not read (the log is the user's).
MAX_MARKER_CHARS = 80
#: The sentence for a server that stopped without a readable marker (after "because").
ON_ITS_OWN = "it stopped on its own (shut down from JupyterLab, or it exited)"
#: The longest idle time a marker may state: a year (anything longer is not believed).
MAX_IDLE_SECONDS = 366 * 24 * 3600

_IDLE = re.compile(r"idle for ([0-9]{1,9}) s")


def idle_marker(idle_seconds: float) -> str:
    """The line the extension writes before its idle stop."""
    return f"{MARKER} idle for {max(0, int(idle_seconds))} s"


def duration(seconds: float) -> str:
    """``3725`` → ``"1 h 2 min"``; under a minute → ``"less than a minute"``."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "less than a minute"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def last_marker(log_tail: str) -> str | None:
    """What follows the last marker line of ``log_tail`` (stripped), or None."""
    found = None
    for line in log_tail.splitlines():
        text = line.strip()
        if text.startswith(MARKER):
            found = text[len(MARKER) :].strip()
    return found


def stop_reason(log_tail: str) -> str:
    """Why a server that stopped itself stopped, as a sentence after "because".

    Only the last marker counts; one that is too long, or says anything but
    ``idle for <digits> s``, gives :data:`ON_ITS_OWN`, as no marker does.
    """
    said = last_marker(log_tail)
    if said is None or len(said) > MAX_MARKER_CHARS:
        return ON_ITS_OWN
    match = _IDLE.fullmatch(said)
    if match is None or int(match[1]) > MAX_IDLE_SECONDS:
        return ON_ITS_OWN
    return f"it was idle for {duration(int(match[1]))} (no kernel or GPU was busy)"
