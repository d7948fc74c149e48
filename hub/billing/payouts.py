"""Provider payouts: earnings leave the platform once, and a crash never pays twice.

The flow (docs/payouts.md):

1. **A run** (daily by default, or on demand) makes at most one payout per
   (provider, period), for the provider's available earnings accrued before the
   period's end, when they reach ``payout_minimum``. The payout row and the
   ledger move earnings -> payouts in flight commit in one DB transaction; the
   unique (provider, period) key makes a second run, or a racing one, a no-op.
2. **The state machine** (:func:`advance`), resumable from the row alone:

   * ``pending``: build and sign the transfer, then **persist** its signature,
     raw bytes and last valid block height -> ``signed``. Nothing is sent before
     this commit.
   * ``signed``/``sent``: look the signature up. Landed at the configured
     commitment: settle (in flight -> paid out). Landed with an error: fail, the
     funds go back to earnings with the reason. Not seen: while the blockhash is
     still valid, send the *same bytes* again (safe: the chain runs a signature
     once); only once the blockhash has expired, and the chain still has not
     seen it, sign a new transaction (compare-and-set on the old signature, so
     two workers cannot both re-sign).
   * ``settled`` and ``failed`` are final; an admin may retry a failed payout,
     which moves its amount out of earnings again.

3. An underfunded treasury signs nothing: the payout stays ``pending`` with the
   reason and is tried again on the next round, so only what the treasury can
   pay is ever in a signed transaction.

Money: the ledger moves micro-credits; the chain moves lamports or token base
units, ``floor(amount * 10^decimals / rate)``, integers only (the dust under one
base unit stays with the platform; at the default rates there is none).

Demo nodes' earnings are play money: on a real chain (``Chain.real``) they are
left out of every payout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from .. import timeutil
from ..db.ledger_models import Allocation, LedgerTransaction, Posting
from ..db.marketplace_models import Node, Provider, Reservation
from ..db.models import Account
from ..db.payout_models import OPEN_PAYOUT_STATES, Payout, PayoutWalletChange
from ..settings import Settings
from . import deposits, ledger, payout_tx
from .deposits import COMMITMENTS, Chain
from .ledger import LedgerError
from .treasury import Treasury

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Lamports kept back in the treasury for fees and its own rent exemption.
TREASURY_SOL_RESERVE = 5_000 * 4 + 890_880
#: Lamports a USDC payout may need besides fees: the rent of a new token account.
TOKEN_ACCOUNT_RENT = 2_039_280
PAYOUT_KIND = "payout"
SETTLE_KIND = "payout_settle"
EXPLORERS = {
    "mainnet": "https://explorer.solana.com/tx/{signature}",
    "devnet": "https://explorer.solana.com/tx/{signature}?cluster=devnet",
    "testnet": "https://explorer.solana.com/tx/{signature}?cluster=testnet",
}


class PayoutError(LedgerError):
    status = 400


class PayoutNotFound(PayoutError):
    status = 404


class PayoutConflict(PayoutError):
    status = 409


class ReSignRefused(PayoutConflict):
    """Signing anew while the previous transaction may still land could pay twice."""


def crash_point(name: str) -> None:
    """A seam between the steps of :func:`advance`; crash-injection tests raise here."""


# --- periods, accounts, amounts ------------------------------------------------------


def period_containing(settings: Settings, moment: datetime) -> tuple[datetime, datetime]:
    length = settings.payout_period_seconds
    index = int((moment - EPOCH).total_seconds()) // length
    start = EPOCH + timedelta(seconds=index * length)
    return start, start + timedelta(seconds=length)


def last_complete_period(settings: Settings, now: datetime) -> tuple[datetime, datetime]:
    """The latest period that has ended by ``now``: what a run pays."""
    start, _ = period_containing(settings, now)
    return start - timedelta(seconds=settings.payout_period_seconds), start


def in_flight(session: Session, account_id: int) -> int:
    return ledger.ledger_account(
        session, f"payouts:{account_id}", "payouts_in_flight", account_id=account_id
    ).id


def earnings(session: Session, account_id: int) -> int:
    return ledger.provider_earnings(session, account_id).id


def to_units(settings: Settings, micro: int) -> int:
    """Micro-credits -> lamports or token base units, rounded down; refused with a sentence
    at the edges (nothing, negative, more than a u64 transfer carries)."""
    if isinstance(micro, bool) or not isinstance(micro, int) or micro <= 0:
        raise PayoutError(f"a payout must be a positive whole number of micro-credits ({micro}).")
    if settings.payout_asset == "SOL":
        units = micro * deposits.LAMPORTS_PER_SOL // settings.payout_micro_credits_per_sol
    else:
        units = micro * deposits.USDC_UNITS // settings.payout_micro_credits_per_usdc
    if units <= 0:
        raise PayoutError(
            f"{micro} micro-credits is worth less than one base unit of {settings.payout_asset}."
        )
    if units > payout_tx.U64_MAX:
        raise PayoutError(
            f"{micro} micro-credits is {units} base units of {settings.payout_asset}, more than "
            f"one transfer can carry ({payout_tx.U64_MAX})."
        )
    return units


# --- wallets: a change applies only to later periods ---------------------------------


def record_wallet(
    session: Session,
    settings: Settings,
    account_id: int,
    wallet: str,
    now: datetime | None = None,
) -> PayoutWalletChange | None:
    """Record ``wallet`` as the provider's, from the next period on (the first one recorded
    applies from the start). None when it is already the wallet in effect last."""
    now = now or timeutil.utcnow()
    latest = session.scalar(
        select(PayoutWalletChange)
        .where(PayoutWalletChange.provider_account_id == account_id)
        .order_by(PayoutWalletChange.id.desc())
        .limit(1)
    )
    if latest is not None and latest.wallet == wallet:
        return None
    effective = EPOCH if latest is None else period_containing(settings, now)[1]
    change = PayoutWalletChange(
        provider_account_id=account_id, wallet=wallet, effective_from=effective, created_at=now
    )
    session.add(change)
    session.flush()
    log.info("payout wallet of account %s is %s from %s", account_id, wallet, effective)
    return change


def wallet_for(session: Session, account_id: int, period_start: datetime) -> str | None:
    """The wallet in effect for the period starting at ``period_start``."""
    return session.scalar(
        select(PayoutWalletChange.wallet)
        .where(
            PayoutWalletChange.provider_account_id == account_id,
            PayoutWalletChange.effective_from <= period_start,
        )
        .order_by(PayoutWalletChange.effective_from.desc(), PayoutWalletChange.id.desc())
        .limit(1)
    )


# --- what a provider may be paid -----------------------------------------------------


def payable(session: Session, account_id: int, period_end: datetime, *, real_chain: bool) -> int:
    """Earnings accrued before ``period_end`` and not yet moved to a payout, at most the
    balance; on a real chain without what demo nodes earned."""
    account = earnings(session, account_id)
    accrued = (
        select(func.coalesce(func.sum(Posting.amount), 0))
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .where(
            Posting.ledger_account_id == account,
            LedgerTransaction.kind != PAYOUT_KIND,
            or_(
                and_(
                    LedgerTransaction.period_end.is_not(None),
                    LedgerTransaction.period_end <= period_end,
                ),
                and_(
                    LedgerTransaction.period_end.is_(None),
                    LedgerTransaction.created_at < period_end,
                ),
            ),
        )
    )
    if real_chain:
        demo = (
            select(Allocation.id)
            .join(Reservation, Reservation.id == Allocation.reservation_id)
            .join(Node, Node.id == Reservation.node_id)
            .where(Node.demo.is_(True))
        )
        accrued = accrued.where(
            or_(
                LedgerTransaction.allocation_id.is_(None),
                LedgerTransaction.allocation_id.not_in(demo),
            )
        )
    moved = (
        select(func.coalesce(func.sum(Posting.amount), 0))
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .where(Posting.ledger_account_id == account, LedgerTransaction.kind == PAYOUT_KIND)
    )
    due = int(session.scalar(accrued) or 0) + int(session.scalar(moved) or 0)
    return max(0, min(due, ledger.balance(session, account)))


# --- a run: one payout per provider and period ---------------------------------------


@dataclass
class RunResult:
    period_start: datetime
    period_end: datetime
    created: list[int] = field(default_factory=list)
    advanced: dict[int, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def create_payout(
    session: Session,
    settings: Settings,
    chain: Chain,
    account_id: int,
    period: tuple[datetime, datetime],
    now: datetime,
) -> Payout | None:
    """The payout of one provider for one period, made once (None: nothing to pay)."""
    start, end = period
    existing = session.scalar(
        select(Payout).where(Payout.provider_account_id == account_id, Payout.period_start == start)
    )
    if existing is not None:
        return None
    amount = payable(session, account_id, end, real_chain=chain.real)
    if amount < settings.payout_minimum:
        return None
    wallet = wallet_for(session, account_id, start)
    if wallet is None:
        return None
    payout = Payout(
        provider_account_id=account_id,
        period_start=start,
        period_end=end,
        amount=amount,
        asset=settings.payout_asset,
        units=to_units(settings, amount),
        wallet=wallet,
        chain=chain.name,
        status="pending",
        signings=0,
        retries=0,
        created_at=now,
        updated_at=now,
    )
    session.add(payout)
    session.flush()  # a racing run loses here, on the unique (provider, period)
    _move(session, payout, f"payout:{payout.id}:reserve:0", to_flight=True)
    log.info(
        "payout %s: %s micro-credits of account %s for %s, to %s",
        payout.id,
        amount,
        account_id,
        start.isoformat(),
        wallet,
    )
    return payout


def _move(session: Session, payout: Payout, key: str, *, to_flight: bool) -> None:
    """Earnings -> in flight (``to_flight``), or back; one balanced ledger transaction."""
    sign = 1 if to_flight else -1
    ledger.post(
        session,
        key,
        PAYOUT_KIND,
        [
            ledger.Leg(earnings(session, payout.provider_account_id), -sign * payout.amount),
            ledger.Leg(in_flight(session, payout.provider_account_id), sign * payout.amount),
        ],
        reference=str(payout.id),
        memo=f"payout {payout.id}" + ("" if to_flight else f" returned: {payout.reason}"),
        created_by="payouts",
    )


def providers_to_pay(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Accounts of providers with a wallet; records any wallet change first."""
    rows = session.execute(
        select(Provider.account_id, Provider.payout_wallet).where(
            Provider.payout_wallet.is_not(None)
        )
    ).all()
    for account_id, wallet in rows:
        if wallet:
            record_wallet(session, settings, account_id, wallet, now)
    return [account_id for account_id, _ in rows]


