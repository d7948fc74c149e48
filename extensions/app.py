"""The ExtensionApp: configuration, the portal client, the idle check, the handlers.

Configuration comes from traits (``c.GpuPortalExtension.<trait> = ...``),
whose defaults the spawner sets through the server's environment:

* ``GPUPORTAL_PORTAL_URL``: the portal's public URL, e.g.
  ``https://hub.example.org/services/portal/``;
* ``GPUPORTAL_IDLE_TIMEOUT_SECONDS``: the profile's idle limit (0 disables);
* ``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_USER``, ``JUPYTERHUB_SERVER_NAME``:
  what JupyterHub gives every server;
* ``CUDA_VISIBLE_DEVICES``: the GPUs this server holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jupyter_server.extension.application import ExtensionApp
from tornado.ioloop import PeriodicCallback
from traitlets import Float, Int, List, Unicode, default

from . import gpuuse, starter
from .handlers import MetricsHandler, UsageHandler
from .idle import IdleCuller
from .portal import PortalClient, utcnow
from .usage import build_report

DEFAULT_IDLE_TIMEOUT = 30 * 60


def portal_url_from_env(env: dict[str, str] | os._Environ[str]) -> str:
    """``GPUPORTAL_PORTAL_URL``, else ``<hub origin><JUPYTERHUB_BASE_URL>services/portal/``.

    The hub's origin is known only when the hub has a public URL
    (``c.JupyterHub.public_url``, passed as ``JUPYTERHUB_PUBLIC_HUB_URL``);
    without one, and without ``GPUPORTAL_PORTAL_URL``, there is no portal URL.
    """
    explicit = env.get("GPUPORTAL_PORTAL_URL", "").strip()
    if explicit:
        return explicit.rstrip("/") + "/"
    hub = urlsplit(env.get("JUPYTERHUB_PUBLIC_HUB_URL", ""))
    if not (hub.scheme and hub.netloc):
        return ""
    base = env.get("JUPYTERHUB_BASE_URL", "/") or "/"
    path = base.rstrip("/") + "/services/portal/"
    return urlunsplit((hub.scheme, hub.netloc, path, "", ""))


class GpuPortalExtension(ExtensionApp):
    """Cost, runway and GPU use of this server, and GPU-aware idle culling."""

    name = "gpuportal"
    load_other_extensions = True

    portal_url = Unicode(
        help="""The portal's URL as this server reaches it, ending in /services/portal/.

        Default: $GPUPORTAL_PORTAL_URL, else the hub's public URL
        ($JUPYTERHUB_PUBLIC_HUB_URL's origin) + $JUPYTERHUB_BASE_URL + services/portal/.
        Example: c.GpuPortalExtension.portal_url = "https://hub.example.org/services/portal/"
        """,
    ).tag(config=True)

    @default("portal_url")
    def _portal_url_default(self) -> str:
        return portal_url_from_env(os.environ)

    api_token = Unicode(
        help="""The hub token the server calls the portal with. Default: $JUPYTERHUB_API_TOKEN.

        Never logged. The portal accepts a server's token read-only, for its owner.
        """,
    ).tag(config=True)

    @default("api_token")
    def _api_token_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    hub_user = Unicode(help="This server's owner. Default: $JUPYTERHUB_USER.").tag(config=True)

    @default("hub_user")
    def _hub_user_default(self) -> str:
        return os.environ.get("JUPYTERHUB_USER", "")

    server_name = Unicode(
        help="This server's name ('' for the default server). Default: $JUPYTERHUB_SERVER_NAME."
    ).tag(config=True)

    @default("server_name")
    def _server_name_default(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVER_NAME", "")

    portal_timeout_seconds = Float(
        3.0, help="Timeout of one portal request, seconds. Example: = 5.0"
    ).tag(config=True)

    portal_cache_seconds = Float(
        5.0, help="How long a portal reading is reused, seconds. Example: = 10.0"
    ).tag(config=True)

    idle_timeout_seconds = Int(
        help="""Stop this server after its GPUs and kernels idled this long, seconds; 0 disables.

        Default: $GPUPORTAL_IDLE_TIMEOUT_SECONDS (the spawner sets it per profile), else 1800.
        Example: c.GpuPortalExtension.idle_timeout_seconds = 3600
        """,
    ).tag(config=True)

    @default("idle_timeout_seconds")
    def _idle_timeout_default(self) -> int:
        raw = os.environ.get("GPUPORTAL_IDLE_TIMEOUT_SECONDS", "").strip()
        try:
            return max(0, int(raw)) if raw else DEFAULT_IDLE_TIMEOUT
        except ValueError:
            self.log.warning("GPUPORTAL_IDLE_TIMEOUT_SECONDS=%r is not a number; using 1800", raw)
            return DEFAULT_IDLE_TIMEOUT

    idle_check_seconds = Int(
        60, help="How often the idle check samples GPUs and kernels, seconds. Example: = 30"
    ).tag(config=True)

    busy_gpu_percent = Int(
        5, help="A GPU above this utilisation (percent) counts as busy. Example: = 10"
    ).tag(config=True)

    visible_gpus = List(
        Unicode(),
        help="""This server's GPUs, as indices or UUIDs; empty means every GPU of the machine.

        Default: $CUDA_VISIBLE_DEVICES (as Ray sets it for the server's job).
        """,
    ).tag(config=True)

    @default("visible_gpus")
    def _visible_gpus_default(self) -> list[str]:
        raw = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return [part.strip() for part in raw.split(",") if part.strip()]

    starter_dir = Unicode(
        help="""Folder of starter notebooks copied into the server's home when it starts,
        never over a file the user changed (extensions/starter.py); "" copies nothing.

        Default: gpuportal's notebook templates (notebooks/) under JupyterHub, else "".
        Example: c.GpuPortalExtension.starter_dir = "/srv/team-notebooks"
        """,
    ).tag(config=True)

    @default("starter_dir")
    def _starter_dir_default(self) -> str:
        return str(starter.default_source()) if os.environ.get("JUPYTERHUB_USER") else ""

    #: The extension's clock; tests replace it to travel in time.
    clock: Callable[[], datetime] = staticmethod(utcnow)

    portal: PortalClient
    culler: IdleCuller
    _idle_callback: PeriodicCallback | None = None

    def initialize_settings(self) -> None:
        self.portal = PortalClient(
            self.portal_url,
            self.api_token,
            self.hub_user,
            self.server_name,
            timeout=self.portal_timeout_seconds,
            cache_seconds=self.portal_cache_seconds,
            clock=lambda: self.clock(),
        )
        self.culler = IdleCuller(
            timeout_seconds=self.idle_timeout_seconds,
            busy_gpu_pct=self.busy_gpu_percent,
            shutdown=self.shutdown_server,
            started_at=self.clock(),
            user=self.hub_user,
            server=self.server_name,
        )
        self.log.info(
            "gpuportal: user %s server %r, portal %s, idle timeout %s",
            self.hub_user,
            self.server_name,
            self.portal_url or "(not configured)",
            f"{self.idle_timeout_seconds} s" if self.idle_timeout_seconds else "off",
        )
        self.install_starter()
        if self.idle_timeout_seconds > 0:
            self._idle_callback = PeriodicCallback(
                self._idle_tick, self.idle_check_seconds * 1000, jitter=0.1
            )
            self._idle_callback.start()

    def install_starter(self) -> None:
        """The starter notebooks into the home (the server's root), before it serves."""
        if not self.starter_dir or self.serverapp is None:
            return
        try:
            starter.install(Path(self.serverapp.root_dir), Path(self.starter_dir))
        except OSError as exc:  # a full or read-only home must not stop the server
            self.log.warning("gpuportal: starter notebooks not copied: %s", exc)

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (r"/api/gpuportal/usage", UsageHandler),
                (r"/api/gpuportal/metrics", MetricsHandler),
            ]
        )

    async def stop_extension(self) -> None:
        if self._idle_callback is not None:
            self._idle_callback.stop()
        await self.portal.close()

    def shutdown_server(self, reason: str) -> None:
        """Stop the whole server cleanly, as jupyter-server's own idle shutdown does."""
        assert self.serverapp is not None  # set before any extension is initialized
        self.serverapp.stop()

    async def sample(
        self,
    ) -> tuple[datetime, list[gpuuse.KernelState], gpuuse.GpuSample, list[Any]]:
        """One reading of kernels and GPUs, also fed to the idle culler."""
        assert self.serverapp is not None
        kernels = gpuuse.kernel_states(self.serverapp.kernel_manager)
        sample = await gpuuse.sample_gpus_async(self.visible_gpus)
        trees = {k.id: gpuuse.process_tree(k.pid) for k in kernels}
        rows = gpuuse.per_kernel(kernels, trees, sample.processes)
        now = self.clock()
        self.culler.observe(now, kernels, sample, rows)
        return now, kernels, sample, rows

    async def check_idle(self) -> bool:
        """Sample, then stop the server if it has idled long enough; True when it did."""
        now, _, _, _ = await self.sample()
        return self.culler.cull_if_due(now)

    async def _idle_tick(self) -> None:
        try:
            await self.check_idle()
        except Exception:
            self.log.warning("gpuportal: idle check failed", exc_info=True)

    async def report(self) -> tuple[dict[str, Any], bool]:
        """The usage report, and whether the portal refused this server's token."""
        _, _, sample, rows = await self.sample()
        reading = await self.portal.read()
        now = self.clock()
        report = build_report(
            user=self.hub_user,
            server=self.server_name,
            portal_url=self.portal_url,
            reading=reading,
            sample=sample,
            kernels=rows,
            idle=self.culler.report(now),
            now=now,
        )
        return report, reading.forbidden
