"""The dashboards service: Voila behind hub OAuth, at ``/services/dashboards/``.

JupyterHub starts this as a managed service (``python -m gpuportal.dashboards.service``)
with the usual service environment (``JUPYTERHUB_SERVICE_URL``, ``..._PREFIX``, the
OAuth client). It is Voila's own standalone server, not a Jupyter server: there is no
contents API, no terminal, and a kernel only accepts widget messages, never code. What
it adds to Voila:

* **Login**: JupyterHub's own identity provider and authorizer for Jupyter servers
  (``JupyterHubIdentityProvider``): a browser without a cookie goes through the hub's
  OAuth flow, and only users with ``access:services!service=dashboards`` get in.
* **Who may see which dashboard**: each notebook names the roles it is for
  (:mod:`.catalog`); the render handler asks the portal who the user is
  (``GET /api/v1/me`` with the user's own token) and answers 403 with a sentence
  otherwise. Any other path is a 404: nothing outside the dashboards folder, and
  nothing in it but the listed notebooks, is served.
* **The user's identity in the kernel**: the render handler issues a one-time ticket
  (:mod:`.tickets`) for the user's OAuth token and hands it to the kernel in a request
  header that Voila passes to kernels (``http_header_envs``), also to a preheated
  kernel. The kernel redeems it over 127.0.0.1 and calls the portal **as that user**.
* **Preheated kernels**: one per dashboard, with pandas, widgets and plots imported and
  the notebook run up to the point where it waits for its user, so a page shows its
  first figures within seconds.
* **No tracebacks**: Voila's ``show_tracebacks`` stays off, and the notebooks turn any
  failure into a sentence (:mod:`.display`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import jinja2
from jupyter_server.utils import url_path_join
from jupyterhub.singleuser.extension import JupyterHubAuthorizer, JupyterHubIdentityProvider
from tornado import web
from traitlets.config import Config
from voila.app import Voila
from voila.request_info_handler import RequestInfoSocketHandler
from voila.tornado.handler import TornadoVoilaHandler
from voila.tornado.treehandler import TornadoVoilaTreeHandler

from .catalog import BY_NOTEBOOK
from .client import SERVICE_URL_ENV
from .tickets import TICKET_HEADER, TicketHandler, Tickets

log = logging.getLogger("gpuportal.dashboards")

#: The folder served: the notebooks, and nothing above it.
DASHBOARDS_DIR = Path(__file__).resolve().parent


def portal_url() -> str:
    """The portal API's base URL (``.../services/portal/``), from the environment."""
    return os.environ.get("GPUPORTAL_PORTAL_URL", "http://127.0.0.1:8000/services/portal/")


async def portal_role(http: httpx.AsyncClient, token: str) -> str | None:
    """The portal's role for the owner of ``token``; None when the portal refuses it."""
    url = url_path_join(portal_url(), "api/v1/me")
    reply = await http.get(url, headers={"Authorization": f"token {token}"})
    if reply.status_code in (401, 403):
        return None
    reply.raise_for_status()
    role = reply.json().get("role")
    return str(role) if role else None


class DashboardHandler(TornadoVoilaHandler):
    """Voila's render handler, with the role check and the ticket for the kernel."""

    @web.authenticated
    async def get(self, path: str | None = None) -> None:
        name = (path or "").strip("/")
        dashboard = BY_NOTEBOOK.get(name)
        if dashboard is None:
            raise web.HTTPError(404, "There is no such dashboard.")
        token = self.identity_provider.hub_auth.get_token(self)
        if not token:  # pragma: no cover - an authenticated request carries its token
            raise web.HTTPError(403, "Log in to the hub again to see this dashboard.")
        try:
            role = await portal_role(self.settings["gpuportal_http"], token)
        except httpx.HTTPError as exc:
            log.warning(
                "dashboards: the portal did not answer who %s is: %s",
                self.current_user.username,
                exc,
            )
            raise web.HTTPError(
                503, "The portal is not answering; try again in a moment."
            ) from None
        allowed = dashboard.roles
        if role not in allowed:
            log.info("dashboards: %s (%s) may not see %s", self.current_user.username, role, name)
            who = " and ".join(r + "s" for r in allowed)
            you = "not known to the portal" if role is None else f"a {role}"
            raise web.HTTPError(
                403, f"The {dashboard.title.lower()} dashboard is for {who}; you are {you}."
            )
        tickets: Tickets = self.settings["gpuportal_tickets"]
        # Set here, never taken from the client: whatever header it sent is replaced.
        self.request.headers[TICKET_HEADER] = tickets.issue(token, self.current_user.username)
        log.info("dashboards: %s (%s) opens %s", self.current_user.username, role, name)
        await super().get(name)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A sentence and the status, never a traceback."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) if isinstance(exc, web.HTTPError) else None
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_error_page(status_code, message or "The dashboard could not be shown."))


_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(DASHBOARDS_DIR / "templates"), autoescape=True
)


def _error_page(status: int, message: str) -> str:
    return _templates.get_template("error.html").render(
        status=status, message=message, back_url=hub_url("dashboards")
    )


