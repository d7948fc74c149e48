"""Solana deposits: a customer sends SOL or USDC to the platform; the portal credits it once.

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

USDC is an SPL token, so it is not sent to the deposit address itself but to
the deposit address's associated token account (ATA) for the USDC mint. The
portal derives that account from (deposit address, token program, mint) and
credits only SPL Token ``Transfer``/``TransferChecked`` instructions whose
destination is exactly it: the token program refuses a transfer between
accounts of different mints, so the destination pins the mint, and a
``TransferChecked`` naming another mint is refused outright. USDC deposits
credit ``amount * rate / 10^6`` micro-credits under their own key
``solana:usdc:<signature>``, so one transaction paying both SOL and USDC can be
credited for both, each once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from ..settings import Settings
from . import ledger
from .ledger import LedgerError

SYSTEM_PROGRAM = "11111111111111111111111111111111"
TOKEN_PROGRAM = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"  # noqa: S105 - a program id
ASSOCIATED_TOKEN_PROGRAM = "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL"  # noqa: S105
TOKEN_2022_PROGRAM = "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb"  # noqa: S105 - a program id
#: The SPL Memo program, v2 and v1: a deposit names its account in a memo.
MEMO_PROGRAMS = (
    "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr",
    "Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo",
)
MEMO_PREFIX = "gpuportal-"
LAMPORTS_PER_SOL = 1_000_000_000
USDC_DECIMALS = 6
USDC_UNITS = 10**USDC_DECIMALS  # base units per USDC
_TRANSFER = 2  # the System Program's Transfer instruction index
_TOKEN_TRANSFER = 3  # SPL Token Transfer: [3, amount u64]; source, destination, authority
_TOKEN_TRANSFER_CHECKED = 12  # [12, amount u64, decimals u8]; source, mint, destination, ...
_TOKEN_INITIALIZE_MINT2 = 20
_MINT_SIZE = 82


class DepositRefused(LedgerError):
    status = 400


class DepositNotYours(LedgerError):
    """The transaction's memo names another account: the claim credits nothing."""

    status = 403


class DepositNotFound(LedgerError):
    status = 404


class ChainUnavailable(LedgerError):
    """The chain did not answer; nothing is decided, the caller tries again later."""

    status = 503


class DepositsUnconfigured(LedgerError):
    """The platform, not the request, lacks what a deposit needs (e.g. the USDC mint)."""

    status = 503


@dataclass(frozen=True)
class Transfer:
    source: str
    destination: str
    lamports: int
    asset: str = "SOL"


@dataclass(frozen=True)
class TokenTransfer:
    """One SPL Token transfer; ``mint`` is known only for ``TransferChecked``."""

    source: str
    destination: str
    amount: int
    mint: str | None = None
    program: str = TOKEN_PROGRAM


@dataclass(frozen=True)
class ChainTransaction:
    """What the chain says about one signature, reduced to what a deposit needs."""

    signature: str
    succeeded: bool
    transfers: list[Transfer] = field(default_factory=list)
    token_transfers: list[TokenTransfer] = field(default_factory=list)
    #: The text of every SPL Memo instruction, top-level or inner.
    memos: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SignatureStatus:
    """Where a sent transaction stands: its commitment, and its error if it failed."""

    commitment: str  # "processed" | "confirmed" | "finalized"
    err: str | None = None


#: Commitment levels, weakest first.
COMMITMENTS = ("processed", "confirmed", "finalized")


class Chain(Protocol):
    """One Solana cluster: deposits read it, payouts also send to it.

    ``real`` is False only for the embedded LiteSVM chain, whose money is play
    money: a demo node's earnings may be paid there and never on a real chain.
    """

    name: str
    real: bool

    def lookup(self, signature: str) -> ChainTransaction | None:
        """The confirmed transaction, or None when the chain does not know it (yet)."""

    def latest_blockhash(self) -> tuple[Any, int]:
        """A recent blockhash and the last block height at which it is still valid."""

    def block_height(self) -> int:
        """The current block height (a blockhash expires once this passes its last valid)."""

    def send_raw(self, raw: bytes) -> None:
        """Hand signed transaction bytes to the chain; sending the same bytes again is safe."""

    def signature_status(self, signature: str) -> SignatureStatus | None:
        """The status of a sent transaction, or None when the chain has not seen it."""

    def balance(self, address: str) -> int:
        """Lamports held by ``address`` (0 when the account does not exist)."""

    def token_balance(self, token_account: str) -> int:
        """Base units held by an SPL token account (0 when it does not exist)."""


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


