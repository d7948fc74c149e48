"""Pure billing arithmetic and messages: exact tables, no database."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import pytest

from gpuportal.hub.billing import deposits, ledger, metering, quotas
from gpuportal.hub.db.ledger_models import Allocation
from gpuportal.provider import money

from .conftest import T0


def s(seconds: float):
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("gpus", "price", "seconds", "expected"),
    [
        (1, 3_600_000, 60, 60_000),  # 1000 micro per GPU-second
        (2, 3_600_000, 60, 120_000),
        (1, 1_000_000, 1, 277),  # 277.77... rounded down
        (1, 1_000_000, 60, 16_666),  # 16_666.66... rounded down
        (1, 1_000_000, 3600, 1_000_000),
        (3, 7, 3600, 21),
        (1, 1_000_000, 0, 0),
        (1, 1_000_000, -5, 0),  # never negative before the start
        (1, 1_000_000, 0.5, 138),  # sub-second: microsecond resolution
    ],
)
def test_accrued(gpus: int, price: int, seconds: float, expected: int) -> None:
    assert money.accrued(gpus, price, T0, s(seconds)) == expected


def alloc(gpus: int = 1, price: int = 1_000_000, fee: int = 1000) -> Allocation:
    return Allocation(
        gpu_count=gpus,
        price_per_gpu_hour=price,
        platform_fee_bps=fee,
        started_at=T0,
        last_charged_at=T0,
    )


def test_interval_charges_sum_to_the_cumulative_charge() -> None:
    a = alloc(price=1_000_000, fee=1250)
    cuts = [0, 30, 60, 90, 97.5, 120, 3600, 3601]
    parts = [metering.split(a, s(x), s(y)) for x, y in pairwise(cuts)]
    assert sum(p.charge for p in parts) == money.accrued(1, 1_000_000, T0, s(3601))
    assert sum(p.fee for p in parts) == metering.fee_of(1_000_277, 1250)
    assert all(p.charge == p.fee + p.provider for p in parts)


@pytest.mark.parametrize(
    ("fee_bps", "expected"),
    [
        (0, metering.Split(60_000, 0, 60_000)),
        (1000, metering.Split(60_000, 6_000, 54_000)),
        (10_000, metering.Split(60_000, 60_000, 0)),
        (333, metering.Split(60_000, 1_998, 58_002)),
    ],
)
def test_split(fee_bps: int, expected: metering.Split) -> None:
    assert metering.split(alloc(price=3_600_000, fee=fee_bps), s(0), s(60)) == expected


I30 = timedelta(seconds=30)


@pytest.mark.parametrize(
    ("last", "now", "ended", "expected"),
    [
        (0, 10, None, []),
        (0, 30, None, [(0, 30)]),
        (0, 61, None, [(0, 30), (30, 60)]),
        (30, 61, None, [(30, 60)]),
        (60, 61, None, []),
        (0, 100, 45, [(0, 30), (30, 45)]),  # the end cuts the last interval
        (0, 100, 60, [(0, 30), (30, 60)]),  # an end on the grid adds nothing
        (45, 100, 45, []),  # already charged to the end
        (0, 40, 45, [(0, 30)]),  # an end not yet reached waits
        (0, -10, None, []),  # the clock before the start
    ],
)
def test_periods_due(last: float, now: float, ended: float | None, expected: list) -> None:
    got = metering.periods_due(T0, s(last), s(now), I30, None if ended is None else s(ended))
    assert got == [(s(a), s(b)) for a, b in expected]


def test_periods_due_is_bounded_per_tick() -> None:
    got = metering.periods_due(T0, T0, s(86_400), I30, limit=5)
    assert len(got) == 5


def test_usage_key_is_allocation_and_interval_end() -> None:
    assert metering.usage_key(7, s(30)) == f"usage:7:{int(s(30).timestamp()) * 1_000_000}"
    assert metering.usage_key(7, s(30)) != metering.usage_key(8, s(30))


@pytest.mark.parametrize(
    ("available", "rate", "expected"),
    [(1_000_000, 3_600_000, 1000.0), (0, 1, 0.0), (-5, 10, 0.0), (5, 0, None)],
)
def test_runway_seconds(available: int, rate: int, expected: float | None) -> None:
    assert metering.runway_seconds(available, rate) == expected


@pytest.mark.parametrize(
    ("text", "micro"),
    [("10", 10_000_000), ("2.5", 2_500_000), ("0.000001", 1), (" 3 ", 3_000_000)],
)
def test_parse_credits(text: str, micro: int) -> None:
    assert money.parse_credits(text) == micro


@pytest.mark.parametrize("text", ["ten", "1e3", "0.0000001", "nan", "inf", ""])
def test_parse_credits_refuses(text: str) -> None:
    with pytest.raises(money.InvalidAmount):
        money.parse_credits(text)


@pytest.mark.parametrize(
    ("micro", "text"),
    [(10_000_000, "10.00 credits"), (1_999_999, "1.99 credits"), (-2_500_000, "-2.50 credits")],
)
def test_format_credits(micro: int, text: str) -> None:
    assert money.format_credits(micro, "credits") == text


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, "5"])
def test_positive_amount_refuses(amount: object) -> None:
    with pytest.raises(ledger.InvalidAmount):
        ledger.positive_amount(amount)


def test_params_hash_ignores_leg_order_but_not_amounts() -> None:
    legs = [ledger.Leg(1, 5), ledger.Leg(2, -5)]
    assert ledger.params_hash("grant", legs) == ledger.params_hash("grant", legs[::-1])
    assert ledger.params_hash("grant", legs) != ledger.params_hash(
        "grant", [ledger.Leg(1, 6), ledger.Leg(2, -6)]
    )
    assert ledger.params_hash("grant", legs) != ledger.params_hash("promo", legs)


@pytest.mark.parametrize(
    "legs",
    [
        [ledger.Leg(1, 5)],
        [ledger.Leg(1, 5), ledger.Leg(2, -4)],
        [ledger.Leg(1, True), ledger.Leg(2, -1)],
    ],
)
def test_unbalanced_transactions_are_refused(legs: list[ledger.Leg]) -> None:
    with pytest.raises(ledger.LedgerError):
        ledger.build("k", "grant", legs)


def test_runway_refusal_sentence() -> None:
    # 5 minutes of credit at 15 credits/hour, with a 15 minute minimum.
    why = quotas.runway_refusal(1_250_000, 0, 15_000_000, 900, "credits")
    assert why == (
        "Your available balance of 1.25 credits covers 5 min of this server at "
        "15.00 credits/hour; a launch needs credit for at least 15 min (3.75 credits). "
        "Add credits (a Solana deposit, or ask an admin for a grant), or choose fewer or "
        "cheaper GPUs."
    )
    assert quotas.runway_refusal(3_750_000, 0, 15_000_000, 900, "credits") is None


def test_quota_and_spend_cap_sentences() -> None:
    assert quotas.quota_refusal("Your", 36_000, "day", 35_000, 2, 900) is None
    assert quotas.quota_refusal("Your", 36_000, "day", 1_000, 2, 900) == (
        "Your GPU-hour budget of 10 GPU-h per day has 0.28 GPU-h left; this launch needs "
        "at least 0.5 GPU-h (2 GPU for 15 min). Wait until older usage leaves the window, "
        "choose fewer GPUs, or ask an admin to raise the quota."
    )
    assert quotas.spend_cap_refusal("your", 10_000_000, 4_000_000, 6_000_000, "credits") is None
    assert "exceeds your spend cap of 10.00 credits/hour" in str(
        quotas.spend_cap_refusal("your", 10_000_000, 4_000_000, 7_000_000, "credits")
    )


def test_minutes() -> None:
    assert [quotas.minutes(x) for x in (0, 59, 60, 300, 3600, 5400)] == [
        "0 s",
        "59 s",
        "1 min",
        "5 min",
        "1 h",
        "1 h 30 min",
    ]


SENDER, US, OTHER = "Sender1", "Deposit1", "Other1"
#: This account's deposit memo, and another account's.
MEMO, THEIRS = deposits.MEMO_PREFIX + "ours", deposits.MEMO_PREFIX + "theirs"


@pytest.mark.parametrize(
    ("found", "lamports", "outcome"),
    [
        (
            deposits.ChainTransaction(
                "sig", True, [deposits.Transfer(SENDER, US, 500)], memos=[MEMO]
            ),
            500,
            500,
        ),
        (
            deposits.ChainTransaction(
                "sig",
                True,
                [deposits.Transfer(SENDER, US, 200), deposits.Transfer(SENDER, US, 300)],
                memos=[MEMO],
            ),
            500,
            500,
        ),
        (None, 500, deposits.DepositNotFound),
        (
            deposits.ChainTransaction(
                "sig", False, [deposits.Transfer(SENDER, US, 500)], memos=[MEMO]
            ),
            500,
            deposits.DepositRefused,
        ),
        (
            deposits.ChainTransaction(
                "sig", True, [deposits.Transfer(SENDER, OTHER, 500)], memos=[MEMO]
            ),
            500,
            deposits.DepositRefused,
        ),
        (
            deposits.ChainTransaction(
                "sig", True, [deposits.Transfer(SENDER, US, 400)], memos=[MEMO]
            ),
            500,
            deposits.DepositRefused,
        ),
        (deposits.ChainTransaction("sig", True, [], memos=[MEMO]), 500, deposits.DepositRefused),
        # another account's memo: not ours to credit; no memo at all: refused
        (
            deposits.ChainTransaction(
                "sig", True, [deposits.Transfer(SENDER, US, 500)], memos=[THEIRS]
            ),
            500,
            deposits.DepositNotYours,
        ),
        (
            deposits.ChainTransaction("sig", True, [deposits.Transfer(SENDER, US, 500)]),
            500,
            deposits.DepositRefused,
        ),
    ],
)
def test_verify_deposit(found, lamports: int, outcome) -> None:
    if isinstance(outcome, int):
        assert (
            deposits.verify(found, signature="sig", address=US, lamports=lamports, memo=MEMO)
            == outcome
        )
    else:
        with pytest.raises(outcome):
            deposits.verify(found, signature="sig", address=US, lamports=lamports, memo=MEMO)


def test_system_transfer_decoding() -> None:
    keys = [SENDER, US, deposits.SYSTEM_PROGRAM]
    data = (2).to_bytes(4, "little") + (500_000_000).to_bytes(8, "little")
    other = (0).to_bytes(4, "little") + (1).to_bytes(8, "little")  # CreateAccount, not a transfer
    assert deposits.system_transfers(keys, [(2, [0, 1], data), (2, [0, 1], other)]) == [
        deposits.Transfer(SENDER, US, 500_000_000)
    ]
    assert deposits.system_transfers([SENDER, US, "Token1"], [(2, [0, 1], data)]) == []


MINT, FAKE = "Mint1", "Fake1"


def _tokens(*transfers: deposits.TokenTransfer, ok: bool = True) -> deposits.ChainTransaction:
    return deposits.ChainTransaction("sig", ok, [], list(transfers), memos=[MEMO])


@pytest.mark.parametrize(
    ("found", "outcome"),
    [
        (_tokens(deposits.TokenTransfer(SENDER, US, 500, MINT)), 500),
        (
            _tokens(
                deposits.TokenTransfer(SENDER, US, 200), deposits.TokenTransfer(SENDER, US, 300)
            ),
            500,
        ),
        (None, deposits.DepositNotFound),
        (_tokens(deposits.TokenTransfer(SENDER, US, 500, MINT), ok=False), deposits.DepositRefused),
        (_tokens(deposits.TokenTransfer(SENDER, US, 500, FAKE)), deposits.DepositRefused),
        (_tokens(deposits.TokenTransfer(SENDER, OTHER, 500, MINT)), deposits.DepositRefused),
        (_tokens(deposits.TokenTransfer(SENDER, US, 499, MINT)), deposits.DepositRefused),
        # SOL to the deposit address is no USDC deposit
        (
            deposits.ChainTransaction(
                "sig", True, [deposits.Transfer(SENDER, US, 500)], memos=[MEMO]
            ),
            deposits.DepositRefused,
        ),
    ],
)
def test_verify_usdc_deposit(found, outcome) -> None:
    def run() -> int:
        return deposits.verify_usdc(
            found, signature="sig", token_account=US, mint=MINT, amount=500, memo=MEMO
        )

    if isinstance(outcome, int):
        assert run() == outcome
    else:
        with pytest.raises(outcome):
            run()


def test_token_transfer_decoding() -> None:
    keys = [SENDER, MINT, US, "Owner1", deposits.TOKEN_PROGRAM, deposits.SYSTEM_PROGRAM]
    amount = (7).to_bytes(8, "little")
    instructions = [
        (4, [0, 2, 3], bytes([3]) + amount),  # Transfer
        (4, [0, 1, 2, 3], bytes([12]) + amount + bytes([6])),  # TransferChecked
        (4, [0, 1, 3], bytes([7]) + amount),  # MintTo: not a transfer
        (5, [0, 2, 3], bytes([3]) + amount),  # not the Token program
    ]
    assert deposits.token_transfers(keys, instructions) == [
        deposits.TokenTransfer(SENDER, US, 7),
        deposits.TokenTransfer(SENDER, US, 7, MINT),
    ]


# --- issue 9: a debt shows as a debt, never as 0.00 -------------------------------------------


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (1_239_999, "1.23 credits"),
        (0, "0.00 credits"),
        (-1, "-0.01 credits"),
        (-4_050_000, "-4.05 credits"),
        (-4_050_001, "-4.06 credits"),
    ],
)
def test_a_debt_is_never_shown_as_zero(micro: int, text: str) -> None:
    assert money.format_credits(micro, "credits") == text


def test_a_refusal_in_debt_says_so() -> None:
    why = quotas.runway_refusal(-4_050_000, 0, 1_000_000, 900, "credits")
    assert why is not None
    assert "You owe 4.05 credits" in why and "-4.05 credits" in why
    assert "0.00" not in why


@pytest.mark.parametrize(
    ("gpu_hours", "cap"),
    [(-1.0, None), (1e300, None), (float("inf"), None), (None, -1), (None, 2**63)],
)
def test_set_quota_refuses_amounts_out_of_bounds(gpu_hours, cap) -> None:
    with pytest.raises(ledger.LedgerError, match="must be between"):
        quotas.set_quota(
            None,  # type: ignore[arg-type]  (refused before the DB is touched)
            user="ann",
            team=None,
            window="day",
            gpu_hours=gpu_hours,
            spend_cap_per_hour=cap,
        )
