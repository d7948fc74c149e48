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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..db.ledger_models import OPEN_STATES, Allocation
from ..db.marketplace_models import LIVE_STATUSES, Node, Reservation
from ..db.models import Account, Team
from ..market import marketplace
from ..settings import Settings
from . import allocations, credits, quotas
from .ledger import IdempotencyConflict, UnknownAccount


def provider_name(session: Session, res: Reservation) -> str | None:
    """The hub name of the provider whose node holds the reservation."""
    node = session.get(Node, res.node_id)
    if node is None:
        return None
    return node.cluster.provider.account.hub_name


def authorize_reservation(
    session: Session, settings: Settings, res: Reservation, now: datetime
) -> None:
    """Raise a ledger error (402/403 with a sentence) unless the user can pay for it.

    The user's other live reservations count as if they ran (see
    :mod:`.quotas`), and at most ``max_live_reservations`` may be live at once.
    The account row is locked first, so two reservations of one user are
    authorized one after the other and each sees the other.
    """
    session.get(Account, res.account_id, with_for_update=True)
    live = session.scalar(
        select(func.count(Reservation.id)).where(
            Reservation.account_id == res.account_id,
            Reservation.status.in_(LIVE_STATUSES),
            Reservation.id != res.id,
        )
    )
    limit = settings.max_live_reservations
    if int(live or 0) >= limit:
        raise quotas.QuotaExceeded(
            f"{res.user_name} already holds {live} reservation(s), the most one user may hold "
            f"at once ({limit}); stop a server (or release a reservation) first."
        )
    if res.gpu_count <= 0 or res.price_per_gpu_hour <= 0:
        return
    credits.welcome(session, settings, res.account_id)
    quotas.authorize_launch(
        session,
        settings,
        user=res.user_name,
        gpu_count=res.gpu_count,
        price_per_gpu_hour=res.price_per_gpu_hour,
        team=team_of(session, res),
        now=now,
        reservation_id=res.id,
    )


def team_of(session: Session, res: Reservation) -> str | None:
    """The name of the team that pays for the reservation; None when the user pays."""
    if res.team_id is None:
        return None
    team = session.get(Team, res.team_id)
    return None if team is None else team.hub_group


def bill_to_team(session: Session, res: Reservation, team: str | None) -> None:
    """Make ``team`` the payer of a new reservation, if its user is a member.

    Called before :func:`authorize_reservation`, in the same transaction: a
    crafted ``team`` of a team the user is not in is refused (403) and the
    reservation is released by the caller.
    """
    if not team:
        return
    row = allocations.team_named(session, team)
    account = session.get(Account, res.account_id)
    if account is None or not allocations.is_member(session, row, account):
        raise allocations.Forbidden(
            f"Team {team!r} cannot pay for this server: {res.user_name} is not a member of "
            "it. Bill it to your own wallet, or ask a team admin to add you."
        )
    res.team_id = row.id
    session.flush()


def _terms(
    session: Session, res: Reservation, now: datetime, team: str | None = None
) -> allocations.OpenRequest:
    """A bill on the reservation's own terms (price, fee, GPUs, payee), from ``now``."""
    return allocations.OpenRequest(
        user=res.user_name,
        server=res.server_name,
        gpu_count=res.gpu_count,
        price_per_gpu_hour=res.price_per_gpu_hour,
        platform_fee_bps=res.platform_fee_bps,
        started_at=now,
        reservation_id=res.id,
        provider=provider_name(session, res),
        team=team if team is not None else team_of(session, res),
    )


def open_for(session: Session, settings: Settings, res: Reservation, now: datetime) -> Allocation:
    """Open (idempotently) the allocation that bills an active reservation from ``now``."""
    alloc, _created = allocations.open_allocation(session, settings, _terms(session, res, now), now)
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


def open_for_reservation(
    session: Session, settings: Settings, reservation_id: str, team: str | None, now: datetime
) -> tuple[Allocation, bool]:
    """Open the bill of a live reservation on the reservation's own terms.

    The price, fee, GPU count, user, server and provider (the payee) all come
    from the reservation, and the bill starts now: a caller (even one holding a
    stolen trusted-service token) can only start billing a server the
    marketplace placed, never choose what it costs, when it started or who is
    paid. A held reservation is activated first, as the activate route does.
    """
    res = session.get(Reservation, reservation_id)
    if res is None:
        raise UnknownAccount(f"there is no reservation {reservation_id!r}.")
    if res.status not in LIVE_STATUSES:
        raise IdempotencyConflict(
            f"reservation {reservation_id} was {res.status}; an allocation needs a live "
            "(held or active) reservation."
        )
    if res.status == "held":
        try:
            marketplace.activate(session, reservation_id)
        except marketplace.MarketError as exc:
            raise IdempotencyConflict(exc.message) from None
    return allocations.open_allocation(
        session,
        settings,
        _terms(session, res, now, team),
        now,
    )
