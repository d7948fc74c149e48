"""Portal API v1 for the admin control panel: the audit log, customers and teams,
live allocations (stop, refund) and the pricing in force.

Every route here is for admins only (:data:`Admin`: the admin role, and a token
that may use the portal; a read-only token is refused even for reads). Every
action writes an audit record (:mod:`gpuportal.hub.db.audit`) in the action's
own DB transaction. The other admin actions live with their kind: block,
unblock and delist in ``providers.py``; credit grants, sign-up approval and
quotas in ``billing.py``; they write their audit records the same way.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select

from ... import timeutil
from ...billing import ledger, metering, quotas, refunds
from ...billing.ledger import MAX_AMOUNT
from ...db import audit
from ...db.ledger_models import OPEN_STATES, Allocation
from ...db.models import Account, Team
from ..auth import PortalDep
from ..hubapi import HubUnavailable
from .billing import _public as allocation_view
from .plumbing import Admin, AdminReason, ApiError, in_db

log = logging.getLogger(__name__)
router = APIRouter()


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: StrictInt | None = Field(
        None,
        gt=0,
        le=MAX_AMOUNT,
        description="Micro-credits to give back; default all that the allocation was charged.",
    )
    reason: str = Field(min_length=1, max_length=500)


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target_kind: str
    target: str
    reason: str
    detail: dict[str, Any]


Name = Annotated[str | None, Query(max_length=255)]


@router.get("/api/v1/admin/audit", response_model=list[AuditPublic], tags=["admin"])
async def audit_log(
    _admin: Admin,
    portal: PortalDep,
    actor: Name = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target_kind: Annotated[str | None, Query(max_length=32)] = None,
    target: Name = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_ROWS)] = 200,
) -> Any:
    """The audit log, newest first, filtered by every parameter given (``action``
    ending in a dot, e.g. ``node.``, matches every action of that kind)."""
    return await in_db(
        portal,
        lambda s: audit.search(
            s,
            actor=actor,
            action=action,
            target_kind=target_kind,
            target=target,
            since=since,
            until=until,
            limit=limit,
        ),
    )


@router.get("/api/v1/admin/accounts", tags=["admin"])
async def accounts_overview(_admin: Admin, portal: PortalDep) -> Any:
    """Every customer (and provider, admin) account and every team: balance and quota."""
    now = timeutil.utcnow()

    def load(session: Any) -> dict[str, list[dict[str, Any]]]:
        users = []
        for account in session.scalars(select(Account).order_by(Account.hub_name).limit(2000)):
            quota = metering.quota_for(session, account_id=account.id)
            users.append(
                {
                    "name": account.hub_name,
                    "role": account.role,
                    "active": account.active,
                    "balance": ledger.balance_by_key(session, f"wallet:{account.id}"),
                    "quota": None if quota is None else quotas.quota_view(session, quota, now),
                }
            )
        teams = []
        for team in session.scalars(select(Team).order_by(Team.hub_group).limit(2000)):
            quota = metering.quota_for(session, team_id=team.id)
            teams.append(
                {
                    "name": team.hub_group,
                    "active": team.active,
                    "members": sorted(m.account.hub_name for m in team.memberships),
                    "balance": ledger.balance_by_key(session, f"team:{team.id}"),
                    "quota": None if quota is None else quotas.quota_view(session, quota, now),
                }
            )
        return {"users": users, "teams": teams}

    return await in_db(portal, load)


def _admin_allocation(session: Any, alloc: Allocation) -> dict[str, Any]:
    view = allocation_view(session, alloc)
    paid = refunds.charged(session, alloc.id)
    view.update(charged=paid.charged, refunded=paid.refunded)
    return view


@router.get("/api/v1/admin/allocations", tags=["admin"])
async def all_allocations(
    _admin: Admin, portal: PortalDep, user: Name = None, open_only: bool = True
) -> Any:
    """Allocations of everyone (or of ``user``), newest first: what each was charged and
    what was refunded."""

    def load(session: Any) -> list[dict[str, Any]]:
        query = select(Allocation)
        if user:
            query = query.where(Allocation.user_name == user)
        if open_only:
            query = query.where(Allocation.status.in_(OPEN_STATES))
        rows = session.scalars(query.order_by(Allocation.id.desc()).limit(500))
        return [_admin_allocation(session, a) for a in rows]

    return await in_db(portal, load)


@router.post("/api/v1/admin/allocations/{allocation_id}/refund", tags=["admin"])
async def refund_allocation(
    allocation_id: int, body: RefundCreate, admin: Admin, portal: PortalDep
) -> Any:
    """Give back (part of) what one allocation was charged, once, with a reason."""

    def work(session: Any) -> dict[str, Any]:
        txn = refunds.refund(session, allocation_id, body.amount, body.reason, admin.name)
        amount = sum(p.amount for p in txn.postings if p.amount > 0)
        alloc = session.get(Allocation, allocation_id)
        audit.record(
            session,
            actor=admin.name,
            action="allocation.refund",
            target_kind="allocation",
            target=str(allocation_id),
            reason=body.reason,
            detail={
                "amount": amount,
                "user": alloc.user_name,
                "server": alloc.server_name,
                "transaction": txn.id,
            },
        )
        log.warning("admin %s: refunded allocation %s: %s", admin.name, allocation_id, amount)
        return {"transaction": txn.id, "amount": amount, **_admin_allocation(session, alloc)}

    return await in_db(portal, work)


@router.post("/api/v1/admin/allocations/{allocation_id}/stop", tags=["admin"])
async def stop_allocation(
    allocation_id: int, admin: Admin, portal: PortalDep, body: AdminReason | None = None
) -> Any:
    """Stop the server of a live allocation through the hub (the spawner then closes
    its bill at the moment it stopped)."""
    reason = body.reason if body else ""

    def find(session: Any) -> tuple[str, str, str]:
        alloc = session.get(Allocation, allocation_id)
        if alloc is None:
            raise ApiError(404, f"There is no allocation {allocation_id}.")
        return alloc.user_name, alloc.server_name, alloc.status

    user, server, status = await in_db(portal, find)
    if status not in OPEN_STATES:
        raise ApiError(409, f"Allocation {allocation_id} is not running (it is {status}).")
    try:
        await portal.hub.stop_server(user, server)
    except HubUnavailable:
        raise ApiError(503, "The hub is not answering; nothing was stopped. Try again.") from None

    def note(session: Any) -> dict[str, Any]:
        audit.record(
            session,
            actor=admin.name,
            action="allocation.stop",
            target_kind="allocation",
            target=str(allocation_id),
            reason=reason,
            detail={"user": user, "server": server},
        )
        return {"allocation": allocation_id, "user": user, "server": server, "stopping": True}

    log.warning("admin %s: stopped %s/%s (allocation %s)", admin.name, user, server, allocation_id)
    return await in_db(portal, note)


@router.get("/api/v1/admin/pricing", tags=["admin"])
async def pricing(_admin: Admin, portal: PortalDep) -> Any:
    """The price bounds and the platform fee in force. They are settings, read at start:
    change them in the portal's environment and restart it (this is read-only)."""
    s = portal.settings
    return {
        "min_price": s.min_price,
        "max_price": s.max_price,
        "house_price": s.house_price,
        "platform_fee_bps": s.platform_fee_bps,
        "currency": s.currency_name,
        "how_to_change": "Set GPUPORTAL_MIN_PRICE, GPUPORTAL_MAX_PRICE, GPUPORTAL_HOUSE_PRICE "
        "or GPUPORTAL_PLATFORM_FEE_BPS and restart the portal; running servers keep the "
        "price and fee they locked.",
    }
