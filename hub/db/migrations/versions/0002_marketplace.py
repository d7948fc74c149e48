"""marketplace: providers, clusters, nodes, GPUs, reservations, GPU allocations,
verification challenges and heartbeat rollups

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("region", sa.String(length=64), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=True),
        sa.Column("payout_wallet", sa.String(length=44), nullable=True),
        sa.Column("price_per_gpu_hour", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("house", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('listed', 'paused', 'delisted')", name=op.f("ck_providers_status_known")
        ),
        sa.CheckConstraint(
            "length(display_name) > 0", name=op.f("ck_providers_display_name_not_empty")
        ),
        sa.CheckConstraint("price_per_gpu_hour > 0", name=op.f("ck_providers_price_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_providers_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_providers")),
        sa.UniqueConstraint("account_id", name=op.f("uq_providers_account_id")),
    )
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("jobs_url", sa.String(length=512), nullable=False),
        sa.Column("ray_address", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name=op.f("fk_clusters_provider_id_providers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clusters")),
        sa.UniqueConstraint("provider_id", "name", name=op.f("uq_clusters_provider_id")),
    )
    op.create_index(op.f("ix_clusters_provider_id"), "clusters", ["provider_id"], unique=False)
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.Column("verification", sa.String(length=16), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reliability", sa.Float(), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_counter", sa.BigInteger(), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("driver_version", sa.String(length=64), nullable=True),
        sa.Column("failed_starts", sa.Integer(), nullable=False),
        sa.Column("failed_verifications", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'online', 'offline', 'left')", name=op.f("ck_nodes_status_known")
        ),
        sa.CheckConstraint(
            "verification IN ('unverified', 'verified', 'failed', 'changed')",
            name=op.f("ck_nodes_verification_known"),
        ),
        sa.CheckConstraint("length(node_id) > 0", name=op.f("ck_nodes_node_id_not_empty")),
        sa.CheckConstraint(
            "reliability >= 0 AND reliability <= 1", name=op.f("ck_nodes_reliability_range")
        ),
        sa.ForeignKeyConstraint(
            ["cluster_id"], ["clusters.id"], name=op.f("fk_nodes_cluster_id_clusters")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("node_id", name=op.f("uq_nodes_node_id")),
    )
    op.create_index(op.f("ix_nodes_cluster_id"), "nodes", ["cluster_id"], unique=False)
    op.create_table(
        "gpus",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=96), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("vram_mib", sa.Integer(), nullable=False),
        sa.Column("cuda_capability", sa.String(length=16), nullable=True),
        sa.Column("pci_bus_id", sa.String(length=32), nullable=True),
        sa.CheckConstraint('"index" >= 0', name=op.f("ck_gpus_index_not_negative")),
        sa.CheckConstraint("vram_mib >= 0", name=op.f("ck_gpus_vram_not_negative")),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_gpus_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gpus")),
        sa.UniqueConstraint("node_id", "index", name=op.f("uq_gpus_node_id")),
    )
    op.create_index(op.f("ix_gpus_model"), "gpus", ["model"], unique=False)
    op.create_index(op.f("ix_gpus_node_id"), "gpus", ["node_id"], unique=False)
    op.create_table(
        "heartbeat_rollups",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeats", sa.Integer(), nullable=False),
        sa.Column("gpu_util_sum", sa.Float(), nullable=False),
        sa.Column("gpu_samples", sa.Integer(), nullable=False),
        sa.Column("memory_used_mib_max", sa.BigInteger(), nullable=False),
        sa.Column("temperature_c_max", sa.Integer(), nullable=False),
        sa.Column("power_w_sum", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.id"],
            name=op.f("fk_heartbeat_rollups_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_id", "minute", name=op.f("pk_heartbeat_rollups")),
    )
    op.create_table(
        "node_challenges",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.String(length=512), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'passed', 'failed', 'expired')",
            name=op.f("ck_node_challenges_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.id"],
            name=op.f("fk_node_challenges_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_challenges")),
        sa.UniqueConstraint("nonce", name=op.f("uq_node_challenges_nonce")),
    )
    op.create_index(
        op.f("ix_node_challenges_node_id"), "node_challenges", ["node_id"], unique=False
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_indices", sa.JSON(), nullable=False),
        sa.Column("gpu_model", sa.String(length=64), nullable=False),
        sa.Column("price_per_gpu_hour", sa.BigInteger(), nullable=False),
        sa.Column("platform_fee_bps", sa.Integer(), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("server_name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('held', 'active', 'released', 'expired')",
            name=op.f("ck_reservations_status_known"),
        ),
        sa.CheckConstraint("gpu_count > 0", name=op.f("ck_reservations_gpu_count_positive")),
        sa.CheckConstraint(
            "platform_fee_bps >= 0 AND platform_fee_bps <= 10000",
            name=op.f("ck_reservations_fee_bps_range"),
        ),
        sa.CheckConstraint("price_per_gpu_hour > 0", name=op.f("ck_reservations_price_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_reservations_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_reservations_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    op.create_index(
        op.f("ix_reservations_account_id"), "reservations", ["account_id"], unique=False
    )
    op.create_index(op.f("ix_reservations_node_id"), "reservations", ["node_id"], unique=False)
    op.create_index(op.f("ix_reservations_status"), "reservations", ["status"], unique=False)
    op.create_index(
        "uq_reservations_live_server",
        "reservations",
        ["account_id", "server_name"],
        unique=True,
        sqlite_where=sa.text("status IN ('held', 'active')"),
        postgresql_where=sa.text("status IN ('held', 'active')"),
    )
    op.create_table(
        "gpu_allocations",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("reservation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_gpu_allocations_gpu_id_gpus")
        ),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_gpu_allocations_reservation_id_reservations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gpu_id", name=op.f("pk_gpu_allocations")),
    )
    op.create_index(
        op.f("ix_gpu_allocations_reservation_id"),
        "gpu_allocations",
        ["reservation_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_gpu_allocations_reservation_id"), table_name="gpu_allocations")
    op.drop_table("gpu_allocations")
    op.drop_index("uq_reservations_live_server", table_name="reservations")
    op.drop_index(op.f("ix_reservations_status"), table_name="reservations")
    op.drop_index(op.f("ix_reservations_node_id"), table_name="reservations")
    op.drop_index(op.f("ix_reservations_account_id"), table_name="reservations")
    op.drop_table("reservations")
    op.drop_index(op.f("ix_node_challenges_node_id"), table_name="node_challenges")
    op.drop_table("node_challenges")
    op.drop_table("heartbeat_rollups")
    op.drop_index(op.f("ix_gpus_node_id"), table_name="gpus")
    op.drop_index(op.f("ix_gpus_model"), table_name="gpus")
    op.drop_table("gpus")
    op.drop_index(op.f("ix_nodes_cluster_id"), table_name="nodes")
    op.drop_table("nodes")
    op.drop_index(op.f("ix_clusters_provider_id"), table_name="clusters")
    op.drop_table("clusters")
    op.drop_table("providers")
