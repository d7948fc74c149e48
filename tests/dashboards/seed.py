"""A realistic marketplace for the dashboards: two providers, their nodes, heartbeats,
two weeks of usage by a customer and a team, and what each side earned or paid.

Rows are written the way the control plane writes them (ledger transactions through
``ledger.post``, balanced, one per charged period), so every report reads them exactly
as it reads real metering. Everything is deterministic: the expected totals come back
in :class:`Seeded` for the tests to look for on the rendered pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub.billing import ledger
from gpuportal.hub.db import accounts, transaction
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.marketplace_models import (
    Cluster,
    Gpu,
    HeartbeatRollup,
    Node,
    NodeChallenge,
    Provider,
    Reservation,
)
from gpuportal.hub.db.models import Team, TeamMembership
from gpuportal.hub.db.payout_models import Payout
from gpuportal.hub.timeutil import utcnow

MICRO = 1_000_000
FEE_BPS = 1000

#: (provider, display name, region, price per GPU-hour, nodes); each node:
#: (node id, GPU model, GPU count, status, verification, reliability, offline reason).
PROVIDERS = [
    (
        "prov-alpha",
        "Alpha GPUs",
        "eu-west",
        2 * MICRO,
        [
            ("alpha-node-1", "A100-80GB", 2, "online", "verified", 0.97, None),
            ("alpha-node-2", "RTX-4090", 1, "offline", "verified", 0.62, "heartbeats"),
        ],
    ),
    (
        "prov-bravo",
        "Bravo Compute",
        "us-east",
        2_500_000,
        [
            ("bravo-node-1", "A100-80GB", 4, "online", "verified", 0.99, None),
            ("bravo-node-2", "H100-80GB", 1, "online", "failed", 0.91, None),
        ],
    ),
]
CUSTOMER = "cust-carol"
TEAM_MEMBER = "cust-dave"
TEAM = "ml-team"


@dataclass
class Seeded:
    now: datetime
    #: Provider name -> total earnings (micro-credits) over the seeded period.
    earnings: dict[str, int] = field(default_factory=dict)
    #: Provider name -> node ids.
    nodes: dict[str, list[str]] = field(default_factory=dict)
    #: Customer name -> total spend.
    spend: dict[str, int] = field(default_factory=dict)
    #: Platform fee over the period.
    fee: int = 0
    servers: dict[str, set[str]] = field(default_factory=dict)
    #: Provider name -> the signature of its one settled payout.
    payouts: dict[str, str] = field(default_factory=dict)


def hub_model(name: str) -> dict[str, object]:
    """The hub's user model for a seeded name (the groups give the portal role)."""
    groups = ["providers"] if name.startswith("prov-") else ["customers"]
    if name == TEAM_MEMBER:
        groups.append(TEAM)
    return {"name": name, "admin": False, "groups": groups}


def utilisation(node_index: int, minute: datetime) -> float:
    """A daily rhythm in percent, different per node, never quite idle at its peak."""
    hour = minute.hour + minute.minute / 60
    base = 40 + 55 * math.sin((hour - 6 + node_index * 3) / 24 * 2 * math.pi)
    return max(0.0, min(100.0, base))


def seed(engine: Engine, now: datetime | None = None, days: int = 14) -> Seeded:
    """Write the marketplace into a migrated portal DB; returns the expected figures."""
    now = (now or utcnow()).replace(second=0, microsecond=0)
    result = Seeded(now=now)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with transaction(sessions) as session:
        _seed(session, now, days, result)
    return result


