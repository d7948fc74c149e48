"""teams: team admins (a role on the membership) and a team's default GPU profile

Revision ID: 0010_teams
Revises: 0009_balances
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_teams"
down_revision = "0009_balances"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("team_memberships") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="member")
        )
        batch.create_check_constraint(
            op.f("ck_team_memberships_team_role_known"), "role IN ('member', 'admin')"
        )
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("default_profile", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("default_profile")
    with op.batch_alter_table("team_memberships") as batch:
        batch.drop_constraint(op.f("ck_team_memberships_team_role_known"), type_="check")
        batch.drop_column("role")