def run(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    now: datetime | None = None,
    mint: str | None = None,
) -> RunResult:
    """Make this period's payouts, then advance every open payout. Each provider and each
    payout is its own DB transaction: one failing is reported and the rest go on."""
    now = now or timeutil.utcnow()
    period = last_complete_period(settings, now)
    result = RunResult(*period)
    accounts = ledger.with_retry(sessions, lambda s: providers_to_pay(s, settings, now))
    for account_id in accounts:

        def make(session: Session, account: int = account_id) -> int | None:
            return _id(create_payout(session, settings, chain, account, period, now))

        try:
            made = ledger.with_retry(sessions, make)
        except LedgerError as exc:
            result.errors[f"account {account_id}"] = str(exc)
            continue
        if made is not None:
            result.created.append(made)
    result.advanced, errors = resume(sessions, settings, chain, treasury, now, mint)
    result.errors.update(errors)
    return result


def _id(payout: Payout | None) -> int | None:
    return None if payout is None else payout.id


def resume(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    now: datetime | None = None,
    mint: str | None = None,
) -> tuple[dict[int, str], dict[str, str]]:
    """Advance every open payout from its persisted state (after a restart, every round)."""
    with sessions() as session:
        open_ids = list(
            session.scalars(
                select(Payout.id).where(Payout.status.in_(OPEN_PAYOUT_STATES)).order_by(Payout.id)
            )
        )
    done: dict[int, str] = {}
    errors: dict[str, str] = {}
    for payout_id in open_ids:
        try:
            done[payout_id] = advance(
                sessions, settings, chain, treasury, payout_id, now, mint=mint
            )
        except LedgerError as exc:
            errors[f"payout {payout_id}"] = str(exc)
            log.warning("payout %s not advanced: %s", payout_id, exc)
    return done, errors


