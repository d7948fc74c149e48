"""Quotas and the spawn-time check: may this account start this server now?

Checked at spawn (``POST /api/v1/authorize``, called by the spawner before it
submits) and again during the session by the meter (see
:func:`gpuportal.hub.billing.metering.check_runway`). A refusal is one sentence that
says why and what to do, because the spawner shows it to the user as is.

Limits, per user and per team (hub group):

* a GPU-hour budget over a rolling window (day, week or month), counted from
  allocation time (a user's quota counts all their servers; a team's quota
  counts the servers the team pays for);
* a spend cap per hour: the summed hourly price of the payer's running
  servers, including the new one, may not exceed it.

Held GPUs count as if they ran: every live (held or active) reservation of the
user that has no open allocation yet is counted at its locked price and GPU
count, next to the running servers. So a user can hold only what they can pay
the minimum billable period for, whether the reservations are made at once or
one after another (issue 9: a user with 0.30 credits held 8 of 8 GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpuportal.provider.money import format_credits

from ..db.ledger_models import OPEN_STATES, QUOTA_WINDOWS, Allocation, Quota
from ..db.marketplace_models import LIVE_STATUSES, Reservation
from ..settings import Settings
from . import ledger, metering
from .allocations import Forbidden, account_named, is_member, team_named
from .ledger import LedgerError

#: Bounds of a quota (docs/billing.md): GPU-hours per window, and micro-credits per hour
#: (the most 1024 GPUs at the highest price can cost).
MAX_QUOTA_GPU_HOURS = 10**7
MAX_SPEND_CAP = ledger.MAX_PRICE * 1024


class PaymentRequired(LedgerError):
    status = 402


class QuotaExceeded(LedgerError):
    status = 403


def minutes(seconds: float) -> str:
    """Durations for people: ``20 s`` (under a minute), ``5 min``, ``1 h 30 min``."""
    if seconds < 60:
        return f"{int(max(seconds, 0))} s"
    total = int(seconds // 60)
    hours, mins = divmod(total, 60)
    if hours:
        return f"{hours} h {mins} min" if mins else f"{hours} h"
    return f"{mins} min"


def hours(gpu_seconds: int) -> str:
    return f"{gpu_seconds / 3600:.2f}".rstrip("0").rstrip(".") + " GPU-h"


def runway_refusal(
    available: int, running_rate: int, new_rate: int, min_seconds: int, currency: str
) -> str | None:
    """Why the payer cannot afford ``min_seconds`` of everything it would run; None if it can.

    A negative ``available`` is a debt and is said so (never shown as 0.00).
    """
    total_rate = running_rate + new_rate
    needed = -(-total_rate * min_seconds // 3600)  # ceil: the whole minimum period
    if available >= needed:
        return None
    running = (
        f" together with your running and held servers "
        f"({format_credits(running_rate, currency)}/hour)"
        if running_rate
        else ""
    )
    if available < 0:
        return (
            f"You owe {format_credits(-available, currency)} (your available balance is "
            f"{format_credits(available, currency)}); a launch of this server at "
            f"{format_credits(new_rate, currency)}/hour{running} needs credit for at "
            f"least {minutes(min_seconds)} ({format_credits(needed, currency)}). Add "
            "credits (a Solana deposit, or ask an admin for a grant) to pay the debt first."
        )
    covers = metering.runway_seconds(available, total_rate) or 0.0
    return (
        f"Your available balance of {format_credits(available, currency)} covers "
        f"{minutes(covers)} of this server at {format_credits(new_rate, currency)}/hour"
        f"{running}; a launch needs credit for at least {minutes(min_seconds)} "
        f"({format_credits(needed, currency)}). Add credits (a Solana deposit, or ask an "
        "admin for a grant), or choose fewer or cheaper GPUs."
    )


def quota_refusal(
    whose: str, quota_seconds: int, window: str, left: int, gpu_count: int, min_seconds: int
) -> str | None:
    """Why a GPU-hour budget cannot take ``gpu_count`` GPUs for the minimum period."""
    needed = gpu_count * min_seconds
    if left >= needed:
        return None
    return (
        f"{whose} GPU-hour budget of {hours(quota_seconds)} per {window} has "
        f"{hours(max(left, 0))} left; this launch needs at least {hours(needed)} "
        f"({gpu_count} GPU for {minutes(min_seconds)}). Wait until older usage leaves the "
        "window, choose fewer GPUs, or ask an admin to raise the quota."
    )


def spend_cap_refusal(
    whose: str, cap: int, running_rate: int, new_rate: int, currency: str
) -> str | None:
    if running_rate + new_rate <= cap:
        return None
    return (
        f"This server costs {format_credits(new_rate, currency)}/hour; with the running "
        f"servers ({format_credits(running_rate, currency)}/hour) that exceeds "
        f"{whose} spend cap of {format_credits(cap, currency)}/hour. Stop a running "
        "server, choose fewer or cheaper GPUs, or ask an admin to raise the cap."
    )


@dataclass
class Authorization:
    """A granted launch: what the payer has and how long it lasts with the new server."""

    user: str
    payer: str
    balance: int
    available: int
    rate_per_hour: int
    runway_seconds: float | None


@dataclass(frozen=True)
class _Budget:
    """A quota a launch must fit (the user's own, or their paying team's), and what
    already weighs on it."""

    #: Whose quota, as a sentence starts ("Your", "Team x's") and inside one ("your").
    whose: str
    whose_inside: str
    quota: Quota | None
    open_allocs: list[Allocation]
    #: Held reservations (GPUs, micro-credits per hour): ready soon, so counted now.
    held_gpus: int
    held_rate: int


def authorize_launch(
    session: Session,
    settings: Settings,
    *,
    user: str,
    gpu_count: int,
    price_per_gpu_hour: int,
    team: str | None,
    now: datetime,
    reservation_id: str | None = None,
) -> Authorization:
    """Grant the launch of a server or raise :class:`PaymentRequired` / :class:`QuotaExceeded`.

    ``reservation_id``: the reservation this launch is (it is already held, so
    it is the new server, not one of the held ones counted next to it).
    """
    account = account_named(session, user)
    if not account.active:
        raise Forbidden(f"the account {user!r} is deactivated.")
    team_row = None
    if team:
        team_row = team_named(session, team)
        if not is_member(session, team_row, account):
            raise Forbidden(
                f"{user} is not a member of team {team!r}, so the team cannot pay for this server."
            )
    payer_clause = (
        (Allocation.team_id == team_row.id)
        if team_row is not None
        else ((Allocation.account_id == account.id) & Allocation.team_id.is_(None))
    )
    running = list(
        session.scalars(select(Allocation).where(payer_clause, Allocation.status.in_(OPEN_STATES)))
    )
    payer_id = (
        ledger.team_budget(session, team_row.id).id
        if team_row is not None
        else ledger.wallet(session, account.id).id
    )
    state = metering.payer_state(session, payer_id, running, now)
    # Held reservations weigh on the user's own quota (all of them: the user holds
    # the GPUs) and on the payer each names: the user's wallet, or the team's budget.
    held = held_reservations(session, account.id, exclude=reservation_id)
    held_rate = sum(r.gpu_count * r.price_per_gpu_hour for r in held)
    held_gpus = sum(r.gpu_count for r in held)
    if team_row is None:
        payer_held = [r for r in held if r.team_id is None]
    else:
        payer_held = held_reservations(session, None, team_id=team_row.id, exclude=reservation_id)
    personal_held_rate = sum(r.gpu_count * r.price_per_gpu_hour for r in payer_held)
    team_held_gpus = sum(r.gpu_count for r in payer_held) if team_row is not None else 0
    new_rate = gpu_count * price_per_gpu_hour
    currency = settings.currency_name
    why = runway_refusal(
        state.available,
        state.rate_per_hour + personal_held_rate,
        new_rate,
        settings.min_billable_seconds,
        currency,
    )
    if why:
        raise PaymentRequired(why)
    budgets = [
        _Budget(
            "Your",
            "your",
            metering.quota_for(session, account_id=account.id),
            list(
                session.scalars(
                    select(Allocation).where(
                        Allocation.account_id == account.id, Allocation.status.in_(OPEN_STATES)
                    )
                )
            ),
            held_gpus,
            held_rate,
        ),
    ]
    if team_row is not None:
        whose = f"Team {team}'s"
        budgets.append(
            _Budget(
                whose,
                whose,
                metering.quota_for(session, team_id=team_row.id),
                running,
                team_held_gpus,
                personal_held_rate,
            )
        )
    for budget in budgets:
        _check_budget(session, settings, budget, gpu_count, new_rate, now)
    total_rate = state.rate_per_hour + personal_held_rate + new_rate
    return Authorization(
        user,
        f"team:{team}" if team else f"user:{user}",
        state.balance,
        state.available,
        total_rate,
        metering.runway_seconds(state.available, total_rate),
    )


def _check_budget(
    session: Session,
    settings: Settings,
    budget: _Budget,
    gpu_count: int,
    new_rate: int,
    now: datetime,
) -> None:
    """Raise :class:`QuotaExceeded` unless the launch fits ``budget``'s GPU-hours and
    spend cap for the minimum billable period."""
    quota = budget.quota
    if quota is None:
        return
    if quota.gpu_seconds is not None:
        left = metering.quota_left(session, quota, now) or 0
        # The running servers keep burning the budget during the minimum period too.
        # So do held GPUs, which start burning it as soon as their servers are ready.
        left -= (
            sum(a.gpu_count for a in budget.open_allocs) + budget.held_gpus
        ) * settings.min_billable_seconds
        why = quota_refusal(
            budget.whose,
            quota.gpu_seconds,
            quota.rolling_window,
            left,
            gpu_count,
            settings.min_billable_seconds,
        )
        if why:
            raise QuotaExceeded(why)
    if quota.spend_cap_per_hour is not None:
        why = spend_cap_refusal(
            budget.whose_inside,
            quota.spend_cap_per_hour,
            sum(metering.hourly_rate(a) for a in budget.open_allocs) + budget.held_rate,
            new_rate,
            settings.currency_name,
        )
        if why:
            raise QuotaExceeded(why)


def held_reservations(
    session: Session,
    account_id: int | None,
    *,
    exclude: str | None = None,
    team_id: int | None = None,
) -> list[Reservation]:
    """Live reservations of an account (or, with ``team_id``, billed to that team, by
    any member) that no open allocation bills yet.

    A held reservation (server starting) and an active one whose allocation is
    not open yet both keep GPUs from everyone else, so both count; one with an
    open allocation is counted through that allocation, never twice.
    """
    billed = select(Allocation.reservation_id).where(
        Allocation.reservation_id.is_not(None), Allocation.status.in_(OPEN_STATES)
    )
    owner = (
        Reservation.team_id == team_id
        if team_id is not None
        else Reservation.account_id == account_id
    )
    query = select(Reservation).where(
        owner,
        Reservation.status.in_(LIVE_STATUSES),
        Reservation.id.not_in(billed),
    )
    if exclude is not None:
        query = query.where(Reservation.id != exclude)
    return list(session.scalars(query.order_by(Reservation.created_at)))


def set_quota(
    session: Session,
    *,
    user: str | None,
    team: str | None,
    window: str,
    gpu_hours: float | None,
    spend_cap_per_hour: int | None,
) -> Quota:
    """Create or replace the quota of one user or one team (admins)."""
    if (user is None) == (team is None):
        raise LedgerError("name exactly one of user or team.")
    if window not in QUOTA_WINDOWS:
        raise LedgerError(f"window must be one of {', '.join(QUOTA_WINDOWS)}.")
    if gpu_hours is not None and not 0 <= gpu_hours <= MAX_QUOTA_GPU_HOURS:
        raise LedgerError(f"gpu_hours must be between 0 and {MAX_QUOTA_GPU_HOURS}.")
    if spend_cap_per_hour is not None and not 0 <= spend_cap_per_hour <= MAX_SPEND_CAP:
        raise LedgerError(f"spend_cap_per_hour must be between 0 and {MAX_SPEND_CAP}.")
    if user is not None:
        owner_id = account_named(session, user).id
        quota = metering.quota_for(session, account_id=owner_id)
        fields = {"account_id": owner_id}
    else:
        owner_id = team_named(session, str(team)).id
        quota = metering.quota_for(session, team_id=owner_id)
        fields = {"team_id": owner_id}
    if quota is None:
        quota = Quota(**fields)
        session.add(quota)
    quota.rolling_window = window
    quota.gpu_seconds = None if gpu_hours is None else round(gpu_hours * 3600)
    quota.spend_cap_per_hour = spend_cap_per_hour
    session.flush()
    return quota


def quota_view(session: Session, quota: Quota, now: datetime) -> dict[str, object]:
    since = now - timedelta(seconds=QUOTA_WINDOWS[quota.rolling_window])
    used = metering.gpu_seconds_used(metering.quota_allocations(session, quota, since), since, now)
    return {
        "window": quota.rolling_window,
        "gpu_hours": None if quota.gpu_seconds is None else quota.gpu_seconds / 3600,
        "gpu_hours_used": used / 3600,
        "spend_cap_per_hour": quota.spend_cap_per_hour,
    }
