"""team notebook templates

Revision ID: 0012_templates
Revises: 0010_teams
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_templates"
down_revision = "0010_teams"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "team_templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=80), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("gpu_model", sa.String(length=64), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("min_vram_gb", sa.Integer(), nullable=False),
        sa.Column("expected_minutes", sa.Integer(), nullable=False),
        sa.Column("notebook", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("published_by", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("length(slug) > 0", name=op.f("ck_team_templates_slug_not_empty")),
        sa.CheckConstraint("gpu_count >= 0", name=op.f("ck_team_templates_gpu_count_not_negative")),
        sa.CheckConstraint(
            "min_vram_gb >= 0", name=op.f("ck_team_templates_min_vram_not_negative")
        ),
        sa.CheckConstraint(
            "expected_minutes > 0", name=op.f("ck_team_templates_expected_minutes_positive")
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_team_templates_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["published_by"],
            ["accounts.id"],
            name=op.f("fk_team_templates_published_by_accounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_team_templates")),
        sa.UniqueConstraint("team_id", "slug", name=op.f("uq_team_templates_team_id")),
    )
    op.create_index(op.f("ix_team_templates_team_id"), "team_templates", ["team_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_team_templates_team_id"), table_name="team_templates")
    op.drop_table("team_templates")
