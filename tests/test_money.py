"""The one money module: the micro-credit, parsing, display with one rounding rule, accrual.

Every place that shows an amount (the ledger's messages, the marketplace's
``*_display`` fields, the spawn form, the provider CLI) goes through
``gpuportal.provider.money``, so the same amount reads the same everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuportal.provider import money

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("10", 10_000_000),
        ("2.5", 2_500_000),
        ("0.000001", 1),
        (" 3 ", 3_000_000),
        ("1.20", 1_200_000),
        ("-2", -2_000_000),
        ("0", 0),
    ],
)
def test_parse_credits_reads_an_amount_exactly(text: str, micro: int) -> None:
    assert money.parse_credits(text) == micro


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("ten", money.NotAnAmount),
        ("1e3", money.NotAnAmount),
        ("nan", money.NotAnAmount),
        ("inf", money.NotAnAmount),
        ("", money.NotAnAmount),
        ("0.0000001", money.TooManyDecimals),
    ],
)
def test_parse_credits_refuses_what_is_not_money(
    text: str, error: type[money.InvalidAmount]
) -> None:
    with pytest.raises(error) as caught:
        money.parse_credits(text)
    assert isinstance(caught.value, ValueError)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (1_200_000, "1.20"),
        (0, "0.00"),
        (1_199_999, "1.19"),  # floor, where half-up once showed 1.20
        (5_000, "0.00"),  # half-up once showed 0.01: more credit than there is
        (4_999, "0.00"),
        (123_456_789, "123.45"),  # half-up once showed 123.46
        (-1_200_000, "-1.20"),
        (-1, "-0.01"),  # a debt is never shown as 0.00
        (-4_000, "-0.01"),
        (-10_000, "-0.01"),
        (-10_001, "-0.02"),
        (10**15, "1000000000.00"),
    ],
)
def test_format_credits_rounds_toward_minus_infinity(micro: int, text: str) -> None:
    assert money.format_credits(micro) == text
    assert money.format_credits(micro, "credits") == f"{text} credits"


def test_every_display_uses_the_one_rule() -> None:
    """The marketplace's sentences and the spawn form show what the ledger shows."""
    from gpuportal.hub.billing import quotas
    from gpuportal.hub.market import placement
    from gpuportal.spawners import form

    # No local copies of the rule remain where they used to live.
    assert not hasattr(placement, "credits")
    assert not hasattr(placement, "MICRO")
    assert form.format_credits is money.format_credits
    assert quotas.format_credits is money.format_credits


@pytest.mark.parametrize(
    ("gpus", "price", "elapsed", "expected"),
    [
        (1, 3_600_000, timedelta(seconds=1), 1_000),
        (2, 1_000_000, timedelta(hours=1), 2_000_000),
        (1, 1_000_000, timedelta(microseconds=3_599), 0),  # rounded down
        (1, 1_000_000, timedelta(microseconds=3_600), 1),
        (1, 1_000_000, timedelta(0), 0),
        (1, 1_000_000, -timedelta(seconds=5), 0),  # never negative
    ],
)
def test_accrued_is_rounded_down_and_never_negative(
    gpus: int, price: int, elapsed: timedelta, expected: int
) -> None:
    assert money.accrued(gpus, price, T0, T0 + elapsed) == expected


def test_accrued_of_intervals_sums_to_the_whole() -> None:
    """Charged as differences of cumulative values, rounding never accumulates."""
    ends = [T0 + timedelta(seconds=7 * k, microseconds=13 * k) for k in range(1, 200)]
    parts = [
        money.accrued(3, 1_234_567, T0, b) - money.accrued(3, 1_234_567, T0, a)
        for a, b in zip([T0, *ends], ends, strict=False)
    ]
    assert sum(parts) == money.accrued(3, 1_234_567, T0, ends[-1])
