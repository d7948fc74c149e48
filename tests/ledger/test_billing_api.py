"""The billing API in-process, on SQLite and PostgreSQL, with a hub double and LiteSVM.

The hub double answers token checks (as tests/test_app.py's does); Solana is
real: solders' in-process LiteSVM, with an airdrop and a signed transfer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import deposits, ledger
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.hub.db.models import Account
from gpuportal.hub.portal import loops
from gpuportal.hub.portal.context import Portal

from ..fakes import FakeHub, PortalClientFactory
from .conftest import CREDIT, Clock, add_node, free_gpus, reserve

USERS = {
    "tok-admin": {"name": "admin", "kind": "user", "admin": True, "groups": ["admins"]},
    "tok-ann": {"name": "ann", "kind": "user", "admin": False, "groups": ["ml"]},
    "tok-bob": {"name": "bob", "kind": "user", "admin": False, "groups": []},
    "tok-spawner": {"name": "ray-spawner", "kind": "service"},
    "tok-other-svc": {"name": "dashboards", "kind": "service"},
    # A hub user an admin just created: never logged in, unknown to the portal.
    "tok-cal": {"name": "cal", "kind": "user", "admin": False, "groups": []},
}
API = "/services/portal/api/v1"
DEPOSIT = Keypair()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def chain() -> deposits.LiteSVMChain:
    return deposits.LiteSVMChain()


@pytest.fixture
def client(portal_client: PortalClientFactory, chain: deposits.LiteSVMChain) -> TestClient:
    client = portal_client(
        hub=FakeHub(USERS),
        chain=chain,
        ray_dashboard_url="http://127.0.0.1:9",
        solana_deposit_address=str(DEPOSIT.pubkey()),
        solana_micro_credits_per_sol=100 * CREDIT,
        signup_credits=0,  # exact balances: no sign-up credit here
    )
    for token in ("tok-admin", "tok-ann", "tok-bob"):  # first contact makes the accounts
        assert client.get(f"{API}/me", headers=auth(token)).status_code == 200
    return client


@pytest.fixture
def portal(client: TestClient) -> Portal:
    return client.app.state.portal  # type: ignore[no-any-return]


def error(reply: Any) -> str:
    return str(reply.json()["error"]["message"])


def test_grant_and_balance(client: TestClient) -> None:
    body = {"user": "ann", "amount": 10 * CREDIT, "idempotency_key": "welcome-ann"}
    first = client.post(f"{API}/credits/grants", json=body, headers=auth("tok-admin"))
    assert first.status_code == 201, first.text
    again = client.post(f"{API}/credits/grants", json=body, headers=auth("tok-admin"))
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    other = client.post(
        f"{API}/credits/grants", json={**body, "amount": 5}, headers=auth("tok-admin")
    )
    assert other.status_code == 409
    assert "already used for a different request" in error(other)
    balance = client.get(f"{API}/balance", headers=auth("tok-ann")).json()
    assert (balance["balance"], balance["display"]) == (10 * CREDIT, "10.00 credits")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"user": "ann", "amount": 0}, 400, "more than zero"),
        ({"user": "ann", "amount": -5}, 400, "more than zero"),
        ({"user": "ann", "amount": 1.5}, 422, "amount"),
        ({"user": "zed", "amount": 5}, 404, "no hub user named 'zed'"),
        ({"team": "nope", "amount": 5}, 404, "no team named 'nope'"),
        ({"amount": 5}, 400, "exactly one of user or team"),
    ],
)
def test_bad_grants(client: TestClient, body: dict, status: int, words: str) -> None:
    reply = client.post(f"{API}/credits/grants", json=body, headers=auth("tok-admin"))
    assert reply.status_code == status, reply.text
    assert words in error(reply)


def test_only_admins_grant(client: TestClient) -> None:
    reply = client.post(
        f"{API}/credits/grants", json={"user": "ann", "amount": 5}, headers=auth("tok-ann")
    )
    assert reply.status_code == 403


def test_spawner_opens_and_closes(client: TestClient, portal: Portal, clock: Clock) -> None:
    client.post(
        f"{API}/credits/grants",
        json={"user": "ann", "amount": 10 * CREDIT},
        headers=auth("tok-admin"),
    )
    add_node(portal.sessions)
    rid = reserve(portal.sessions, "ann", server="gpu", gpus=1)
    terms = {"reservation_id": rid}
    for token in ("tok-ann", "tok-other-svc"):
        assert client.post(f"{API}/allocations", json=terms, headers=auth(token)).status_code == 403
    opened = client.post(f"{API}/allocations", json=terms, headers=auth("tok-spawner"))
    assert opened.status_code == 201, opened.text
    alloc = opened.json()
    assert (alloc["status"], alloc["started_at"][:19]) == ("running", "2026-03-01T12:00:00")
    assert (alloc["user"], alloc["server"], alloc["price_per_gpu_hour"]) == (
        "ann",
        "gpu",
        3_600_000,
    )
    retry = client.post(f"{API}/allocations", json=terms, headers=auth("tok-spawner"))
    assert (retry.status_code, retry.json()["id"]) == (200, alloc["id"])
    clash = client.post(
        f"{API}/allocations", json={**terms, "gpu_count": 2}, headers=auth("tok-spawner")
    )
    assert clash.status_code == 422, "the GPUs come from the reservation"
    clock.advance(90)
    closed = client.post(f"{API}/allocations/{alloc['id']}/close", headers=auth("tok-spawner"))
    assert closed.status_code == 200, closed.text
    assert (closed.json()["status"], closed.json()["charged"]) == ("closed", 90_000)
    again = client.post(f"{API}/allocations/{alloc['id']}/close", headers=auth("tok-spawner"))
    assert again.json()["charged"] == 90_000
    assert (
        client.post(f"{API}/allocations/999/close", headers=auth("tok-spawner")).status_code == 404
    )
    # The owner sees it; another user does not.
    assert (
        client.get(f"{API}/allocations/{alloc['id']}", headers=auth("tok-ann")).status_code == 200
    )
    assert (
        client.get(f"{API}/allocations/{alloc['id']}", headers=auth("tok-bob")).status_code == 403
    )
    # Usage per server and per day, JSON and CSV; 403 for someone else's.
    by_server = client.get(f"{API}/usage", headers=auth("tok-ann")).json()
    assert by_server["rows"] == [
        {"server": "gpu", "allocations": 1, "gpu_hours": 0.025, "charged": 90_000}
    ]
    csv = client.get(f"{API}/usage?by=day&format=csv", headers=auth("tok-ann"))
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text == (
        "day,server,allocations,gpu_hours,charged_micro_credits\n2026-03-01,gpu,1,0.025,90000\n"
    )
    assert client.get(f"{API}/usage?user=ann", headers=auth("tok-bob")).status_code == 403
    assert client.get(f"{API}/balance?user=ann", headers=auth("tok-bob")).status_code == 403
    assert client.get(f"{API}/usage?user=ann", headers=auth("tok-admin")).status_code == 200


def test_authorize_refuses_with_a_sentence(client: TestClient, clock: Clock) -> None:
    client.post(
        f"{API}/credits/grants", json={"user": "ann", "amount": 300_000}, headers=auth("tok-admin")
    )
    ask = {"user": "ann", "gpu_count": 1, "price_per_gpu_hour": 3_600_000}
    refused = client.post(f"{API}/authorize", json=ask, headers=auth("tok-spawner"))
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "payment_required"
    assert "covers 5 min" in error(refused) and "at least 15 min" in error(refused)
    cheaper = client.post(
        f"{API}/authorize", json={**ask, "price_per_gpu_hour": 1_000_000}, headers=auth("tok-ann")
    )
    assert cheaper.status_code == 200 and cheaper.json()["allowed"] is True
    assert client.post(f"{API}/authorize", json=ask, headers=auth("tok-bob")).status_code == 403


def test_meter_stops_a_server_through_the_hub(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    import asyncio

    client.post(
        f"{API}/credits/grants", json={"user": "ann", "amount": 30_000}, headers=auth("tok-admin")
    )
    add_node(portal.sessions, gpus=1)
    rid = reserve(portal.sessions, "ann", fee_bps=0)
    opened = client.post(
        f"{API}/allocations", headers=auth("tok-spawner"), json={"reservation_id": rid}
    )
    assert opened.status_code == 201, opened.text
    assert free_gpus(portal.sessions) == 0
    clock.advance(30)
    asyncio.run(loops.run_once(portal, clock.now))
    balance = client.get(f"{API}/balance", headers=auth("tok-ann")).json()
    # 30 s of credit left, less than the grace period: the stop comes when it is spent.
    assert balance["warning"].startswith("Out of credits: your servers stop at")
    clock.advance(portal.settings.grace_seconds)
    asyncio.run(loops.run_once(portal, clock.now))
    assert portal.hub.stopped == [("ann", "")]  # type: ignore[attr-defined]
    listed = client.get(f"{API}/allocations", headers=auth("tok-ann")).json()
    assert listed[0]["status"] == "closed" and listed[0]["charged"] == 30_000
    assert client.get(f"{API}/balance", headers=auth("tok-ann")).json()["balance"] == 0
    # The stop gave the GPU back in the same step.
    assert free_gpus(portal.sessions) == 1


def memo_ix(text: str, signer: Pubkey) -> Instruction:
    """An SPL Memo instruction, built here (not with the portal's code)."""
    return Instruction(
        Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"),
        text.encode(),
        [AccountMeta(signer, is_signer=True, is_writable=False)],
    )


def memo_of(client: TestClient, token: str) -> str:
    """The deposit memo the portal shows this caller."""
    memo: str = client.get(f"{API}/deposits/solana", headers=auth(token)).json()["memo"]
    return memo


def send_sol(
    chain: deposits.LiteSVMChain, to: Pubkey, lamports: int, memo: str | None = None
) -> str:
    payer = Keypair()
    chain.svm.airdrop(payer.pubkey(), 5 * 10**9)
    ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=to, lamports=lamports))
    extra = [] if memo is None else [memo_ix(memo, payer.pubkey())]
    message = Message.new_with_blockhash([*extra, ix], payer.pubkey(), chain.svm.latest_blockhash())
    return chain.send(VersionedTransaction(message, [payer]))


