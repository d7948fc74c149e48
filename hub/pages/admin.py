"""The admin control panel's hub pages, ``/hub/portal-admin`` (JupyterHub's own admin
page stays as it is).

* ``GET /hub/portal-admin``: providers and nodes (status, verification, reliability;
  block, unblock, delist, list) and the pricing in force;
* ``GET /hub/portal-admin/accounts``: customers and teams (balance, quota; grant
  credits, set a quota);
* ``GET /hub/portal-admin/allocations``: live allocations (stop a server, refund);
* ``GET /hub/portal-admin/payouts``: pending and failed payouts, the treasury (retry a
  failed payout, run a payout round now);
* ``GET /hub/portal-admin/audit``: the audit log, filtered by actor, action, target;
* ``POST /hub/portal-admin/act``: one action from a form (the hub's XSRF check),
  then back to the page it came from with a sentence saying what happened.

The hub lets only users with the ``admin-ui`` scope in (403 otherwise, as for its
own admin page); every read and action then goes to the portal's admin API as that
admin (``PortalAdminClient``), whose rules are checked again there. Every action
the portal carries out writes its audit record there, in the same transaction.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jupyterhub.handlers import BaseHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from gpuportal.provider.money import format_credits, parse_credits

from .portal_reader import Configured, PortalAdminClient, PortalUnavailable

#: The panel's path below the hub's prefix.
ADMIN_PAGE = "portal-admin"
SECTIONS = {
    "": "Providers and nodes",
    "accounts": "Customers and teams",
    "allocations": "Live allocations",
    "payouts": "Payouts",
    "audit": "Audit log",
}

NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

client: Configured[PortalAdminClient] = Configured("The admin pages are")
set_client = client.set


def money(micro: Any) -> str:
    return format_credits(int(micro or 0))


async def _load(user: Any, section: str, args: dict[str, str]) -> dict[str, Any]:
    portal = client()
    if section == "accounts":
        return {"accounts": await portal.get(user, "admin/accounts")}
    if section == "allocations":
        return {"allocations": await portal.get(user, "admin/allocations", open_only="true")}
    if section == "payouts":
        return {"payouts": await portal.get(user, "payouts/admin")}
    if section == "audit":
        filters = {k: args[k] for k in ("actor", "action", "target_kind", "target") if args.get(k)}
        return {"records": await portal.get(user, "admin/audit", **filters), "filters": filters}
    return {
        "providers": await portal.get(user, "admin/providers"),
        "nodes": await portal.get(user, "admin/nodes"),
        "pricing": await portal.get(user, "admin/pricing"),
    }


class AdminPanel(BaseHandler):
    """One section of the panel; what it shows is the portal's answer, autoescaped."""

    @web.authenticated
    @needs_scope("admin-ui")
    async def get(self, section: str | None = None) -> None:
        section = (section or "").strip("/")
        if section not in SECTIONS:
            raise web.HTTPError(404, "There is no such section of the admin panel.")
        args = {
            k: self.get_argument(k, "")[:255] for k in ("actor", "action", "target_kind", "target")
        }
        error, data = None, {}
        try:
            data = await _load(self.current_user, section, args)
        except PortalUnavailable as exc:
            error = str(exc)
        html = await self.render_template(
            "portal_admin.html",
            user=self.current_user,
            section=section,
            sections=SECTIONS,
            panel=f"{self.hub.base_url}{ADMIN_PAGE}",
            error=error,
            done=self.get_argument("done", "")[:500],
            failed=self.get_argument("failed", "")[:500],
            money=money,
            **data,
        )
        self.finish(html)


def _reason(form: dict[str, str]) -> str:
    return form.get("reason", "").strip()[:500]


def _amount(text: str, *, required: bool) -> int | None:
    """Credits typed in a form → micro-credits; a sentence when it is not money."""
    if not text.strip():
        if required:
            raise ValueError("Say how many credits.")
        return None
    try:
        micro = parse_credits(text)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if micro <= 0:
        raise ValueError("The amount must be more than zero.")
    return micro


