"""The house provider: the embedded stack's own local Ray head, owned by the admin.

``gpuportal up`` runs the provider join flow for it, so a fresh ``make run`` has
verified GPUs to spawn on at once:

1. the node identity (ed25519 key, 0600) is created once in the data dir, so the
   Ray head declares the same ``gpuportal/node:<id>`` across restarts;
2. the control plane registers provider, cluster, node and GPUs with the node's
   public key (it is trusted and has no hub token of the admin to send);
3. the provider agent (``gpuportal provider run``) then does what every node
   does over HTTP: it answers a verification challenge and sends signed
   heartbeats. Until it passes, the house GPUs are not placed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuportal.provider.agent import inventory
from gpuportal.provider.identity import Identity
from gpuportal.provider.isolation import node_isolation
from gpuportal.provider.raynode import ensure_auth_token

from ..db import accounts, session_factory, transaction
from ..market.providers import GpuClaim, register_node, upsert_cluster, upsert_provider
from ..settings import Settings
from .localray import GpuPlan

HOUSE_DIR = "house-node"
HOUSE_CLUSTER = "house"


def house_dir(settings: Settings) -> Path:
    return settings.data_dir / HOUSE_DIR


def house_identity(settings: Settings, plan: GpuPlan, hub_url: str) -> Identity:
    """The house node's identity, created on first use, remembering the GPU plan."""
    identity = Identity.create_or_load(house_dir(settings))
    identity.state.hub_url = hub_url
    identity.state.demo = plan.demo
    identity.state.demo_gpus = (
        ",".join(f"{n}x{m}" for m, n in plan.models.items()) if plan.demo else ""
    )
    identity.state.region = settings.region
    identity.state.price = settings.house_price
    identity.save()
    return identity


def register_house(
    settings: Settings, engine: Any, identity: Identity, jobs_url: str, ray_address: str | None
) -> dict[str, Any]:
    """Register the admin-owned house provider, cluster, node (with its key) and GPUs.

    The GPUs are the same claims the agent will make (its own inventory
    function), and stay unschedulable until the agent passes its challenge.
    """
    gpus, driver = inventory(identity.state.demo, identity.state.demo_gpus, identity.node_id)
    claims = [
        GpuClaim(g.index, g.uuid, g.model, g.vram_mib, g.cuda_capability, g.pci_bus_id)
        for g in gpus
    ]
    with transaction(session_factory(engine)) as session:
        account = accounts.upsert_account(
            session, {"name": settings.admin_user, "admin": True, "groups": ["admins"]}
        )
        provider = upsert_provider(
            session,
            account.id,
            display_name="house",
            region=settings.region,
            price=settings.house_price,
            house=True,
        )
        cluster = upsert_cluster(
            session,
            provider,
            name=HOUSE_CLUSTER,
            jobs_url=jobs_url,
            ray_address=ray_address,
            ray_token=ensure_auth_token(settings.ray_token_path),
        )
        node = register_node(
            session,
            cluster,
            identity.node_id,
            claims,
            demo=identity.state.demo,
            reliability_start=settings.reliability_start,
            public_key=identity.public_key,
            driver_version=driver,
            isolation=node_isolation(),
        )
        if node.status == "left":
            node.status = "pending"
        return {
            "node_id": node.node_id,
            "gpus": len(claims),
            "demo": node.demo,
            "price": provider.price_per_gpu_hour,
        }


def verification_of(engine: Any, node_id: str) -> str | None:
    from sqlalchemy import select

    from ..db.marketplace_models import Node

    with transaction(session_factory(engine)) as session:
        return session.scalar(select(Node.verification).where(Node.node_id == node_id))
