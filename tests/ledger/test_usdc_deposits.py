"""USDC (SPL token) deposits through the billing API, on SQLite and PostgreSQL, on LiteSVM.

The chain is real: solders' in-process LiteSVM runs the SPL Token and
Associated Token programs. The mint, the token accounts and the transfers are
built with solana-py's ``spl.token.instructions``, not with the portal's own
code, so the portal's decoder is checked against an independent encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import VersionedTransaction
from spl.token import instructions as spl
from spl.token import models
from spl.token.constants import TOKEN_PROGRAM_ID

from gpuportal.hub.billing import deposits
from gpuportal.hub.portal.app import create_app
from gpuportal.hub.portal.cache import MemoryCache
from gpuportal.hub.portal.context import Portal
from gpuportal.hub.settings import load_settings

from ..fakes import FakeHub
from .conftest import CREDIT
from .test_billing_api import API, DEPOSIT, USERS, auth, error, memo_ix, memo_of

USDC = 10**6  # base units per USDC


def send(chain: deposits.LiteSVMChain, instructions: list[Any], signers: list[Keypair]) -> str:
    message = Message.new_with_blockhash(
        instructions, signers[0].pubkey(), chain.svm.latest_blockhash()
    )
    return chain.send(VersionedTransaction(message, signers))


def make_mint(
    chain: deposits.LiteSVMChain, authority: Keypair, program: Pubkey = TOKEN_PROGRAM_ID
) -> Pubkey:
    """A fresh 6-decimal mint whose authority is ``authority`` (funded here)."""
    mint = Keypair()
    chain.svm.airdrop(authority.pubkey(), 10 * 10**9)
    create = create_account(
        CreateAccountParams(
            from_pubkey=authority.pubkey(),
            to_pubkey=mint.pubkey(),
            lamports=chain.svm.minimum_balance_for_rent_exemption(82),
            space=82,
            owner=program,
        )
    )
    init = spl.initialize_mint(
        models.InitializeMintParams(
            decimals=6,
            program_id=program,
            mint=mint.pubkey(),
            mint_authority=authority.pubkey(),
        )
    )
    send(chain, [create, init], [authority, mint])
    assert chain.svm.get_account(mint.pubkey()) is not None
    return mint.pubkey()


def fund(
    chain: deposits.LiteSVMChain,
    mint: Pubkey,
    authority: Keypair,
    owner: Pubkey,
    amount: int,
    program: Pubkey = TOKEN_PROGRAM_ID,
) -> None:
    """Mint ``amount`` base units into ``owner``'s associated token account."""
    ata = spl.get_associated_token_address(owner, mint, program)
    payer = Keypair()  # not the authority: the demo mint's authority is the mint account itself
    chain.svm.airdrop(payer.pubkey(), 10**9)
    send(
        chain,
        [
            spl.create_idempotent_associated_token_account(payer.pubkey(), owner, mint, program),
            spl.mint_to_checked(
                models.MintToCheckedParams(
                    program_id=program,
                    mint=mint,
                    dest=ata,
                    mint_authority=authority.pubkey(),
                    amount=amount,
                    decimals=6,
                )
            ),
        ],
        [payer, authority],
    )


def send_usdc(
    chain: deposits.LiteSVMChain,
    mint: Pubkey,
    authority: Keypair,
    to_owner: Pubkey,
    amount: int,
    *,
    checked: bool = True,
    memo: str | None = None,
    program: Pubkey = TOKEN_PROGRAM_ID,
) -> str:
    """A customer, funded with ``amount``, pays it to ``to_owner``'s token account."""
    customer = Keypair()
    chain.svm.airdrop(customer.pubkey(), 10**9)
    fund(chain, mint, authority, customer.pubkey(), amount, program)
    source = spl.get_associated_token_address(customer.pubkey(), mint, program)
    dest = spl.get_associated_token_address(to_owner, mint, program)
    if checked:
        move = spl.transfer_checked(
            models.TransferCheckedParams(
                program_id=program,
                source=source,
                mint=mint,
                dest=dest,
                owner=customer.pubkey(),
                amount=amount,
                decimals=6,
            )
        )
    else:
        move = spl.transfer(
            models.TransferParams(
                program_id=program,
                source=source,
                dest=dest,
                owner=customer.pubkey(),
                amount=amount,
            )
        )
    create = spl.create_idempotent_associated_token_account(
        customer.pubkey(), to_owner, mint, program
    )
    extra = [] if memo is None else [memo_ix(memo, customer.pubkey())]
    signature = send(chain, [*extra, create, move], [customer])
    found = chain.lookup(signature)
    assert found is not None and found.succeeded, f"the test's own transfer failed: {found}"
    return signature


