"""The dashboards, who each is for, and which a hub user is shown.

Shared by the service (which answers 403 to anyone else) and the hub's dashboards page
(which links only what fits). The roles are the portal's (admin > provider > customer,
from the hub's admin flag and role groups); the portal enforces the same rule on the
data behind each dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Dashboard:
    notebook: str
    title: str
    description: str
    roles: tuple[str, ...]


DASHBOARDS = (
    Dashboard(
        "provider_earnings.ipynb",
        "Provider earnings",
        "Your nodes, GPU utilisation, earnings per day, week and month, projected "
        "earnings, payouts and your price against the market.",
        ("provider", "admin"),
    ),
    Dashboard(
        "usage.ipynb",
        "Usage",
        "What your servers cost per server and per day, idle GPU time and its cost, "
        "your balance, runway and quota.",
        ("customer", "provider", "admin"),
    ),
    Dashboard(
        "analytics.ipynb",
        "Marketplace analytics",
        "Capacity, revenue, spend by team and user, spawns, faults, top providers and payouts.",
        ("admin",),
    ),
)
BY_NOTEBOOK = {d.notebook: d for d in DASHBOARDS}


def role_of(admin: bool, groups: Iterable[str]) -> str:
    """The portal's role rule, on the hub's user: admin > provider > customer."""
    names = set(groups)
    if admin or "admins" in names:
        return "admin"
    if "providers" in names:
        return "provider"
    return "customer"


def for_role(role: str) -> list[Dashboard]:
    return [d for d in DASHBOARDS if role in d.roles]


def render_path(notebook: str) -> str:
    """A dashboard's path under the service's prefix."""
    return f"voila/render/{notebook}"
