"""Tests that catch a wrong sum: each one kills a plausible one-line bug in the money path.

A mutation run over the money modules (issue 9, item 8) left these one-line bugs
alive: no test failed with any of them applied. Each test below names the bug it
catches, and was checked by applying that bug by hand and watching the test fail
(``make mutate`` repeats the check with a mutation tool; docs/testing.md). The
amounts are chosen so that the bug changes the answer: prices that do not divide
evenly, a running server that matters, an allocation that straddles the window.

SQLite and PostgreSQL (the ``db_url`` fixture), time through the test clock.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from solders.pubkey import Pubkey
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import allocations, deposits, ledger, metering, quotas
from gpuportal.hub.billing.ledger import LedgerError, UnknownAccount
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account
from gpuportal.hub.settings import Settings

from .conftest import (
    CREDIT,
    T0,
    add_account,
    add_team,
    allocation,
    balance_of,
    grant,
    open_alloc,
)

PRICE = 3_600_000  # 3.60 credits per GPU-hour: 1000 micro-credits per GPU-second
HOUR = timedelta(hours=1)


def authorize_launch(
    session: Session, settings: Settings, user: str, **kw: Any
) -> quotas.Authorization:
    args: dict[str, Any] = {"gpu_count": 1, "price_per_gpu_hour": PRICE, "team": None, "now": T0}
    args.update(kw)
    return quotas.authorize_launch(session, settings, user=user, **args)


def set_quota(sessions: sessionmaker[Session], **kw: Any) -> None:
    args: dict[str, Any] = {
        "user": None,
        "team": None,
        "window": "day",
        "gpu_hours": None,
        "spend_cap_per_hour": None,
    }
    args.update(kw)
    with portal_db.transaction(sessions) as session:
        quotas.set_quota(session, **args)


def fund_team(sessions: sessionmaker[Session], team_id: int, micro: int) -> None:
    with portal_db.transaction(sessions) as session:
        ledger.post(
            session,
            f"team-grant:{team_id}",
            "grant",
            [
                ledger.Leg(ledger.team_budget(session, team_id).id, micro),
                ledger.Leg(ledger.external(session, "grants").id, -micro),
            ],
        )


def end_alloc(sessions: sessionmaker[Session], alloc_id: int, ended_at: Any) -> None:
    """Mark an allocation closed at ``ended_at`` (its bill is not what these tests check)."""
    with portal_db.transaction(sessions) as session:
        alloc = session.get(Allocation, alloc_id)
        assert alloc is not None
        alloc.status, alloc.ended_at, alloc.last_charged_at = "closed", ended_at, ended_at


# --- quotas.py: the spawn-time check -------------------------------------------------------


@pytest.mark.parametrize(("available", "refused"), [(250_000, True), (250_001, False)])
def test_the_minimum_credit_check_rounds_up(available: int, refused: bool) -> None:
    """Mutant: ``needed`` rounded down. 1,000,001 micro/h for 900 s is 250,000.25 micro,
    so 250,000 micro-credits do not cover the minimum period; 250,001 do."""
    why = quotas.runway_refusal(available, 0, 1_000_001, 900, "credits")
    assert (why is not None) is refused
    if refused:
        assert "0.25 credits" in str(why)


def test_a_gpu_hour_quota_counts_the_minimum_period_of_running_servers(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: authorize drops the quota use of running servers. 1500 GPU-s left, one
    server running (900 s of it in the minimum period) leaves 600 s: too few for 900."""
    bob = add_account(sessions, "bob")
    for account, name in ((ann, "ann"), (bob, "bob")):
        grant(sessions, account, 100 * CREDIT, f"g-{name}")
        set_quota(sessions, user=name, gpu_hours=1500 / 3600)
    open_alloc(sessions, settings, "ann", server="running")
    with portal_db.transaction(sessions) as session:
        with pytest.raises(quotas.QuotaExceeded, match="Your GPU-hour budget"):
            authorize_launch(session, settings, "ann")
        # The same quota without a running server takes the launch.
        assert authorize_launch(session, settings, "bob").payer == "user:bob"