@pytest.fixture
def chain() -> deposits.LiteSVMChain:
    return deposits.LiteSVMChain()


@pytest.fixture
def authority() -> Keypair:
    return Keypair()


@pytest.fixture
def mint(chain: deposits.LiteSVMChain, authority: Keypair) -> Pubkey:
    return make_mint(chain, authority)


def make_client(settings_mint: str, tmp_path: Path, db_url: str, chain: Any) -> Iterator[Any]:
    settings = load_settings(
        data_dir=tmp_path,
        db_url=db_url,
        ray_dashboard_url="http://127.0.0.1:9",
        solana_deposit_address=str(DEPOSIT.pubkey()),
        usdc_mint=settings_mint,
        micro_credits_per_usdc=2 * CREDIT,  # not 1:1, so the rate is visibly applied
        signup_credits=0,
    )
    portal = Portal(settings, cache=MemoryCache(), hub=FakeHub(USERS), chain=chain)
    with TestClient(create_app(settings, portal, background=False)) as test_client:
        for token in ("tok-admin", "tok-ann", "tok-bob"):
            assert test_client.get(f"{API}/me", headers=auth(token)).status_code == 200
        yield test_client


@pytest.fixture
def client(
    tmp_path: Path, db_url: str, chain: deposits.LiteSVMChain, mint: Pubkey
) -> Iterator[TestClient]:
    yield from make_client(str(mint), tmp_path, db_url, chain)


def balance(client: TestClient, token: str) -> int:
    return int(client.get(f"{API}/balance", headers=auth(token)).json()["balance"])


@pytest.mark.parametrize("checked", [True, False], ids=["TransferChecked", "Transfer"])
def test_usdc_deposit_is_credited_once_at_the_rate(
    client: TestClient,
    chain: deposits.LiteSVMChain,
    mint: Pubkey,
    authority: Keypair,
    checked: bool,
) -> None:
    signature = send_usdc(
        chain,
        mint,
        authority,
        DEPOSIT.pubkey(),
        3 * USDC + 1,
        checked=checked,
        memo=memo_of(client, "tok-ann"),
    )
    body = {"signature": signature, "amount": 3 * USDC + 1}
    first = client.post(f"{API}/deposits/usdc", json=body, headers=auth("tok-ann"))
    assert first.status_code == 201, first.text
    assert (first.json()["credited"], first.json()["balance"]) == (6 * CREDIT + 2, 6 * CREDIT + 2)
    replay = client.post(f"{API}/deposits/usdc", json=body, headers=auth("tok-ann"))
    assert (replay.status_code, replay.json()["created"]) == (200, False)
    assert balance(client, "tok-ann") == 6 * CREDIT + 2
    stolen = client.post(f"{API}/deposits/usdc", json=body, headers=auth("tok-bob"))
    assert stolen.status_code == 403
    assert "another account's deposit memo" in error(stolen)
    assert balance(client, "tok-bob") == 0
    # The same signature is no SOL deposit: the SOL path still refuses it.
    as_sol = client.post(
        f"{API}/deposits/solana",
        json={"signature": signature, "lamports": 3 * USDC + 1},
        headers=auth("tok-bob"),
    )
    assert as_sol.status_code == 403  # bound to ann: bob is refused whatever he calls it


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("wrong mint", 400, "not USDC (mint"),
        ("wrong mint unchecked", 400, "sends no USDC to the platform's USDC token account"),
        ("another token account", 400, "sends no USDC to the platform's USDC token account"),
        ("wrong amount", 400, "sent 5000000 USDC base units to the platform's token account, not"),
        ("unknown", 404, "has no confirmed transaction"),
        ("not a signature", 400, "is not a Solana transaction signature"),
        ("zero", 400, "Amount must be more than zero"),
    ],
)
def test_bad_usdc_deposits_credit_nothing(
    client: TestClient,
    chain: deposits.LiteSVMChain,
    mint: Pubkey,
    authority: Keypair,
    case: str,
    status: int,
    words: str,
) -> None:
    to = Pubkey.new_unique() if case == "another token account" else DEPOSIT.pubkey()
    token = mint
    if case.startswith("wrong mint"):
        authority = Keypair()  # a look-alike token, sent to the right owner
        token = make_mint(chain, authority)
    signature = send_usdc(
        chain,
        token,
        authority,
        to,
        5 * USDC,
        checked=case != "wrong mint unchecked",
        memo=memo_of(client, "tok-ann"),
    )
    amount = {"wrong amount": 4 * USDC, "zero": 0}.get(case, 5 * USDC)
    if case == "unknown":
        signature = str(Keypair().sign_message(b"never sent"))
    if case == "not a signature":
        signature = "0OIl-not-base58"
    reply = client.post(
        f"{API}/deposits/usdc",
        json={"signature": signature, "amount": amount},
        headers=auth("tok-ann"),
    )
    assert reply.status_code == status, reply.text
    assert words in error(reply)
    assert balance(client, "tok-ann") == 0