def test_solana_deposit_is_credited_once(client: TestClient, chain: deposits.LiteSVMChain) -> None:
    signature = send_sol(chain, DEPOSIT.pubkey(), 250_000_000, memo_of(client, "tok-ann"))
    body = {"signature": signature, "lamports": 250_000_000}
    first = client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-ann"))
    assert first.status_code == 201, first.text
    assert (first.json()["credited"], first.json()["balance"]) == (25 * CREDIT, 25 * CREDIT)
    replay = client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-ann"))
    assert (replay.status_code, replay.json()["created"], replay.json()["balance"]) == (
        200,
        False,
        25 * CREDIT,
    )
    stolen = client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-bob"))
    assert stolen.status_code == 403
    assert "another account's deposit memo" in error(stolen)
    assert client.get(f"{API}/balance", headers=auth("tok-bob")).json()["balance"] == 0


def test_a_deposit_claimed_first_by_the_wrong_account_credits_nothing_and_stays_its_owners(
    client: TestClient, chain: deposits.LiteSVMChain
) -> None:
    """The front-run: bob watches the deposit address and submits ann's signature first."""
    signature = send_sol(chain, DEPOSIT.pubkey(), 250_000_000, memo_of(client, "tok-ann"))
    body = {"signature": signature, "lamports": 250_000_000}
    stolen = client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-bob"))
    assert stolen.status_code == 403, stolen.text
    assert client.get(f"{API}/balance", headers=auth("tok-bob")).json()["balance"] == 0
    mine = client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-ann"))
    assert mine.status_code == 201 and mine.json()["balance"] == 25 * CREDIT
    unbound = send_sol(chain, DEPOSIT.pubkey(), 250_000_000)  # no memo: nobody's
    reply = client.post(
        f"{API}/deposits/solana",
        json={"signature": unbound, "lamports": 250_000_000},
        headers=auth("tok-ann"),
    )
    assert reply.status_code == 400 and "carries no deposit memo" in error(reply)


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("wrong recipient", 400, "sends no SOL to the platform's deposit address"),
        ("wrong amount", 400, "sent 250000000 lamports to the deposit address, not 999"),
        ("unknown", 404, "has no confirmed transaction"),
        ("not a signature", 400, "is not a Solana transaction signature"),
        ("zero", 400, "Lamports must be more than zero"),
    ],
)
def test_bad_deposits_credit_nothing(
    client: TestClient, chain: deposits.LiteSVMChain, case: str, status: int, words: str
) -> None:
    to = Pubkey.new_unique() if case == "wrong recipient" else DEPOSIT.pubkey()
    signature = send_sol(chain, to, 250_000_000, memo_of(client, "tok-ann"))
    lamports = {"wrong amount": 999, "zero": 0}.get(case, 250_000_000)
    if case == "unknown":
        signature = str(Keypair().sign_message(b"never sent"))
    if case == "not a signature":
        signature = "0OIl-not-base58"
    reply = client.post(
        f"{API}/deposits/solana",
        json={"signature": signature, "lamports": lamports},
        headers=auth("tok-ann"),
    )
    assert reply.status_code == status, reply.text
    assert words in error(reply)
    assert client.get(f"{API}/balance", headers=auth("tok-ann")).json()["balance"] == 0


