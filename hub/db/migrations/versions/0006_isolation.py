"""isolation: each cluster's Ray token, each node's isolation mode

``clusters.ray_token``: every Ray cluster runs with Ray's token authentication;
the spawner reads a cluster's token from its reservation (trusted callers
only) and the portal's Ray cross-check uses it. ``nodes.isolation``: ``user``
(each customer under an OS account of their own) or ``exclusive`` (the node
cannot create accounts, so it hosts one customer at a time).

Revision ID: 0006_isolation
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_isolation"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("ray_token", sa.String(length=256), nullable=True))
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(
            sa.Column("isolation", sa.String(length=16), nullable=False, server_default="user")
        )
        batch.create_check_constraint("isolation_known", "isolation IN ('user', 'exclusive')")


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_constraint("isolation_known", type_="check")
        batch.drop_column("isolation")
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("ray_token")
