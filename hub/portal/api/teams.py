"""Portal API v1 for teams: JupyterHub groups that pay together, and sharing servers.

Who may do what:

* a portal admin creates teams and manages every team;
* a team admin (the ``admin`` team role) manages their team: members, roles, the
  budget (the team quota) and the default GPU profile;
* a member reads their team; anyone else gets 404 for a team they are not in
  (whether it exists is not theirs to know) and 403 for a change;
* credits reach a team's wallet through the admin grant (``POST /credits/grants``
  with ``team``), like a user's.

Teams are hub groups, and the hub holds who is a member: every change of
membership is made in the hub first (through :mod:`..hubapi`), then mirrored
into the portal DB in the same request; a change made in the hub directly
reaches the portal at the next sync (``sync_from_hub``). Every change writes an
audit record (:mod:`gpuportal.hub.db.audit`) in its own DB transaction, so it
shows in the admin control panel.

Sharing: a member shares a running server with a teammate through
``POST /shares``; the portal checks that they share a team and asks the hub
for a JupyterHub 5 share (users hold no ``shares`` scope themselves, so they
cannot share with outsiders behind the portal's back). When a member leaves a
team, the shares between them and the team's members are revoked.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ... import timeutil
from ...billing import ledger, metering, quotas
from ...db import accounts, audit
from ...db.models import Account, Team
from ..auth import CurrentCaller, CurrentUser, PortalDep, PortalUser
from ..context import Portal
from ..hubapi import HubUnavailable
from ..sharing import revoke_team_shares
from .plumbing import ApiError, account_from_hub, check_owner, in_db, small_body

log = logging.getLogger(__name__)
router = APIRouter(tags=["teams"], dependencies=[Depends(small_body)])

TeamName = Annotated[str, Path(min_length=1, max_length=255)]
UserName = Annotated[str, Path(min_length=1, max_length=255)]
HUB_DOWN = "The hub is not answering; nothing was changed. Try again in a moment."


class TeamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    default_profile: str | None = Field(None, min_length=1, max_length=64)
    reason: str = Field("", max_length=500)


class MemberAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, max_length=255)
    role: Literal["member", "admin"] = "member"
    reason: str = Field("", max_length=500)


class RoleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["member", "admin"]
    reason: str = Field("", max_length=500)


class BudgetSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: Literal["day", "week", "month"] = "month"
    gpu_hours: float | None = Field(None, ge=0, le=quotas.MAX_QUOTA_GPU_HOURS)
    spend_cap_per_hour: int | None = Field(
        None, ge=0, le=quotas.MAX_SPEND_CAP, description="Micro-credits per hour."
    )
    reason: str = Field("", max_length=500)


class ProfileSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_profile: str | None = Field(None, min_length=1, max_length=64)
    reason: str = Field("", max_length=500)


class ShareChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: str = Field("", max_length=255, description="Your server's name; '' the default.")
    user: str = Field(min_length=1, max_length=255, description="The teammate.")


# --- reading -------------------------------------------------------------------------


def team_view(session: Session, team: Team, account: Account) -> dict[str, Any]:
    """A team as its members see it: who is in it, its money, budget and profile."""
    now = timeutil.utcnow()
    quota = metering.quota_for(session, team_id=team.id)
    mine = accounts.membership(session, team, account)
    return {
        "name": team.hub_group,
        "role": None if mine is None else mine.role,
        "manage": accounts.is_team_admin(session, team, account),
        "members": [
            {"name": m.account.hub_name, "role": m.role}
            for m in sorted(team.memberships, key=lambda m: m.account.hub_name)
        ],
        "balance": ledger.balance_by_key(session, f"team:{team.id}"),
        "budget": None if quota is None else quotas.quota_view(session, quota, now),
        "default_profile": team.default_profile,
    }


def _account(session: Session, caller: PortalUser) -> Account:
    account = session.get(Account, caller.account_id)
    if account is None:  # pragma: no cover (the caller's account is made at auth)
        raise ApiError(403, "You have no portal account yet; log in to the hub again.")
    return account


def _visible_team(session: Session, caller: PortalUser, name: str) -> tuple[Team, Account]:
    """The team, if the caller is a member or manages it; else 404 (no hint it exists)."""
    account = _account(session, caller)
    team = accounts.team_named(session, name)
    if team is None or not (
        accounts.membership(session, team, account)
        or accounts.is_team_admin(session, team, account)
    ):
        raise ApiError(404, f"You are not in a team named {name[:64]!r}.")
    return team, account


def _managed_team(session: Session, caller: PortalUser, name: str) -> tuple[Team, Account]:
    """The team, if the caller is its team admin (or a portal admin); 404 for outsiders,
    403 for plain members."""
    team, account = _visible_team(session, caller, name)
    if caller.read_only or not accounts.is_team_admin(session, team, account):
        raise ApiError(
            403,
            f"Only a team admin of {team.hub_group!r} (or a portal admin) may change it; "
            "ask one of them.",
        )
    return team, account


@router.get("/api/v1/teams")
async def list_teams(caller: CurrentUser, portal: PortalDep) -> Any:
    """Your teams (every team for a portal admin), with members, balance and budget."""

    def load(session: Session) -> list[dict[str, Any]]:
        account = _account(session, caller)
        names = set(accounts.teams_of(session, account)) | set(
            accounts.teams_managed_by(session, account)
        )
        rows = session.scalars(select(Team).where(Team.hub_group.in_(names), Team.active))
        return [team_view(session, t, account) for t in sorted(rows, key=lambda t: t.hub_group)]

    return await in_db(portal, load)


@router.get("/api/v1/teams/{team}")
async def get_team(team: TeamName, caller: CurrentUser, portal: PortalDep) -> Any:
    def load(session: Session) -> dict[str, Any]:
        row, account = _visible_team(session, caller, team)
        return team_view(session, row, account)

    return await in_db(portal, load)


def can_pay(session: Session, team: Team) -> tuple[bool, str]:
    """Whether the team can pay for a launch now, and why not: credit in its wallet and
    GPU-hours left in its budget. (The reservation checks the launch itself.)"""
    if ledger.balance_by_key(session, f"team:{team.id}") <= 0:
        return False, "no credit left"
    quota = metering.quota_for(session, team_id=team.id)
    if quota is not None and quota.gpu_seconds is not None:
        now = timeutil.utcnow()
        since = now - timedelta(seconds=quotas.QUOTA_WINDOWS[quota.rolling_window])
        used = metering.gpu_seconds_used(
            metering.quota_allocations(session, quota, since), since, now
        )
        if used >= quota.gpu_seconds:
            return False, "its GPU-hour budget is used up"
    return True, ""


@router.get("/api/v1/billing-teams")
async def billing_teams(
    caller: CurrentCaller,
    portal: PortalDep,
    user: Annotated[str | None, Query(max_length=255)] = None,
) -> Any:
    """The teams a user may bill a server to, for the spawn form's **Bill to**: each
    with its default GPU profile and whether it can pay now (``why`` not, if not).
    Yourself by default; the spawner asks for the user it spawns for."""
    name = user or caller.name
    check_owner(caller, name, "You can only see the teams you may bill to yourself.")

    def load(session: Session) -> list[dict[str, Any]]:
        account = session.scalar(select(Account).where(Account.hub_name == name))
        if account is None:
            return []
        rows = []
        for group in accounts.teams_of(session, account):
            team = accounts.team_named(session, group)
            if team is None:  # pragma: no cover (teams_of lists existing teams)
                continue
            ok, why = can_pay(session, team)
            rows.append(
                {"name": group, "default_profile": team.default_profile, "can_pay": ok, "why": why}
            )
        return rows

    return await in_db(portal, load)


# --- changing ------------------------------------------------------------------------


def _note(
    session: Session, caller: PortalUser, action: str, team: str, reason: str, **detail: Any
) -> None:
    audit.record(
        session,
        actor=caller.name,
        action=action,
        target_kind="team",
        target=team,
        reason=reason,
        detail=detail,
    )
    log.info("%s: %s %s %s", caller.name, action, team, detail)


@router.post("/api/v1/teams", status_code=201)
async def create_team(body: TeamCreate, caller: CurrentUser, portal: PortalDep) -> Any:
    """Create a team (portal admins): its hub group first, then the portal's team."""
    if not caller.admin or caller.read_only:
        raise ApiError(403, "Only portal admins may create teams; ask an admin.")
    try:
        accounts.check_team_name(body.name)
    except accounts.TeamError as exc:
        raise ApiError(422, str(exc)[:1].upper() + str(exc)[1:]) from None
    try:
        await portal.hub.create_group(body.name)
    except HubUnavailable:
        raise ApiError(503, HUB_DOWN) from None

    def write(session: Session) -> dict[str, Any]:
        team = accounts.create_team(session, body.name, body.default_profile)
        _note(session, caller, "team.create", team.hub_group, body.reason)
        return team_view(session, team, _account(session, caller))

    return await in_db(portal, write)


