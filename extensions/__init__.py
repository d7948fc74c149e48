"""gpuportal's jupyter-server extension: cost, runway and GPU use inside each user server.

It runs on a provider's machine next to customer code, so it holds no secret
and never imports ``gpuportal.hub``: it reads the portal over HTTP with the
server's own ``JUPYTERHUB_API_TOKEN`` and reads GPUs through the provider's
NVML seam. Everything it shows is information; the bill is kept by the portal.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """How jupyter-server finds the extension (enabled by jupyter_server_config.d)."""
    from .app import GpuPortalExtension

    return [{"module": "gpuportal.extensions", "app": GpuPortalExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the prebuilt JupyterLab front end is (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "@gpuportal/jupyterlab"}]
