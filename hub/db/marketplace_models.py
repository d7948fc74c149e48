"""Marketplace tables: providers own clusters, clusters own nodes, nodes own GPUs.

A reservation holds some GPUs of one node for one user's server. Double booking
is impossible by construction: each held GPU has one row in ``gpu_allocations``
whose primary key *is* the GPU, so two transactions that both try to take the
same GPU cannot both commit, on SQLite or PostgreSQL alike.

Money is integer micro-credits (1 credit = 1_000_000); times are aware UTC.
Verification challenges and per-minute heartbeat rollups live here too, because
they decide whether a node is schedulable and how reliable it is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from gpuportal.provider.rayresources import NODE_RESOURCE_PREFIX

from .models import Account, Base, UTCDateTime, column_now

PROVIDER_STATUSES = ("listed", "paused", "delisted")
NODE_STATUSES = ("pending", "online", "offline", "left")
VERIFICATION_STATUSES = ("unverified", "verified", "failed", "changed")
ISOLATION_MODES = ("user", "exclusive")
RESERVATION_STATUSES = ("held", "active", "released", "expired")
#: Why a node is offline: it missed heartbeats; its Ray cluster reports its Ray
#: node dead or without it; its cluster's dashboard stopped answering.
OFFLINE_REASONS = ("heartbeats", "ray", "ray-unreachable")
#: Offline reasons only the Ray cross-check may clear (heartbeats do not).
RAY_OFFLINE_REASONS = ("ray", "ray-unreachable")
CHALLENGE_STATUSES = ("pending", "passed", "failed", "expired")
#: Reservations that still hold their GPUs.
LIVE_STATUSES = ("held", "active")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Provider(Base):
    """A hub user (in the ``providers`` group, or the admin for the house) selling GPUs."""

    __tablename__ = "providers"
    __table_args__ = (
        CheckConstraint(_in("status", PROVIDER_STATUSES), name="status_known"),
        CheckConstraint("price_per_gpu_hour > 0", name="price_positive"),
        CheckConstraint("length(display_name) > 0", name="display_name_not_empty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(2), nullable=True)
    #: Solana public key (base58), validated before it is stored. None: no payouts yet.
    payout_wallet: Mapped[str | None] = mapped_column(String(44), nullable=True)
    #: Micro-credits per GPU-hour; locked into each reservation when it is made.
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="listed")
    #: The platform's own provider (the embedded stack's local Ray head).
    house: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )

    account: Mapped[Account] = relationship()
    clusters: Mapped[list[Cluster]] = relationship(back_populates="provider")


class Cluster(Base):
    """One Ray cluster of a provider, reached by the spawner through its Jobs API."""

    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("provider_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    jobs_url: Mapped[str] = mapped_column(String(512))
    ray_address: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The cluster's Ray token (Ray's token authentication). Given only to trusted
    #: callers (the spawner) and used by the portal's Ray cross-check; never shown.
    ray_token: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)

    provider: Mapped[Provider] = relationship(back_populates="clusters")
    nodes: Mapped[list[Node]] = relationship(back_populates="cluster")


class Node(Base):
    """A machine in a provider's cluster. Schedulable only when listed, online,
    verified, not blocked, and above the reliability threshold."""

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint(_in("status", NODE_STATUSES), name="status_known"),
        CheckConstraint(_in("verification", VERIFICATION_STATUSES), name="verification_known"),
        CheckConstraint("reliability >= 0 AND reliability <= 1", name="reliability_range"),
        CheckConstraint("length(node_id) > 0", name="node_id_not_empty"),
        CheckConstraint(_in("isolation", ISOLATION_MODES), name="isolation_known"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), index=True)
    #: The node's own stable id, also the Ray custom resource ``gpuportal/node:<node_id>``.
    node_id: Mapped[str] = mapped_column(String(64), unique=True)
    demo: Mapped[bool] = mapped_column(default=False)
    #: ``user``: each customer runs under an OS account of their own; ``exclusive``:
    #: the node cannot make accounts, so it hosts one customer at a time.
    isolation: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    blocked: Mapped[bool] = mapped_column(default=False)
    verification: Mapped[str] = mapped_column(String(16), default="unverified")
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: When a verified node is challenged again (drawn at random after each pass).
    next_challenge_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reliability: Mapped[float] = mapped_column(Float, default=0.9)
    #: ed25519 public key (hex) that signs heartbeats; None for control-plane-made nodes.
    public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: Highest heartbeat counter accepted so far: a replay carries one not above it.
    heartbeat_counter: Mapped[int] = mapped_column(BigInteger, default=0)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Why an offline node is offline (see OFFLINE_REASONS); None while online. A node
    #: that Ray reports dead or missing stays offline, despite heartbeats, until Ray
    #: reports it alive again.
    offline_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    driver_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failed_starts: Mapped[int] = mapped_column(Integer, default=0)
    failed_verifications: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )

    cluster: Mapped[Cluster] = relationship(back_populates="nodes")
    gpus: Mapped[list[Gpu]] = relationship(back_populates="node", order_by="Gpu.index")

    @property
    def resource(self) -> str:
        """The Ray custom resource that pins a job to this node."""
        return f"{NODE_RESOURCE_PREFIX}{self.node_id}"


class Gpu(Base):
    """One GPU of a node, as claimed at registration and checked by verification."""

    __tablename__ = "gpus"
    __table_args__ = (
        UniqueConstraint("node_id", "index"),
        CheckConstraint('"index" >= 0', name="index_not_negative"),
        CheckConstraint("vram_mib >= 0", name="vram_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(96))
    model: Mapped[str] = mapped_column(String(64), index=True)
    vram_mib: Mapped[int] = mapped_column(Integer)
    cuda_capability: Mapped[str | None] = mapped_column(String(16), nullable=True)
    pci_bus_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    node: Mapped[Node] = relationship(back_populates="gpus")


class Reservation(Base):
    """GPUs of one node held for one user's server, at a price locked when made.

    ``held`` until the spawner activates it (or it expires at ``expires_at``),
    then ``active`` until ``released``. Only held and active reservations own
    rows in ``gpu_allocations``.
    """

    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint(_in("status", RESERVATION_STATUSES), name="status_known"),
        CheckConstraint("gpu_count > 0", name="gpu_count_positive"),
        CheckConstraint("price_per_gpu_hour > 0", name="price_positive"),
        CheckConstraint(
            "platform_fee_bps >= 0 AND platform_fee_bps <= 10000", name="fee_bps_range"
        ),
        # One live reservation per user server: a retried spawn finds its own.
        Index(
            "uq_reservations_live_server",
            "account_id",
            "server_name",
            unique=True,
            sqlite_where=text("status IN ('held', 'active')"),
            postgresql_where=text("status IN ('held', 'active')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    #: The team that pays for this server (a member launching "for the team"); None: the
    #: user pays. Checked against membership when the reservation is authorized.
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id"), index=True, nullable=True, default=None
    )
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    gpu_count: Mapped[int] = mapped_column(Integer)
    gpu_indices: Mapped[list[int]] = mapped_column(JSON)
    gpu_model: Mapped[str] = mapped_column(String(64))
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    platform_fee_bps: Mapped[int] = mapped_column(Integer)
    user_name: Mapped[str] = mapped_column(String(255))
    server_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="held", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Set once when the spawner (or an admin) reports that the server failed to
    #: start; it counts against the node's reliability exactly once.
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)

    node: Mapped[Node] = relationship()


class GpuAllocation(Base):
    """The lock that makes booking atomic: one row per GPU held by a live reservation."""

    __tablename__ = "gpu_allocations"

    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id"), primary_key=True)
    reservation_id: Mapped[str] = mapped_column(
        ForeignKey("reservations.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)


class NodeChallenge(Base):
    """A verification challenge: a nonce and a seed the node must answer before the deadline."""

    __tablename__ = "node_challenges"
    __table_args__ = (CheckConstraint(_in("status", CHALLENGE_STATUSES), name="status_known"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer)
    #: Chain length (gpuportal.provider.workload); None for challenges made before it.
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The rows the portal checks, per GPU UUID. Secret: never sent to the node.
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    demo: Mapped[bool] = mapped_column(default=False)
    detail: Mapped[str | None] = mapped_column(String(512), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class HeartbeatRollup(Base):
    """Per-node, per-minute heartbeat summary for uptime and the dashboards."""

    __tablename__ = "heartbeat_rollups"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    heartbeats: Mapped[int] = mapped_column(Integer, default=0)
    gpu_util_sum: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_samples: Mapped[int] = mapped_column(Integer, default=0)
    memory_used_mib_max: Mapped[int] = mapped_column(BigInteger, default=0)
    temperature_c_max: Mapped[int] = mapped_column(Integer, default=0)
    power_w_sum: Mapped[float] = mapped_column(Float, default=0.0)
