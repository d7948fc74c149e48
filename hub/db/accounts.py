"""Accounts (hub users) and teams (hub groups), kept in step with the hub.

The hub owns identity; the portal keeps one account per hub user and one team
per hub group so that money, quotas and templates can refer to them with
foreign keys. Accounts and teams are never deleted, only deactivated, because
ledger rows will point at them.

The three role groups (``customers``, ``providers``, ``admins``) set an
account's role; they are not teams.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import TEAM_ROLES, Account, Team, TeamMembership

ROLE_GROUPS = {"customers": "customer", "providers": "provider", "admins": "admin"}


def role_for(user: dict[str, Any]) -> str:
    """admin > provider > customer, from the hub's admin flag and role groups."""
    groups = set(user.get("groups") or ())
    if user.get("admin") or "admins" in groups:
        return "admin"
    if "providers" in groups:
        return "provider"
    return "customer"


def upsert_account(session: Session, user: dict[str, Any]) -> Account:
    """Create or update the account for one hub user model (name, admin, groups)."""
    account = session.scalar(select(Account).where(Account.hub_name == user["name"]))
    role = role_for(user)
    if account is None:
        account = Account(hub_name=user["name"], role=role, active=True)
        session.add(account)
    elif account.role != role or not account.active:
        account.role, account.active = role, True
    session.flush()
    return account