def test_deposit_address_is_published(client: TestClient) -> None:
    info = client.get(f"{API}/deposits/solana", headers=auth("tok-ann")).json()
    usdc = {k: info.pop(k) for k in ("usdc_mint", "usdc_token_account")}  # tested with USDC
    memo = info.pop("memo")
    assert memo.startswith("gpuportal-") and memo != memo_of(client, "tok-bob")
    assert info == {
        "address": str(DEPOSIT.pubkey()),
        "chain": "litesvm",
        "micro_credits_per_sol": 100 * CREDIT,
        "currency": "credits",
        "micro_credits_per_usdc": CREDIT,
    }
    assert usdc["usdc_token_account"] == deposits.associated_token_account(
        str(DEPOSIT.pubkey()), usdc["usdc_mint"]
    )


# --- issue 9: bounded money, users the portal has not met, issue 8: billing defence ---------


@pytest.mark.parametrize(
    "amount",
    [2**63, 2**63 - 1, 2**70, ledger.MAX_AMOUNT + 1],
)
def test_a_huge_grant_is_refused_with_a_sentence(client: TestClient, amount: int) -> None:
    reply = client.post(
        f"{API}/credits/grants", json={"user": "ann", "amount": amount}, headers=auth("tok-admin")
    )
    assert reply.status_code == 400, reply.text
    assert "at most" in error(reply)
    balance = client.get(f"{API}/balance", headers=auth("tok-ann"))
    assert (balance.status_code, balance.json()["balance"]) == (200, 0)