def test_a_team_quota_limits_the_servers_the_team_pays_for(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: authorize ignores the team quota (ann has none of her own)."""
    team = add_team(sessions, "ml", [ann])
    fund_team(sessions, team, 100 * CREDIT)
    with portal_db.transaction(sessions) as session:
        assert authorize_launch(session, settings, "ann", team="ml").payer == "team:ml"
    set_quota(sessions, team="ml", gpu_hours=0.1)  # 360 GPU-s: less than 900
    with (
        portal_db.transaction(sessions) as session,
        pytest.raises(quotas.QuotaExceeded, match="Team ml's GPU-hour budget"),
    ):
        authorize_launch(session, settings, "ann", team="ml")


def test_a_personal_launch_does_not_count_the_servers_a_team_pays_for(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: the personal payer counts team-paid servers. Ann's own 1 credit covers
    900 s at 3.60/h (0.90); the team's 8-GPU server at 36/h per GPU is not hers to pay."""
    team = add_team(sessions, "ml", [ann])
    fund_team(sessions, team, 1000 * CREDIT)
    open_alloc(sessions, settings, "ann", server="team-gpu", gpus=8, price=36_000_000, team="ml")
    grant(sessions, ann, CREDIT, "g-ann")
    with portal_db.transaction(sessions) as session:
        ok = authorize_launch(session, settings, "ann")
    assert (ok.payer, ok.balance, ok.available, ok.rate_per_hour) == (
        "user:ann",
        CREDIT,
        CREDIT,
        PRICE,
    )


def test_a_deactivated_account_may_not_launch(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    grant(sessions, ann, 100 * CREDIT, "g-ann")
    with portal_db.transaction(sessions) as session:
        account = session.get(Account, ann)
        assert account is not None
        account.active = False
    with (
        portal_db.transaction(sessions) as session,
        pytest.raises(allocations.Forbidden, match="the account 'ann' is deactivated"),
    ):
        authorize_launch(session, settings, "ann")


# --- metering.py: quota windows, runway, warnings --------------------------------------------


def test_the_quota_window_counts_only_the_time_inside_it(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutants: the window counts old allocations whole, or starts at the epoch.

    Now is T0 + 48 h; the day window starts at T0 + 24 h. One server ran 20 h long
    before it (none of it counts); a 2-GPU server ran from T0 + 23 h to T0 + 25 h
    (one hour of it inside: 2 GPU-hours).
    """
    now = T0 + 48 * HOUR
    old = open_alloc(sessions, settings, "ann", server="old", started_at=T0, now=T0)
    end_alloc(sessions, old, T0 + 20 * HOUR)
    straddling = open_alloc(
        sessions, settings, "ann", server="straddle", gpus=2, started_at=T0 + 23 * HOUR, now=now
    )
    end_alloc(sessions, straddling, T0 + 25 * HOUR)
    set_quota(sessions, user="ann", gpu_hours=10)
    with portal_db.transaction(sessions) as session:
        quota = metering.quota_for(session, account_id=ann)
        assert quota is not None
        assert metering.quota_left(session, quota, now) == 8 * 3600
        assert quotas.quota_view(session, quota, now) == {
            "window": "day",
            "gpu_hours": 10.0,
            "gpu_hours_used": 2.0,
            "spend_cap_per_hour": None,
        }


def test_the_quota_runway_is_shared_by_the_gpus_in_use(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: the quota runway ignores the GPU count. One GPU-hour left, two GPUs
    running: 30 minutes, not an hour (the money would last far longer)."""
    grant(sessions, ann, 1000 * CREDIT, "g-ann")
    set_quota(sessions, user="ann", gpu_hours=1)
    alloc_id = open_alloc(sessions, settings, "ann", gpus=2)
    with portal_db.transaction(sessions) as session:
        alloc = session.get(Allocation, alloc_id)
        assert alloc is not None
        state = metering.payer_state(session, ledger.wallet(session, ann).id, [alloc], T0)
    assert (state.runway, state.reason) == (1800.0, "quota_exhausted")


def test_a_runway_exactly_at_the_warning_threshold_is_not_warned_yet(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: the warning's ``<`` becomes ``<=``. The threshold is the warning time
    before the stop: 600 s + the 120 s grace. At 1000 micro/s, 720,000 micro-credits
    last exactly the 720 s threshold: no warning; one micro-credit less warns."""
    threshold = metering.warning_threshold_seconds(settings)
    assert threshold == 720
    bob = add_account(sessions, "bob")
    grant(sessions, ann, threshold * 1000, "g-ann")
    grant(sessions, bob, threshold * 1000 - 1, "g-bob")
    at_threshold = open_alloc(sessions, settings, "ann")
    below = open_alloc(sessions, settings, "bob")
    result = metering.TickResult()
    with portal_db.transaction(sessions) as session:
        metering.check_runway(session, settings, T0, result)
    assert result.warned == [below]
    assert at_threshold not in result.stopping + result.warned


# --- allocations.py: closing ---------------------------------------------------------------


def test_closing_a_stopping_allocation_ends_it_at_its_stop_time(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: the close is no longer capped at ``stopping_at``. The server was due to
    stop at T0 + 100 s; a close reported at T0 + 300 s charges 100 s, not 300 s."""
    grant(sessions, ann, 100 * CREDIT, "g-ann")
    alloc_id = open_alloc(sessions, settings, "ann")
    with portal_db.transaction(sessions) as session:
        alloc = session.get(Allocation, alloc_id)
        assert alloc is not None
        alloc.status, alloc.stopping_at = "stopping", T0 + timedelta(seconds=100)
    with portal_db.transaction(sessions) as session:
        allocations.close_allocation(session, settings, alloc_id, None, T0 + timedelta(seconds=300))
    closed = allocation(sessions, alloc_id)
    assert (closed.status, closed.ended_at) == ("closed", T0 + timedelta(seconds=100))
    assert balance_of(sessions, f"wallet:{ann}") == 100 * CREDIT - 100 * 1000


def test_an_unknown_provider_is_refused(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    request = allocations.OpenRequest(
        user="ann",
        server="",
        gpu_count=1,
        price_per_gpu_hour=PRICE,
        platform_fee_bps=1000,
        started_at=T0,
        provider="nobody",
    )
    with portal_db.transaction(sessions) as session:
        with pytest.raises(UnknownAccount, match="no provider account named 'nobody'"):
            allocations.open_allocation(session, settings, request, T0)
        assert session.query(Allocation).count() == 0


# --- quotas.set_quota: what it refuses -------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"user": "ann", "team": "ml"}, "name exactly one of user or team"),
        ({}, "name exactly one of user or team"),
        ({"user": "ann", "window": "year"}, "window must be one of day, week, month"),
        ({"user": "ann", "gpu_hours": -0.5}, "gpu_hours must be between 0 and"),
        ({"user": "ann", "spend_cap_per_hour": -1}, "spend_cap_per_hour must be between 0 and"),
        ({"user": "nobody"}, "no portal account named 'nobody'"),
        ({"team": "nobody"}, "no team named 'nobody'"),
    ],
)
def test_set_quota_refuses_bad_input_with_a_sentence(
    sessions: sessionmaker[Session], ann: int, kw: dict[str, Any], message: str
) -> None:
    add_team(sessions, "ml", [ann])
    with pytest.raises(LedgerError, match=message):
        set_quota(sessions, **kw)


def test_set_quota_replaces_the_quota_and_stores_whole_gpu_seconds(
    sessions: sessionmaker[Session], ann: int
) -> None:
    set_quota(sessions, user="ann", window="week", gpu_hours=1.0001, spend_cap_per_hour=7)
    set_quota(sessions, user="ann", window="month", gpu_hours=2.5)
    with portal_db.transaction(sessions) as session:
        quota = metering.quota_for(session, account_id=ann)
        assert quota is not None
        assert (quota.rolling_window, quota.gpu_seconds, quota.spend_cap_per_hour) == (
            "month",
            9000,
            None,
        )


# --- deposits.py: rounding, dust, the generated address, the RPC seam -------------------------


def test_sol_and_usdc_deposits_round_down_to_the_micro_credit(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutants: SOL or USDC deposits round up. At 100 credits per SOL a lamport is
    0.1 micro-credit; at 1.5 credits per USDC a base unit is 1.5 micro-credits."""
    assert settings.solana_micro_credits_per_sol == 100_000_000
    usdc = settings.model_copy(update={"micro_credits_per_usdc": 1_500_000})
    with portal_db.transaction(sessions) as session:
        sol, _ = deposits.credit(
            session, settings, account_id=ann, signature="sig-sol", lamports=1_234_567_891, by="t"
        )
        tok, _ = deposits.credit_usdc(
            session, usdc, account_id=ann, signature="sig-usdc", amount=3, by="t"
        )
    assert (sol, tok) == (123_456_789, 4)
    assert balance_of(sessions, f"wallet:{ann}") == 123_456_793


def test_a_deposit_worth_less_than_one_micro_credit_is_refused(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Mutant: the dust guard is off (nothing would be credited, yet the signature
    would be used up)."""
    usdc = settings.model_copy(update={"micro_credits_per_usdc": 500_000})
    with portal_db.transaction(sessions) as session:
        with pytest.raises(deposits.DepositRefused, match="less than one micro-credit"):
            deposits.credit(session, settings, account_id=ann, signature="s1", lamports=9, by="t")
        with pytest.raises(deposits.DepositRefused, match="less than one micro-credit"):
            deposits.credit_usdc(session, usdc, account_id=ann, signature="s2", amount=1, by="t")
    assert balance_of(sessions, f"wallet:{ann}") == 0


def test_the_generated_deposit_address_is_made_once_and_its_key_kept_private(
    settings: Settings,
) -> None:
    assert not settings.solana_deposit_address
    key = settings.data_dir / "solana-deposit-keypair.json"
    assert not key.exists()
    address = deposits.deposit_address(settings)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert str(Pubkey.from_string(address)) == address
    assert deposits.deposit_address(settings) == address, "the same address every time"


def test_usdc_without_a_mint_on_a_real_cluster_is_unconfigured(settings: Settings) -> None:
    chain = deposits.RpcChain("http://127.0.0.1:9")  # never called: the mint is checked first
    with pytest.raises(deposits.DepositsUnconfigured, match="GPUPORTAL_USDC_MINT"):
        deposits.usdc_mint(settings, chain)


# RpcChain.lookup is tested through solana-py's own client against a stand-in JSON-RPC
# server on 127.0.0.1. Its ``getTransaction`` reply was written by hand in the shape of
# Solana's documented answer (encoding ``jsonParsed``); no Solana cluster is involved,
# so this proves our parsing of that documented shape, not what a real cluster sends.
# (Writing it found that solana-py 0.41 has no blocking ``Client`` any more: RpcChain
# could not even be created.)

PAYER = "3UVYmECPPMZSCqWKfENfuoTv51fTDTWicX9xmBD2euKe"
PLATFORM = "AjozzgE83A3x1sHNUR64hfH7zaEBWeMaFuAN9kQgujrc"
TOKEN_SRC = "7cVfgArCheMR6Cs4t6vz5rfnqd56vZq4ndaBrY5xkxXy"
TOKEN_DST = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
SIGNATURE = (
    "5VERv8NMvzbJMEkV8xnrLkEaWRtSz9CosKDYjCJjBRnbJLgp8uirBgmQpjKhoR4tjF3ZpRzrFmBV6UjKdiSZkQUW"
)


#: The deposit memo of account 7 at PLATFORM: what a deposit bound to that account carries.
MEMO = deposits.deposit_memo(PLATFORM, 7)


def rpc_reply(err: Any = None, inner: list[dict[str, Any]] | None = None) -> str:
    meta = {
        "err": err,
        "status": {"Ok": None} if err is None else {"Err": err},
        "fee": 5000,
        "preBalances": [2_000_000_000, 0, 1],
        "postBalances": [499_995_000, 1_500_000_000, 1],
        "innerInstructions": inner or [],
        "logMessages": [],
        "preTokenBalances": [],
        "postTokenBalances": [],
        "rewards": [],
        "loadedAddresses": {"writable": [], "readonly": []},
        "computeUnitsConsumed": 450,
    }
    keys = [
        {"pubkey": k, "signer": i == 0, "writable": i < 2, "source": "transaction"}
        for i, k in enumerate([PAYER, PLATFORM, deposits.SYSTEM_PROGRAM])
    ]
    instructions = [
        {
            "program": "system",
            "programId": deposits.SYSTEM_PROGRAM,
            "stackHeight": None,
            "parsed": {
                "type": "transfer",
                "info": {"source": PAYER, "destination": PLATFORM, "lamports": 1_500_000_000},
            },
        },
        {
            "program": "spl-token",
            "programId": deposits.TOKEN_PROGRAM,
            "stackHeight": None,
            "parsed": {
                "type": "transferChecked",
                "info": {
                    "source": TOKEN_SRC,
                    "destination": TOKEN_DST,
                    "mint": MINT,
                    "authority": PAYER,
                    "tokenAmount": {
                        "amount": "2500000",
                        "decimals": 6,
                        "uiAmount": 2.5,
                        "uiAmountString": "2.5",
                    },
                },
            },
        },
        {
            "program": "spl-memo",
            "programId": "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr",
            "stackHeight": None,
            "parsed": MEMO,
        },
    ]
    result = {
        "slot": 430,
        "blockTime": 1_767_225_600,
        "meta": meta,
        "transaction": {
            "signatures": [SIGNATURE],
            "message": {
                "accountKeys": keys,
                "recentBlockhash": "EkSnNWid2cvwEVnVx9aBqawnmiCNiDgp3gUdkDPTKN1N",
                "instructions": instructions,
            },
        },
        "version": 0,
    }
    return json.dumps({"jsonrpc": "2.0", "id": 1, "result": result})


class StandInRpc:
    """A JSON-RPC endpoint on 127.0.0.1 that answers every call with one fixed result."""

    def __init__(self, reply: str) -> None:
        self.reply = json.loads(reply)
        self.calls: list[dict[str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                call = json.loads(self.rfile.read(int(self.headers["content-length"])))
                stand_in.calls.append(call)
                body = json.dumps({**stand_in.reply, "id": call["id"]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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


@pytest.fixture
def rpc() -> Iterator[Callable[[str], tuple[deposits.RpcChain, StandInRpc]]]:
    started: list[StandInRpc] = []

    def make(reply: str) -> tuple[deposits.RpcChain, StandInRpc]:
        stand_in = StandInRpc(reply)
        started.append(stand_in)
        return deposits.RpcChain(stand_in.url), stand_in

    yield make
    for stand_in in started:
        stand_in.close()


def test_rpc_lookup_reads_sol_and_token_transfers_from_a_finalized_transaction(
    rpc: Callable[[str], tuple[deposits.RpcChain, StandInRpc]],
) -> None:
    chain, stand_in = rpc(rpc_reply())
    found = chain.lookup(SIGNATURE)
    assert found == deposits.ChainTransaction(
        SIGNATURE,
        True,
        [deposits.Transfer(PAYER, PLATFORM, 1_500_000_000)],
        [deposits.TokenTransfer(TOKEN_SRC, TOKEN_DST, 2_500_000, MINT)],
        [MEMO],
    )
    (call,) = stand_in.calls
    assert call["method"] == "getTransaction"
    assert call["params"] == [
        SIGNATURE,
        {"encoding": "jsonParsed", "commitment": "finalized", "maxSupportedTransactionVersion": 0},
    ]
    # What it read is what verify() credits.
    assert deposits.verify(
        found, signature=SIGNATURE, address=PLATFORM, lamports=1_500_000_000, memo=MEMO
    )
    # Bound to account 7: account 8 claiming it is refused.
    with pytest.raises(deposits.DepositNotYours):
        deposits.verify(
            found,
            signature=SIGNATURE,
            address=PLATFORM,
            lamports=1_500_000_000,
            memo=deposits.deposit_memo(PLATFORM, 8),
        )


def test_rpc_lookup_reads_transfers_made_through_another_program(
    rpc: Callable[[str], tuple[deposits.RpcChain, StandInRpc]],
) -> None:
    """A SOL transfer made by a program (an inner instruction) counts as a deposit."""
    extra = {
        "index": 0,
        "instructions": [
            {
                "program": "system",
                "programId": deposits.SYSTEM_PROGRAM,
                "stackHeight": 2,
                "parsed": {
                    "type": "transfer",
                    "info": {"source": TOKEN_SRC, "destination": PLATFORM, "lamports": 7},
                },
            }
        ],
    }
    chain, _ = rpc(rpc_reply(inner=[extra]))
    found = chain.lookup(SIGNATURE)
    assert found is not None
    assert deposits.Transfer(TOKEN_SRC, PLATFORM, 7) in found.transfers
    assert deposits.verify(
        found, signature=SIGNATURE, address=PLATFORM, lamports=1_500_000_007, memo=MEMO
    )


def test_rpc_lookup_of_a_failed_transaction_says_it_failed(
    rpc: Callable[[str], tuple[deposits.RpcChain, StandInRpc]],
) -> None:
    chain, _ = rpc(rpc_reply(err={"InstructionError": [0, {"Custom": 1}]}))
    found = chain.lookup(SIGNATURE)
    assert found is not None and found.succeeded is False
    with pytest.raises(deposits.DepositRefused, match="failed on chain"):
        deposits.verify(
            found, signature=SIGNATURE, address=PLATFORM, lamports=1_500_000_000, memo=MEMO
        )


def test_rpc_lookup_of_an_unknown_signature_is_none(
    rpc: Callable[[str], tuple[deposits.RpcChain, StandInRpc]],
) -> None:
    chain, _ = rpc(json.dumps({"jsonrpc": "2.0", "id": 1, "result": None}))
    assert chain.lookup(SIGNATURE) is None


# --- reservation_billing.close_for: which bill a release closes --------------------------------


def test_releasing_a_reservation_closes_its_own_bill_and_no_other(
    sessions: sessionmaker[Session], settings: Settings, ann: int
) -> None:
    """Survivor of ``make mutate`` (``reservation_id == ...`` became ``>=``): with one
    reservation every comparison finds the right bill. Three open bills, opened in the
    order b, a, c: releasing a, then c, closes exactly that one each time."""
    from gpuportal.hub.billing import reservation_billing

    grant(sessions, ann, 100 * CREDIT, "g-ann")
    ids = {}
    for rid in ("b", "a", "c"):
        request = allocations.OpenRequest(
            user="ann",
            server=rid,
            gpu_count=1,
            price_per_gpu_hour=PRICE,
            platform_fee_bps=1000,
            started_at=T0,
            reservation_id=rid,
        )
        with portal_db.transaction(sessions) as session:
            ids[rid] = allocations.open_allocation(session, settings, request, T0)[0].id
    later = T0 + timedelta(seconds=60)
    for released, still_open in (("a", {"b", "c"}), ("c", {"b"})):
        with portal_db.transaction(sessions) as session:
            closed = reservation_billing.close_for(session, settings, released, later)
            assert closed is not None and closed.id == ids[released]
        running = {rid for rid, aid in ids.items() if allocation(sessions, aid).status == "running"}
        assert running == still_open
    with portal_db.transaction(sessions) as session:
        assert reservation_billing.close_for(session, settings, "a", later) is None
