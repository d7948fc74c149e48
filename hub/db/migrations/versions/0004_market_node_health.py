"""marketplace node health: why a node is offline, failed starts per reservation

Revision ID: 0004_market
Revises: 0002
Create Date: 2026-12-01

Continues the marketplace branch (0002). ``nodes.offline_reason`` keeps a node
that Ray reports dead offline despite heartbeats; ``reservations.failed_at``
makes a reported failed start count once. Plain ``ADD COLUMN``s (no table
rebuild on SQLite, so no existing constraint is touched).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_market"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("offline_reason", sa.String(length=32), nullable=True))
    op.add_column("reservations", sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("reservations", sa.Column("failure_reason", sa.String(length=512), nullable=True))


def downgrade() -> None:
    op.drop_column("reservations", "failure_reason")
    op.drop_column("reservations", "failed_at")
    op.drop_column("nodes", "offline_reason")