def test_grants_stop_at_the_largest_balance_and_the_balance_still_reads(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    biggest = {"user": "ann", "amount": ledger.MAX_AMOUNT}
    first = client.post(f"{API}/credits/grants", json=biggest, headers=auth("tok-admin"))
    assert first.status_code == 201, first.text
    more = client.post(f"{API}/credits/grants", json=biggest, headers=auth("tok-admin"))
    assert more.status_code == 400 and "above the most one wallet" in error(more)
    one = client.post(
        f"{API}/credits/grants", json={"user": "ann", "amount": 1}, headers=auth("tok-admin")
    )
    assert one.status_code == 400
    balance = client.get(f"{API}/balance", headers=auth("tok-ann"))
    assert (balance.status_code, balance.json()["balance"]) == (200, ledger.MAX_WALLET_BALANCE)
    # A rich user's server is metered like anyone's: the meter is not broken by it.
    add_node(portal.sessions, gpus=1)
    rid = reserve(portal.sessions, "ann")
    opened = client.post(
        f"{API}/allocations", json={"reservation_id": rid}, headers=auth("tok-spawner")
    )
    assert opened.status_code == 201, opened.text
    clock.advance(60)
    result = asyncio.run(loops.run_once(portal, clock.now))
    assert (result.failed, result.failed_payers, result.charged) == ([], [], 60_000)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/deposits/solana", {"signature": "1" * 88, "lamports": 2**63}),
        ("/deposits/usdc", {"signature": "1" * 88, "amount": 2**63}),
    ],
)
def test_a_huge_deposit_is_refused_before_the_chain_is_asked(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    reply = client.post(f"{API}{path}", json=body, headers=auth("tok-ann"))
    assert reply.status_code == 400, reply.text
    assert "at most" in error(reply)


@pytest.mark.parametrize(
    "body",
    [
        {"user": "ann", "spend_cap_per_hour": 2**63},
        {"user": "ann", "gpu_hours": 1e300},
    ],
)
def test_a_huge_quota_is_refused(client: TestClient, body: dict[str, Any]) -> None:
    reply = client.put(f"{API}/quotas", json=body, headers=auth("tok-admin"))
    assert reply.status_code == 422, reply.text


def test_grant_and_quota_for_a_hub_user_who_has_not_logged_in_yet(client: TestClient) -> None:
    granted = client.post(
        f"{API}/credits/grants",
        json={"user": "cal", "amount": 5 * CREDIT},
        headers=auth("tok-admin"),
    )
    assert granted.status_code == 201, granted.text
    quota = client.put(
        f"{API}/quotas", json={"user": "cal", "gpu_hours": 2}, headers=auth("tok-admin")
    )
    assert quota.status_code == 200, quota.text
    assert quota.json()["gpu_hours"] == 2
    # cal logs in later and finds both.
    assert client.get(f"{API}/balance", headers=auth("tok-cal")).json()["balance"] == 5 * CREDIT
    assert client.get(f"{API}/quotas", headers=auth("tok-cal")).json()["gpu_hours"] == 2
    # A name the hub does not know is still a 404 with a sentence.
    nobody = client.post(
        f"{API}/credits/grants", json={"user": "zed", "amount": 5}, headers=auth("tok-admin")
    )
    assert nobody.status_code == 404 and "no hub user named 'zed'" in error(nobody)


@pytest.mark.parametrize(
    "forged",
    [
        {"price_per_gpu_hour": 1},
        {"started_at": "2026-01-01T00:00:00+00:00"},
        {"provider": "bob"},
        {"user": "bob"},
        {"gpu_count": 8},
        {"platform_fee_bps": 10_000},
    ],
)
def test_a_stolen_spawner_token_cannot_choose_the_terms_of_a_bill(
    client: TestClient, portal: Portal, clock: Clock, forged: dict[str, Any]
) -> None:
    add_node(portal.sessions)
    rid = reserve(portal.sessions, "ann", server="gpu")
    reply = client.post(
        f"{API}/allocations", json={"reservation_id": rid, **forged}, headers=auth("tok-spawner")
    )
    assert reply.status_code == 422, reply.text
    assert client.get(f"{API}/allocations?user=ann", headers=auth("tok-admin")).json() == []


def test_a_bill_opens_only_for_a_live_reservation(
    client: TestClient, portal: Portal, clock: Clock
) -> None:
    add_node(portal.sessions)
    unknown = client.post(
        f"{API}/allocations", json={"reservation_id": "f" * 24}, headers=auth("tok-spawner")
    )
    assert unknown.status_code == 404, unknown.text
    rid = reserve(portal.sessions, "ann", server="gpu")
    released = client.delete(f"{API}/reservations/{rid}", headers=auth("tok-spawner"))
    assert released.status_code == 200, released.text
    late = client.post(
        f"{API}/allocations", json={"reservation_id": rid}, headers=auth("tok-spawner")
    )
    assert late.status_code == 409 and "needs a live" in error(late)
    # A live one opens on its own terms: its price, GPUs, provider, and from now.
    rid = reserve(portal.sessions, "ann", server="gpu", gpus=2)
    opened = client.post(
        f"{API}/allocations", json={"reservation_id": rid}, headers=auth("tok-spawner")
    )
    assert opened.status_code == 201, opened.text
    alloc = opened.json()
    assert (alloc["gpu_count"], alloc["price_per_gpu_hour"], alloc["reservation_id"]) == (
        2,
        3_600_000,
        rid,
    )
    assert alloc["started_at"][:19] == clock.now.isoformat()[:19]
    with portal_db.transaction(portal.sessions) as session:
        row = session.get(Allocation, alloc["id"])
        assert row is not None
        provider = session.get(Account, row.provider_account_id)
        assert provider is not None and provider.hub_name == "prov", "the node's provider is paid"


def test_the_history_lists_grants_and_deposits_newest_first_and_only_your_own(
    client: TestClient, chain: deposits.LiteSVMChain
) -> None:
    """Issue 11: the billing page's "grants and deposits", from the ledger."""
    grant = {"user": "ann", "amount": 3 * CREDIT, "memo": "<b>welcome</b>"}
    assert client.post(f"{API}/credits/grants", json=grant, headers=auth("tok-admin")).is_success
    # 0.01 SOL = 1 credit, with ann's deposit memo
    signature = send_sol(chain, DEPOSIT.pubkey(), 10_000_000, memo_of(client, "tok-ann"))
    body = {"signature": signature, "lamports": 10_000_000}
    assert client.post(f"{API}/deposits/solana", json=body, headers=auth("tok-ann")).is_success
    rows = client.get(f"{API}/credits/history", headers=auth("tok-ann")).json()
    assert [(r["kind"], r["amount"], r["display"]) for r in rows] == [
        ("deposit", CREDIT, "1.00 credits"),
        ("grant", 3 * CREDIT, "3.00 credits"),
    ]
    assert rows[1]["memo"] == "<b>welcome</b>", "data, not markup: the page escapes it"
    assert client.get(f"{API}/credits/history", headers=auth("tok-bob")).json() == []
    other = client.get(f"{API}/credits/history?user=ann", headers=auth("tok-bob"))
    assert other.status_code == 403
    mine = client.get(f"{API}/credits/history?user=ann", headers=auth("tok-admin"))
    assert len(mine.json()) == 2, "admins see anyone's"