@router.post("/api/v1/teams/{team}/members", status_code=201)
async def add_member(
    team: TeamName, body: MemberAdd, caller: CurrentUser, portal: PortalDep
) -> Any:
    """Add a hub user to the team (team admins): the hub group, then the portal."""
    await in_db(portal, lambda s: _managed_team(s, caller, team))
    await account_from_hub(portal, body.user, missing=422, hub_down=HUB_DOWN)
    try:
        await portal.hub.add_group_users(team, [body.user])
    except HubUnavailable:
        raise ApiError(503, HUB_DOWN) from None

    def write(session: Session) -> dict[str, Any]:
        row, account = _managed_team(session, caller, team)
        user = session.scalars(select(Account).where(Account.hub_name == body.user)).one()
        accounts.add_member(session, row, user, body.role)
        _note(session, caller, "team.member.add", team, body.reason, user=body.user, role=body.role)
        return team_view(session, row, account)

    return await in_db(portal, write)


@router.delete("/api/v1/teams/{team}/members/{user}")
async def remove_member(
    team: TeamName, user: UserName, caller: CurrentUser, portal: PortalDep
) -> Any:
    """Remove a member (team admins; a member may also leave): the hub group, then the
    portal; the shares between them and the team's members are revoked."""

    def check(session: Session) -> list[str]:
        row, _account = _visible_team(session, caller, team)
        if user != caller.name or caller.read_only:
            _managed_team(session, caller, team)
        return [m.account.hub_name for m in row.memberships if m.account.hub_name != user]

    others = await in_db(portal, check)
    try:
        await portal.hub.remove_group_users(team, [user])
    except HubUnavailable:
        raise ApiError(503, HUB_DOWN) from None

    def write(session: Session) -> dict[str, Any]:
        row = accounts.team_named(session, team)
        gone = session.scalar(select(Account).where(Account.hub_name == user))
        removed = bool(row and gone and accounts.remove_member(session, row, gone))
        _note(session, caller, "team.member.remove", team, "", user=user, was_member=removed)
        return {"team": team, "user": user, "removed": removed}

    answer = await in_db(portal, write)
    answer["revoked"] = await revoke_team_shares(portal, user, others)
    return answer


