"""The hub API endpoint where ``gpuportal-singleuser`` reports its port, as batchspawner does.

``POST /hub/api/gpuportal/report`` with the server's own ``JUPYTERHUB_API_TOKEN``.
The token identifies exactly one spawner (the one it was issued to); the
spawner then checks that the report names its current Ray job and a sane
port. The node never chooses the host the hub connects to: the spawner does
(see ``RaySpawner.connect_ip``), so a provider cannot point a user's route at
an arbitrary address.

Importing this module registers the handler with JupyterHub (the hub builds
its handler table from ``jupyterhub.apihandlers.default_handlers`` at start),
which is what the ``ray`` spawner entry point and ``jupyterhub_config.py`` do.
"""

from __future__ import annotations

import hmac
from typing import Any

from jupyterhub.apihandlers import APIHandler, default_handlers
from tornado import web

HANDLER_PATH = r"/api/gpuportal/report"
MAX_BODY = 4096


class ReportHandler(APIHandler):
    """Accept ``{"job_id", "port", "gpus"}`` from the server a token belongs to."""

    @web.authenticated
    async def post(self) -> None:
        user: Any = self.current_user
        spawners = getattr(user, "spawners", None)
        token = self.get_auth_token() or ""
        if not spawners or not token:
            raise web.HTTPError(403, "Only a user server's own token can report.")
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, "Report too large.")
        spawner = None
        for candidate in list(spawners.values()):
            candidate_token = getattr(candidate, "api_token", None) or ""
            if candidate_token and hmac.compare_digest(candidate_token, token):
                spawner = candidate
                break
        accept = getattr(spawner, "accept_report", None)
        if spawner is None or accept is None:
            raise web.HTTPError(403, "This token does not belong to a Ray-placed server.")
        body = self.get_json_body()
        if not isinstance(body, dict):
            raise web.HTTPError(400, "The report must be a JSON object.")
        try:
            accept(body)
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.set_status(201)
        self.finish({"message": "reported"})


def register() -> None:
    """Add the handler to the hub's API handlers once (idempotent)."""
    if not any(entry[0] == HANDLER_PATH for entry in default_handlers):
        default_handlers.append((HANDLER_PATH, ReportHandler))


register()