def token_transfers(
    account_keys: list[str], instructions: list[tuple[int, list[int], bytes]]
) -> list[TokenTransfer]:
    """Decode SPL Token ``Transfer`` and ``TransferChecked`` from a compiled message.

    Token-2022 transfers (same layouts) are decoded too, marked by ``program``,
    so that :func:`verify_usdc` can refuse them with a sentence: the associated
    account customers are told to pay is derived with the classic program.
    """
    out = []
    for program_index, accounts, data in instructions:
        program = account_keys[program_index]
        if program not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM) or not data:
            continue
        if data[0] == _TOKEN_TRANSFER and len(data) == 9 and len(accounts) >= 3:
            out.append(
                TokenTransfer(
                    account_keys[accounts[0]],
                    account_keys[accounts[1]],
                    int.from_bytes(data[1:9], "little"),
                    program=program,
                )
            )
        elif data[0] == _TOKEN_TRANSFER_CHECKED and len(data) == 10 and len(accounts) >= 4:
            out.append(
                TokenTransfer(
                    account_keys[accounts[0]],
                    account_keys[accounts[2]],
                    int.from_bytes(data[1:9], "little"),
                    account_keys[accounts[1]],
                    program=program,
                )
            )
    return out


def memo_texts(
    account_keys: list[str], instructions: list[tuple[int, list[int], bytes]]
) -> list[str]:
    """The text of every SPL Memo instruction (undecodable bytes are skipped)."""
    out = []
    for program_index, _, data in instructions:
        if account_keys[program_index] in MEMO_PROGRAMS:
            try:
                out.append(data.decode("utf-8").strip())
            except UnicodeDecodeError:
                continue
    return out


def deposit_memo(address: str, account_id: int) -> str:
    """The memo that binds a deposit to one account: it must be in the transaction.

    Derived from the deposit address and the account, so nothing is stored; it
    need not be secret: whoever puts another account's memo on a transfer pays
    that account, never themselves.
    """
    digest = hashlib.sha256(f"{address}:{account_id}".encode()).hexdigest()
    return f"{MEMO_PREFIX}{digest[:20]}"


def associated_token_account(owner: str, mint: str) -> str:
    """The ATA wallets send ``mint`` tokens to when told to pay ``owner``."""
    from solders.pubkey import Pubkey

    ata, _ = Pubkey.find_program_address(
        [
            bytes(Pubkey.from_string(owner)),
            bytes(Pubkey.from_string(TOKEN_PROGRAM)),
            bytes(Pubkey.from_string(mint)),
        ],
        Pubkey.from_string(ASSOCIATED_TOKEN_PROGRAM),
    )
    return str(ata)


