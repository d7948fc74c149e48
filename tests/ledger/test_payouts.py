"""Provider payouts on the embedded chain (solders' LiteSVM), on SQLite and PostgreSQL.

Earnings come from the real meter (a reservation on a node, its allocation, meter
ticks); the transfer runs in a real SVM and is checked there. Crashes are injected
at the seams of the state machine (``payouts.crash_point``) as a ``BaseException``
that no handler catches, and recovery starts from a new chain object loaded from
the persisted state file, as a restarted process would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from solders.keypair import Keypair
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gpuportal.hub import db as portal_db
from gpuportal.hub.billing import (
    allocations,
    deposits,
    metering,
    payouts,
    reservation_billing,
    treasury,
)
from gpuportal.hub.db.marketplace_models import Provider
from gpuportal.hub.db.payout_models import Payout
from gpuportal.hub.settings import Settings

from .conftest import CREDIT, Clock, add_account, add_node, balance_of, grant, reserve, total

LAMPORTS_PER_MICRO = 10  # at the default 100 credits per SOL


class Crash(BaseException):
    """A process dying at a seam: nothing catches it."""


@pytest.fixture
def psettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"payout_period_seconds": 3600, "payout_minimum": CREDIT})


@pytest.fixture
def chain(tmp_path: Path) -> deposits.LiteSVMChain:
    return deposits.LiteSVMChain(state_path=tmp_path / deposits.LITESVM_STATE)


@pytest.fixture
def vault(psettings: Settings, chain: deposits.LiteSVMChain) -> treasury.Treasury:
    the_treasury = treasury.load(psettings, chain)
    treasury.fund_embedded(chain, the_treasury, psettings)
    return the_treasury


def provider_with_wallet(sessions: sessionmaker[Session], name: str = "prov") -> str:
    """The provider of ``add_node`` with a fresh wallet; returns the wallet."""
    wallet = str(Keypair().pubkey())
    with portal_db.transaction(sessions) as session:
        provider = session.scalar(
            select(Provider).join(Provider.account).where(Provider.account.has(hub_name=name))
        )
        assert provider is not None
        provider.payout_wallet = wallet
    return wallet


def earn(
    sessions: sessionmaker[Session],
    settings: Settings,
    clock: Clock,
    customer: str,
    seconds: int,
    gpus: int = 1,
    provider: str | None = "prov",
) -> int:
    """``customer`` runs a server for ``seconds`` through the real meter; returns the
    provider's share (micro-credits) that the ledger booked."""
    cid = add_account(sessions, customer)
    grant(sessions, cid, 100 * CREDIT, f"grant-{customer}")
    rid = reserve(sessions, customer, gpus=gpus)
    with portal_db.transaction(sessions) as session:
        alloc, _ = reservation_billing.open_for_reservation(session, settings, rid, None, clock.now)
        alloc_id = alloc.id
    step = settings.meter_interval_seconds
    for _ in range(seconds // step):
        clock.advance(step)
        metering.tick(sessions, settings, clock.now)
    with portal_db.transaction(sessions) as session:
        allocations.close_allocation(session, settings, alloc_id, None, clock.now)
    return 0 if provider is None else provider_earnings(sessions, provider)


def provider_account(sessions: sessionmaker[Session], name: str = "prov") -> int:
    from gpuportal.hub.db.models import Account

    with portal_db.transaction(sessions) as session:
        found = session.scalar(select(Account.id).where(Account.hub_name == name))
        assert found is not None
        return found


def provider_earnings(sessions: sessionmaker[Session], name: str = "prov") -> int:
    return balance_of(sessions, f"earnings:{provider_account(sessions, name)}")


def all_payouts(sessions: sessionmaker[Session]) -> list[Payout]:
    with portal_db.transaction(sessions) as session:
        found = list(session.scalars(select(Payout).order_by(Payout.id)))
        for payout in found:
            session.expunge(payout)
        return found


def restarted(chain: deposits.LiteSVMChain) -> deposits.LiteSVMChain:
    """A new process's chain: a fresh SVM loaded from the persisted state file."""
    return deposits.LiteSVMChain(state_path=chain.state_path)


@pytest.fixture
def earned(sessions, psettings, clock) -> tuple[str, int]:
    add_node(sessions, gpus=2)
    wallet = provider_with_wallet(sessions)
    share = earn(sessions, psettings, clock, "ann", 600)
    clock.advance(3600)  # the hour has ended: its period is due
    return wallet, share


# --- the end-to-end path -------------------------------------------------------------------


def test_a_run_after_metered_usage_pays_exactly_the_earnings_and_the_ledger_settles(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    wallet, share = earned
    assert share == 540_000  # 10 min of 3.6 credits/h less the 10 % fee: 0.54 credits
    settings = replace_minimum(psettings, 1)
    result = payouts.run(sessions, settings, chain, vault, clock.now)
    assert len(result.created) == 1 and result.errors == {}
    (payout,) = all_payouts(sessions)
    assert payout.status == "settled"
    assert payout.amount == share
    assert payout.units == share * LAMPORTS_PER_MICRO
    assert chain.balance(wallet) == payout.units  # checked on the chain itself
    found = chain.lookup(payout.signature or "")
    assert found is not None and found.succeeded
    assert [t.lamports for t in found.transfers if t.destination == wallet] == [payout.units]
    account = provider_account(sessions)
    assert balance_of(sessions, f"earnings:{account}") == 0
    assert balance_of(sessions, f"payouts:{account}") == 0
    assert balance_of(sessions, "external:payouts") == share
    assert total(sessions) == 0


def replace_minimum(settings: Settings, minimum: int) -> Settings:
    return settings.model_copy(update={"payout_minimum": minimum})


def test_a_second_run_and_a_duplicate_send_move_nothing_more(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    wallet, _share = earned
    settings = replace_minimum(psettings, 1)
    payouts.run(sessions, settings, chain, vault, clock.now)
    paid = chain.balance(wallet)
    (payout,) = all_payouts(sessions)
    again = payouts.run(sessions, settings, chain, vault, clock.now)
    assert again.created == []
    chain.send_raw(payout.tx_bytes or b"")  # the same bytes once more: the chain runs it once
    assert payouts.advance(sessions, settings, chain, vault, payout.id) == "settled"
    assert chain.balance(wallet) == paid == payout.units
    assert len(all_payouts(sessions)) == 1
    assert total(sessions) == 0


# --- crashes -------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["after_persist", "after_send"])
@pytest.mark.parametrize("expire", [False, True], ids=["blockhash-valid", "blockhash-expired"])
def test_a_crash_at_each_point_recovers_with_exactly_one_transfer(
    sessions, psettings, clock, chain, vault, earned, monkeypatch, point, expire
) -> None:
    wallet, share = earned
    settings = replace_minimum(psettings, 1)

    def die(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(payouts, "crash_point", die)
    with pytest.raises(Crash):
        payouts.run(sessions, settings, chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.signature and payout.tx_bytes  # persisted before anything was sent
    monkeypatch.setattr(payouts, "crash_point", lambda name: None)
    after = restarted(chain)
    if expire:
        after.next_block()  # the restart took long: the first blockhash is gone
    payouts.resume(sessions, settings, after, vault, clock.now)
    payouts.resume(sessions, settings, after, vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.status == "settled"
    assert after.balance(wallet) == payout.units == share * LAMPORTS_PER_MICRO
    landed = [s for s in after._landed if after._landed[s] == ""]
    transfers = [after.lookup(s) for s in landed]
    to_wallet = [
        t for found in transfers if found for t in found.transfers if t.destination == wallet
    ]
    assert len(to_wallet) == 1
    # a crash before the send with an expired blockhash is the one case that re-signs
    assert payout.signings == (2 if (point, expire) == ("after_persist", True) else 1)
    assert total(sessions) == 0


class LaggingChain:
    """A chain whose status lookups see nothing yet (an RPC node behind the leader)."""

    def __init__(self, inner: deposits.LiteSVMChain) -> None:
        self.inner = inner
        self.name = inner.name
        self.real = inner.real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def signature_status(self, signature: str) -> None:
        return None


def test_an_unseen_transaction_is_sent_again_as_the_same_bytes_never_signed_anew(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    wallet, _ = earned
    settings = replace_minimum(psettings, 1)
    lagging = LaggingChain(chain)
    for _ in range(3):
        payouts.run(sessions, settings, lagging, vault, clock.now)  # type: ignore[arg-type]
    (payout,) = all_payouts(sessions)
    assert payout.status == "sent" and payout.signings == 1
    assert chain.balance(wallet) == payout.units
    assert payouts.advance(sessions, settings, chain, vault, payout.id) == "settled"


def test_signing_anew_while_the_blockhash_is_valid_is_refused(
    sessions, psettings, clock, chain, vault, earned, monkeypatch
) -> None:
    settings = replace_minimum(psettings, 1)
    monkeypatch.setattr(payouts, "crash_point", _crash_after_persist)
    with pytest.raises(Crash):
        payouts.run(sessions, settings, chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    state = payouts._State(
        "signed", payout.signature, payout.tx_bytes, payout.last_valid_block_height
    )
    with portal_db.transaction(sessions) as session, pytest.raises(payouts.ReSignRefused):
        payouts._resign(session, settings, chain, vault, payout.id, state, None)


def _crash_after_persist(name: str) -> None:
    if name == "after_persist":
        raise Crash(name)


# --- the treasury, failures and retries ------------------------------------------------------


def test_an_underfunded_treasury_pays_only_what_it_can_and_the_rest_later(
    sessions, psettings, clock, tmp_path
) -> None:
    settings = replace_minimum(psettings, 1)
    add_node(sessions, provider="p1", node_id="n1", gpus=1)
    add_node(sessions, provider="p2", node_id="n2", gpus=1)
    w1, w2 = provider_with_wallet(sessions, "p1"), provider_with_wallet(sessions, "p2")
    # both run at once, so each of the two one-GPU nodes gets one of them
    bills = []
    for customer in ("ann", "bob"):
        grant(sessions, add_account(sessions, customer), 100 * CREDIT, f"grant-{customer}")
        rid = reserve(sessions, customer)
        with portal_db.transaction(sessions) as session:
            alloc, _ = reservation_billing.open_for_reservation(
                session, settings, rid, None, clock.now
            )
            bills.append(alloc.id)
    for _ in range(20):
        clock.advance(30)
        metering.tick(sessions, settings, clock.now)
    with portal_db.transaction(sessions) as session:
        for alloc_id in bills:
            allocations.close_allocation(session, settings, alloc_id, None, clock.now)
    assert provider_earnings(sessions, "p1") == provider_earnings(sessions, "p2") == 540_000
    clock.advance(3600)
    chain = deposits.LiteSVMChain(state_path=tmp_path / "chain.json")
    vault = treasury.load(settings, chain)
    one = 540_000 * LAMPORTS_PER_MICRO
    chain.airdrop(str(vault.pubkey), one + payouts.TREASURY_SOL_RESERVE)  # enough for one
    result = payouts.run(sessions, settings, chain, vault, clock.now)
    assert sorted(result.advanced.values()) == ["pending", "settled"]
    waiting = [p for p in all_payouts(sessions) if p.status == "pending"]
    assert len(waiting) == 1 and "treasury holds" in (waiting[0].reason or "")
    assert waiting[0].signature is None  # nothing signed that the treasury cannot pay
    assert sorted([chain.balance(w1), chain.balance(w2)]) == [0, one]
    chain.airdrop(str(vault.pubkey), one + payouts.TREASURY_SOL_RESERVE)  # topped up
    payouts.resume(sessions, settings, chain, vault, clock.now)
    assert [p.status for p in all_payouts(sessions)] == ["settled", "settled"]
    assert chain.balance(w1) == chain.balance(w2) == one
    paid = balance_of(sessions, "external:payouts")
    assert paid == 2 * 540_000  # never more than the verified earnings
    assert total(sessions) == 0


def test_a_transfer_that_fails_on_chain_returns_the_funds_with_a_reason_and_can_be_retried(
    sessions, psettings, clock, chain, vault, earned, monkeypatch
) -> None:
    wallet, share = earned
    settings = replace_minimum(psettings, 1)
    real_transfer = payouts.payout_tx.sol_transfer
    # the chain refuses the transfer: a brand-new wallet must receive at least its rent
    monkeypatch.setattr(payouts.payout_tx, "sol_transfer", lambda t, w, n: real_transfer(t, w, 1))
    payouts.run(sessions, settings, chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.status == "failed"
    assert "failed on chain" in (payout.reason or "")
    account = provider_account(sessions)
    assert balance_of(sessions, f"earnings:{account}") == share
    assert balance_of(sessions, f"payouts:{account}") == 0
    monkeypatch.setattr(payouts.payout_tx, "sol_transfer", real_transfer)
    with portal_db.transaction(sessions) as session:
        payouts.retry(session, payout.id)
    with portal_db.transaction(sessions) as session, pytest.raises(payouts.PayoutConflict):
        payouts.retry(session, payout.id)  # pending now: not failed
    payouts.resume(sessions, settings, chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.status == "settled" and chain.balance(wallet) == payout.units
    assert balance_of(sessions, f"earnings:{account}") == 0
    assert total(sessions) == 0


# --- amounts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [-1, 0])
def test_the_minimum_pays_at_exactly_the_minimum_and_not_below(
    sessions, psettings, clock, chain, vault, earned, over
) -> None:
    _, share = earned
    settings = replace_minimum(psettings, share - over)
    result = payouts.run(sessions, settings, chain, vault, clock.now)
    assert len(result.created) == (1 if over == 0 else 0)


@pytest.mark.parametrize(
    ("micro", "words"),
    [
        (0, "positive whole number"),
        (-5, "positive whole number"),
        (True, "positive whole number"),
        (2**64 * 10**8, "more than one transfer can carry"),
    ],
)
def test_amounts_at_the_edges_are_refused_with_a_sentence(psettings, micro, words) -> None:
    with pytest.raises(payouts.PayoutError, match=words):
        payouts.to_units(psettings, micro)


def test_u64_max_lamports_is_the_most_one_transfer_carries(psettings) -> None:
    per_lamport = psettings.payout_micro_credits_per_sol // 10**9 or 1
    settings = psettings.model_copy(update={"payout_micro_credits_per_sol": 10**9})
    assert payouts.to_units(settings, payouts.payout_tx.U64_MAX) == payouts.payout_tx.U64_MAX
    with pytest.raises(payouts.PayoutError):
        payouts.to_units(settings, payouts.payout_tx.U64_MAX + 1)
    assert per_lamport


# --- who is paid what -------------------------------------------------------------------------


class RealChain(LaggingChain):
    """The embedded chain standing in for a real one (``real`` is what matters)."""

    def __init__(self, inner: deposits.LiteSVMChain) -> None:
        super().__init__(inner)
        self.real = True

    def signature_status(self, signature: str) -> Any:
        return self.inner.signature_status(signature)


def test_demo_node_earnings_never_pay_out_on_a_real_chain(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    settings = replace_minimum(psettings, 1)
    result = payouts.run(sessions, settings, RealChain(chain), vault, clock.now)  # type: ignore[arg-type]
    assert result.created == []  # add_node's node is a demo node
    assert all_payouts(sessions) == []
    result = payouts.run(sessions, settings, chain, vault, clock.now)  # the embedded chain pays
    assert len(result.created) == 1


def test_a_wallet_change_applies_only_to_later_periods_and_is_recorded(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    first, share = earned
    settings = replace_minimum(psettings, 1)
    with portal_db.transaction(sessions) as session:
        payouts.providers_to_pay(session, settings, clock.now)  # the first wallet is recorded
    second = provider_with_wallet(sessions)  # changed before the run of the ended period
    payouts.run(sessions, settings, chain, vault, clock.now)
    assert chain.balance(first) == share * LAMPORTS_PER_MICRO
    assert chain.balance(second) == 0
    earn(sessions, settings, clock, "bob", 600)
    clock.advance(2 * 3600)
    payouts.run(sessions, settings, chain, vault, clock.now)
    assert chain.balance(second) > 0
    from gpuportal.hub.db.payout_models import PayoutWalletChange

    with portal_db.transaction(sessions) as session:
        changes = list(session.scalars(select(PayoutWalletChange.wallet)))
    assert changes == [first, second]


def test_the_embedded_chain_remembers_balances_and_signatures_across_a_restart(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    wallet, _ = earned
    payouts.run(sessions, replace_minimum(psettings, 1), chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    after = restarted(chain)
    assert after.balance(wallet) == payout.units
    assert after.signature_status(payout.signature or "") == deposits.SignatureStatus("finalized")
    assert after.balance(str(vault.pubkey)) == chain.balance(str(vault.pubkey))


def test_a_usdc_payout_moves_token_units_to_the_wallets_token_account(
    sessions, psettings, clock, chain, earned
) -> None:
    wallet, share = earned
    mint = Keypair()
    chain.ensure_mint(mint)
    settings = psettings.model_copy(
        update={"payout_asset": "USDC", "payout_minimum": 1, "usdc_mint": str(mint.pubkey())}
    )
    vault = treasury.load(settings, chain)
    treasury.fund_embedded(chain, vault, settings, usdc_mint=mint)
    payouts.run(sessions, settings, chain, vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.status == "settled" and payout.asset == "USDC"
    assert payout.units == share  # 1 micro-credit per base unit at the default rate
    ata = deposits.associated_token_account(wallet, str(mint.pubkey()))
    assert chain.token_balance(ata) == share
    found = chain.lookup(payout.signature or "")
    assert found is not None
    assert [(t.destination, t.amount, t.mint) for t in found.token_transfers] == [
        (ata, share, str(mint.pubkey()))
    ]
    assert total(sessions) == 0


def test_two_processes_share_the_embedded_chain_through_its_state_file(tmp_path: Path) -> None:
    """The portal and the CLI each hold a LiteSVM; the state file is the one truth."""
    path = tmp_path / deposits.LITESVM_STATE
    portal_side, cli_side = (deposits.LiteSVMChain(state_path=path) for _ in range(2))
    someone = str(Keypair().pubkey())
    cli_side.airdrop(someone, 5 * 10**9)
    assert portal_side.balance(someone) == 5 * 10**9
    portal_side.next_block()
    assert cli_side.block_height() == 1
    assert cli_side.latest_blockhash() == portal_side.latest_blockhash()


def test_two_runs_racing_make_one_payout_and_one_transfer(
    sessions, psettings, clock, chain, vault, earned
) -> None:
    """Two workers (each with its own chain object on the shared state file) run at once:
    the unique (provider, period) key and the row lock leave one payout, one transfer."""
    import threading

    wallet, share = earned
    settings = replace_minimum(psettings, 1)
    other = restarted(chain)
    gate = threading.Barrier(2)
    problems: list[BaseException] = []

    def work(worker_chain: deposits.LiteSVMChain) -> None:
        try:
            gate.wait(timeout=60)
            payouts.run(sessions, settings, worker_chain, vault, clock.now)
        except BaseException as exc:  # reported below, in the test's thread
            problems.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in (chain, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert problems == []
    payouts.resume(sessions, settings, restarted(chain), vault, clock.now)
    (payout,) = all_payouts(sessions)
    assert payout.status == "settled" and payout.signings == 1
    final = restarted(chain)
    assert final.balance(wallet) == share * LAMPORTS_PER_MICRO
    assert total(sessions) == 0


@given(
    micro=st.integers(min_value=1, max_value=10**15),
    per_sol=st.integers(min_value=1, max_value=10**12),
    per_usdc=st.integers(min_value=1, max_value=10**12),
)
def test_conversion_never_pays_more_than_the_earnings_it_moves(
    micro: int, per_sol: int, per_usdc: int
) -> None:
    """Integer units, never worth more than the micro-credits moved, and less than one
    unit of dust left over (or a refusal with a sentence)."""
    from gpuportal.hub.settings import load_settings

    for asset, rate, scale in (("SOL", per_sol, 10**9), ("USDC", per_usdc, 10**6)):
        settings = load_settings(
            payout_asset=asset,
            payout_micro_credits_per_sol=per_sol,
            payout_micro_credits_per_usdc=per_usdc,
        )
        try:
            units = payouts.to_units(settings, micro)
        except payouts.PayoutError as exc:
            assert str(exc).endswith(".")
            continue
        assert isinstance(units, int) and 0 < units <= payouts.payout_tx.U64_MAX
        assert units * rate <= micro * scale < (units + 1) * rate
