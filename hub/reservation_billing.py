"""Where the marketplace meets the ledger: reservations drive allocations.

The control plane is the billing authority, so the spawner never opens or
closes a bill itself. A reservation is **authorized** when it is made (the
user must afford the minimum billable period at the locked price, and stay
within quotas), **activating** it (the server is ready) opens its allocation
at the reservation's locked price and fee, and **releasing** it (stop, failed
start, dead node) closes the allocation at that moment. Each step runs in the
same database transaction as the reservation change, so a reservation and
its bill never disagree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import allocations, credits, quotas
from .ledger_models import OPEN_STATES, Allocation
from .marketplace_models import Node, Reservation
from .settings import Settings


def provider_name(session: Session, res: Reservation) -> str | None:
    """The hub name of the provider whose node holds the reservation."""
    node = session.get(Node, res.node_id)
    if node is None:
        return None
    return node.cluster.provider.account.hub_name


def authorize(session: Session, settings: Settings, res: Reservation, now: datetime) -> None:
    """Raise a ledger error (402/403 with a sentence) unless the user can pay for it."""
    if res.gpu_count <= 0 or res.price_per_gpu_hour <= 0:
        return
    credits.welcome(session, settings.signup_credits, res.account_id)
    quotas.authorize(
        session,
        settings,
        user=res.user_name,
        gpu_count=res.gpu_count,
        price_per_gpu_hour=res.price_per_gpu_hour,
        team=None,
        now=now,
    )


def open_for(session: Session, settings: Settings, res: Reservation, now: datetime) -> Allocation:
    """Open (idempotently) the allocation that bills an active reservation from ``now``."""
    alloc, _created = allocations.open_allocation(
        session,
        settings,
        allocations.OpenRequest(
            user=res.user_name,
            server=res.server_name,
            gpu_count=res.gpu_count,
            price_per_gpu_hour=res.price_per_gpu_hour,
            platform_fee_bps=res.platform_fee_bps,
            started_at=now,
            reservation_id=res.id,
            provider=provider_name(session, res),
        ),
        now,
    )
    return alloc


def close_for(
    session: Session, settings: Settings, reservation_id: str, now: datetime
) -> Allocation | None:
    """Close the open allocation of a released reservation at ``now``; None if none."""
    alloc = session.scalar(
        select(Allocation).where(
            Allocation.reservation_id == reservation_id, Allocation.status.in_(OPEN_STATES)
        )
    )
    if alloc is None:
        return None
    return allocations.close_allocation(session, settings, alloc.id, now, now)
