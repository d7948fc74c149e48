"""Portal DB models for provider payouts: one row per (provider, period), and wallet changes.

A :class:`Payout` is a mutable state machine row (like an allocation): the money
it carries moved in the append-only ledger when it was created (earnings ->
payouts in flight) and moves again when it settles (in flight -> paid out) or
fails (in flight -> back to earnings). The signed transaction, its signature and
the last block height at which its blockhash is valid are stored *before* the
transaction is sent, so a crash at any point resumes from the row. The treasury
key is never stored here: only the signed bytes, which carry a signature, not a key.

A :class:`PayoutWalletChange` records every wallet a provider names; a change
applies only to periods that start after it was recorded.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, UTCDateTime, column_now

#: ``pending``: created, funds in flight, not signed yet (or waiting for treasury funds);
#: ``signed``: signature, bytes and last valid block height stored, maybe sent;
#: ``sent``: handed to the chain at least once; ``settled`` (final): landed at the
#: configured commitment; ``failed`` (final until retried): funds back in earnings.
PAYOUT_STATES = ("pending", "signed", "sent", "settled", "failed")
OPEN_PAYOUT_STATES = ("pending", "signed", "sent")
PAYOUT_ASSETS = ("SOL", "USDC")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Payout(Base):
    __tablename__ = "payouts"
    __table_args__ = (
        UniqueConstraint("provider_account_id", "period_start", name="uq_payouts_provider_period"),
        CheckConstraint(f"status IN ({_in(PAYOUT_STATES)})", name="status_known"),
        CheckConstraint(f"asset IN ({_in(PAYOUT_ASSETS)})", name="asset_known"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("units > 0", name="units_positive"),
        Index("ix_payouts_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), index=True
    )
    period_start: Mapped[datetime] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Micro-credits moved out of earnings for this payout.
    amount: Mapped[int] = mapped_column(BigInteger)
    asset: Mapped[str] = mapped_column(String(8))
    #: Lamports (SOL) or token base units (USDC) sent; u64 on chain.
    units: Mapped[int] = mapped_column(BigInteger)
    #: The wallet in effect for the period (owner of the token account for USDC).
    wallet: Mapped[str] = mapped_column(String(44))
    chain: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    signature: Mapped[str | None] = mapped_column(String(100), unique=True)
    tx_bytes: Mapped[bytes | None] = mapped_column(LargeBinary)
    last_valid_block_height: Mapped[int | None] = mapped_column(BigInteger)
    #: How many times a transaction was signed for it (a re-sign only after expiry).
    signings: Mapped[int] = mapped_column(Integer, default=0)
    #: How many times it was returned to earnings and retried.
    retries: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PayoutWalletChange(Base):
    __tablename__ = "payout_wallet_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), index=True
    )
    wallet: Mapped[str] = mapped_column(String(44))
    #: Periods starting at or after this moment pay to ``wallet``.
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
