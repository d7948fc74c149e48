"""``GET /api/gpuportal/usage`` (JSON) and ``GET /api/gpuportal/metrics`` (Prometheus).

Both need a logged-in user allowed to read the resource ``gpuportal``
(``@web.authenticated`` + ``@authorized``), as jupyter-server's own kernel
handlers do; under JupyterHub that is the server's owner (or whoever holds
``access:servers`` on it). A portal that fails gives 200 with a
``portal.error`` sentence; a portal that refuses the token because it belongs
to another user gives 403.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from . import metrics

AUTH_RESOURCE = "gpuportal"


class Reporter(Protocol):
    """What the handlers need of the extension (``app.GpuPortalExtension``); a protocol,
    so this module does not import the app that registers it."""

    async def report(self) -> tuple[dict[str, Any], bool]: ...


class GpuPortalHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def gpuportal(self) -> Reporter:
        app: Any = self.extensionapp
        return app


class UsageHandler(GpuPortalHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """This server's cost, runway, stop time and per-kernel GPU use."""
        report, forbidden = await self.gpuportal.report()
        if forbidden:
            raise web.HTTPError(403, report["portal"]["error"])
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(report))


class MetricsHandler(GpuPortalHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The same report as Prometheus text (a refused token only drops the portal's part)."""
        report, _ = await self.gpuportal.report()
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.finish(metrics.render(report))
