"""Payouts through the portal API, and the treasury secret nowhere it must not be.

The portal runs in-process with the embedded LiteSVM chain (its state in the data
dir) on SQLite and PostgreSQL; time moves with the clock fixture.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from sqlalchemy import MetaData, select

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import deposits, ledger, payouts, treasury
from gpuportal.hub.db.marketplace_models import Provider
from gpuportal.hub.db.models import Account
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import load_settings

from ..fakes import FakeHub
from .conftest import CREDIT, T0, Clock
from .test_billing_api import API, USERS, auth, error

WALLET = str(Keypair().pubkey())


@pytest.fixture
def portal(tmp_path: Path, db_url: str) -> Portal:
    settings = load_settings(
        data_dir=tmp_path,
        db_url=db_url,
        ray_dashboard_url="http://127.0.0.1:9",
        signup_credits=0,
        payout_period_seconds=3600,
    )
    chain = deposits.make_chain(settings)
    return Portal(settings, cache=MemoryCache(), hub=FakeHub(USERS), chain=chain)


@pytest.fixture
def client(portal: Portal, clock: Clock) -> Iterator[TestClient]:
    with TestClient(create_app(portal.settings, portal, background=False)) as test_client:
        for token in ("tok-admin", "tok-ann", "tok-bob"):
            assert test_client.get(f"{API}/me", headers=auth(token)).status_code == 200
        yield test_client


def make_provider(portal: Portal, name: str, earned: int) -> int:
    """``name`` sells GPUs with a wallet and has ``earned`` micro-credits of the hour at T0."""
    with portal_db.transaction(portal.sessions) as session:
        account = session.scalar(select(Account).where(Account.hub_name == name))
        assert account is not None
        session.add(
            Provider(
                account_id=account.id,
                display_name=name,
                region="local",
                price_per_gpu_hour=CREDIT,
                payout_wallet=WALLET,
            )
        )
        session.flush()
        ledger.post(
            session,
            f"earned-{name}",
            "usage",
            [
                ledger.Leg(ledger.provider_earnings(session, account.id).id, earned),
                ledger.Leg(ledger.external(session, "grants").id, -earned),
            ],
            period_end=T0 + timedelta(minutes=30),
        )
        return account.id


def test_a_provider_sees_their_settled_payout_and_its_signature(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    make_provider(portal, "ann", 2 * CREDIT)
    clock.advance(2 * 3600)
    ran = client.post(f"{API}/payouts/run", headers=auth("tok-admin"))
    assert ran.status_code == 200, ran.text
    assert len(ran.json()["created"]) == 1 and ran.json()["errors"] == {}
    again = client.post(f"{API}/payouts/run", headers=auth("tok-admin")).json()
    assert again["created"] == []  # one per provider and period
    mine = client.get(f"{API}/payouts", headers=auth("tok-ann"))
    assert mine.status_code == 200
    (payout,) = mine.json()
    assert (payout["status"], payout["amount"], payout["wallet"]) == ("settled", 2 * CREDIT, WALLET)
    assert payout["units"] == 2 * CREDIT * 10 and payout["explorer_url"] is None  # embedded chain
    found = portal.chain.lookup(payout["signature"])  # type: ignore[union-attr]
    assert found is not None and found.succeeded
    assert client.get(f"{API}/payouts", headers=auth("tok-bob")).json() == []
    theirs = client.get(f"{API}/payouts?provider=ann", headers=auth("tok-bob"))
    assert theirs.status_code == 403 and "only see your own payouts" in error(theirs)
    admin = client.get(f"{API}/payouts?provider=ann", headers=auth("tok-admin"))
    assert [p["id"] for p in admin.json()] == [payout["id"]]


def test_the_admin_view_lists_pending_and_failed_and_the_treasury_balance(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    make_provider(portal, "ann", 2 * CREDIT)
    clock.advance(2 * 3600)
    chain, vault, _ = portal.payout_side()
    drained = chain.balance(str(vault.pubkey))
    # empty the treasury: the payout waits, pending, with the reason
    with chain._writing():
        from solders.account import Account as SvmAccount

        chain.svm.set_account(
            vault.pubkey,
            SvmAccount(1_000, b"", deposits._pubkey(deposits.SYSTEM_PROGRAM), False, 0),
        )
    client.post(f"{API}/payouts/run", headers=auth("tok-admin"))
    view = client.get(f"{API}/payouts/admin", headers=auth("tok-admin"))
    assert view.status_code == 200, view.text
    body = view.json()
    assert body["treasury"]["address"] == str(vault.pubkey)
    assert body["treasury"]["lamports"] == 1_000 < drained
    (pending,) = body["pending"]
    assert pending["status"] == "pending" and "treasury holds" in pending["reason"]
    assert body["failed"] == [] and body["totals"]["pending"] == 2 * CREDIT
    assert client.get(f"{API}/payouts/admin", headers=auth("tok-ann")).status_code == 403


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/payouts/999/retry", 404, "There is no payout 999"),
        ("/payouts/abc/retry", 422, "payout_id"),
    ],
)
def test_bad_retries_are_refused_with_a_sentence(
    client: TestClient, path: str, status: int, words: str
) -> None:
    reply = client.post(f"{API}{path}", headers=auth("tok-admin"))
    assert reply.status_code == status, reply.text
    assert words in error(reply)


def test_a_settled_payout_cannot_be_retried(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    make_provider(portal, "ann", 2 * CREDIT)
    clock.advance(2 * 3600)
    (made,) = client.post(f"{API}/payouts/run", headers=auth("tok-admin")).json()["created"]
    reply = client.post(f"{API}/payouts/{made}/retry", headers=auth("tok-admin"))
    assert reply.status_code == 409 and "only a failed payout can be retried" in error(reply)
    assert client.post(f"{API}/payouts/{made}/retry", headers=auth("tok-ann")).status_code == 403


# --- the secret scan --------------------------------------------------------------------------


def secret_forms(keypair: Keypair) -> list[bytes]:
    """Every way the treasury secret could be written down."""
    secret, seed = bytes(keypair), bytes(keypair)[:32]
    # base58 of 64 and of 32 bytes, written by solders' own encoders
    b58_secret = str(Signature.from_bytes(secret)).encode()
    b58_seed = str(Pubkey.from_bytes(seed)).encode()
    assert b58_secret == str(keypair).encode()
    forms = [secret, seed, b58_secret, b58_seed]
    forms += [secret.hex().encode(), seed.hex().encode(), base64.b64encode(secret)]
    forms += [json.dumps(list(secret)).encode(), json.dumps(list(seed)).encode()]
    forms += [json.dumps(list(secret), separators=(",", ":")).encode()]
    return forms


def test_the_treasury_secret_is_in_no_log_db_row_response_or_state_file(
    client: TestClient, portal: Portal, clock: Clock, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    caplog.set_level(logging.DEBUG)
    make_provider(portal, "ann", 2 * CREDIT)
    clock.advance(2 * 3600)
    replies = [
        client.post(f"{API}/payouts/run", headers=auth("tok-admin")),
        client.get(f"{API}/payouts", headers=auth("tok-ann")),
        client.get(f"{API}/payouts/admin", headers=auth("tok-admin")),
        client.get(f"{API}/payouts?provider=ann", headers=auth("tok-admin")),
        client.get(f"{API}/deposits/solana", headers=auth("tok-ann")),
    ]
    assert all(r.status_code == 200 for r in replies)
    _chain, vault, _ = portal.payout_side()
    logging.getLogger("scan").info("treasury %s, %r", vault, vault)  # what a careless log shows
    key_file = tmp_path / treasury.EMBEDDED_TREASURY
    keypair = Keypair.from_bytes(bytes(json.loads(key_file.read_text())))
    assert keypair.pubkey() == vault.pubkey
    haystacks: dict[str, bytes] = {
        "logs": "\n".join(r.getMessage() for r in caplog.records).encode(),
        "responses": b"\n".join(r.content for r in replies),
        "chain state": (tmp_path / deposits.LITESVM_STATE).read_bytes(),
        "db": dump_db(portal),
        "openapi": client.get("/services/portal/openapi.json").content,
    }
    assert str(vault.pubkey).encode() in haystacks["responses"]  # the scan can find things
    for where, text in haystacks.items():
        for form in secret_forms(keypair):
            assert form not in text, f"the treasury secret is in the {where}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(vault)


def dump_db(portal: Portal) -> bytes:
    """Every row of every table, as bytes (binary columns raw, the rest as text)."""
    out = []
    meta = MetaData()
    meta.reflect(portal.engine)
    with portal.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(table.select()):
                for value in row:
                    out.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(out)


def test_the_treasury_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, solana_treasury_keypair=str(tmp_path / "t.json"))
    chain: Any = deposits.LiteSVMChain()
    path = tmp_path / "t.json"
    with pytest.raises(treasury.TreasuryUnavailable, match="cannot be read"):
        treasury.load(settings, chain)
    path.write_text(json.dumps(list(bytes(Keypair()))))
    path.chmod(0o644)
    with pytest.raises(treasury.TreasuryUnavailable, match="make it 0600"):
        treasury.load(settings, chain)
    path.chmod(0o600)
    path.write_text("[1, 2, 3]")
    with pytest.raises(treasury.TreasuryUnavailable, match="not a JSON array of 64 bytes") as err:
        treasury.load(settings, chain)
    assert "[1, 2, 3]" not in str(err.value)


def test_a_real_chain_without_a_treasury_file_is_refused_with_a_sentence(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, solana_rpc_url="http://127.0.0.1:9")
    with pytest.raises(treasury.TreasuryUnavailable, match="GPUPORTAL_SOLANA_TREASURY_KEYPAIR"):
        treasury.load(settings, deposits.RpcChain(settings.solana_rpc_url))


def test_payout_period_grid_and_units(portal: Portal) -> None:
    start, end = payouts.last_complete_period(portal.settings, T0 + timedelta(minutes=90))
    assert (start, end) == (T0, T0 + timedelta(hours=1))


def test_the_treasury_reaches_no_user_server_or_provider_node(tmp_path: Path) -> None:
    """The control plane's environment names the treasury file (and a careless operator
    may export the key itself); the environments built for a user server and for a
    provider node's Ray carry neither."""
    from gpuportal.provider import isolation, raynode
    from gpuportal.spawners.singleuser import server_env

    keypair = Keypair()
    control_plane = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "GPUPORTAL_SOLANA_TREASURY_KEYPAIR": str(tmp_path / "treasury.json"),
        "SOLANA_TREASURY_SECRET": str(keypair),
        "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
    }
    account = isolation.Account("gp-alice-0123456789", 4242, 4242, tmp_path)
    built = [
        server_env(control_plane, "alices-token", account, "http://127.0.0.1:5000/u/"),
        raynode.ray_env(tmp_path / "ray-auth-token", {}, source=control_plane),
    ]
    for env in built:
        text = "\n".join(f"{k}={v}" for k, v in env.items()).encode()
        assert b"TREASURY" not in text
        for form in secret_forms(keypair):
            assert form not in text