class LiteSVMChain:
    """The embedded chain: solders' in-process LiteSVM.

    LiteSVM's transaction history keeps results, not messages, so this chain
    records each transaction it is sent and decodes transfers from that record.
    """

    name = "litesvm"
    real = False

    def __init__(self, svm: Any | None = None, state_path: Path | None = None) -> None:
        from solders.litesvm import LiteSVM

        self.svm = svm if svm is not None else LiteSVM()
        self._sent: dict[str, Any] = {}
        #: signature -> error text ("" when it succeeded) of every transaction that landed.
        self._landed: dict[str, str] = {}
        #: signature -> its inner instructions (program index, accounts, data), as run.
        self._inner: dict[str, list[tuple[int, list[int], bytes]]] = {}
        #: Our block height: one block per blockhash (a blockhash expires with its block).
        self.height = 0
        #: Addresses persisted though no transaction touched them (airdrops, restored state).
        self._extra: set[str] = set()
        self.state_path = state_path
        #: (mtime, size) of the state file as this process last read or wrote it.
        self._seen: tuple[int, int] | None = None
        if state_path is not None and state_path.exists():
            self._load(state_path)

    def _stat(self) -> tuple[int, int] | None:
        if self.state_path is None:
            return None
        try:
            found = self.state_path.stat()
        except FileNotFoundError:
            return None
        return found.st_mtime_ns, found.st_size

    def _refresh(self) -> None:
        """Another process (the CLI, a second portal) wrote the state: start from it."""
        if self.state_path is None or self._stat() == self._seen or self._stat() is None:
            return
        from solders.litesvm import LiteSVM

        self.svm = LiteSVM()
        self._sent, self._landed, self._inner, self._extra = {}, {}, {}, set()
        self._load(self.state_path)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time across processes: read the latest state, change, save."""
        if self.state_path is None:
            yield
            return
        import fcntl

        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.state_path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refresh()
            yield
            self.save()
        finally:
            os.close(lock)

    # --- persistence: a restart forgets neither a payout nor a deposit -------------------

    def _load(self, path: Path) -> None:
        import base64

        from solders.account import Account
        from solders.transaction import VersionedTransaction

        self._seen = self._stat()
        state = json.loads(path.read_text())
        self.height = int(state.get("height", 0))
        # LiteSVM's blockhashes are deterministic: replaying the expiries restores the
        # blockhash this chain had, so a transaction signed before a restart stays valid
        # exactly as long as it would have.
        for _ in range(self.height):
            self.svm.expire_blockhash()
        for address, raw in state.get("accounts", {}).items():
            self._extra.add(address)
            self.svm.set_account(_pubkey(address), Account.from_bytes(base64.b64decode(raw)))
        for signature, entry in state.get("sent", {}).items():
            self._sent[signature] = VersionedTransaction.from_bytes(base64.b64decode(entry["tx"]))
            if entry.get("landed") is not None:
                self._landed[signature] = entry["landed"]
            self._inner[signature] = [
                (int(p), [int(a) for a in accounts], base64.b64decode(data))
                for p, accounts, data in entry.get("inner", [])
            ]

    def save(self) -> None:
        """Write the touched accounts and the signatures seen (atomically, 0600)."""
        import base64

        if self.state_path is None:
            return
        addresses: set[str] = set()
        for transaction in self._sent.values():
            addresses.update(str(k) for k in transaction.message.account_keys)
        addresses.update(self._extra)
        accounts = {}
        for address in sorted(addresses):
            account = self.svm.get_account(_pubkey(address))
            if account is None or account.executable or str(account.owner) in _NOT_PERSISTED:
                continue
            accounts[address] = base64.b64encode(bytes(account)).decode()
        sent = {
            signature: {
                "tx": base64.b64encode(bytes(transaction)).decode(),
                "landed": self._landed.get(signature),
                "inner": [
                    [p, accounts, base64.b64encode(data).decode()]
                    for p, accounts, data in self._inner.get(signature, [])
                ],
            }
            for signature, transaction in self._sent.items()
        }
        body = json.dumps({"height": self.height, "accounts": accounts, "sent": sent})
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
        os.replace(tmp, self.state_path)
        self._seen = self._stat()

    def remember(self, address: str) -> None:
        """Persist ``address`` from now on even if no transaction touched it (an airdrop)."""
        self._extra.add(address)

    def airdrop(self, address: str, lamports: int) -> None:
        """Add play lamports to ``address``. Written to the account directly: LiteSVM's own
        airdrop is a transaction, and a second one of the same amount in the same block
        would be refused as a duplicate."""
        from solders.account import Account

        with self._writing():
            key = _pubkey(address)
            found = self.svm.get_account(key)
            if found is None:
                account = Account(lamports, b"", _pubkey(SYSTEM_PROGRAM), False, 0)
            else:
                account = Account(
                    found.lamports + lamports,
                    bytes(found.data),
                    found.owner,
                    found.executable,
                    found.rent_epoch,
                )
            self.svm.set_account(key, account)
            self.remember(address)

    # --- sending ---------------------------------------------------------------------

    def send(self, transaction: Any) -> str:
        """Submit a signed transaction; returns its signature (also when it failed)."""
        with self._writing():
            signature = str(transaction.signatures[0])
            if signature in self._landed:  # the chain runs a signature once, restarts or not
                return signature
            result = self.svm.send_transaction(transaction)
            self._record(signature, transaction, result)
        return signature

    def _record(self, signature: str, transaction: Any, result: Any) -> None:
        from solders.transaction_metadata import FailedTransactionMetadata

        self._sent.setdefault(signature, transaction)
        if isinstance(result, FailedTransactionMetadata):
            err = str(result.err())
            # Not executed at all (stale blockhash, a duplicate, an unpayable fee): it did not
            # land. A duplicate keeps the first result.
            if not any(word in err for word in _NOT_LANDED):
                self._landed.setdefault(signature, err)
                self._inner.setdefault(signature, _inner_of(result.meta()))
        else:
            self._landed.setdefault(signature, "")
            self._inner.setdefault(signature, _inner_of(result))

    def send_raw(self, raw: bytes) -> None:
        from solders.transaction import VersionedTransaction

        self.send(VersionedTransaction.from_bytes(raw))

    def latest_blockhash(self) -> tuple[Any, int]:
        # LiteSVM accepts only its latest blockhash, so it is valid for this block only.
        self._refresh()
        return self.svm.latest_blockhash(), self.height

    def block_height(self) -> int:
        self._refresh()
        return self.height

    def next_block(self) -> None:
        """Move to a new block: every earlier blockhash expires (tests, and the demo)."""
        with self._writing():
            self.svm.expire_blockhash()
            self.height += 1

    def signature_status(self, signature: str) -> SignatureStatus | None:
        self._refresh()
        if signature not in self._landed:
            return None
        err = self._landed[signature]
        return SignatureStatus("finalized", err or None)

    def balance(self, address: str) -> int:
        self._refresh()
        account = self.svm.get_account(_pubkey(address))
        return 0 if account is None else int(account.lamports)

    def token_balance(self, token_account: str) -> int:
        self._refresh()
        account = self.svm.get_account(_pubkey(token_account))
        if account is None or len(bytes(account.data)) < 72:
            return 0
        return int.from_bytes(bytes(account.data)[64:72], "little")

    def lookup(self, signature: str) -> ChainTransaction | None:
        from solders.signature import Signature
        from solders.transaction_metadata import TransactionMetadata

        self._refresh()
        meta = self.svm.get_transaction(Signature.from_string(signature))
        sent = self._sent.get(signature)
        if sent is None:
            return None
        if meta is None:  # from before a restart: the result was persisted
            if signature not in self._landed:
                return None
            meta_ok = self._landed[signature] == ""
        else:
            meta_ok = isinstance(meta, TransactionMetadata)
        message = sent.message
        keys = [str(k) for k in message.account_keys]
        instructions = [
            (ix.program_id_index, list(ix.accounts), bytes(ix.data)) for ix in message.instructions
        ]
        # Transfers made by another program (cross-program invocations) count too.
        instructions += self._inner.get(signature, [])
        return ChainTransaction(
            signature,
            meta_ok,
            system_transfers(keys, instructions),
            token_transfers(keys, instructions),
            memo_texts(keys, instructions),
        )

    def ensure_mint(self, mint: Any, decimals: int = USDC_DECIMALS) -> None:
        """Create the demo mint on this chain once (its own key is its mint authority).

        The embedded chain starts empty on every process start, while the demo
        mint's key lives on in the data dir; so the mint is re-created here
        when missing, at the same address, and a demo can mint with that key.
        """
        from solders.instruction import AccountMeta, Instruction
        from solders.keypair import Keypair
        from solders.message import Message
        from solders.system_program import CreateAccountParams, create_account
        from solders.transaction import VersionedTransaction

        self._refresh()
        if self.svm.get_account(mint.pubkey()) is not None:
            return
        payer = Keypair()
        self.svm.airdrop(payer.pubkey(), LAMPORTS_PER_SOL)
        token_program = _pubkey(TOKEN_PROGRAM)
        create = create_account(
            CreateAccountParams(
                from_pubkey=payer.pubkey(),
                to_pubkey=mint.pubkey(),
                lamports=self.svm.minimum_balance_for_rent_exemption(_MINT_SIZE),
                space=_MINT_SIZE,
                owner=token_program,
            )
        )
        init = Instruction(
            token_program,
            bytes([_TOKEN_INITIALIZE_MINT2, decimals]) + bytes(mint.pubkey()) + bytes([0]),
            [AccountMeta(mint.pubkey(), is_signer=False, is_writable=True)],
        )
        message = Message.new_with_blockhash(
            [create, init], payer.pubkey(), self.svm.latest_blockhash()
        )
        result = self.svm.send_transaction(VersionedTransaction(message, [payer, mint]))
        if self.svm.get_account(mint.pubkey()) is None:  # pragma: no cover - a LiteSVM bug
            raise DepositsUnconfigured(f"could not create the demo USDC mint: {result}")
        self.remember(str(mint.pubkey()))
        self.save()


def _inner_of(meta: Any) -> list[tuple[int, list[int], bytes]]:
    """The inner instructions LiteSVM ran for one transaction, flattened."""
    out = []
    for group in meta.inner_instructions():
        for inner in group:
            ix = inner.instruction()
            out.append((ix.program_id_index, list(ix.accounts), bytes(ix.data)))
    return out


#: Errors of a transaction that was never executed, so it did not land.
_NOT_LANDED = (
    "BlockhashNotFound",
    "AlreadyProcessed",
    "InsufficientFundsForFee",
    "AccountNotFound",
)
#: Owners whose accounts the embedded chain's state file leaves out (sysvars, loaders).
_NOT_PERSISTED = frozenset(
    {
        "Sysvar1111111111111111111111111111111111111",
        "NativeLoader1111111111111111111111111111111",
        "BPFLoader2111111111111111111111111111111111",
        "BPFLoaderUpgradeab1e11111111111111111111111",
    }
)


def _pubkey(text: str) -> Any:
    from solders.pubkey import Pubkey

    return Pubkey.from_string(text)


class RpcChain:
    """A real cluster through solana-py's JSON-RPC client, ``finalized`` commitment.

    solana-py 0.41 ships only its asyncio client (``AsyncClient``; the blocking
    ``solana.rpc.api.Client`` is gone). ``lookup`` runs in a worker thread (the
    deposit route's threadpool), so it drives one short-lived client per call with
    ``asyncio.run``. Tested against a JSON-RPC stand-in on 127.0.0.1
    (tests/ledger/test_money_mutants.py); no test reaches a real cluster.
    """

    name = "rpc"
    real = True

    def __init__(self, url: str) -> None:
        try:
            from solana.rpc.async_api import AsyncClient
        except ImportError:
            raise LedgerError(
                "GPUPORTAL_SOLANA_RPC_URL is set but solana-py is not "
                "installed; pip install solana."
            ) from None
        self._client_class = AsyncClient
        self._url = url

    async def _get_transaction(self, signature: str) -> Any:
        from solana.rpc.commitment import Finalized
        from solders.signature import Signature

        async with self._client_class(self._url, timeout=10) as client:
            return await client.get_transaction(
                Signature.from_string(signature),
                encoding="jsonParsed",
                commitment=Finalized,
                max_supported_transaction_version=0,
            )

    # --- payouts: each call one short-lived client, bounded by its timeout ---------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async def go() -> Any:
            async with self._client_class(self._url, timeout=10) as client:
                return await getattr(client, method)(*args, **kwargs)

        try:
            return asyncio.run(go())
        except LedgerError:
            raise
        except Exception as exc:  # the network, the endpoint or its answer
            raise ChainUnavailable(
                f"the Solana RPC endpoint did not answer {method}: {type(exc).__name__}"
            ) from None

    def latest_blockhash(self) -> tuple[Any, int]:
        from solana.rpc.commitment import Finalized

        value = self._call("get_latest_blockhash", Finalized).value
        return value.blockhash, int(value.last_valid_block_height)

    def block_height(self) -> int:
        from solana.rpc.commitment import Confirmed

        return int(self._call("get_block_height", Confirmed).value)

    def send_raw(self, raw: bytes) -> None:
        from solana.rpc.models import TxOpts

        # No preflight: a re-send of bytes that already landed must not be refused
        # by simulation; the outcome is read from getSignatureStatuses.
        self._call("send_raw_transaction", raw, TxOpts(skip_preflight=True, max_retries=0))

    def signature_status(self, signature: str) -> SignatureStatus | None:
        from solders.signature import Signature

        reply = self._call(
            "get_signature_statuses",
            [Signature.from_string(signature)],
            search_transaction_history=True,
        )
        status = reply.value[0] if reply.value else None
        if status is None:
            return None
        level = str(status.confirmation_status or "processed").rsplit(".", 1)[-1].lower()
        return SignatureStatus(level, None if status.err is None else str(status.err))

    def balance(self, address: str) -> int:
        from solana.rpc.commitment import Confirmed

        return int(self._call("get_balance", _pubkey(address), Confirmed).value)

    def token_balance(self, token_account: str) -> int:
        from solana.rpc.commitment import Confirmed

        try:
            reply = self._call("get_token_account_balance", _pubkey(token_account), Confirmed)
        except ChainUnavailable:
            return 0
        value = getattr(reply, "value", None)
        return 0 if value is None else int(value.amount)

    def lookup(self, signature: str) -> ChainTransaction | None:
        reply = asyncio.run(self._get_transaction(signature))
        if reply.value is None:
            return None
        body = json.loads(reply.value.to_json())
        meta = body.get("meta") or {}
        transfers = []
        tokens: list[TokenTransfer] = []
        memos: list[str] = []
        everything = list(body["transaction"]["message"]["instructions"])
        for group in meta.get("innerInstructions") or []:  # transfers made through programs
            everything += group.get("instructions", [])
        for ix in everything:
            parsed = ix.get("parsed") if isinstance(ix, dict) else None
            if ix.get("programId") in MEMO_PROGRAMS and isinstance(parsed, str):
                memos.append(parsed.strip())
            if (
                ix.get("programId") == SYSTEM_PROGRAM
                and isinstance(parsed, dict)
                and parsed.get("type") == "transfer"
            ):
                info = parsed["info"]
                transfers.append(
                    Transfer(info["source"], info["destination"], int(info["lamports"]))
                )
            if (
                ix.get("programId") in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM)
                and isinstance(parsed, dict)
                and parsed.get("type") in ("transfer", "transferChecked")
            ):
                info = parsed["info"]
                amount = info.get("amount") or info.get("tokenAmount", {}).get("amount", 0)
                tokens.append(
                    TokenTransfer(
                        info["source"],
                        info["destination"],
                        int(amount),
                        info.get("mint"),
                        ix["programId"],
                    )
                )
        return ChainTransaction(signature, meta.get("err") is None, transfers, tokens, memos)


def make_chain(settings: Settings) -> Chain:
    """The configured chain; the embedded one keeps its state in the data dir."""
    if settings.solana_rpc_url:
        return RpcChain(settings.solana_rpc_url)
    return LiteSVMChain(state_path=settings.data_dir / LITESVM_STATE)


#: The embedded chain's state file in the data dir (accounts it touched, signatures seen).
LITESVM_STATE = "litesvm-state.json"


def deposit_address(settings: Settings) -> str:
    """The configured address, or one made once for this data dir (its key kept 0600)."""
    if settings.solana_deposit_address:
        return check_address(settings.solana_deposit_address)
    path = settings.data_dir / "solana-deposit-keypair.json"
    if not path.exists():
        _write_keypair(path)
    from solders.keypair import Keypair

    return str(Keypair.from_bytes(bytes(json.loads(path.read_text()))).pubkey())


def usdc_mint(settings: Settings, chain: Chain) -> str:
    """The configured USDC mint; on the embedded chain, a demo mint made once per data dir."""
    if settings.usdc_mint:
        return check_address(settings.usdc_mint)
    if not isinstance(chain, LiteSVMChain):
        raise DepositsUnconfigured(
            "USDC deposits need GPUPORTAL_USDC_MINT when GPUPORTAL_SOLANA_RPC_URL is set "
            "(the USDC mint of that cluster)."
        )
    path = settings.data_dir / "usdc-demo-mint-keypair.json"
    if not path.exists():
        _write_keypair(path)
    from solders.keypair import Keypair

    mint = Keypair.from_bytes(bytes(json.loads(path.read_text())))
    chain.ensure_mint(mint)
    return str(mint.pubkey())


def _write_keypair(path: Path) -> None:
    from solders.keypair import Keypair

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(list(bytes(Keypair()))))


def check_memo(found: ChainTransaction, *, signature: str, memo: str) -> None:
    """A deposit is credited only to the account whose deposit memo it carries."""
    if memo in found.memos:
        return
    if any(text.startswith(MEMO_PREFIX) for text in found.memos):
        raise DepositNotYours(
            f"transaction {signature} carries another account's deposit memo; a deposit is "
            "credited only to the account its memo names, so nothing was credited."
        )
    raise DepositRefused(
        f"transaction {signature} carries no deposit memo; a deposit must include your memo "
        f"{memo!r} (GET /api/v1/deposits/solana shows it). Ask an admin about this one."
    )


def verify(
    found: ChainTransaction | None, *, signature: str, address: str, lamports: int, memo: str
) -> int:
    """Check a deposit against the chain; returns the lamports to credit or raises."""
    if found is None:
        raise DepositNotFound(
            f"the chain has no confirmed transaction {signature}; wait for it to be "
            "finalized and submit it again."
        )
    if not found.succeeded:
        raise DepositRefused(f"transaction {signature} failed on chain, so it moved no SOL.")
    check_memo(found, signature=signature, memo=memo)
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


def verify_usdc(
    found: ChainTransaction | None,
    *,
    signature: str,
    token_account: str,
    mint: str,
    amount: int,
    memo: str,
) -> int:
    """Check a USDC deposit against the chain; returns the base units to credit or raises."""
    if found is None:
        raise DepositNotFound(
            f"the chain has no confirmed transaction {signature}; wait for it to be "
            "finalized and submit it again."
        )
    if not found.succeeded:
        raise DepositRefused(f"transaction {signature} failed on chain, so it moved no USDC.")
    check_memo(found, signature=signature, memo=memo)
    classic = [t for t in found.token_transfers if t.program == TOKEN_PROGRAM]
    if not any(t.destination == token_account for t in classic) and any(
        t.program == TOKEN_2022_PROGRAM for t in found.token_transfers
    ):
        raise DepositRefused(
            f"transaction {signature} is a Token-2022 transfer; USDC deposits are accepted only "
            "through the classic SPL Token program, to the token account shown by GET "
            "/api/v1/deposits/solana."
        )
    other = sorted({t.mint for t in found.token_transfers if t.mint and t.mint != mint})
    if other:
        raise DepositRefused(
            f"transaction {signature} moves token {other[0]}, not USDC (mint {mint}); "
            "only USDC can be credited."
        )
    to_us = [t for t in classic if t.destination == token_account]
    if not to_us:
        raise DepositRefused(
            f"transaction {signature} sends no USDC to the platform's USDC token account "
            f"{token_account}; only USDC sent there can be credited."
        )
    received = sum(t.amount for t in to_us)
    if received != amount:
        raise DepositRefused(
            f"transaction {signature} sent {received} USDC base units to the platform's "
            f"token account, not {amount}; submit the amount that was sent."
        )
    return received


def _post_deposit(
    session: Session,
    *,
    account_id: int,
    key: str,
    source: str,
    micro: int,
    memo: str,
    extra: dict[str, object],
    by: str,
) -> bool:
    """Credit ``micro`` once under ``key``; another account claiming it is a 409."""
    wallet = ledger.wallet(session, account_id).id
    origin = ledger.external(session, source).id
    try:
        _, created = ledger.post(
            session,
            key,
            "deposit",
            [ledger.Leg(wallet, micro), ledger.Leg(origin, -micro)],
            reference=key.rsplit(":", 1)[-1],
            memo=memo,
            created_by=by,
            extra={**extra, "account": account_id},
        )
    except ledger.IdempotencyConflict:
        raise ledger.IdempotencyConflict(
            f"deposit {key.rsplit(':', 1)[-1]} was already credited to another account."
        ) from None
    return created


def credit_usdc(
    session: Session, settings: Settings, *, account_id: int, signature: str, amount: int, by: str
) -> tuple[int, bool]:
    """Credit a verified USDC deposit once. Returns ``(micro_credits, created)``."""
    micro = amount * settings.micro_credits_per_usdc // USDC_UNITS
    if micro <= 0:
        raise DepositRefused(f"{amount} USDC base units is worth less than one micro-credit.")
    created = _post_deposit(
        session,
        account_id=account_id,
        key=f"solana:usdc:{signature}",
        source="usdc",
        micro=micro,
        memo=f"USDC deposit of {amount} base units",
        extra={"usdc_base_units": amount},
        by=by,
    )
    return micro, created


def credit(
    session: Session, settings: Settings, *, account_id: int, signature: str, lamports: int, by: str
) -> tuple[int, bool]:
    """Credit a verified SOL deposit once. Returns ``(micro_credits, created)``."""
    micro = lamports * settings.solana_micro_credits_per_sol // LAMPORTS_PER_SOL
    if micro <= 0:
        raise DepositRefused(f"{lamports} lamports is worth less than one micro-credit.")
    created = _post_deposit(
        session,
        account_id=account_id,
        key=f"solana:{signature}",
        source="solana",
        micro=micro,
        memo=f"Solana deposit of {lamports} lamports",
        extra={"lamports": lamports},
        by=by,
    )
    return micro, created