# --- the state machine ---------------------------------------------------------------


def _locked(session: Session, payout_id: int) -> Payout:
    payout = session.scalar(select(Payout).where(Payout.id == payout_id).with_for_update())
    if payout is None:
        raise PayoutNotFound(f"there is no payout {payout_id}.")
    return payout


def treasury_shortfall(
    settings: Settings, chain: Chain, treasury: Treasury, units: int, mint: str | None = None
) -> str:
    """Why the treasury cannot pay ``units`` now ("" when it can)."""
    lamports = chain.balance(str(treasury.pubkey))
    if settings.payout_asset == "SOL":
        need = units + TREASURY_SOL_RESERVE
        if lamports < need:
            return (
                f"the treasury holds {lamports} lamports, less than this payout needs ({need} "
                "with fees); it is tried again when the treasury is topped up."
            )
        return ""
    if not mint:
        return "USDC payouts need a USDC mint (GPUPORTAL_USDC_MINT)."
    held = chain.token_balance(deposits.associated_token_account(str(treasury.pubkey), mint))
    if held < units:
        return (
            f"the treasury holds {held} USDC base units, less than this payout ({units}); it is "
            "tried again when the treasury is topped up."
        )
    if lamports < TREASURY_SOL_RESERVE + TOKEN_ACCOUNT_RENT:
        return f"the treasury holds {lamports} lamports, too few for fees; top it up with SOL."
    return ""