def action_request(form: dict[str, str]) -> tuple[str, str, Any, str]:
    """The portal call for one form: ``(method, path, body, what was done)``; a
    ValueError with a sentence when the form is not one the panel makes."""
    action, target = form.get("action", ""), form.get("target", "").strip()
    reason = _reason(form)
    body: dict[str, Any]
    if not target:
        raise ValueError("Say what to act on.")
    if action in ("block", "unblock"):
        if not NODE_ID.fullmatch(target) or set(target) == {"."}:
            raise ValueError("A node id is 1-64 letters, digits, '.', '_' or '-'.")
        return (
            "POST",
            f"admin/nodes/{target}/{action}",
            {"reason": reason},
            f"Node {target} {action}ed.",
        )
    if action in ("delist", "list"):
        if not target.isdigit():
            raise ValueError("A provider is named by its number.")
        path = f"admin/providers/{target}/delist" + ("?listed=true" if action == "list" else "")
        return "POST", path, {"reason": reason}, f"Provider {target} {action}ed."
    if action in ("stop", "refund"):
        if not target.isdigit():
            raise ValueError("An allocation is named by its number.")
        if action == "stop":
            body = {"reason": reason}
            return (
                "POST",
                f"admin/allocations/{target}/stop",
                body,
                f"Allocation {target}'s server is stopping.",
            )
        if not reason:
            raise ValueError("Say why you refund.")
        amount = _amount(form.get("amount", ""), required=False)
        body = {"reason": reason} if amount is None else {"reason": reason, "amount": amount}
        return "POST", f"admin/allocations/{target}/refund", body, f"Allocation {target} refunded."
    if action == "retry":
        if not target.isdigit():
            raise ValueError("A payout is named by its number.")
        return "POST", f"payouts/{target}/retry", {}, f"Payout {target} is being paid again."
    if action == "run":
        return "POST", "payouts/run", {}, "A payout round ran."
    kind = form.get("kind", "user")
    if kind not in ("user", "team"):
        raise ValueError("Credits and quotas go to a user or a team.")
    if action == "grant":
        amount = _amount(form.get("amount", ""), required=True)
        body = {kind: target, "amount": amount, "memo": reason}
        return "POST", "credits/grants", body, f"Granted {money(amount)} to {kind} {target}."
    if action == "quota":
        hours = form.get("gpu_hours", "").strip()
        try:
            gpu_hours = float(hours) if hours else None
        except ValueError:
            raise ValueError(f"{hours!r} is not a number of GPU-hours.") from None
        body = {
            kind: target,
            "window": form.get("window", "day"),
            "gpu_hours": gpu_hours,
            "reason": reason,
        }
        return "PUT", "quotas", body, f"Quota of {kind} {target} set."
    raise ValueError("The admin panel has no such action.")


class AdminAction(BaseHandler):
    """One admin action from a panel form, through the portal's admin API."""

    @web.authenticated
    @needs_scope("admin-ui")
    async def post(self) -> None:
        form = {k: self.get_body_argument(k, "")[:500] for k in self.request.body_arguments}
        back = form.get("back", "")
        if back not in SECTIONS:
            back = ""
        outcome: dict[str, str]
        try:
            method, path, body, said = action_request(form)
            path, _, query = path.partition("?")
            await client().send(self.current_user, method, path, body, dict(parse_qsl(query)))
            outcome = {"done": said}
            self.log.info("admin %s: %s %s", self.current_user.name, method, path)
        except (ValueError, PortalUnavailable) as exc:
            outcome = {"failed": str(exc)}
        url = f"{self.hub.base_url}{ADMIN_PAGE}" + (f"/{back}" if back else "")
        self.redirect(f"{url}?{urlencode(outcome)}")


HANDLERS = [
    (rf"/{ADMIN_PAGE}/act", AdminAction),
    (rf"/{ADMIN_PAGE}(/accounts|/allocations|/payouts|/audit)?/?", AdminPanel),
]
