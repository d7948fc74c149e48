"""Hub pages that user-facing messages link to, in one place.

The billing page is served by the hub (``gpuportal.hub.pages``), under the hub's
prefix: ``/hub/billing`` with the default base URL. The spawner's refusals for
lack of credit and the JupyterLab extension's top-up link point to it. It lives
with the node-side pure modules so that every side may import it (it imports
nothing).
"""

from __future__ import annotations

#: The billing page's path below the hub's prefix (``JupyterHub.hub_prefix``).
BILLING_PAGE = "billing"


def billing_url(hub_prefix: str = "/hub/") -> str:
    """The billing page's URL path for a hub served at ``hub_prefix`` (``/hub/``)."""
    return hub_prefix.rstrip("/") + "/" + BILLING_PAGE