def _sign(
    payout: Payout, settings: Settings, chain: Chain, treasury: Treasury, mint: str | None
) -> None:
    """Sign a transfer for ``payout`` and store signature, bytes and last valid height."""
    from solders.message import Message

    payer = treasury.pubkey
    if payout.asset == "SOL":
        moves = payout_tx.sol_transfer(payer, payout.wallet, payout.units)
    else:
        if not mint:
            raise PayoutError("USDC payouts need GPUPORTAL_USDC_MINT.")
        moves = payout_tx.usdc_transfer(payer, payout.wallet, mint, payout.units)
    signing = payout.signings + 1
    note = payout_tx.memo(f"gpuportal payout {payout.id} #{signing}", payer)
    blockhash, last_valid = chain.latest_blockhash()
    message = Message.new_with_blockhash([note, *moves], payer, blockhash)
    signed = treasury.sign(message)
    payout.signature = str(signed.signatures[0])
    payout.tx_bytes = bytes(signed)
    payout.last_valid_block_height = last_valid
    payout.signings = signing
    payout.status = "signed"


def advance(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    payout_id: int,
    now: datetime | None = None,
    *,
    mint: str | None = None,
) -> str:
    """Move one payout as far as it can go now; returns its status. Safe to call again at
    any moment, from any process, after a crash at any point."""
    mint = mint or settings.usdc_mint or None
    for _ in range(3):  # at most: sign, send; re-sign after expiry, send again
        status = _step(sessions, settings, chain, treasury, payout_id, mint)
        if status is not None:
            return status
    return "sent"


def _step(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    payout_id: int,
    mint: str | None,
) -> str | None:
    """One step of :func:`advance`; None when it signed anew and the next step sends."""
    state = ledger.with_retry(
        sessions, lambda s: _sign_if_pending(s, settings, chain, treasury, payout_id, mint)
    )
    if state.status not in ("signed", "sent"):
        return state.status
    signature, raw, last_valid = state.signature, state.raw, state.last_valid
    assert signature and raw is not None and last_valid is not None
    crash_point("after_persist")
    seen = chain.signature_status(signature)
    if seen is None:
        if chain.block_height() > last_valid:
            ledger.with_retry(
                sessions, lambda s: _resign(s, settings, chain, treasury, payout_id, state, mint)
            )
            return None
        chain.send_raw(raw)  # the first send, or the same bytes again
        crash_point("after_send")
        ledger.with_retry(sessions, lambda s: _mark_sent(s, payout_id, signature))
        seen = chain.signature_status(signature)
        if seen is None:
            return "sent"
    if seen.err is not None:
        reason = f"the transfer failed on chain: {seen.err}"
        return ledger.with_retry(
            sessions, lambda s: _finish(s, payout_id, signature, reason=reason)
        )
    if COMMITMENTS.index(seen.commitment) >= COMMITMENTS.index(settings.payout_commitment):
        return ledger.with_retry(sessions, lambda s: _finish(s, payout_id, signature, reason=None))
    return "sent"  # landed, not yet at the commitment that settles it


