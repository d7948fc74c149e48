"""The dashboards' SQL reports on a seeded marketplace, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gpuportal.hub.billing import analytics
from gpuportal.hub.db.models import Account

from .seed import CUSTOMER, FEE_BPS, TEAM, TEAM_MEMBER, seed


def account_id(session: Session, name: str) -> int:
    return session.scalar(select(Account.id).where(Account.hub_name == name)) or 0


def test_a_provider_report_holds_only_that_providers_nodes_and_earnings(db: Engine) -> None:
    seeded = seed(db)
    with Session(db) as session:
        report = analytics.provider_report(
            session, account_id(session, "prov-bravo"), seeded.now, 30, FEE_BPS
        )
    assert [n["node"] for n in report["nodes"]] == ["bravo-node-1", "bravo-node-2"]
    assert {r["node"] for r in report["earnings"]} == {"bravo-node-1"}
    assert {r["node"] for r in report["utilisation"]} == {"bravo-node-1", "bravo-node-2"}
    assert sum(r["earned"] for r in report["earnings"]) == seeded.earnings["prov-bravo"]
    assert report["earnings_total"] == seeded.earnings["prov-bravo"]
    assert [p["signature"] for p in report["payouts"]] == [seeded.payouts["prov-bravo"]]
    assert report["payouts"][0]["provider"] == "prov-bravo"
    assert "tx_bytes" not in report["payouts"][0]
    # Alpha (2.00) and Bravo (2.50) both list A100s: the median is between them.
    assert report["market_median"]["A100-80GB"] == 2_250_000
    messages = [a["message"] for a in report["alerts"]]
    assert messages == ["Node bravo-node-2 failed verification; its GPUs are not offered."]
    projected = {p["node"]: p for p in report["projected"]}
    assert projected["bravo-node-1"]["per_month"] > 0


def test_offline_and_unreliable_nodes_raise_alerts(db: Engine) -> None:
    seeded = seed(db)
    with Session(db) as session:
        report = analytics.provider_report(
            session, account_id(session, "prov-alpha"), seeded.now, 30, FEE_BPS
        )
    assert [a["message"] for a in report["alerts"]] == [
        "Node alpha-node-2 is offline (heartbeats).",
        "Node alpha-node-2 has a low reliability score (0.62); it is placed last, then not at all.",
    ]


def test_a_customers_usage_is_their_own_and_adds_up_to_their_spend(db: Engine) -> None:
    seeded = seed(db)
    with Session(db) as session:
        report = analytics.usage_report(session, account_id(session, CUSTOMER), seeded.now, 30)
    assert sum(r["charged"] for r in report["by_server"]) == seeded.spend[CUSTOMER]
    assert sum(r["charged"] for r in report["by_day"]) == seeded.spend[CUSTOMER]
    assert {r["server"] for r in report["by_server"]} == seeded.servers[CUSTOMER]
    sessions = report["sessions"]
    assert sessions and all(s["server"] in seeded.servers[CUSTOMER] for s in sessions)
    # Heartbeats cover the last two days: those sessions have utilisation, some idle time.
    measured = [s for s in sessions if s["measured_minutes"]]
    assert measured and all(0 <= s["utilisation"] <= 1 for s in measured)
    assert all(s["idle_cost"] >= 0 for s in sessions)


def test_the_analytics_add_up_across_payers_providers_and_the_fee(db: Engine) -> None:
    seeded = seed(db)
    with Session(db) as session:
        report = analytics.analytics_report(session, seeded.now - timedelta(days=30), seeded.now)
    totals = report["totals"]
    assert totals["fee"] == seeded.fee
    assert totals["spend"] == sum(seeded.spend.values())
    assert totals["spend"] == totals["earnings"] + totals["fee"]
    payers = {(r["payer"], r["name"]): r["spend"] for r in report["spend_by_payer"]}
    assert payers[("user", CUSTOMER)] == seeded.spend[CUSTOMER]
    assert payers[("team", TEAM)] == seeded.spend[TEAM_MEMBER]
    top = {r["provider"]: r["earned"] for r in report["top_providers"]}
    assert top == {
        "prov-alpha": seeded.earnings["prov-alpha"],
        "prov-bravo": seeded.earnings["prov-bravo"],
    }
    capacity = {(r["gpu_model"], r["region"]): r for r in report["capacity"]}
    # Verified GPUs only: Bravo's H100 failed verification.
    assert set(capacity) == {
        ("A100-80GB", "eu-west"),
        ("RTX-4090", "eu-west"),
        ("A100-80GB", "us-east"),
    }
    assert capacity[("A100-80GB", "us-east")]["gpus"] == 4
    assert report["spawns"]["failed"] == 1
    assert report["spawns"]["started"] == report["spawns"]["total"] - 1
    assert report["spawns"]["latency_p50_seconds"] is not None
    assert report["faults"]["failed_verifications"] == 1
    assert [n["node"] for n in report["faults"]["offline_nodes"]] == ["alpha-node-2"]
    assert {p["signature"] for p in report["payouts"]} == set(seeded.payouts.values())


def test_a_range_before_any_usage_is_empty_not_an_error(db: Engine) -> None:
    seeded = seed(db)
    with Session(db) as session:
        report = analytics.analytics_report(
            session, seeded.now - timedelta(days=400), seeded.now - timedelta(days=300)
        )
    assert report["revenue"] == [] and report["totals"] == {"spend": 0, "earnings": 0, "fee": 0}
