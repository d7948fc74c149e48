"""Solana deposits: a customer sends SOL to the platform's address; the portal credits it once.

The portal never takes the customer's word for a deposit. It looks the
transaction up on the chain by its signature and checks that it succeeded
(at the configured confirmation), that it moved SOL to the platform's deposit
address, and that the amount is what the customer says. Only then does it
credit ``lamports * rate / 10^9`` micro-credits, in one ledger transaction whose
idempotency key is the signature: a replay credits nothing more, and a second
account claiming the same signature gets 409.

Chains: :class:`LiteSVMChain` is the embedded default, solders' in-process
Solana runtime (transactions reach it through :meth:`LiteSVMChain.send`);
:class:`RpcChain` reads a real cluster through solana-py (``pip install
solana``), with ``finalized`` commitment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from . import ledger
from .ledger import LedgerError
from .settings import Settings

SYSTEM_PROGRAM = "11111111111111111111111111111111"
LAMPORTS_PER_SOL = 1_000_000_000
_TRANSFER = 2  # the System Program's Transfer instruction index


class DepositRefused(LedgerError):
    status = 400


class DepositNotFound(LedgerError):
    status = 404


@dataclass(frozen=True)
class Transfer:
    source: str
    destination: str
    lamports: int
    asset: str = "SOL"


@dataclass(frozen=True)
class ChainTransaction:
    """What the chain says about one signature, reduced to what a deposit needs."""

    signature: str
    succeeded: bool
    transfers: list[Transfer] = field(default_factory=list)


class Chain(Protocol):
    name: str

    def lookup(self, signature: str) -> ChainTransaction | None:
        """The confirmed transaction, or None when the chain does not know it (yet)."""


def check_signature(text: str) -> str:
    """Refuse what cannot be a transaction signature before asking any chain."""
    from solders.signature import Signature

    try:
        return str(Signature.from_string(text.strip()))
    except (ValueError, TypeError):
        raise DepositRefused(
            f"{text[:100]!r} is not a Solana transaction signature (base58, 64 bytes)."
        ) from None


def check_address(text: str) -> str:
    from solders.pubkey import Pubkey

    try:
        return str(Pubkey.from_string(text.strip()))
    except (ValueError, TypeError):
        raise DepositRefused(f"{text[:100]!r} is not a Solana address.") from None


def system_transfers(
    account_keys: list[str], instructions: list[tuple[int, list[int], bytes]]
) -> list[Transfer]:
    """Decode System Program transfers from a compiled message's instructions."""
    out = []
    for program_index, accounts, data in instructions:
        if account_keys[program_index] != SYSTEM_PROGRAM or len(data) != 12:
            continue
        if int.from_bytes(data[:4], "little") != _TRANSFER or len(accounts) < 2:
            continue
        out.append(
            Transfer(
                account_keys[accounts[0]],
                account_keys[accounts[1]],
                int.from_bytes(data[4:], "little"),
            )
        )
    return out


class LiteSVMChain:
    """The embedded chain: solders' in-process LiteSVM.

    LiteSVM's transaction history keeps results, not messages, so this chain
    records each transaction it is sent and decodes transfers from that record.
    """

    name = "litesvm"

    def __init__(self, svm: Any | None = None) -> None:
        from solders.litesvm import LiteSVM

        self.svm = svm if svm is not None else LiteSVM()
        self._sent: dict[str, Any] = {}

    def send(self, transaction: Any) -> str:
        """Submit a signed transaction; returns its signature (also when it failed)."""
        self.svm.send_transaction(transaction)
        signature = str(transaction.signatures[0])
        self._sent.setdefault(signature, transaction)
        return signature

    def lookup(self, signature: str) -> ChainTransaction | None:
        from solders.signature import Signature
        from solders.transaction_metadata import TransactionMetadata

        meta = self.svm.get_transaction(Signature.from_string(signature))
        sent = self._sent.get(signature)
        if meta is None or sent is None:
            return None
        message = sent.message
        keys = [str(k) for k in message.account_keys]
        instructions = [
            (ix.program_id_index, list(ix.accounts), bytes(ix.data)) for ix in message.instructions
        ]
        return ChainTransaction(
            signature, isinstance(meta, TransactionMetadata), system_transfers(keys, instructions)
        )


