"""The payout transfer itself: the instructions of one payout, built without solana-py.

One payout is one transaction, fee paid by the treasury:

* a Memo naming the payout and its signing (``gpuportal payout 12 #1``), so the
  provider sees what paid them, and so a re-signing after expiry is a different
  transaction even on a chain whose blockhash has not moved;
* SOL: one System Program ``Transfer`` of the lamports;
* USDC: ``CreateIdempotent`` of the wallet's associated token account (the
  treasury pays its rent the first time), then ``TransferChecked`` from the
  treasury's token account, naming the mint and its decimals.
"""

from __future__ import annotations

from typing import Any

from . import deposits

MEMO_PROGRAM = "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"
#: The largest amount a token or lamport transfer carries on chain.
U64_MAX = 2**64 - 1
_ATA_CREATE_IDEMPOTENT = 1
_MINT_TO_CHECKED = 14


def _key(text: str) -> Any:
    from solders.pubkey import Pubkey

    return Pubkey.from_string(text)


def memo(text: str, signer: Any) -> Any:
    from solders.instruction import AccountMeta, Instruction

    return Instruction(
        _key(MEMO_PROGRAM), text.encode(), [AccountMeta(signer, is_signer=True, is_writable=False)]
    )


def sol_transfer(treasury: Any, wallet: str, lamports: int) -> list[Any]:
    from solders.system_program import TransferParams, transfer

    return [
        transfer(TransferParams(from_pubkey=treasury, to_pubkey=_key(wallet), lamports=lamports))
    ]


def create_ata_idempotent(payer: Any, owner: str, mint: str) -> Any:
    from solders.instruction import AccountMeta, Instruction

    ata = deposits.associated_token_account(owner, mint)
    return Instruction(
        _key(deposits.ASSOCIATED_TOKEN_PROGRAM),
        bytes([_ATA_CREATE_IDEMPOTENT]),
        [
            AccountMeta(payer, is_signer=True, is_writable=True),
            AccountMeta(_key(ata), is_signer=False, is_writable=True),
            AccountMeta(_key(owner), is_signer=False, is_writable=False),
            AccountMeta(_key(mint), is_signer=False, is_writable=False),
            AccountMeta(_key(deposits.SYSTEM_PROGRAM), is_signer=False, is_writable=False),
            AccountMeta(_key(deposits.TOKEN_PROGRAM), is_signer=False, is_writable=False),
        ],
    )


def usdc_transfer(treasury: Any, wallet: str, mint: str, units: int) -> list[Any]:
    from solders.instruction import AccountMeta, Instruction

    source = deposits.associated_token_account(str(treasury), mint)
    dest = deposits.associated_token_account(wallet, mint)
    data = (
        bytes([deposits._TOKEN_TRANSFER_CHECKED])
        + units.to_bytes(8, "little")
        + bytes([deposits.USDC_DECIMALS])
    )
    return [
        create_ata_idempotent(treasury, wallet, mint),
        Instruction(
            _key(deposits.TOKEN_PROGRAM),
            data,
            [
                AccountMeta(_key(source), is_signer=False, is_writable=True),
                AccountMeta(_key(mint), is_signer=False, is_writable=False),
                AccountMeta(_key(dest), is_signer=False, is_writable=True),
                AccountMeta(treasury, is_signer=True, is_writable=False),
            ],
        ),
    ]


def mint_demo_usdc(chain: deposits.LiteSVMChain, mint: Any, owner: str, units: int) -> None:
    """Mint demo USDC to ``owner``'s token account on the embedded chain (the demo mint's
    own key is its authority)."""
    from solders.instruction import AccountMeta, Instruction
    from solders.keypair import Keypair
    from solders.message import Message
    from solders.transaction import VersionedTransaction

    payer = Keypair()
    chain.svm.airdrop(payer.pubkey(), deposits.LAMPORTS_PER_SOL)
    mint_address = str(mint.pubkey())
    ata = deposits.associated_token_account(owner, mint_address)
    mint_to = Instruction(
        _key(deposits.TOKEN_PROGRAM),
        bytes([_MINT_TO_CHECKED]) + units.to_bytes(8, "little") + bytes([deposits.USDC_DECIMALS]),
        [
            AccountMeta(mint.pubkey(), is_signer=False, is_writable=True),
            AccountMeta(_key(ata), is_signer=False, is_writable=True),
            AccountMeta(mint.pubkey(), is_signer=True, is_writable=False),
        ],
    )
    message = Message.new_with_blockhash(
        [create_ata_idempotent(payer.pubkey(), owner, mint_address), mint_to],
        payer.pubkey(),
        chain.svm.latest_blockhash(),
    )
    chain.send(VersionedTransaction(message, [payer, mint]))
