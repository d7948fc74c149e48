"""Revoking server shares that a team membership gave, when the membership ends.

Used by the team API (a member removed through the portal) and by the hub sync
(a member removed from the hub group directly), so a share never outlives the
team that allowed it.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ..billing import ledger
from ..db import accounts
from ..db.models import Account
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
