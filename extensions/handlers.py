"""``GET /api/gpuportal/usage`` (JSON), ``GET /api/gpuportal/metrics`` (Prometheus) and
``POST /api/gpuportal/save-ack`` (the front end saved before a stop; savestop.py).

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

    def acknowledge_save(self, request_id: str, saved: list[str], failed: list[str]) -> bool: ...


#: A save acknowledgement lists paths; more than this is not a real answer.
MAX_ACK_BYTES = 256 * 1024


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


def _paths(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise web.HTTPError(400, f"{key!r} must be a list of paths.")
    return value


class SaveAckHandler(GpuPortalHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        """The front end saved its open documents for save request ``id`` (before a stop).

        Body: ``{"id": "...", "saved": [paths], "failed": [paths]}``. Answers
        ``{"acknowledged": true}`` when that request was pending, false for an old,
        unknown or already acknowledged one (nothing changes then).
        """
        if len(self.request.body) > MAX_ACK_BYTES:
            raise web.HTTPError(413, "The acknowledgement is too large.")
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "The body must be JSON.") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise web.HTTPError(400, "The body must be an object with the request's 'id'.")
        done = self.gpuportal.acknowledge_save(
            body["id"], _paths(body, "saved"), _paths(body, "failed")
        )
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"acknowledged": done}))
