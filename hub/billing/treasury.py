"""The payout treasury: the one key that pays providers, held so that it never leaks.

The key is read from a file (a JSON array of 64 bytes, as ``solana-keygen`` writes
it) and kept inside :class:`Treasury`, whose ``repr`` and ``str`` show only the
public key: solders' own ``Keypair.__str__`` is the secret in base58, so a stray
``%s`` in a log line would print it. The file must be readable by its owner only
(mode 0600); the path, never the key, comes from the environment, and the key is
never stored in the portal DB, logged, or sent to user servers or provider nodes.

On the embedded LiteSVM chain the treasury is made once in the data dir and topped
up at start (play money); on a real chain (``GPUPORTAL_SOLANA_RPC_URL``) it must
be configured with ``GPUPORTAL_SOLANA_TREASURY_KEYPAIR``.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from ..settings import Settings
from . import deposits
from .ledger import LedgerError

#: The embedded chain's treasury key file in the data dir.
EMBEDDED_TREASURY = "solana-treasury-keypair.json"


class TreasuryUnavailable(LedgerError):
    status = 503


class Treasury:
    """The payout key. Only :meth:`sign` uses the secret; nothing prints it."""

    __slots__ = ("_keypair", "pubkey")

    def __init__(self, keypair: Any) -> None:
        self._keypair = keypair
        self.pubkey = keypair.pubkey()

    def sign(self, message: Any) -> Any:
        """A signed ``VersionedTransaction`` of ``message`` (the treasury pays the fee)."""
        from solders.transaction import VersionedTransaction

        return VersionedTransaction(message, [self._keypair])

    def __repr__(self) -> str:
        return f"Treasury({self.pubkey})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled into a task queue or a cache
        raise TypeError("the treasury key is not serialisable")


def treasury_path(settings: Settings, chain: deposits.Chain) -> Path:
    if settings.solana_treasury_keypair:
        return Path(settings.solana_treasury_keypair).expanduser()
    if chain.real:
        raise TreasuryUnavailable(
            "payouts on a real chain need GPUPORTAL_SOLANA_TREASURY_KEYPAIR, the path of the "
            "treasury keypair file (mode 0600)."
        )
    path = settings.data_dir / EMBEDDED_TREASURY
    if not path.exists():
        deposits._write_keypair(path)
    return path


def load(settings: Settings, chain: deposits.Chain) -> Treasury:
    """Read the treasury key; a missing, open or malformed file is one sentence, no key."""
    from solders.keypair import Keypair

    path = treasury_path(settings, chain)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise TreasuryUnavailable(f"the treasury keypair file {path} cannot be read.") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TreasuryUnavailable(
            f"the treasury keypair file {path} is readable by others (mode "
            f"{stat.S_IMODE(mode):o}); make it 0600 (chmod 600 {path})."
        )
    try:
        raw = json.loads(path.read_text())
        keypair = Keypair.from_bytes(bytes(raw))
    except (OSError, ValueError, TypeError):
        raise TreasuryUnavailable(
            f"the treasury keypair file {path} is not a JSON array of 64 bytes."
        ) from None
    return Treasury(keypair)


def fund_embedded(
    chain: deposits.LiteSVMChain, treasury: Treasury, settings: Settings, usdc_mint: Any = None
) -> None:
    """Top the embedded chain's treasury up at start (SOL, and demo USDC when paid in USDC)."""
    address = str(treasury.pubkey)
    short = settings.litesvm_treasury_lamports - chain.balance(address)
    if short > 0:
        chain.airdrop(address, short)
    if usdc_mint is not None:
        from . import payout_tx

        target = settings.litesvm_treasury_lamports  # as many base units as lamports: plenty
        ata = deposits.associated_token_account(address, str(usdc_mint.pubkey()))
        missing = target - chain.token_balance(ata)
        if missing > 0:
            payout_tx.mint_demo_usdc(chain, usdc_mint, address, missing)