def sync(
    session: Session,
    users: Iterable[dict[str, Any]],
    groups: Iterable[dict[str, Any]],
    left: list[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Make accounts, teams and memberships mirror the hub. Returns counts of changes.

    ``left``: if given, gets ``(team, user)`` for every membership the hub ended
    (so the caller can revoke what the membership gave, such as server shares).
    """
    users = list(users)
    counts = {"accounts": 0, "teams": 0, "deactivated": 0}
    seen_users = set()
    by_name: dict[str, Account] = {}
    for user in users:
        before = session.scalar(select(Account.id).where(Account.hub_name == user["name"]))
        account = upsert_account(session, user)
        counts["accounts"] += before is None
        seen_users.add(user["name"])
        by_name[user["name"]] = account
    for account in session.scalars(select(Account).where(Account.active)):
        if account.hub_name not in seen_users:
            account.active = False
            counts["deactivated"] += 1

    seen_groups = set()
    for group in groups:
        name = group["name"]
        if name in ROLE_GROUPS:
            continue
        seen_groups.add(name)
        team = session.scalar(select(Team).where(Team.hub_group == name))
        if team is None:
            team = Team(hub_group=name, active=True)
            session.add(team)
            session.flush()
            counts["teams"] += 1
        team.active = True
        wanted = {by_name[u].id for u in group.get("users") or () if u in by_name}
        current = {m.account_id: m for m in team.memberships}
        for account_id in wanted - current.keys():
            session.add(TeamMembership(team_id=team.id, account_id=account_id))
        for account_id in current.keys() - wanted:
            if left is not None:
                left.append((name, current[account_id].account.hub_name))
            session.delete(current[account_id])
    for team in session.scalars(select(Team).where(Team.active)):
        if team.hub_group not in seen_groups:
            team.active = False
            counts["deactivated"] += 1
    session.flush()
    return counts


def teams_of(session: Session, account: Account) -> list[str]:
    rows = session.scalars(
        select(Team.hub_group)
        .join(TeamMembership, TeamMembership.team_id == Team.id)
        .where(TeamMembership.account_id == account.id, Team.active)
        .order_by(Team.hub_group)
    )
    return list(rows)


def membership(session: Session, team: Team, account: Account) -> TeamMembership | None:
    """The account's membership of the team, or None (an inactive team has no members)."""
    if not team.active:
        return None
    return session.scalar(
        select(TeamMembership).where(
            TeamMembership.team_id == team.id, TeamMembership.account_id == account.id
        )
    )


def is_team_admin(session: Session, team: Team, account: Account) -> bool:
    """Whether the account manages this team (its membership and templates).

    A portal admin manages every team; otherwise the account must be a member
    of the (active) team with the ``admin`` team role.
    """
    if account.role == "admin" and account.active:
        return team.active
    found = membership(session, team, account)
    return found is not None and found.role == "admin"


def set_team_role(session: Session, team: Team, account: Account, role: str) -> TeamMembership:
    """Make a member a team admin (``admin``) or a plain member (``member``).

    The hub group decides who is a member: only a member can hold a team role,
    so an outsider must be added to the hub group first (LookupError otherwise).
    """
    if role not in TEAM_ROLES:
        raise ValueError(f"a team role is one of {', '.join(TEAM_ROLES)}, not {role!r}.")
    found = membership(session, team, account)
    if found is None:
        raise LookupError(f"{account.hub_name} is not a member of team {team.hub_group!r}.")
    found.role = role
    session.flush()
    return found


def teams_managed_by(session: Session, account: Account) -> list[str]:
    """The active teams this account is a team admin of (every team for a portal admin)."""
    query = select(Team.hub_group).where(Team.active).order_by(Team.hub_group)
    if not (account.role == "admin" and account.active):
        query = query.join(TeamMembership, TeamMembership.team_id == Team.id).where(
            TeamMembership.account_id == account.id, TeamMembership.role == "admin"
        )
    return list(session.scalars(query))


#: A team name is a hub group name: letters, digits and ``-_.``, starting with a letter
#: or digit (the hub accepts more; the portal keeps names that are safe in a URL path).
TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TeamError(ValueError):
    """A team change that cannot be made; the message is a sentence for the user."""


def check_team_name(name: str) -> str:
    if name in ROLE_GROUPS:
        raise TeamError(f"{name!r} is a role group (it sets accounts' roles), not a team.")
    if not TEAM_NAME.match(name):
        raise TeamError(
            f"{name[:64]!r} is not a team name: use 1 to 64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit."
        )
    return name


def team_named(session: Session, name: str, *, active_only: bool = True) -> Team | None:
    query = select(Team).where(Team.hub_group == name)
    if active_only:
        query = query.where(Team.active)
    return session.scalar(query)


def create_team(session: Session, name: str, default_profile: str | None = None) -> Team:
    """Create the team (or reactivate the one of that name); its hub group is made by
    the caller. Idempotent."""
    check_team_name(name)
    team = team_named(session, name, active_only=False)
    if team is None:
        team = Team(hub_group=name, active=True, default_profile=default_profile)
        session.add(team)
    else:
        team.active = True
        if default_profile is not None:
            team.default_profile = default_profile
    session.flush()
    return team


def add_member(
    session: Session, team: Team, account: Account, role: str = "member"
) -> TeamMembership:
    """Make ``account`` a member of ``team`` (idempotent; the role is set either way)."""
    if role not in TEAM_ROLES:
        raise TeamError(f"a team role is one of {', '.join(TEAM_ROLES)}, not {role!r}.")
    found = membership(session, team, account)
    if found is None:
        found = TeamMembership(team_id=team.id, account_id=account.id, role=role)
        session.add(found)
    else:
        found.role = role
    session.flush()
    return found


def remove_member(session: Session, team: Team, account: Account) -> bool:
    """End ``account``'s membership of ``team``; False when it was not a member."""
    found = membership(session, team, account)
    if found is None:
        return False
    session.delete(found)
    session.flush()
    return True


def teammates(session: Session, account: Account) -> list[str]:
    """Everyone who shares an active team with ``account`` (not ``account`` itself)."""
    mine = select(TeamMembership.team_id).where(TeamMembership.account_id == account.id)
    rows = session.scalars(
        select(Account.hub_name)
        .join(TeamMembership, TeamMembership.account_id == Account.id)
        .join(Team, Team.id == TeamMembership.team_id)
        .where(TeamMembership.team_id.in_(mine), Team.active, Account.id != account.id)
        .distinct()
        .order_by(Account.hub_name)
    )
    return list(rows)
