"""Portal DB models for money and metering: the ledger, allocations and quotas.

The ledger is double-entry and append-only: a :class:`LedgerTransaction` owns
postings whose amounts sum to zero, and neither table accepts UPDATE or DELETE
(database triggers refuse them, on SQLite and on PostgreSQL; see migration
0003). A correction is a new transaction, never an edit. Amounts are signed
integers of micro-credits: a positive posting raises that account's balance.

Allocations are the billing periods of running servers. They are ordinary
mutable rows: the meter moves ``last_charged_at`` forward in the same database
transaction that writes the charge, so the two never disagree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .models import Base, UTCDateTime, column_now

#: Ledger account kinds. ``external`` accounts stand for the world outside the
#: platform (grants, deposits): their balances go negative as money comes in.
LEDGER_KINDS = (
    "customer_wallet",
    "team_budget",
    "provider_earnings",
    "platform_revenue",
    "payouts_in_flight",
    "external",
)

#: Allocation states: ``running`` (metered), ``stopping`` (out of credit, a stop
#: is scheduled at ``stopping_at``), ``stop_due`` (closed by the meter at
#: ``stopping_at``; the hub has not confirmed the stop yet), ``closed``.
ALLOCATION_STATES = ("running", "stopping", "stop_due", "closed")
OPEN_STATES = ("running", "stopping")

QUOTA_WINDOWS = {"day": 86_400, "week": 7 * 86_400, "month": 30 * 86_400}


def _in(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class LedgerAccount(Base):
    """A bucket of money. ``key`` names it uniquely, e.g. ``wallet:42``, ``platform:revenue``."""

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        CheckConstraint(f"kind IN ({_in(LEDGER_KINDS)})", name="kind_known"),
        CheckConstraint("length(key) > 0", name="key_not_empty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), index=True
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", ondelete="RESTRICT"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)


class LedgerTransaction(Base):
    """One balanced movement of money, created once per idempotency key.

    ``params_hash`` fingerprints what was asked for (kind and postings), so a
    retry with the same key is recognised and a different request that reuses
    the key is refused with 409 instead of being merged.
    """

    __tablename__ = "ledger_transactions"
    __table_args__ = (
        CheckConstraint("length(idempotency_key) > 0", name="key_not_empty"),
        Index("ix_ledger_transactions_allocation_period", "allocation_id", "period_end"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    params_hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    memo: Mapped[str] = mapped_column(String(500), default="")
    reference: Mapped[str | None] = mapped_column(String(200))
    allocation_id: Mapped[int | None] = mapped_column(
        ForeignKey("allocations.id", ondelete="RESTRICT")
    )
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)

    postings: Mapped[list[Posting]] = relationship(
        back_populates="transaction", order_by="Posting.id"
    )


class Posting(Base):
    """One leg of a transaction: a signed amount of micro-credits on one account."""

    __tablename__ = "ledger_postings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_transactions.id", ondelete="RESTRICT"), index=True
    )
    ledger_account_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT"), index=True
    )
    amount: Mapped[int] = mapped_column(BigInteger)

    transaction: Mapped[LedgerTransaction] = relationship(back_populates="postings")


class LedgerBalance(Base):
    """One ledger account's balance, moved by the database with every posting (0007).

    A trigger adds each inserted posting in the same transaction, so this always
    equals ``SUM(amount)`` of the account's postings; code only reads it.
    """

    __tablename__ = "ledger_balances"

    ledger_account_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT"), primary_key=True
    )
    balance: Mapped[int] = mapped_column(BigInteger)


class Allocation(Base):
    """One running server's billing period, from ready to stop, at a locked price.

    ``reservation_id`` names the marketplace reservation it bills (activating
    a reservation opens its allocation, releasing it closes it); the price and
    fee are copied here when the allocation opens so a later price change never
    reaches a running server.
    """

    __tablename__ = "allocations"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(ALLOCATION_STATES)})", name="status_known"),
        CheckConstraint("gpu_count > 0", name="gpu_count_positive"),
        CheckConstraint("price_per_gpu_hour >= 0", name="price_not_negative"),
        CheckConstraint("platform_fee_bps >= 0 AND platform_fee_bps <= 10000", name="fee_bps"),
        Index("ix_allocations_status", "status"),
        Index("ix_allocations_user_server", "user_name", "server_name"),
        # Room in each page for the meter's moves of last_charged_at (HOT updates; 0013).
        {"postgresql_with": {"fillfactor": 70}},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), index=True
    )
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id", ondelete="RESTRICT"))
    provider_account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT")
    )
    reservation_id: Mapped[str | None] = mapped_column(String(32), index=True)
    user_name: Mapped[str] = mapped_column(String(255))
    server_name: Mapped[str] = mapped_column(String(255), default="")
    gpu_count: Mapped[int] = mapped_column(Integer)
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    platform_fee_bps: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_charged_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    runway_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stopping_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stop_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)


class Quota(Base):
    """A limit for one user or one team: GPU-hours per rolling window, spend per hour."""

    __tablename__ = "quotas"
    __table_args__ = (
        CheckConstraint("(account_id IS NULL) <> (team_id IS NULL)", name="one_owner"),
        CheckConstraint(f"rolling_window IN ({_in(list(QUOTA_WINDOWS))})", name="window_known"),
        CheckConstraint("gpu_seconds IS NULL OR gpu_seconds >= 0", name="gpu_seconds"),
        CheckConstraint("spend_cap_per_hour IS NULL OR spend_cap_per_hour >= 0", name="spend_cap"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), unique=True
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), unique=True
    )
    rolling_window: Mapped[str] = mapped_column(String(8), default="day")
    gpu_seconds: Mapped[int | None] = mapped_column(BigInteger)
    spend_cap_per_hour: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )
