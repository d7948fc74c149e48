"""The ``rpc`` chain backend's payouts, driven through solana-py's async client against a
stand-in JSON-RPC cluster on 127.0.0.1.

The stand-in keeps a block height, hands out blockhashes with a last valid height,
accepts raw transactions (decoded and checked with solders), and reports their status
as the test script says: ``processed`` -> ``confirmed`` -> ``finalized``, never seen
(dropped), or too late (the blockhash expired). It proves the state machine against
Solana's documented answers, not against a real cluster.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from solders.hash import Hash
from solders.keypair import Keypair
from solders.transaction import VersionedTransaction
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import deposits, ledger, payouts, treasury
from gpuportal.hub.db.marketplace_models import Provider
from gpuportal.hub.db.payout_models import Payout
from gpuportal.hub.settings import Settings

from .conftest import CREDIT, T0, Clock, add_account, balance_of, total

WALLET = str(Keypair().pubkey())


class StandInCluster:
    """A tiny Solana cluster's JSON-RPC face, on 127.0.0.1."""

    def __init__(self) -> None:
        self.height = 100
        self.lifetime = 150  # blocks a blockhash stays valid
        self.blockhashes: dict[str, int] = {}  # blockhash -> last valid height
        self.sends: list[bytes] = []
        #: signature -> how many status polls it has had (it climbs one level per poll)
        self.landed: dict[str, int] = {}
        self.drop = False  # accept sends but never land them
        self.lamports = 10**12
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                call = json.loads(self.rfile.read(int(self.headers["content-length"])))
                result = cluster.answer(call["method"], call.get("params") or [])
                body = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def context(self, value: Any) -> dict[str, Any]:
        return {"context": {"slot": self.height}, "value": value}

    def answer(self, method: str, params: list[Any]) -> Any:
        if method == "getLatestBlockhash":
            blockhash = str(Hash.new_unique())
            self.blockhashes[blockhash] = self.height + self.lifetime
            return self.context({"blockhash": blockhash, "lastValidBlockHeight": self.height + 150})
        if method == "getBlockHeight":
            return self.height
        if method == "getBalance":
            return self.context(self.lamports)
        if method == "sendTransaction":
            import base64

            raw = base64.b64decode(params[0])
            tx = VersionedTransaction.from_bytes(raw)
            assert tx.verify_with_results() == [True], "a bad signature reached the cluster"
            self.sends.append(raw)
            signature = str(tx.signatures[0])
            valid_until = self.blockhashes.get(str(tx.message.recent_blockhash), -1)
            if not self.drop and self.height <= valid_until:
                self.landed.setdefault(signature, 0)
            return signature
        if method == "getSignatureStatuses":
            out = []
            for signature in params[0]:
                if signature not in self.landed:
                    out.append(None)
                    continue
                polls = self.landed[signature]
                self.landed[signature] = polls + 1
                level = ("processed", "confirmed", "finalized")[min(polls, 2)]
                out.append(
                    {
                        "slot": self.height,
                        "confirmations": None if level == "finalized" else 0,
                        "err": None,
                        "status": {"Ok": None},
                        "confirmationStatus": level,
                    }
                )
            return self.context(out)
        raise AssertionError(f"the stand-in does not know {method}")

    def landed_transfers(self) -> int:
        return len(self.landed)


@pytest.fixture
def cluster() -> Iterator[StandInCluster]:
    stand_in = StandInCluster()
    yield stand_in
    stand_in.close()


@pytest.fixture
def rpc_settings(settings: Settings, cluster: StandInCluster, tmp_path: Path) -> Settings:
    key = tmp_path / "treasury.json"
    key.write_text(json.dumps(list(bytes(Keypair()))))
    key.chmod(0o600)
    return settings.model_copy(
        update={
            "solana_rpc_url": cluster.url,
            "solana_treasury_keypair": str(key),
            "payout_period_seconds": 3600,
            "payout_minimum": 1,
        }
    )


@pytest.fixture
def provider(sessions: sessionmaker[Session], clock: Clock) -> int:
    """A provider (no demo nodes) with 2 credits earned in the hour at T0."""
    account = add_account(sessions, "prov")
    with portal_db.transaction(sessions) as session:
        session.add(
            Provider(
                account_id=account,
                display_name="prov",
                region="local",
                price_per_gpu_hour=CREDIT,
                payout_wallet=WALLET,
            )
        )
        ledger.post(
            session,
            "earned",
            "usage",
            [
                ledger.Leg(ledger.provider_earnings(session, account).id, 2 * CREDIT),
                ledger.Leg(ledger.external(session, "grants").id, -2 * CREDIT),
            ],
            period_end=T0 + timedelta(minutes=10),
        )
    clock.advance(2 * 3600)
    return account


def the_payout(sessions: sessionmaker[Session]) -> Payout:
    with portal_db.transaction(sessions) as session:
        found = session.scalar(select(Payout))
        assert found is not None
        session.expunge(found)
        return found