@router.put("/api/v1/teams/{team}/members/{user}/role")
async def set_role(
    team: TeamName, user: UserName, body: RoleSet, caller: CurrentUser, portal: PortalDep
) -> Any:
    """Make a member a team admin or a plain member (team admins)."""

    def write(session: Session) -> dict[str, Any]:
        row, account = _managed_team(session, caller, team)
        target = session.scalar(select(Account).where(Account.hub_name == user))
        if target is None or accounts.membership(session, row, target) is None:
            raise ApiError(
                422, f"{user[:64]} is not a member of team {team!r}; add them to the team first."
            )
        accounts.set_team_role(session, row, target, body.role)
        _note(session, caller, "team.role", team, body.reason, user=user, role=body.role)
        return team_view(session, row, account)

    return await in_db(portal, write)


@router.put("/api/v1/teams/{team}/budget")
async def set_budget(
    team: TeamName, body: BudgetSet, caller: CurrentUser, portal: PortalDep
) -> Any:
    """Set the team's budget (team admins): GPU-hours per window and a spend cap per
    hour, for the servers the team pays for. ``null`` removes a limit."""

    def write(session: Session) -> dict[str, Any]:
        row, account = _managed_team(session, caller, team)
        quotas.set_quota(
            session,
            user=None,
            team=row.hub_group,
            window=body.window,
            gpu_hours=body.gpu_hours,
            spend_cap_per_hour=body.spend_cap_per_hour,
        )
        _note(
            session,
            caller,
            "team.budget",
            team,
            body.reason,
            window=body.window,
            gpu_hours=body.gpu_hours,
            spend_cap_per_hour=body.spend_cap_per_hour,
        )
        return team_view(session, row, account)

    return await in_db(portal, write)


