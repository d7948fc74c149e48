"""The hub's ``/hub/dashboards`` page and the navigation bar's link to it.

Loaded by ``jupyterhub_config.py`` into the hub process: :data:`HANDLERS` go to
``c.JupyterHub.extra_handlers`` and :data:`TEMPLATES` to ``c.JupyterHub.template_paths``
(its ``page.html`` adds "Dashboards" to every hub page's navigation bar). The page links
the dashboards that fit the user's role; the service and the portal still check.
"""

from __future__ import annotations

from pathlib import Path

from jupyterhub.handlers import BaseHandler
from tornado import web

from .catalog import for_role, render_path, role_of

TEMPLATES = str(Path(__file__).resolve().parent / "templates" / "hub")
SERVICE = "dashboards"


class DashboardsPageHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        user = self.current_user
        role = role_of(bool(user.admin), (g.name for g in user.groups))
        prefix = f"{self.base_url}services/{SERVICE}/"
        links = [
            {
                "title": d.title,
                "description": d.description,
                "url": prefix + render_path(d.notebook),
            }
            for d in for_role(role)
        ]
        html = await self.render_template("dashboards.html", links=links, role=role)
        self.finish(html)


HANDLERS = [(r"/dashboards", DashboardsPageHandler)]
