"""The provider registry: providers, their clusters, nodes and GPUs.

Registration stores *claims*. A node's GPUs become schedulable only when a
verification passes (``verification == "verified"``); a registration that
changes anything a verified node claims (its GPUs' count, models, memory or
UUIDs, its demo flag, its cluster or that cluster's ``jobs_url``) marks the
node ``changed`` and so unschedulable until it passes a fresh challenge. The
house provider of the embedded stack is registered the same way, by the
control plane itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpuportal.provider.money import format_credits

from .. import timeutil
from ..db.marketplace_models import Cluster, Gpu, Node, Provider
from .marketplace import Invalid, vram_for

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
COUNTRY = re.compile(r"^[A-Z]{2}$")

log = logging.getLogger(__name__)


def validate_wallet(wallet: str) -> str:
    """A Solana public key in base58, or :class:`Invalid` with a sentence."""
    from solders.pubkey import Pubkey

    text = wallet.strip()
    try:
        if not 32 <= len(text) <= 44:
            raise ValueError
        return str(Pubkey.from_string(text))
    except ValueError:
        raise Invalid(
            f"payout wallet {wallet[:60]!r} is not a Solana public key "
            "(32 bytes in base58, e.g. 11111111111111111111111111111111)."
        ) from None


def validate_price(price: int, min_price: int, max_price: int) -> int:
    if not min_price <= price <= max_price:
        raise Invalid(
            f"price {format_credits(price)}/h is outside the platform's bounds "
            f"{format_credits(min_price)}..{format_credits(max_price)} per GPU-hour "
            f"({min_price}..{max_price} micro-credits)."
        )
    return price


def validate_node_id(node_id: str) -> str:
    if not NODE_ID.match(node_id):
        raise Invalid(f"node id {node_id[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'.")
    return node_id


@dataclass(frozen=True)
class GpuClaim:
    """One GPU as a node claims it (from NVML, or declared for a demo node)."""

    index: int
    uuid: str
    model: str
    vram_mib: int
    cuda_capability: str | None = None
    pci_bus_id: str | None = None

    def key(self) -> tuple[int, str, str, int]:
        return (self.index, self.uuid, self.model, self.vram_mib)


def demo_claims(node_id: str, models: dict[str, int]) -> list[GpuClaim]:
    """Logical GPUs for a demo node: stable fake UUIDs, VRAM from the model name."""
    claims, index = [], 0
    for model, count in models.items():
        for _ in range(count):
            claims.append(GpuClaim(index, f"GPU-demo-{node_id}-{index}", model, vram_for(model)))
            index += 1
    return claims


def upsert_provider(
    session: Session,
    account_id: int,
    *,
    display_name: str,
    region: str,
    price: int,
    country: str | None = None,
    wallet: str | None = None,
    house: bool = False,
) -> Provider:
    provider = session.scalar(select(Provider).where(Provider.account_id == account_id))
    if country is not None and not COUNTRY.match(country):
        raise Invalid(f"country {country!r} must be a two-letter ISO code such as DE or US.")
    if wallet is not None:
        wallet = validate_wallet(wallet)
    if provider is None:
        provider = Provider(
            account_id=account_id,
            display_name=display_name,
            region=region,
            price_per_gpu_hour=price,
            country=country,
            payout_wallet=wallet,
            status="listed",
            house=house,
        )
        session.add(provider)
    else:
        provider.display_name, provider.region = display_name, region
        provider.price_per_gpu_hour = price
        provider.house = provider.house or house
        if country is not None:
            provider.country = country
        if wallet is not None:
            provider.payout_wallet = wallet
    session.flush()
    return provider


def upsert_cluster(
    session: Session,
    provider: Provider,
    *,
    name: str,
    jobs_url: str,
    ray_address: str | None = None,
    ray_token: str | None = None,
) -> Cluster:
    """Create or update a provider's cluster. ``ray_token``: its Ray token, kept as
    given (None leaves a known token in place)."""
    cluster = session.scalar(
        select(Cluster).where(Cluster.provider_id == provider.id, Cluster.name == name)
    )
    if cluster is None:
        cluster = Cluster(
            provider_id=provider.id,
            name=name,
            jobs_url=jobs_url,
            ray_address=ray_address,
            ray_token=ray_token,
        )
        session.add(cluster)
    else:
        if cluster.jobs_url != jobs_url:
            # Where the portal and the spawner reach the nodes changed: claims again.
            for node in session.scalars(select(Node).where(Node.cluster_id == cluster.id)):
                unverify(node, "its cluster's jobs_url changed")
        cluster.jobs_url, cluster.ray_address = jobs_url, ray_address
        if ray_token is not None:
            cluster.ray_token = ray_token
    session.flush()
    return cluster


def unverify(node: Node, why: str) -> None:
    """A change to what a verified node claims makes it a claim again (``changed``):
    unschedulable until it passes a fresh challenge, which is due at once."""
    if node.verification == "verified":
        node.verification = "changed"
        log.warning("node %s: %s; unverified until it passes a new challenge", node.node_id, why)
    node.next_challenge_at = None


def register_node(
    session: Session,
    cluster: Cluster,
    node_id: str,
    claims: list[GpuClaim],
    *,
    demo: bool,
    reliability_start: float,
    public_key: str | None = None,
    driver_version: str | None = None,
    verified: bool = False,
    isolation: str = "user",
) -> Node:
    """Create or update a node and its GPUs from a claim.

    ``verified=True`` is only for the control plane's own house node in the
    embedded stack; every other node is verified by a challenge. A node id that
    belongs to another provider's cluster is refused.
    """
    validate_node_id(node_id)
    node = session.scalar(select(Node).where(Node.node_id == node_id))
    now = timeutil.utcnow()
    if node is None:
        node = Node(
            cluster_id=cluster.id,
            node_id=node_id,
            demo=demo,
            status="pending",
            verification="unverified",
            reliability=reliability_start,
            public_key=public_key,
            driver_version=driver_version,
            heartbeat_counter=0,
            isolation=isolation,
        )
        session.add(node)
        session.flush()
    else:
        owner = session.get(Cluster, node.cluster_id)
        if owner is None or owner.provider_id != cluster.provider_id:
            raise Invalid(f"node id {node_id!r} belongs to another provider; choose another.")
        if node.cluster_id != cluster.id:
            unverify(node, "it moved to another cluster")
        node.cluster_id = cluster.id
        if node.demo != demo:
            unverify(node, "its demo flag changed")
        node.demo = demo
        node.isolation = isolation
        if public_key is not None:
            node.public_key = public_key
        node.driver_version = driver_version or node.driver_version
    current = {g.index: g for g in session.scalars(select(Gpu).where(Gpu.node_id == node.id))}
    before = sorted(GpuClaim(g.index, g.uuid, g.model, g.vram_mib).key() for g in current.values())
    after = sorted(c.key() for c in claims)
    if before != after:
        for claim in claims:
            gpu = current.pop(claim.index, None)
            if gpu is None:
                session.add(
                    Gpu(
                        node_id=node.id,
                        index=claim.index,
                        uuid=claim.uuid,
                        model=claim.model,
                        vram_mib=claim.vram_mib,
                        cuda_capability=claim.cuda_capability,
                        pci_bus_id=claim.pci_bus_id,
                    )
                )
            else:
                gpu.uuid, gpu.model, gpu.vram_mib = claim.uuid, claim.model, claim.vram_mib
                gpu.cuda_capability, gpu.pci_bus_id = claim.cuda_capability, claim.pci_bus_id
        for gone in current.values():
            session.delete(gone)
        # GPUs (count, model, memory, UUID) changed since they were verified.
        unverify(node, "its GPUs changed")
    if verified:
        node.verification, node.verified_at, node.status = "verified", now, "online"
        node.last_heartbeat_at = now
    session.flush()
    return node


def node_summary(node: Node) -> dict[str, Any]:
    gpus = list(node.gpus)
    return {
        "node_id": node.node_id,
        "status": node.status,
        "offline_reason": node.offline_reason,
        "verification": node.verification,
        "verified_at": node.verified_at,
        "demo": node.demo,
        "isolation": node.isolation,
        "blocked": node.blocked,
        "reliability": round(node.reliability, 3),
        "failed_starts": node.failed_starts,
        "last_heartbeat_at": node.last_heartbeat_at,
        "gpus": [
            {"index": g.index, "uuid": g.uuid, "model": g.model, "vram_mib": g.vram_mib}
            for g in gpus
        ],
        "resource": node.resource,
    }