@router.put("/api/v1/teams/{team}/default-profile")
async def set_default_profile(
    team: TeamName, body: ProfileSet, caller: CurrentUser, portal: PortalDep
) -> Any:
    """Set the GPU profile (a spawn-form profile slug) the team's members start with."""

    def write(session: Session) -> dict[str, Any]:
        row, account = _managed_team(session, caller, team)
        row.default_profile = body.default_profile
        session.flush()
        _note(session, caller, "team.profile", team, body.reason, profile=body.default_profile)
        return team_view(session, row, account)

    return await in_db(portal, write)


# --- sharing a running server with a teammate ------------------------------------------


def _teammates(portal: Portal, caller: PortalUser) -> Any:
    def load(session: Session) -> list[str]:
        return accounts.teammates(session, _account(session, caller))

    return in_db(portal, load)


@router.get("/api/v1/shares")
async def list_shares(caller: CurrentUser, portal: PortalDep) -> Any:
    """Your teammates (whom you may share with) and your servers' shares."""
    mates = await _teammates(portal, caller)
    try:
        shares = await portal.hub.shares_of(caller.name)
    except HubUnavailable:
        raise ApiError(503, "The hub is not answering; try again in a moment.") from None
    return {"teammates": mates, "shares": shares}


async def _share_change(body: ShareChange, caller: PortalUser, portal: Portal, grant: bool) -> Any:
    if caller.read_only:
        raise ApiError(403, "A read-only token cannot share servers.")
    if body.user == caller.name:
        raise ApiError(422, "You already have access to your own server.")
    if grant and body.user not in await _teammates(portal, caller):
        raise ApiError(
            403,
            f"You can share a server only with a teammate, and {body.user[:64]} is not in "
            "any of your teams.",
        )
    try:
        if grant:
            await portal.hub.share_server(caller.name, body.server, body.user)
        else:
            await portal.hub.revoke_share(caller.name, body.server, body.user)
    except HubUnavailable as exc:
        if "404" in str(exc):
            raise ApiError(404, f"You have no server named {body.server[:64]!r}.") from None
        raise ApiError(503, HUB_DOWN) from None
    action = "share.grant" if grant else "share.revoke"
    await in_db(
        portal,
        lambda s: audit.record(
            s,
            actor=caller.name,
            action=action,
            target_kind="server",
            target=f"{caller.name}/{body.server}",
            detail={"user": body.user},
        ),
    )
    return {"owner": caller.name, "server": body.server, "user": body.user, "shared": grant}


@router.post("/api/v1/shares", status_code=201)
async def share(body: ShareChange, caller: CurrentUser, portal: PortalDep) -> Any:
    """Share your running server with a teammate (a JupyterHub 5 share)."""
    return await _share_change(body, caller, portal, grant=True)


@router.post("/api/v1/shares/revoke")
async def unshare(body: ShareChange, caller: CurrentUser, portal: PortalDep) -> Any:
    """Take a teammate's access to your server away."""
    return await _share_change(body, caller, portal, grant=False)
