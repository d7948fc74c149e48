"""gpuportal.spawners: the RaySpawner (runs in the hub) and the gpuportal-singleuser
wrapper (runs on provider nodes).

``RaySpawner`` is imported lazily so the node-side wrapper, which shares this
package, does not pull in the hub-side spawner and its dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RaySpawner"]


def __getattr__(name: str) -> Any:
    if name == "RaySpawner":
        from .spawner import RaySpawner

        return RaySpawner
    raise AttributeError(name)
