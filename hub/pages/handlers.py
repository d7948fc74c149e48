"""The hub-side handlers of the money pages (see the package docstring).

* ``GET /hub/billing``: the billing page (``billing.html``);
* ``GET /hub/billing/summary``: the same numbers as JSON for the navigation bar,
  the banner and the home page, which every hub page fetches once it has loaded;
* ``GET /hub/billing/usage.csv?by=server|day``: the portal's CSV export, as the user.

Each reads the portal as the logged-in hub user (``portal_reader.py``); a portal
that does not answer turns into a sentence on the page, never a traceback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import segno
from jupyterhub.handlers import BaseHandler
from tornado import web

from gpuportal.provider.links import BILLING_PAGE
from gpuportal.provider.money import format_credits

from .. import timeutil
from . import money
from .portal_reader import Configured, PortalReader, PortalUnavailable

reader: Configured[PortalReader] = Configured("The hub pages are")
set_reader = reader.set


async def money_summary(user: Any) -> dict[str, Any]:
    """Balance, runway, warnings, running servers and recent sessions of ``user``."""
    portal = reader()
    balance, allocations = await asyncio.gather(
        portal.get(user, "balance"), portal.get(user, "allocations")
    )
    return money.summary(balance, allocations, timeutil.utcnow())


def _qr(text: str) -> str:
    """A QR code of ``text`` as a data: URI, made here (no third-party service)."""
    return str(segno.make(text, error="m").svg_data_uri(scale=5, border=2))


class BillingPage(BaseHandler):
    """Balance, usage per server and per day, grants and deposits, how to add credit."""

    @web.authenticated
    async def get(self) -> None:
        user = self.current_user
        portal = reader()
        error = None
        summary: dict[str, Any] = {"known": False, "warnings": [], "running": [], "recent": []}
        by_server: list[dict[str, Any]] = []
        by_day: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        deposit: dict[str, Any] | None = None
        try:
            summary = await money_summary(user)
            answers: tuple[Any, ...] = await asyncio.gather(
                portal.get(user, "usage", by="server"),
                portal.get(user, "usage", by="day"),
                portal.get(user, "credits/history"),
                portal.get(user, "deposits/solana"),
            )
            usage_server, usage_day, history, deposit = answers
            currency = summary.get("currency", "credits")
            by_server = _usage_rows(usage_server, currency)
            by_day = _usage_rows(usage_day, currency)
            history = history or []
        except PortalUnavailable as exc:
            error = str(exc)
        deposit_view = None
        if deposit:
            deposit_view = {
                **deposit,
                "qr": _qr(f"solana:{deposit['address']}"),
                "per_sol": format_credits(deposit["micro_credits_per_sol"], deposit["currency"]),
                "per_usdc": format_credits(deposit["micro_credits_per_usdc"], deposit["currency"]),
            }
        html = await self.render_template(
            "billing.html",
            user=user,
            money=summary,
            error=error,
            by_server=by_server,
            by_day=by_day,
            history=history,
            deposit=deposit_view,
            portal_api=self.base_url.rstrip("/") + "/services/portal/api/v1/",
            token_url=self.hub.base_url.rstrip("/") + "/token",
        )
        self.finish(html)


def _usage_rows(answer: dict[str, Any] | None, currency: str) -> list[dict[str, Any]]:
    rows = (answer or {}).get("rows", [])
    return [
        {
            **row,
            "label": money.server_label(row["server"]),
            "cost": format_credits(row["charged"], currency),
        }
        for row in rows
    ]


class SummaryAPI(BaseHandler):
    """The money summary as JSON, for scripts on the hub's own pages (same origin)."""

    @web.authenticated
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        try:
            self.finish(await money_summary(self.current_user))
        except PortalUnavailable as exc:
            self.finish({"known": False, "error": str(exc), "warnings": [], "running": []})


class UsageCsv(BaseHandler):
    """The portal's usage export (per server or per day) for the logged-in user."""

    @web.authenticated
    async def get(self) -> None:
        by = self.get_argument("by", "server")
        if by not in ("server", "day"):
            raise web.HTTPError(400, "Choose usage by 'server' or by 'day'.")
        try:
            text = await reader().get_text(self.current_user, "usage", by=by, format="csv")
        except PortalUnavailable as exc:
            raise web.HTTPError(503, str(exc)) from None
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="usage-by-{by}.csv"')
        self.finish(text)


#: Paths below the hub's prefix; the billing page's is the spawner's link target.
HANDLERS = [
    (rf"/{BILLING_PAGE}", BillingPage),
    (rf"/{BILLING_PAGE}/summary", SummaryAPI),
    (rf"/{BILLING_PAGE}/usage\.csv", UsageCsv),
]