def test_a_payout_settles_only_at_the_configured_commitment(
    sessions, rpc_settings, cluster, provider, clock
) -> None:
    chain = deposits.make_chain(rpc_settings)
    assert isinstance(chain, deposits.RpcChain) and chain.real
    vault = treasury.load(rpc_settings, chain)
    result = payouts.run(sessions, rpc_settings, chain, vault, clock.now)
    assert result.errors == {}
    payout = the_payout(sessions)
    assert payout.status == "sent"  # processed is not finalized
    assert payout.last_valid_block_height == 250
    assert payouts.advance(sessions, rpc_settings, chain, vault, payout.id) == "sent"  # confirmed
    assert payouts.advance(sessions, rpc_settings, chain, vault, payout.id) == "settled"
    assert cluster.sends == [payout.tx_bytes]  # sent once; statuses were only read
    assert balance_of(sessions, "external:payouts") == 2 * CREDIT
    assert payouts.explorer_url(rpc_settings, chain, payout.signature) is None  # unknown cluster
    assert total(sessions) == 0


def test_confirmed_commitment_settles_one_step_earlier(
    sessions, rpc_settings, cluster, provider, clock
) -> None:
    settings = rpc_settings.model_copy(update={"payout_commitment": "confirmed"})
    chain = deposits.make_chain(settings)
    vault = treasury.load(settings, chain)
    payouts.run(sessions, settings, chain, vault, clock.now)
    payout = the_payout(sessions)
    assert payouts.advance(sessions, settings, chain, vault, payout.id) == "settled"


def test_a_dropped_transaction_is_sent_again_unchanged_then_signed_anew_after_expiry(
    sessions, rpc_settings, cluster, provider, clock
) -> None:
    chain = deposits.make_chain(rpc_settings)
    vault = treasury.load(rpc_settings, chain)
    cluster.drop = True
    payouts.run(sessions, rpc_settings, chain, vault, clock.now)
    first = the_payout(sessions)
    for _ in range(2):  # still valid: the same bytes again, never a new signature
        assert payouts.advance(sessions, rpc_settings, chain, vault, first.id) == "sent"
    assert cluster.sends == [first.tx_bytes] * 3
    assert the_payout(sessions).signings == 1
    cluster.drop = False
    cluster.height = 251  # past its last valid block height: it can never land now
    assert payouts.advance(sessions, rpc_settings, chain, vault, first.id) == "sent"
    second = the_payout(sessions)
    assert second.signings == 2 and second.signature != first.signature
    assert cluster.sends[-1] == second.tx_bytes
    for _ in range(3):
        payouts.advance(sessions, rpc_settings, chain, vault, first.id)
    assert the_payout(sessions).status == "settled"
    assert cluster.landed_transfers() == 1  # exactly one transfer ever landed
    assert total(sessions) == 0


def test_a_payout_signed_just_before_its_blockhash_expired_is_signed_anew_not_sent(
    sessions, rpc_settings, cluster, provider, clock, monkeypatch
) -> None:
    """A crash after the signature was stored; the restart comes after expiry."""

    class Crash(BaseException):
        pass

    def die(name: str) -> None:
        if name == "after_persist":
            raise Crash(name)

    chain = deposits.make_chain(rpc_settings)
    vault = treasury.load(rpc_settings, chain)
    monkeypatch.setattr(payouts, "crash_point", die)
    with pytest.raises(Crash):
        payouts.run(sessions, rpc_settings, chain, vault, clock.now)
    stale = the_payout(sessions)
    monkeypatch.setattr(payouts, "crash_point", lambda name: None)
    cluster.height = 10_000
    payouts.resume(sessions, rpc_settings, chain, vault, clock.now)
    fresh = the_payout(sessions)
    assert stale.tx_bytes not in cluster.sends  # the expired bytes were never sent
    assert fresh.signings == 2 and cluster.sends == [fresh.tx_bytes]


def test_an_unreachable_endpoint_decides_nothing(
    sessions, rpc_settings, provider, clock, cluster
) -> None:
    chain = deposits.make_chain(rpc_settings)
    vault = treasury.load(rpc_settings, chain)
    cluster.close()
    result = payouts.run(sessions, rpc_settings, chain, vault, clock.now)
    assert any("did not answer" in problem for problem in result.errors.values())
    payout = the_payout(sessions)
    assert payout.status == "pending" and payout.signature is None
    account = provider
    assert balance_of(sessions, f"payouts:{account}") == 2 * CREDIT  # in flight, not lost


@pytest.mark.parametrize(
    ("url", "link"),
    [
        ("https://api.devnet.solana.com", "https://explorer.solana.com/tx/S?cluster=devnet"),
        ("https://api.mainnet-beta.solana.com", "https://explorer.solana.com/tx/S"),
        ("http://127.0.0.1:8899", None),
    ],
)
def test_explorer_links_only_for_known_real_clusters(settings: Settings, url: str, link) -> None:
    configured = settings.model_copy(update={"solana_rpc_url": url})
    assert payouts.explorer_url(configured, deposits.RpcChain(url), "S") == link
    assert payouts.explorer_url(configured, deposits.LiteSVMChain(), "S") is None