def test_payout_settings_survive_the_hub_configs_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jupyterhub_config.py hands the portal every setting as ``str(value)``: an unset
    treasury path must come back unset (it once came back as a file named "None")."""
    first = load_settings(data_dir=tmp_path)
    for name in type(first).model_fields:
        if name.startswith(("payout_", "solana_", "litesvm_")):
            monkeypatch.setenv(f"GPUPORTAL_{name.upper()}", str(getattr(first, name)))
    again = load_settings(data_dir=tmp_path)
    chain = deposits.LiteSVMChain()
    assert treasury.treasury_path(again, chain) == tmp_path / treasury.EMBEDDED_TREASURY
    assert again.payout_asset == "SOL" and again.payout_commitment == "finalized"


def test_a_wallet_changed_through_the_api_pays_from_the_next_period(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    account = make_provider(portal, "ann", 2 * CREDIT)
    new_wallet = str(Keypair().pubkey())
    clock.advance(30 * 60)  # in the middle of the period that earned
    reply = client.patch(
        f"{API}/providers/me", json={"payout_wallet": new_wallet}, headers=auth("tok-ann")
    )
    assert reply.status_code == 200, reply.text
    with portal_db.transaction(portal.sessions) as session:
        assert payouts.wallet_for(session, account, T0) == WALLET  # the period it changed in
        assert payouts.wallet_for(session, account, T0 + timedelta(hours=1)) == new_wallet
    clock.advance(3600)
    client.post(f"{API}/payouts/run", headers=auth("tok-admin"))
    (payout,) = client.get(f"{API}/payouts", headers=auth("tok-ann")).json()
    assert payout["wallet"] == WALLET


def test_payout_runs_and_retries_are_in_the_admin_audit_log(
    client: TestClient, portal: Portal, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuportal.hub.db import audit

    make_provider(portal, "ann", 2 * CREDIT)
    clock.advance(2 * 3600)
    real_transfer = payouts.payout_tx.sol_transfer
    # The chain refuses the transfer (a brand-new wallet must receive at least its rent).
    monkeypatch.setattr(payouts.payout_tx, "sol_transfer", lambda t, w, n: real_transfer(t, w, 1))
    (made,) = client.post(f"{API}/payouts/run", headers=auth("tok-admin")).json()["created"]
    view = client.get(f"{API}/payouts/admin", headers=auth("tok-admin")).json()
    assert [p["id"] for p in view["failed"]] == [made]
    monkeypatch.setattr(payouts.payout_tx, "sol_transfer", real_transfer)
    # A provider may not retry; the refusal leaves no record.
    assert client.post(f"{API}/payouts/{made}/retry", headers=auth("tok-ann")).status_code == 403
    retried = client.post(f"{API}/payouts/{made}/retry", headers=auth("tok-admin"))
    assert retried.status_code == 200, retried.text
    with portal_db.transaction(portal.sessions) as session:
        records = audit.search(session, action="payout.")
    assert [(r["actor"], r["action"]) for r in records] == [
        ("admin", "payout.retry"),
        ("admin", "payout.run"),
    ]
    assert records[0]["target"] == str(made) and records[0]["detail"]["retries"] == 1
    assert records[1]["detail"]["created"] == [made]
