"""The ExtensionApp: configuration, the portal client, the idle check, the handlers.

Configuration comes from traits (``c.GpuPortalExtension.<trait> = ...``),
whose defaults the spawner sets through the server's environment:

* ``GPUPORTAL_PORTAL_URL``: the portal's public URL, e.g.
  ``https://hub.example.org/services/portal/``;
* ``GPUPORTAL_IDLE_TIMEOUT_SECONDS``: the profile's idle limit (0 disables);
* ``GPUPORTAL_TOPUP_URL``: where the front end's low-credit dialog links to;
* ``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_USER``, ``JUPYTERHUB_SERVER_NAME``:
  what JupyterHub gives every server;
* ``CUDA_VISIBLE_DEVICES``: the GPUs this server holds.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jupyter_server.extension.application import ExtensionApp
from tornado.ioloop import PeriodicCallback
from traitlets import Float, Int, List, Unicode, default

from ..provider import stopmarker
from ..provider.links import billing_url
from . import gpuuse, starter
from .handlers import MetricsHandler, SaveAckHandler, UsageHandler
from .idle import IdleCuller
from .portal import PortalClient, PortalReading, utcnow
from .savestop import SaveBeforeStop
from .usage import build_report, parse_time

DEFAULT_IDLE_TIMEOUT = 30 * 60
#: The portal's stop reasons that a top-up cancels (docs/billing.md).
CREDIT_STOP_REASONS = ("out_of_credit", "quota_exhausted")


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
        help="""How often the idle check samples GPUs and kernels, seconds.

        Default: a quarter of the idle limit, at least 1 and at most 60 (every minute
        under the default 30-minute limit; a 5-minute limit is checked every 60 s too,
        a 2-minute one every 30 s), so a server stops within a quarter of its limit
        after it. Example: = 30
        """,
    ).tag(config=True)

    @default("idle_check_seconds")
    def _idle_check_default(self) -> int:
        return min(60, max(1, self.idle_timeout_seconds // 4))

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

    save_wait_seconds = Float(
        30.0,
        help="""Longest wait for the front end to save open documents before a stop, seconds.

        The stop goes ahead when the front end acknowledges its save, or after this long
        (no browser open, a browser that hangs): never later. 0 stops without waiting.
        Example: c.GpuPortalExtension.save_wait_seconds = 15
        """,
    ).tag(config=True)

    save_lead_seconds = Float(
        60.0,
        help="""How long before the portal's scheduled credit stop the front end is asked
        to save, seconds (the portal's grace period is 120 s by default).
        Example: c.GpuPortalExtension.save_lead_seconds = 90
        """,
    ).tag(config=True)

    topup_url = Unicode(
        help="""Where the low-credit dialog sends the user to add credits (http or https).

        Default: $GPUPORTAL_TOPUP_URL, else the portal's API docs (portal_url + "docs").
        Example: c.GpuPortalExtension.topup_url = "https://hub.example.org/hub/credits"
        """,
    ).tag(config=True)

    @default("topup_url")
    def _topup_url_default(self) -> str:
        explicit = os.environ.get("GPUPORTAL_TOPUP_URL", "").strip()
        if explicit:
            return explicit
        base = os.environ.get("JUPYTERHUB_BASE_URL", "").strip()
        if base:  # under JupyterHub: the hub's billing page (gpuportal.hub.pages)
            return billing_url(base.rstrip("/") + "/hub/")
        return self.portal_url + "docs" if self.portal_url else ""

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
    saves: SaveBeforeStop
    _idle_callback: PeriodicCallback | None = None
    _stop_task: asyncio.Task[None] | None = None
    #: Seconds the server had idled when the idle cull decided to stop it.
    _idle_for: float | None = None

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
        self.saves = SaveBeforeStop(wait_seconds=self.save_wait_seconds)
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
                (r"/api/gpuportal/save-ack", SaveAckHandler),
            ]
        )

    async def stop_extension(self) -> None:
        if self._idle_callback is not None:
            self._idle_callback.stop()
        if self._stop_task is not None:
            self._stop_task.cancel()
        await self.portal.close()

    def shutdown_server(self, reason: str) -> None:
        """The idle culler's hook: ask the front end to save, then stop (bounded)."""
        self._idle_for = self.culler.idle_seconds(self.clock())
        self.stop_after_save("idle", self.clock())

    def stop_after_save(self, reason: str, stop_at: datetime) -> None:
        """Raise a save request and stop the server at ``stop_at`` once it is saved, or
        ``save_wait_seconds`` after the request at the latest (one stop task at a time)."""
        self.saves.request(reason, self.clock(), stop_at)
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.ensure_future(self._stop_when_due())

    async def _stop_when_due(self) -> None:
        # Ends when the stop time passes; each round waits at most one second, and the
        # stop time is at most save_wait_seconds (or the portal's stopping_at) away.
        while True:
            pending, stop_time = self.saves.current, self.saves.stop_time()
            if pending is None or stop_time is None:
                return  # called off: the credit was topped up
            remaining = (stop_time - self.clock()).total_seconds()
            if remaining <= 0:
                break
            if pending.acknowledged_at is None:
                await self.saves.wait_for_ack(min(remaining, 1.0))
            else:
                await asyncio.sleep(min(remaining, 1.0))
        self.log.info(
            "gpuportal: server %s/%s stops (%s); documents saved: %s, failed: %s",
            self.hub_user,
            self.server_name,
            pending.reason,
            len(pending.saved) if pending.acknowledged_at else "no answer",
            len(pending.failed),
        )
        self.stop_server(pending.reason)

    def stop_server(self, reason: str) -> None:
        """Stop the whole server cleanly, as jupyter-server's own idle shutdown does.

        An idle stop first writes the marker line (``provider/stopmarker.py``) to
        stderr, the Ray job's log, where the spawner finds why the server stopped.
        """
        assert self.serverapp is not None  # set before any extension is initialized
        if reason == "idle" and self._idle_for is not None:
            print(stopmarker.idle_marker(self._idle_for), file=sys.stderr, flush=True)
        self.serverapp.stop()

    def acknowledge_save(self, request_id: str, saved: list[str], failed: list[str]) -> bool:
        """The front end's answer to a save request (``POST /api/gpuportal/save-ack``)."""
        return self.saves.acknowledge(request_id, self.clock(), saved, failed)

    def follow_credit_stop(self, reading: PortalReading, now: datetime) -> None:
        """Raise a save request ``save_lead_seconds`` before the portal's credit stop, and
        drop it when a fresh reading shows the stop called off."""
        alloc = reading.allocation or {}
        stopping_at = parse_time(alloc.get("stopping_at"))
        if stopping_at is not None:
            if now >= stopping_at - timedelta(seconds=self.save_lead_seconds):
                self.stop_after_save(str(alloc.get("stop_reason") or "out_of_credit"), stopping_at)
            return
        pending = self.saves.current
        fresh = reading.reachable and not reading.stale and reading.allocation is not None
        if fresh and pending is not None and pending.reason in CREDIT_STOP_REASONS:
            self.log.info("gpuportal: credit stop called off; dropping the save request")
            self.saves.cancel()

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
        self.follow_credit_stop(reading, now)
        report = build_report(
            user=self.hub_user,
            server=self.server_name,
            portal_url=self.portal_url,
            reading=reading,
            sample=sample,
            kernels=rows,
            idle=self.culler.report(now),
            now=now,
            save=self.saves.report(),
            topup_url=self.topup_url,
        )
        return report, reading.forbidden