class RpcChain:  # pragma: no cover - needs a Solana cluster; the logic it feeds is tested
    """A real cluster through solana-py's JSON-RPC client, ``finalized`` commitment."""

    name = "rpc"

    def __init__(self, url: str) -> None:
        try:
            from solana.rpc.api import Client
        except ImportError:
            raise LedgerError(
                "GPUPORTAL_SOLANA_RPC_URL is set but solana-py is not "
                "installed; pip install solana."
            ) from None
        self._client = Client(url, timeout=10)

    def lookup(self, signature: str) -> ChainTransaction | None:
        from solana.rpc.commitment import Finalized
        from solders.signature import Signature

        reply = self._client.get_transaction(
            Signature.from_string(signature),
            encoding="jsonParsed",
            commitment=Finalized,
            max_supported_transaction_version=0,
        )
        if reply.value is None:
            return None
        body = json.loads(reply.value.to_json())
        meta = body.get("meta") or {}
        transfers = []
        for ix in body["transaction"]["message"]["instructions"]:
            parsed = ix.get("parsed") if isinstance(ix, dict) else None
            if (
                ix.get("programId") == SYSTEM_PROGRAM
                and isinstance(parsed, dict)
                and parsed.get("type") == "transfer"
            ):
                info = parsed["info"]
                transfers.append(
                    Transfer(info["source"], info["destination"], int(info["lamports"]))
                )
        return ChainTransaction(signature, meta.get("err") is None, transfers)


def make_chain(settings: Settings) -> Chain:
    return RpcChain(settings.solana_rpc_url) if settings.solana_rpc_url else LiteSVMChain()


def deposit_address(settings: Settings) -> str:
    """The configured address, or one made once for this data dir (its key kept 0600)."""
    if settings.solana_deposit_address:
        return check_address(settings.solana_deposit_address)
    path = settings.data_dir / "solana-deposit-keypair.json"
    if not path.exists():
        _write_keypair(path)
    from solders.keypair import Keypair

    return str(Keypair.from_bytes(bytes(json.loads(path.read_text()))).pubkey())


def _write_keypair(path: Path) -> None:
    from solders.keypair import Keypair

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(list(bytes(Keypair()))))


def verify(found: ChainTransaction | None, *, signature: str, address: str, lamports: int) -> int:
    """Check a deposit against the chain; returns the lamports to credit or raises."""
    if found is None:
        raise DepositNotFound(
            f"the chain has no confirmed transaction {signature}; wait for it to be "
            "finalized and submit it again."
        )
    if not found.succeeded:
        raise DepositRefused(f"transaction {signature} failed on chain, so it moved no SOL.")
    to_us = [t for t in found.transfers if t.destination == address]
    if not to_us:
        raise DepositRefused(
            f"transaction {signature} sends no SOL to the platform's deposit address "
            f"{address}; only SOL sent there can be credited."
        )
    received = sum(t.lamports for t in to_us)
    if received != lamports:
        raise DepositRefused(
            f"transaction {signature} sent {received} lamports to the deposit address, not "
            f"{lamports}; submit the amount that was sent."
        )
    return received


def credit(
    session: Session, settings: Settings, *, account_id: int, signature: str, lamports: int, by: str
) -> tuple[int, bool]:
    """Credit a verified deposit once. Returns ``(micro_credits, created)``."""
    micro = lamports * settings.solana_micro_credits_per_sol // LAMPORTS_PER_SOL
    if micro <= 0:
        raise DepositRefused(f"{lamports} lamports is worth less than one micro-credit.")
    wallet = ledger.wallet(session, account_id).id
    source = ledger.external(session, "solana").id
    try:
        _, created = ledger.post(
            session,
            f"solana:{signature}",
            "deposit",
            [ledger.Leg(wallet, micro), ledger.Leg(source, -micro)],
            reference=signature,
            memo=f"Solana deposit of {lamports} lamports",
            created_by=by,
            extra={"lamports": lamports, "account": account_id},
        )
    except ledger.IdempotencyConflict:
        raise ledger.IdempotencyConflict(
            f"deposit {signature} was already credited to another account."
        ) from None
    return micro, created
