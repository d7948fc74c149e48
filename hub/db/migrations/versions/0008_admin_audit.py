"""admin audit log: who did what to which target, when and why

Revision ID: 0008_admin_audit
Revises: 0007_payouts
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_admin_audit"
down_revision = "0007_payouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_kind", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.CheckConstraint("length(actor) > 0", name=op.f("ck_admin_audit_actor_not_empty")),
        sa.CheckConstraint("length(action) > 0", name=op.f("ck_admin_audit_action_not_empty")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_audit")),
    )
    op.create_index("ix_admin_audit_at", "admin_audit", ["at"])
    op.create_index("ix_admin_audit_action", "admin_audit", ["action"])
    op.create_index("ix_admin_audit_target", "admin_audit", ["target_kind", "target"])


def downgrade() -> None:
    op.drop_index("ix_admin_audit_target", table_name="admin_audit")
    op.drop_index("ix_admin_audit_action", table_name="admin_audit")
    op.drop_index("ix_admin_audit_at", table_name="admin_audit")
    op.drop_table("admin_audit")
