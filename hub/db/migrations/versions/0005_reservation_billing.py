"""join the marketplace and ledger branches; allocations name their reservation

Reservation ids are strings, so ``allocations.reservation_id`` becomes a
String(32) with an index: activating a reservation opens its allocation and
releasing it closes it.

Revision ID: 0005
Revises: 0003, 0004_market
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = ("0003", "0004_market")
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("allocations") as batch:
        batch.alter_column(
            "reservation_id",
            existing_type=sa.Integer(),
            type_=sa.String(length=32),
            existing_nullable=True,
            postgresql_using="reservation_id::varchar",
        )
        batch.create_index(
            batch.f("ix_allocations_reservation_id"), ["reservation_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("allocations") as batch:
        batch.drop_index(batch.f("ix_allocations_reservation_id"))
        batch.alter_column(
            "reservation_id",
            existing_type=sa.String(length=32),
            type_=sa.Integer(),
            existing_nullable=True,
            postgresql_using="NULLIF(regexp_replace(reservation_id, '[^0-9]', '', 'g'), '')::integer",
        )