def _seed(session: Session, now: datetime, days: int, result: Seeded) -> None:
    names = [p[0] for p in PROVIDERS] + [CUSTOMER, TEAM_MEMBER]
    acct = {name: accounts.upsert_account(session, hub_model(name)) for name in names}
    team = Team(hub_group=TEAM)
    session.add(team)
    session.flush()
    session.add(TeamMembership(team_id=team.id, account_id=acct[TEAM_MEMBER].id))
    grants = ledger.external(session, "grants")
    for payer in (ledger.wallet(session, acct[CUSTOMER].id), ledger.team_budget(session, team.id)):
        ledger.post(
            session,
            f"seed:grant:{payer.key}",
            "grant",
            [ledger.Leg(grants.id, -5000 * MICRO), ledger.Leg(payer.id, 5000 * MICRO)],
        )
    platform = ledger.platform_revenue(session)
    node_index = 0
    alloc_no = 0
    for name, display, region, price, nodes in PROVIDERS:
        account = acct[name]
        provider = Provider(
            account_id=account.id,
            display_name=display,
            region=region,
            price_per_gpu_hour=price,
            status="listed",
        )
        session.add(provider)
        session.flush()
        cluster = Cluster(provider_id=provider.id, name="default", jobs_url="http://127.0.0.1:1")
        session.add(cluster)
        session.flush()
        earnings = ledger.provider_earnings(session, account.id)
        result.earnings[name] = 0
        result.nodes[name] = []
        for node_id, model, count, status, verification, reliability, reason in nodes:
            node_index += 1
            result.nodes[name].append(node_id)
            node = Node(
                cluster_id=cluster.id,
                node_id=node_id,
                status=status,
                verification=verification,
                verified_at=now - timedelta(days=days) if verification == "verified" else None,
                reliability=reliability,
                offline_reason=reason,
                last_heartbeat_at=now
                - (timedelta(hours=5) if status == "offline" else timedelta()),
                failed_verifications=1 if verification == "failed" else 0,
                demo=True,
            )
            session.add(node)
            session.flush()
            session.add_all(
                Gpu(
                    node_id=node.id, index=i, uuid=f"GPU-{node_id}-{i}", model=model, vram_mib=81920
                )
                for i in range(count)
            )
            if verification == "failed":
                session.add(
                    NodeChallenge(
                        node_id=node.id,
                        nonce=f"seed-{node_id}",
                        seed=1,
                        size=64,
                        status="failed",
                        issued_at=now - timedelta(days=1),
                        deadline=now - timedelta(days=1) + timedelta(minutes=5),
                        detail="answers did not match",
                    )
                )
            # Heartbeat rollups every 5 minutes for the last two days, while online.
            last = now - (timedelta(hours=5) if status == "offline" else timedelta())
            minute = now - timedelta(days=2)
            rows = []
            while minute < last:
                rows.append(
                    {
                        "node_id": node.id,
                        "minute": minute,
                        "heartbeats": 2,
                        "gpu_util_sum": utilisation(node_index, minute) * count,
                        "gpu_samples": count,
                        "memory_used_mib_max": 40_000,
                        "temperature_c_max": 70,
                        "power_w_sum": 300.0 * count,
                    }
                )
                minute += timedelta(minutes=5)
            if rows:
                session.execute(insert(HeartbeatRollup), rows)
            if verification != "verified":
                continue
            # One server a day on each verified node, alternating customer and team.
            for day in range(days):
                alloc_no += 1
                team_pays = alloc_no % 3 == 0
                user = TEAM_MEMBER if team_pays else CUSTOMER
                server = f"train-{model.lower()}" if alloc_no % 2 else "notebook"
                start = (now - timedelta(days=day + 1)).replace(hour=8) + timedelta(
                    minutes=node_index
                )
                hours = 2 + (alloc_no % 5)
                end = start + timedelta(hours=hours)
                gpus = min(count, 1 + alloc_no % 2)
                reservation = Reservation(
                    id=f"seed{alloc_no:04d}",
                    account_id=acct[user].id,
                    node_id=node.id,
                    gpu_count=gpus,
                    gpu_indices=list(range(gpus)),
                    gpu_model=model,
                    price_per_gpu_hour=price,
                    platform_fee_bps=FEE_BPS,
                    user_name=user,
                    server_name=server,
                    status="released",
                    created_at=start - timedelta(seconds=20 + alloc_no % 7),
                    activated_at=start,
                    released_at=end,
                )
                alloc = Allocation(
                    account_id=acct[user].id,
                    team_id=team.id if team_pays else None,
                    provider_account_id=account.id,
                    reservation_id=reservation.id,
                    user_name=user,
                    server_name=server,
                    gpu_count=gpus,
                    price_per_gpu_hour=price,
                    platform_fee_bps=FEE_BPS,
                    status="closed",
                    started_at=start,
                    last_charged_at=end,
                    ended_at=end,
                )
                session.add_all([reservation, alloc])
                session.flush()
                charge = gpus * price * hours
                fee = charge * FEE_BPS // 10_000
                payer = (
                    ledger.team_budget(session, team.id)
                    if team_pays
                    else ledger.wallet(session, acct[user].id)
                )
                ledger.post(
                    session,
                    f"seed:usage:{alloc.id}",
                    "usage",
                    [
                        ledger.Leg(payer.id, -charge),
                        ledger.Leg(earnings.id, charge - fee),
                        ledger.Leg(platform.id, fee),
                    ],
                    allocation_id=alloc.id,
                    period_start=start,
                    period_end=end,
                )
                result.earnings[name] += charge - fee
                result.fee += fee
                result.spend[user] = result.spend.get(user, 0) + charge
                result.servers.setdefault(user, set()).add(server)
    # One settled payout per provider, two days ago (made up: the chain is not involved).
    for index, (name, *_rest) in enumerate(PROVIDERS):
        signature = f"seedpayout{index}" + "1" * 78
        session.add(
            Payout(
                provider_account_id=acct[name].id,
                period_start=now - timedelta(days=3),
                period_end=now - timedelta(days=2),
                amount=1_000_000 + index,
                asset="SOL",
                units=10_000_000 + index,
                wallet="11111111111111111111111111111111",
                chain="litesvm",
                status="settled",
                signature=signature,
                created_at=now - timedelta(days=2),
            )
        )
        result.payouts[name] = signature
    # One failed spawn today, on Bravo's H100 (the node that then failed verification).
    session.add(
        Reservation(
            id="seedfail",
            account_id=acct[CUSTOMER].id,
            node_id=session.query(Node.id).filter(Node.node_id == "bravo-node-2").scalar(),
            gpu_count=1,
            gpu_indices=[0],
            gpu_model="H100-80GB",
            price_per_gpu_hour=2_500_000,
            platform_fee_bps=FEE_BPS,
            user_name=CUSTOMER,
            server_name="h100-try",
            status="released",
            created_at=now - timedelta(hours=3),
            failed_at=now - timedelta(hours=3) + timedelta(minutes=1),
            failure_reason="the server did not start",
            released_at=now - timedelta(hours=3) + timedelta(minutes=1),
        )
    )
