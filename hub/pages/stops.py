"""Why a user's servers stopped on their own, from the hub's spawner objects.

The spawner records a sentence when ``poll()`` finds a server's job ended though
the hub did not stop it (``RaySpawner.stopped_reason``, built from an allow-list
in ``provider/stopmarker.py``: idle for a duration, or "stopped on its own").
The pages show it as text (Jinja autoescape); the portal's credit reasons win
over it when both are known (the page's script hides this one then).
"""

from __future__ import annotations

from typing import Any

from .money import server_label

#: The longest reason shown, characters (the spawner bounds it too).
MAX_REASON_CHARS = 200


def self_stops(user: Any) -> list[dict[str, str]]:
    """``[{"server", "label", "reason"}]`` for each of ``user``'s servers that is not
    running and last stopped on its own; ``[]`` without a user (the login page)."""
    spawners = getattr(user, "spawners", None)
    if not spawners:
        return []
    stops = []
    for name, spawner in sorted(dict(spawners).items()):
        reason = getattr(spawner, "stopped_reason", "")
        if not isinstance(reason, str) or not reason or getattr(spawner, "active", False):
            continue
        stops.append(
            {"server": name, "label": server_label(name), "reason": reason[:MAX_REASON_CHARS]}
        )
    return stops
