"""Wire the hub pages into a JupyterHub configuration (``jupyterhub_config.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpuportal.provider.money import format_credits

from ..settings import Settings
from . import admin, gallery, handlers, stops, teams
from .portal_reader import PortalAdminClient, PortalReader, PortalUserClient

TEMPLATES = Path(__file__).parent / "templates"
#: The product's name on every page (the login page, the title bar).
PRODUCT = "gpuportal"
TAGLINE = (
    "Jupyter notebooks on GPUs from independent providers: pick a GPU, see its price, "
    "and pay per second for what you use."
)


def signup_credit_text(settings: Settings) -> str:
    """One sentence on the sign-up credit, true to the configured policy."""
    if settings.signup_credits <= 0:
        return "CPU-only servers are free; add credit to use GPUs."
    amount = format_credits(settings.signup_credits, settings.currency_name)
    if settings.signup_credit_policy == "identity":
        return f"New accounts get {amount} to try a GPU. CPU-only servers are free."
    return (
        f"New accounts get {amount} to try a GPU once an admin approves them. "
        "CPU-only servers are free."
    )


def register_handlers(extra: Sequence[tuple[str, Any]] = ()) -> None:
    """Add the pages' handlers (and ``extra``) to the hub's page handlers once.

    The hub builds its handler table from ``jupyterhub.handlers.default_handlers``
    when it starts, as it does for the spawner's report handler (idempotent).
    """
    from jupyterhub.handlers import default_handlers

    for path, handler in [
        *handlers.HANDLERS,
        *admin.HANDLERS,
        *teams.HANDLERS,
        *gallery.HANDLERS,
        *extra,
    ]:
        if not any(entry[0] == path for entry in default_handlers):
            default_handlers.append((path, handler))


def configure(
    c: Any,
    settings: Settings,
    *,
    firstuse: bool,
    extra_handlers: Sequence[tuple[str, Any]] = (),
    extra_templates: Sequence[str] = (),
) -> None:
    """Templates, template variables and handlers of the hub pages, on config ``c``.

    ``firstuse``: the embedded sign-up (``SignupAuthenticator``) is the authenticator.
    ``extra_handlers`` and ``extra_templates``: more hub pages (the dashboards' list),
    whose templates extend this package's ``page.html``.
    """
    c.JupyterHub.template_paths = [str(TEMPLATES), *extra_templates]
    credit = signup_credit_text(settings)
    c.JupyterHub.template_vars = {
        "gp_product": PRODUCT,
        "gp_tagline": TAGLINE,
        "gp_signup": firstuse,
        "gp_signup_credit": credit,
        "gp_currency": settings.currency_name,
        # Called with the current user on each page: why their servers stopped themselves.
        "gp_self_stops": stops.self_stops,
    }
    portal = f"http://127.0.0.1:{settings.portal_port}{settings.service_prefix}"
    handlers.set_reader(PortalReader(portal))
    admin.set_client(PortalAdminClient(portal))
    teams.set_client(PortalUserClient(portal))
    gallery.set_clients(PortalReader(portal), gallery.Publisher(portal))
    register_handlers(extra_handlers)
    if firstuse:
        c.SignupAuthenticator.signup_credit_text = credit
