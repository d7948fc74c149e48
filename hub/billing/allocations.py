"""Opening and closing allocations: the spawner's side of metering.

The spawner opens an allocation when a server becomes ready (no charge while
it starts) and closes it at stop, or at the last observed moment of a dead
node. Both calls are idempotent so the spawner can retry them blindly:
opening the same user/server again with the same terms returns the open
allocation; closing twice returns the closed one.

A close whose ``ended_at`` is earlier than what the meter already charged
(a node found dead late) posts a reversing transaction for the difference:
the ledger is append-only, so corrections are new entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..db.ledger_models import OPEN_STATES, Allocation
from ..db.models import Account, Team, TeamMembership
from ..settings import Settings
from . import ledger, metering
from .ledger import LedgerError, UnknownAccount

#: How far in the future a client's clock may be before its timestamps are refused.
CLOCK_SKEW = timedelta(seconds=5)


class Forbidden(LedgerError):
    status = 403


@dataclass(frozen=True)
class OpenRequest:
    """What the spawner knows when a server is ready; prices are locked from here on."""

    user: str
    server: str
    gpu_count: int
    price_per_gpu_hour: int
    platform_fee_bps: int
    started_at: datetime
    reservation_id: str | None = None
    provider: str | None = None
    team: str | None = None


def account_named(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.hub_name == name))
    if account is None:
        raise UnknownAccount(
            f"there is no portal account named {name!r}; the user must log in to the hub "
            "once (or wait for the next hub sync)."
        )
    return account


def team_named(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.hub_group == name, Team.active))
    if team is None:
        raise UnknownAccount(f"there is no team named {name!r} (teams are hub groups).")
    return team


def is_member(session: Session, team: Team, account: Account) -> bool:
    return (
        session.scalar(
            select(TeamMembership.id).where(
                TeamMembership.team_id == team.id, TeamMembership.account_id == account.id
            )
        )
        is not None
    )


def open_allocation(
    session: Session, settings: Settings, req: OpenRequest, now: datetime
) -> tuple[Allocation, bool]:
    """Open (or find the already open) allocation. Returns ``(allocation, created)``."""
    if req.started_at > now + CLOCK_SKEW:
        raise LedgerError(
            "started_at is in the future; send the moment the server became ready, in UTC."
        )
    account = account_named(session, req.user)
    team_id = None
    if req.team:
        team = team_named(session, req.team)
        if not is_member(session, team, account):
            raise Forbidden(
                f"{req.user} is not a member of team {req.team!r}, so the team "
                "cannot pay for this server."
            )
        team_id = team.id
    provider_id = None
    provider_name = req.provider or settings.admin_user  # the house provider is the admin
    provider = session.scalar(select(Account).where(Account.hub_name == provider_name))
    if provider is not None:
        provider_id = provider.id
    elif req.provider:
        raise UnknownAccount(f"there is no provider account named {req.provider!r}.")
    existing = session.scalar(
        select(Allocation).where(
            Allocation.user_name == req.user,
            Allocation.server_name == req.server,
            Allocation.status.in_(OPEN_STATES),
        )
    )
    if existing is not None:
        same = (
            existing.gpu_count,
            existing.price_per_gpu_hour,
            existing.platform_fee_bps,
            existing.reservation_id,
            existing.team_id,
        ) == (
            req.gpu_count,
            req.price_per_gpu_hour,
            req.platform_fee_bps,
            req.reservation_id,
            team_id,
        )
        if not same:
            raise ledger.IdempotencyConflict(
                f"server {req.user}/{req.server} already has an open allocation "
                f"({existing.id}) on other terms; close it first."
            )
        return existing, False
    alloc = Allocation(
        account_id=account.id,
        team_id=team_id,
        provider_account_id=provider_id,
        reservation_id=req.reservation_id,
        user_name=req.user,
        server_name=req.server,
        gpu_count=req.gpu_count,
        price_per_gpu_hour=req.price_per_gpu_hour,
        platform_fee_bps=req.platform_fee_bps,
        status="running",
        started_at=req.started_at,
        last_charged_at=req.started_at,
    )
    session.add(alloc)
    session.flush()
    return alloc, True


def get_allocation(session: Session, allocation_id: int) -> Allocation:
    alloc = session.get(Allocation, allocation_id)
    if alloc is None:
        raise UnknownAccount(f"there is no allocation {allocation_id}.")
    return alloc


def close_allocation(
    session: Session,
    settings: Settings,
    allocation_id: int,
    ended_at: datetime | None,
    now: datetime,
) -> Allocation:
    """End an allocation at ``ended_at`` (default now) and charge exactly up to it."""
    alloc = get_allocation(session, allocation_id)
    if alloc.status in ("closed", "stop_due"):
        # Already ended (by an earlier close, or by the meter at the end of the
        # grace period): the first end stands.
        alloc.status = "closed"
        metering.release_reservation(session, alloc.reservation_id)
        session.flush()
        return alloc
    end = now if ended_at is None else ended_at
    if end > now + CLOCK_SKEW:
        raise LedgerError(
            "ended_at is in the future; send the last moment the server was seen running, in UTC."
        )
    end = min(end, now)
    if end < alloc.started_at:
        raise LedgerError("ended_at is before the server became ready; send a later moment.")
    if alloc.status == "stopping" and alloc.stopping_at is not None:
        end = min(end, alloc.stopping_at)
    if end < alloc.last_charged_at:
        _reverse(session, alloc, end)
    alloc.ended_at, alloc.status = end, "closed"
    # A closed bill holds no GPUs: its reservation (if any) is released with it.
    metering.release_reservation(session, alloc.reservation_id)
    session.flush()
    interval = timedelta(seconds=settings.meter_interval_seconds)
    metering.charge_allocations(session, [alloc.id], now, interval, metering.TickResult())
    return alloc


def _reverse(session: Session, alloc: Allocation, end: datetime) -> None:
    """Give back what was charged for ``[end, last_charged_at)``."""
    part = metering.split(alloc, end, alloc.last_charged_at)
    payer = metering.payer_ledger_account(session, alloc)
    earnings = ledger.provider_earnings(session, alloc.provider_account_id).id
    platform = ledger.platform_revenue(session).id
    ledger.post(
        session,
        f"usage-reversal:{alloc.id}:{(end - metering.EPOCH) // metering.US}",
        "usage_reversal",
        [
            ledger.Leg(payer, part.charge),
            ledger.Leg(earnings, -part.provider),
            ledger.Leg(platform, -part.fee),
        ],
        allocation_id=alloc.id,
        period_start=end,
        period_end=alloc.last_charged_at,
        memo=f"{alloc.user_name}/{alloc.server_name}: ended earlier than charged",
        created_by="meter",
    )
    alloc.last_charged_at = end


def mark_stopped(session: Session, allocation_ids: list[int]) -> None:
    """The hub confirmed these stops: ``stop_due`` → ``closed``."""
    for alloc in session.scalars(select(Allocation).where(Allocation.id.in_(allocation_ids))):
        if alloc.status == "stop_due":
            alloc.status = "closed"
    session.flush()
