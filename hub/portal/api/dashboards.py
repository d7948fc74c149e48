"""Dashboard API v1: the data behind the Voila dashboards, one report per dashboard.

The dashboards' kernels call these as the logged-in hub user, with that user's own
token, so the portal (not the dashboard) decides what each person sees:

- ``GET /api/v1/dashboards/provider``: the caller's own nodes, utilisation, earnings,
  projection, payouts and alerts (providers and admins; an admin sees their own too);
- ``GET /api/v1/dashboards/usage``: the caller's own spend and session utilisation;
- ``GET /api/v1/dashboards/analytics``: the whole marketplace, for admins only (403);
- ``GET /api/v1/dashboards/payouts``: payouts, the caller's own (all for an admin).

No endpoint takes a user name: a report is always the caller's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from ... import timeutil
from ...billing import analytics
from ..auth import CurrentUser, PortalDep, PortalUser, require_role
from .plumbing import Admin, in_db

router = APIRouter(tags=["dashboards"])

Days = Annotated[int, Query(ge=1, le=366, description="How many days back, up to now.")]
ProviderOrAdmin = Annotated[PortalUser, require_role("provider", "admin")]


@router.get("/api/v1/dashboards/provider")
async def provider_dashboard(portal: PortalDep, user: ProviderOrAdmin, days: Days = 30) -> Any:
    """The caller's earnings dashboard: their nodes only, never another provider's."""
    now = timeutil.utcnow()
    fee = portal.settings.platform_fee_bps
    return await in_db(
        portal, lambda s: analytics.provider_report(s, user.account_id, now, days, fee)
    )


@router.get("/api/v1/dashboards/usage")
async def usage_dashboard(portal: PortalDep, user: CurrentUser, days: Days = 30) -> Any:
    """The caller's own usage: spend per server and day, utilisation and idle cost."""
    now = timeutil.utcnow()
    return await in_db(portal, lambda s: analytics.usage_report(s, user.account_id, now, days))


@router.get("/api/v1/dashboards/analytics")
async def analytics_dashboard(portal: PortalDep, user: Admin, days: Days = 30) -> Any:
    """The marketplace for admins: capacity, revenue, spend, spawns, faults, providers."""
    until = timeutil.utcnow()
    since = until - timedelta(days=days)
    return await in_db(portal, lambda s: analytics.analytics_report(s, since, until))


@router.get("/api/v1/dashboards/payouts")
async def payouts(portal: PortalDep, user: ProviderOrAdmin, days: Days = 90) -> Any:
    """Payouts with status and signature: the caller's own, or everyone's for an admin."""
    since = timeutil.utcnow() - timedelta(days=days)
    owner = None if user.role == "admin" else user.account_id
    return await in_db(portal, lambda s: analytics.payouts(s, owner, since))
