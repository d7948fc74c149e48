"""The teams page, ``/hub/teams``, and the home page's "Share" button.

* ``GET /hub/teams``: your teams (every team for a portal admin): members and their
  roles, the team's balance, budget and default profile; forms to add and remove
  members, set roles, the budget and the profile (team admins), and to create a
  team (portal admins);
* ``GET /hub/teams/mates``: your teammates as JSON, for the home page's share form;
* ``POST /hub/teams/act``: one action from a form (the hub's XSRF check), then back
  to the page it came from with a sentence saying what happened.

Every read and action goes to the portal's team API as the logged-in user
(``PortalUserClient``), whose rules decide: a team admin manages their team, a
portal admin every team, and anyone else is refused there with a sentence. Each
action the portal carries out is written to the audit log there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from jupyterhub.handlers import BaseHandler
from tornado import web

from gpuportal.provider.money import format_credits, parse_credits

from .portal_reader import Configured, PortalAdminClient, PortalUnavailable

TEAMS_PAGE = "teams"

client: Configured[PortalAdminClient] = Configured("The teams page is")
set_client = client.set


def _segment(text: str, what: str) -> str:
    text = text.strip()
    if not text or len(text) > 255 or "/" in text:
        raise ValueError(f"Say which {what} (a name without '/').")
    return quote(text, safe="")


def action_request(form: dict[str, str]) -> tuple[str, str, Any, str]:
    """The portal call for one form: ``(method, path, body, what was done)``; a
    ValueError with a sentence when the form is not one the page makes."""
    action = form.get("action", "")
    reason = form.get("reason", "").strip()[:500]
    body: dict[str, Any]
    if action == "share" or action == "unshare":
        mate = form.get("user", "").strip()
        if not mate:
            raise ValueError("Choose a teammate to share with.")
        server = form.get("server", "")
        body = {"server": server, "user": mate}
        label = server or "default server"
        if action == "share":
            return "POST", "shares", body, f"Your {label} is shared with {mate}."
        return "POST", "shares/revoke", body, f"{mate} no longer has access to your {label}."
    if action == "create":
        name = form.get("team", "").strip()
        return "POST", "teams", {"name": name, "reason": reason}, f"Team {name} created."
    team = _segment(form.get("team", ""), "team")
    name = form.get("team", "").strip()
    if action == "add":
        user = form.get("user", "").strip()
        body = {"user": user, "role": form.get("role", "member"), "reason": reason}
        return "POST", f"teams/{team}/members", body, f"{user} added to team {name}."
    if action == "remove":
        user = _segment(form.get("user", ""), "member")
        return "DELETE", f"teams/{team}/members/{user}", None, f"Removed from team {name}."
    if action == "role":
        user = _segment(form.get("user", ""), "member")
        body = {"role": form.get("role", "member"), "reason": reason}
        return "PUT", f"teams/{team}/members/{user}/role", body, f"Role set in team {name}."
    if action == "budget":
        hours = form.get("gpu_hours", "").strip()
        cap = form.get("spend_cap", "").strip()
        try:
            gpu_hours = float(hours) if hours else None
        except ValueError:
            raise ValueError(f"{hours[:32]!r} is not a number of GPU-hours.") from None
        spend_cap = parse_credits(cap) if cap else None
        body = {
            "window": form.get("window", "month"),
            "gpu_hours": gpu_hours,
            "spend_cap_per_hour": spend_cap,
            "reason": reason,
        }
        return "PUT", f"teams/{team}/budget", body, f"Budget of team {name} set."
    if action == "profile":
        profile = form.get("profile", "").strip() or None
        body = {"default_profile": profile, "reason": reason}
        return "PUT", f"teams/{team}/default-profile", body, f"Default profile of {name} set."
    raise ValueError("The teams page has no such action.")


class TeamsPage(BaseHandler):
    """Your teams; what it shows is the portal's answer, autoescaped."""

    @web.authenticated
    async def get(self) -> None:
        error, teams = None, []
        try:
            teams = await client().send(self.current_user, "GET", "teams")
        except PortalUnavailable as exc:
            error = str(exc)
        html = await self.render_template(
            "teams.html",
            user=self.current_user,
            teams=teams,
            error=error,
            page=f"{self.hub.base_url}{TEAMS_PAGE}",
            done=self.get_argument("done", "")[:500],
            failed=self.get_argument("failed", "")[:500],
            money=lambda micro: format_credits(int(micro or 0)),
        )
        self.finish(html)


class TeammatesAPI(BaseHandler):
    """Your teammates and your servers' shares as JSON, for the home page's form."""

    @web.authenticated
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        try:
            self.finish(await client().send(self.current_user, "GET", "shares"))
        except PortalUnavailable as exc:
            self.finish({"teammates": [], "shares": [], "error": str(exc)})


class TeamsAction(BaseHandler):
    """One action from a form on the teams page or the home page."""

    @web.authenticated
    async def post(self) -> None:
        form = {k: self.get_body_argument(k, "")[:500] for k in self.request.body_arguments}
        back = "home" if form.get("back") == "home" else TEAMS_PAGE
        outcome: dict[str, str]
        try:
            method, path, body, said = action_request(form)
            await client().send(self.current_user, method, path, body)
            outcome = {"done": said}
            self.log.info("teams: %s %s %s", self.current_user.name, method, path)
        except (ValueError, PortalUnavailable) as exc:
            outcome = {"failed": str(exc)}
        self.redirect(f"{self.hub.base_url}{back}?{urlencode(outcome)}")


HANDLERS = [
    (rf"/{TEAMS_PAGE}/act", TeamsAction),
    (rf"/{TEAMS_PAGE}/mates", TeammatesAPI),
    (rf"/{TEAMS_PAGE}/?", TeamsPage),
]
