"""The house provider: the embedded stack's own local Ray head, owned by the admin.

``gpuportal up`` registers it so a fresh ``make run`` has GPUs to spawn on at
once. Its node id is created once and kept in the data dir, so the Ray head
declares the same ``gpuportal/node:<id>`` resource across restarts and old
reservations keep pointing at the same node.
"""

from __future__ import annotations

import secrets
from typing import Any

from . import accounts
from .db import session_factory, transaction
from .localray import GpuPlan
from .providers import GpuClaim, demo_claims, register_node, upsert_cluster, upsert_provider
from .settings import Settings

NODE_ID_FILE = "house-node-id"
HOUSE_CLUSTER = "house"


def house_node_id(settings: Settings) -> str:
    """The house node's stable id, created on first use."""
    path = settings.data_dir / NODE_ID_FILE
    try:
        existing = path.read_text().strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    node_id = f"house-{secrets.token_hex(6)}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id + "\n")
    return node_id


def claims_for(plan: GpuPlan, node_id: str) -> list[GpuClaim]:
    """The house GPUs: NVML's when real (read again for UUIDs), else labelled demo GPUs."""
    if not plan.demo:
        from gpuportal.provider import nvml

        return [
            GpuClaim(
                g.index,
                g.uuid,
                g.model.replace(" ", "-"),
                g.memory_total_mib,
                g.cuda_capability,
                g.pci_bus_id,
            )
            for g in nvml.read_inventory()
        ]
    return demo_claims(node_id, plan.models)


def register_house(
    settings: Settings,
    engine: Any,
    plan: GpuPlan,
    node_id: str,
    jobs_url: str,
    ray_address: str | None,
) -> dict[str, Any]:
    """Register the admin-owned house provider, cluster, node and GPUs as verified.

    Trusted: the control plane registers its own hardware here; provider
    machines go through ``gpuportal provider join`` and a challenge instead.
    """
    claims = claims_for(plan, node_id)
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
            session, provider, name=HOUSE_CLUSTER, jobs_url=jobs_url, ray_address=ray_address
        )
        node = register_node(
            session,
            cluster,
            node_id,
            claims,
            demo=plan.demo,
            reliability_start=settings.reliability_start,
            verified=True,
        )
        return {
            "node_id": node.node_id,
            "gpus": len(claims),
            "demo": plan.demo,
            "price": provider.price_per_gpu_hour,
        }