@dataclass(frozen=True)
class _State:
    status: str
    signature: str | None = None
    raw: bytes | None = None
    last_valid: int | None = None


def _sign_if_pending(
    session: Session,
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    payout_id: int,
    mint: str | None,
) -> _State:
    payout = _locked(session, payout_id)
    if payout.status == "pending":
        short = treasury_shortfall(settings, chain, treasury, payout.units, mint)
        if short:
            if payout.reason != short:
                log.warning("payout %s waits: %s", payout.id, short)
            payout.reason = short
            return _State("pending")
        payout.reason = None
        _sign(payout, settings, chain, treasury, mint)
    return _State(payout.status, payout.signature, payout.tx_bytes, payout.last_valid_block_height)


def _mark_sent(session: Session, payout_id: int, signature: str | None) -> None:
    payout = _locked(session, payout_id)
    if payout.status == "signed" and payout.signature == signature:
        payout.status = "sent"


def _resign(
    session: Session,
    settings: Settings,
    chain: Chain,
    treasury: Treasury,
    payout_id: int,
    state: _State,
    mint: str | None,
) -> None:
    """Sign anew, only when the stored transaction can no longer land."""
    payout = _locked(session, payout_id)
    if payout.signature != state.signature or payout.status not in ("signed", "sent"):
        return  # another worker got here first
    height = chain.block_height()
    if height <= (payout.last_valid_block_height or 0):
        raise ReSignRefused(
            f"payout {payout_id}: its transaction {payout.signature} is valid until block "
            f"{payout.last_valid_block_height} (now {height}); it is never signed anew before."
        )
    if chain.signature_status(payout.signature or "") is not None:
        return  # it landed after all; the next round settles it
    log.info("payout %s: blockhash expired unseen; signing anew", payout_id)
    _sign(payout, settings, chain, treasury, mint)


def _finish(session: Session, payout_id: int, signature: str | None, *, reason: str | None) -> str:
    """Settle (``reason`` None) or fail the payout whose transaction is ``signature``."""
    payout = _locked(session, payout_id)
    if payout.signature != signature or payout.status not in ("signed", "sent"):
        return payout.status
    now = timeutil.utcnow()
    if reason is None:
        ledger.post(
            session,
            f"payout:{payout.id}:settle",
            SETTLE_KIND,
            [
                ledger.Leg(in_flight(session, payout.provider_account_id), -payout.amount),
                ledger.Leg(ledger.external(session, "payouts").id, payout.amount),
            ],
            reference=payout.signature,
            memo=f"payout {payout.id} settled",
            created_by="payouts",
        )
        payout.status = "settled"
        payout.settled_at = now
        payout.reason = None
        log.info("payout %s settled: %s", payout.id, payout.signature)
    else:
        payout.reason = reason[:500]
        _move(session, payout, f"payout:{payout.id}:return:{payout.retries}", to_flight=False)
        payout.status = "failed"
        log.warning("payout %s failed, funds back in earnings: %s", payout.id, reason)
    return payout.status


def retry(session: Session, payout_id: int) -> Payout:
    """Try a failed payout again: its amount moves out of earnings once more."""
    payout = _locked(session, payout_id)
    if payout.status != "failed":
        raise PayoutConflict(
            f"payout {payout_id} is {payout.status}; only a failed payout can be retried."
        )
    available = ledger.balance(session, earnings(session, payout.provider_account_id))
    if available < payout.amount:
        raise PayoutConflict(
            f"payout {payout_id} needs {payout.amount} micro-credits of earnings but "
            f"{available} are available (a later payout has paid them)."
        )
    payout.retries += 1
    payout.status = "pending"
    payout.signature = None
    payout.tx_bytes = None
    payout.last_valid_block_height = None
    payout.reason = None
    _move(session, payout, f"payout:{payout.id}:reserve:{payout.retries}", to_flight=True)
    return payout


# --- reading -------------------------------------------------------------------------


