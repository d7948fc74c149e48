"""The dashboards service as the hub runs it: its service entry, roles and hub page.

``jupyterhub_config.py`` adds :func:`service` to ``c.JupyterHub.services``,
:data:`ACCESS` to every user's role, and :func:`hub_page` to the hub's handlers and
templates; ``gpuportal up`` prints :func:`url`. The service itself is
``gpuportal.dashboards.service`` (docs/dashboards.md).
"""

from __future__ import annotations

import sys
from typing import Any

from ..settings import Settings

NAME = "dashboards"
#: Every hub user may open the service; which dashboards they see is the portal's call.
ACCESS = f"access:services!service={NAME}"


def url(settings: Settings) -> str:
    """The dashboards' public URL: the hub's page that lists them for each user."""
    return f"http://127.0.0.1:{settings.port}/hub/dashboards"


def service(settings: Settings) -> dict[str, Any]:
    """The hub-managed Voila service at ``/services/dashboards/``.

    It gets no setting of the control plane (no DB or Redis URL, no key): only where
    the portal API is. Its hub OAuth tokens carry access to the portal, so the
    dashboards' kernels read the portal as the logged-in user, with that user's rights.
    """
    return {
        "name": NAME,
        "display": False,  # the navigation bar links the hub's dashboards page instead
        "url": f"http://127.0.0.1:{settings.dashboards_port}",
        "command": [sys.executable, "-m", "gpuportal.dashboards.service"],
        "environment": {
            "GPUPORTAL_PORTAL_URL": (
                f"http://127.0.0.1:{settings.portal_port}{settings.service_prefix}"
            ),
        },
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": ["access:services!service=portal"],
    }


def hub_page() -> tuple[list[Any], str]:
    """The hub's ``/hub/dashboards`` handlers and the template folder (navigation link)."""
    from gpuportal.dashboards.hubpage import HANDLERS, TEMPLATES

    return HANDLERS, TEMPLATES
