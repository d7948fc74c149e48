"""team billing: a reservation names the team that pays for it

Revision ID: 0011_team_billing
Revises: 0010_teams
Create Date: 2026-12-03

A member who launches "for the team" reserves with the team as payer; the
allocation opened from that reservation bills the team's budget at the
reservation's locked price. Null: the member pays.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_team_billing"
down_revision = "0010_teams"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("team_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_reservations_team_id_teams"), "teams", ["team_id"], ["id"]
        )
        batch.create_index(op.f("ix_reservations_team_id"), ["team_id"])


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_index(op.f("ix_reservations_team_id"))
        batch.drop_constraint(op.f("fk_reservations_team_id_teams"), type_="foreignkey")
        batch.drop_column("team_id")