def test_deposit_info_names_the_usdc_token_account(client: TestClient, mint: Pubkey) -> None:
    info = client.get(f"{API}/deposits/solana", headers=auth("tok-ann")).json()
    assert info["usdc_mint"] == str(mint)
    # solana-py's derivation, not the portal's, is the reference here
    assert info["usdc_token_account"] == str(
        spl.get_associated_token_address(DEPOSIT.pubkey(), mint)
    )
    assert info["micro_credits_per_usdc"] == 2 * CREDIT


def test_demo_mint_is_made_once_in_the_data_dir(
    tmp_path: Path, db_url: str, chain: deposits.LiteSVMChain
) -> None:
    """Without a configured mint the embedded chain gets a demo mint, kept across restarts."""
    for client in make_client("", tmp_path, db_url, chain):
        info = client.get(f"{API}/deposits/solana", headers=auth("tok-ann")).json()
        keypair = Keypair.from_bytes(
            bytes(json.loads((tmp_path / "usdc-demo-mint-keypair.json").read_text()))
        )
        assert info["usdc_mint"] == str(keypair.pubkey())
        signature = send_usdc(
            chain,
            keypair.pubkey(),
            keypair,
            DEPOSIT.pubkey(),
            USDC,
            memo=memo_of(client, "tok-ann"),
        )
        reply = client.post(
            f"{API}/deposits/usdc",
            json={"signature": signature, "amount": USDC},
            headers=auth("tok-ann"),
        )
        assert reply.status_code == 201, reply.text
        assert reply.json()["credited"] == 2 * CREDIT
    fresh = deposits.LiteSVMChain()  # a restart: the chain is empty, the key is kept
    for client in make_client("", tmp_path, db_url, fresh):
        again = client.get(f"{API}/deposits/solana", headers=auth("tok-ann")).json()
        assert again["usdc_mint"] == info["usdc_mint"]
        assert fresh.svm.get_account(keypair.pubkey()) is not None


def test_a_token_2022_transfer_is_refused_with_a_sentence(
    client: TestClient, chain: deposits.LiteSVMChain
) -> None:
    """Token-2022 is refused, documented in docs/billing.md: the token account customers are
    shown is derived with the classic Token program."""
    from spl.token.constants import TOKEN_2022_PROGRAM_ID

    authority = Keypair()
    mint = make_mint(chain, authority, TOKEN_2022_PROGRAM_ID)
    signature = send_usdc(
        chain,
        mint,
        authority,
        DEPOSIT.pubkey(),
        USDC,
        memo=memo_of(client, "tok-ann"),
        program=TOKEN_2022_PROGRAM_ID,
    )
    reply = client.post(
        f"{API}/deposits/usdc",
        json={"signature": signature, "amount": USDC},
        headers=auth("tok-ann"),
    )
    assert reply.status_code == 400, reply.text
    assert "is a Token-2022 transfer" in error(reply)
    assert balance(client, "tok-ann") == 0


def test_transfers_made_through_another_program_are_decoded(chain: deposits.LiteSVMChain) -> None:
    """Inner instructions count: the Associated Token program, creating an account that
    already holds some lamports, tops it up with a System transfer it makes itself (a
    cross-program invocation); the lookup sees that transfer, and not as top-level."""
    mint = Keypair()
    chain.ensure_mint(mint)
    payer, owner = Keypair(), Keypair()
    chain.airdrop(str(payer.pubkey()), 10**9)
    ata = spl.get_associated_token_address(owner.pubkey(), mint.pubkey())
    chain.airdrop(str(ata), 1_000)  # not enough for rent: the program transfers the rest
    create = spl.create_idempotent_associated_token_account(
        payer.pubkey(), owner.pubkey(), mint.pubkey()
    )
    signature = send(chain, [create], [payer])
    found = chain.lookup(signature)
    assert found is not None and found.succeeded
    inner = [t for t in found.transfers if t.destination == str(ata)]
    assert len(inner) == 1 and inner[0].source == str(payer.pubkey())
    assert inner[0].lamports == chain.svm.minimum_balance_for_rent_exemption(165) - 1_000
    assert deposits.LiteSVMChain(state_path=None).lookup(signature) is None  # nothing shared
