"""payouts: one per (provider, period), with the signed transaction stored before sending;
the record of payout wallet changes

Revision ID: 0007_payouts
Revises: 0006_verify
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_payouts"
down_revision = "0006_verify"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payouts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "provider_account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(8), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("wallet", sa.String(44), nullable=False),
        sa.Column("chain", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("signature", sa.String(100), nullable=True, unique=True),
        sa.Column("tx_bytes", sa.LargeBinary(), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("signings", sa.Integer(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint(
            "provider_account_id", "period_start", name="uq_payouts_provider_period"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'signed', 'sent', 'settled', 'failed')", name="status_known"
        ),
        sa.CheckConstraint("asset IN ('SOL', 'USDC')", name="asset_known"),
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint("units > 0", name="units_positive"),
    )
    op.create_index("ix_payouts_status", "payouts", ["status"])
    op.create_index("ix_payouts_provider_account_id", "payouts", ["provider_account_id"])
    op.create_table(
        "payout_wallet_changes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "provider_account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("wallet", sa.String(44), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_payout_wallet_changes_provider_account_id",
        "payout_wallet_changes",
        ["provider_account_id"],
    )


def downgrade() -> None:
    op.drop_table("payout_wallet_changes")
    op.drop_table("payouts")
