"""verification a CPU cannot pass: chain length, secret sample rows, random re-checks

Revision ID: 0006_verify
Revises: 0006_isolation
Create Date: 2026-12-02

``node_challenges.steps`` is the chain length of the challenge and
``node_challenges.sample`` the rows the portal checks (secret, never sent to the
node); ``nodes.next_challenge_at`` is when a verified node is challenged again,
drawn at random. Plain ``ADD COLUMN``s (no table rebuild on SQLite).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_verify"
down_revision = "0006_isolation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("node_challenges", sa.Column("steps", sa.Integer(), nullable=True))
    op.add_column("node_challenges", sa.Column("sample", sa.JSON(), nullable=True))
    op.add_column(
        "nodes", sa.Column("next_challenge_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("nodes", "next_challenge_at")
    op.drop_column("node_challenges", "sample")
    op.drop_column("node_challenges", "steps")