def explorer_url(settings: Settings, chain: Chain, signature: str | None) -> str | None:
    """A block explorer link on a real, known cluster; None on the embedded chain."""
    if not signature or not chain.real:
        return None
    url = settings.solana_rpc_url.lower()
    for name in ("devnet", "testnet"):
        if name in url:
            return EXPLORERS[name].format(signature=signature)
    if "mainnet" in url:
        return EXPLORERS["mainnet"].format(signature=signature)
    return None


def public(
    payout: Payout, settings: Settings, chain: Chain, name: str | None = None
) -> dict[str, Any]:
    """What the API and the CLI show of a payout (never its bytes: nothing to gain)."""
    return {
        "id": payout.id,
        "provider": name,
        "period_start": payout.period_start,
        "period_end": payout.period_end,
        "amount": payout.amount,
        "asset": payout.asset,
        "units": payout.units,
        "wallet": payout.wallet,
        "chain": payout.chain,
        "status": payout.status,
        "signature": payout.signature,
        "explorer_url": explorer_url(settings, chain, payout.signature),
        "reason": payout.reason,
        "retries": payout.retries,
        "created_at": payout.created_at,
        "settled_at": payout.settled_at,
    }


def history(
    session: Session,
    *,
    account_id: int | None = None,
    statuses: tuple[str, ...] | None = None,
    limit: int = 200,
) -> list[tuple[Payout, str]]:
    query = select(Payout, Account.hub_name).join(Account, Account.id == Payout.provider_account_id)
    if account_id is not None:
        query = query.where(Payout.provider_account_id == account_id)
    if statuses:
        query = query.where(Payout.status.in_(statuses))
    rows = session.execute(query.order_by(Payout.id.desc()).limit(limit)).all()
    return [(payout, name) for payout, name in rows]


def one(session: Session, payout_id: int) -> tuple[Payout, str]:
    row = session.execute(
        select(Payout, Account.hub_name)
        .join(Account, Account.id == Payout.provider_account_id)
        .where(Payout.id == payout_id)
    ).first()
    if row is None:
        raise PayoutNotFound(f"there is no payout {payout_id}.")
    return row[0], row[1]


def totals(session: Session) -> dict[str, int]:
    """Micro-credits per payout status (the admin view)."""
    rows = session.execute(
        select(Payout.status, func.coalesce(func.sum(Payout.amount), 0)).group_by(Payout.status)
    )
    return {status: int(total) for status, total in rows}


# --- the service's side: the treasury ready to pay, and what admins see of it ----------


def payout_mint(settings: Settings, chain: Chain) -> str | None:
    """The USDC mint payouts use (the demo mint on the embedded chain); None for SOL."""
    if settings.payout_asset != "USDC":
        return None
    return deposits.usdc_mint(settings, chain)


def prepare(settings: Settings, chain: Chain, *, fund: bool = True) -> Treasury:
    """Load the treasury; on the embedded chain, top it up (SOL, and demo USDC) unless
    ``fund`` is False (a read-only look must not change the balance it shows)."""
    from . import treasury as treasury_module

    the_treasury = treasury_module.load(settings, chain)
    if fund and isinstance(chain, deposits.LiteSVMChain):
        demo_mint = None
        if settings.payout_asset == "USDC" and not settings.usdc_mint:
            import json

            from solders.keypair import Keypair

            payout_mint(settings, chain)  # makes the demo mint (and its key) when missing
            path = settings.data_dir / "usdc-demo-mint-keypair.json"
            demo_mint = Keypair.from_bytes(bytes(json.loads(path.read_text())))
        treasury_module.fund_embedded(chain, the_treasury, settings, usdc_mint=demo_mint)
    return the_treasury


def treasury_view(settings: Settings, chain: Chain, treasury: Treasury) -> dict[str, Any]:
    """The treasury's address and balances (never its key)."""
    address = str(treasury.pubkey)
    view: dict[str, Any] = {
        "address": address,
        "chain": chain.name,
        "asset": settings.payout_asset,
        "lamports": chain.balance(address),
        "usdc_mint": None,
        "usdc_units": None,
    }
    mint = payout_mint(settings, chain) if settings.payout_asset == "USDC" else None
    if mint:
        view["usdc_mint"] = mint
        view["usdc_units"] = chain.token_balance(deposits.associated_token_account(address, mint))
    return view
