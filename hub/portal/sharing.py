"""Revoking server shares that a team membership gave, when the membership ends.

Used by the team API (a member removed through the portal) and by the hub sync
(a member removed from the hub group directly), so a share never outlives the
team that allowed it. The sync also reconciles (:func:`reconcile_shares`): a
revocation the hub missed (it was down when the member left) happens at the next
sync.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ..billing import ledger
from ..db import accounts
from ..db.audit_models import AuditRecord
from ..db.models import Account, Team, TeamMembership
from .context import Portal
from .hubapi import HubUnavailable

log = logging.getLogger(__name__)


async def revoke_team_shares(portal: Portal, user: str, former: list[str]) -> int:
    """Revoke the shares between ``user`` and ``former`` teammates who no longer share
    a team with them (both ways). Returns how many were revoked; a hub that does not
    answer is logged as a warning (the share then stays until revoked in the hub)."""

    def still(session: Session) -> set[str]:
        account = session.scalar(select(Account).where(Account.hub_name == user))
        return set() if account is None else set(accounts.teammates(session, account))

    gone = set(former) - await run_in_threadpool(ledger.with_retry, portal.sessions, still)
    revoked = 0
    try:
        for item in await portal.hub.shared_with(user):
            if item["owner"] in gone:
                await portal.hub.revoke_share(item["owner"], item["server"], user)
                revoked += 1
        for item in await portal.hub.shares_of(user):
            if item["user"] in gone:
                await portal.hub.revoke_share(user, item["server"], item["user"])
                revoked += 1
    except HubUnavailable as exc:
        log.warning("could not revoke the team shares of %s yet: %s", user, exc)
    return revoked


#: How many owners' shares the reconciliation asks the hub for at once.
RECONCILE_CONCURRENCY = 8


def _share_state(session: Session) -> tuple[list[str], dict[str, set[int]]]:
    """Who ever shared a server through the portal (the owners to check), and each
    member's active teams."""
    owners = session.scalars(
        select(AuditRecord.actor).where(AuditRecord.action == "share.grant").distinct()
    )
    teams: dict[str, set[int]] = {}
    rows = session.execute(
        select(Account.hub_name, TeamMembership.team_id)
        .join(TeamMembership, TeamMembership.account_id == Account.id)
        .join(Team, Team.id == TeamMembership.team_id)
        .where(Team.active)
    )
    for name, team_id in rows:
        teams.setdefault(name, set()).add(team_id)
    return sorted(owners), teams


async def reconcile_shares(portal: Portal) -> int:
    """Revoke every share (made through the portal) whose recipient no longer shares a
    team with the server's owner. Returns how many were revoked; an owner whose shares
    the hub does not answer for is logged and checked again at the next sync."""
    owners, teams = await run_in_threadpool(ledger.with_retry, portal.sessions, _share_state)
    gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)

    async def one(owner: str) -> int:
        revoked = 0
        async with gate:
            for item in await portal.hub.shares_of(owner):
                if teams.get(owner, set()) & teams.get(item["user"], set()):
                    continue
                await portal.hub.revoke_share(owner, item["server"], item["user"])
                log.info("revoked the share of %s/%s with %s", owner, item["server"], item["user"])
                revoked += 1
        return revoked

    results = await asyncio.gather(*(one(o) for o in owners), return_exceptions=True)
    for owner, result in zip(owners, results, strict=True):
        if isinstance(result, HubUnavailable):
            log.warning("could not reconcile the shares of %s yet: %s", owner, result)
        elif isinstance(result, BaseException):
            raise result
    return sum(r for r in results if isinstance(r, int))