class IndexHandler(web.RequestHandler):
    """The service's root: the hub's page that lists the dashboards for your role."""

    def get(self, path: str = "") -> None:
        self.redirect(hub_url("dashboards"))


class NotFoundHandler(web.RequestHandler):
    def prepare(self) -> None:
        raise web.HTTPError(404)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(_error_page(status_code, "There is nothing here."))


class LocalRequestInfoHandler(RequestInfoSocketHandler):
    """Voila's channel to preheated kernels, for kernels on this machine only.

    Kernels connect straight to 127.0.0.1; anything that came through the hub's
    proxy (which adds ``X-Forwarded-For``) is not a kernel of ours.
    """

    def open(self, kernel_id: str) -> None:
        if self.request.headers.get("X-Forwarded-For"):
            self.close(code=1008)
            return
        super().open(kernel_id)


class DashboardsVoila(Voila):
    """Voila serving the dashboards folder with the handlers above swapped in."""

    def init_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = super().init_settings()
        settings["gpuportal_tickets"] = Tickets()
        # One client for the portal, kept for the service's life.
        settings["gpuportal_http"] = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0))
        return settings

    def init_handlers(self) -> list[Any]:
        base = self.server_url
        handlers = []
        for spec in super().init_handlers():
            pattern, handler, *rest = spec
            if handler is TornadoVoilaHandler:
                handler = DashboardHandler
            elif handler is TornadoVoilaTreeHandler:
                handler, rest = IndexHandler, []
            elif handler is RequestInfoSocketHandler:
                handler = LocalRequestInfoHandler
            elif "/voila/api/contents" in pattern or "/voila/files/" in pattern:
                handler, rest = NotFoundHandler, []
            if not pattern.startswith(base):  # the identity provider's own, e.g. /oauth_callback
                pattern = url_path_join(base, pattern)
            handlers.append((pattern, handler, *rest))
        handlers.insert(0, (url_path_join(base, "gpuportal/ticket"), TicketHandler))
        handlers.insert(
            0,
            (
                url_path_join(base, "gpuportal/static/(.*)"),
                web.StaticFileHandler,
                {"path": str(DASHBOARDS_DIR / "static")},
            ),
        )
        return handlers


class HubIdentity(JupyterHubIdentityProvider):
    """JupyterHub's identity provider, as Voila constructs one (with a ``token`` argument
    that hub OAuth has no use for: the hub's cookie or token is the credential)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("token", None)
        super().__init__(**kwargs)


def hub_url(path: str) -> str:
    return url_path_join(os.environ.get("JUPYTERHUB_BASE_URL", "/"), "hub", path)


def voila_config(environ: dict[str, str]) -> dict[str, Any]:
    """Voila's configuration for the service environment the hub gives us."""
    service_url = urlparse(environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8003"))
    prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/dashboards/")
    config = {
        "Voila": {
            "ip": "127.0.0.1",
            "port": service_url.port or 8003,
            "port_retries": 0,
            "open_browser": False,
            "base_url": prefix,
            "server_url": prefix,
            "root_dir": str(DASHBOARDS_DIR),
            "identity_provider_class": HubIdentity,
            "authorizer_class": JupyterHubAuthorizer,
            # Nothing from a CDN: a deployment behind a firewall has none.
            "mathjax_url": url_path_join(prefix, "gpuportal/static/mathjax-offline.js"),
        },
        "VoilaConfiguration": {
            "show_tracebacks": False,
            "preheat_kernel": True,
            "default_pool_size": 1,
            "http_header_envs": [TICKET_HEADER],
            "file_allowlist": [],
            "theme": "light",
            # Voila's "lab" template without its CDN stylesheets (share/voila/templates).
            "template": "gpuportal",
        },
        # A page whose kernel websocket drops gets a fresh connection, not the old
        # channels with the messages buffered meanwhile: twice in the full test suite the
        # service stopped answering anything right after replaying such a buffer (a
        # page's socket closed at once and came back). A dashboard loses nothing it
        # needs: its page is drawn, and a reload draws it again.
        "MappingKernelManager": {"buffer_offline_messages": False},
        # The service's own hub token stays in this process (see main).
        "HubOAuth": {"api_token": environ.get("JUPYTERHUB_API_TOKEN", "")},
    }
    return config


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(name)s] %(message)s")
    config = Config(voila_config(dict(os.environ)))
    # Kernels inherit this process's environment: the service's hub token (its OAuth
    # client secret) stays in the configuration above, never in a kernel.
    os.environ.pop("JUPYTERHUB_API_TOKEN", None)
    os.environ.pop("JPY_API_TOKEN", None)
    # Kernels call the service itself (to redeem their ticket) on 127.0.0.1.
    service = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8003"))
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/dashboards/")
    os.environ[SERVICE_URL_ENV] = f"http://127.0.0.1:{service.port or 8003}{prefix}"
    # Where Voila finds the "gpuportal" template.
    shared = str(DASHBOARDS_DIR / "share")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (shared, os.environ.get("JUPYTER_PATH", "")) if p
    )
    os.chdir(DASHBOARDS_DIR)
    DashboardsVoila.launch_instance([], config=config)


if __name__ == "__main__":
    main()
