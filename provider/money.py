"""Money arithmetic, in one place: the micro-credit, parsing, display and accrual.

Pure and without dependencies, so the control plane (the ledger, the meter, the
marketplace), the spawner's form and the node side (the provider CLI, the server
extension) all compute and show money the same way, and node-side code can import it
without the control plane.

* Amounts are integers of micro-credits (:data:`MICRO` per credit); no float ever
  touches money.
* One rounding rule for display: two decimals, rounded toward minus infinity (floor).
  It never shows more credit than there is: a balance rounds toward zero and a debt
  away from it, so a debt of 0.004 credits reads ``-0.01``, never ``0.00``.
* One accrual formula: what ``gpu_count`` GPUs at a price per GPU-hour cost from one
  moment to another, rounded down to the micro-credit; the meter charges exactly this,
  and the server extension's estimate equals it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

#: Micro-credits per credit.
MICRO = 1_000_000
#: Microseconds per hour: prices are per GPU-hour, time is counted in microseconds.
US_PER_HOUR = 3_600_000_000
_US = timedelta(microseconds=1)
_CENT = MICRO // 100


class InvalidAmount(ValueError):
    """Text that is not an amount of credits; the message is a sentence for people."""


class NotAnAmount(InvalidAmount):
    """Not a plain decimal number (a word, an exponent, NaN or infinity, nothing)."""


class TooManyDecimals(InvalidAmount):
    """Finer than one micro-credit (more than six decimals)."""


def parse_credits(text: str) -> int:
    """``"2.5"`` credits → 2_500_000 micro-credits, exactly; refuses what is not money.

    A plain decimal number, surrounding spaces allowed, at most six decimals (one
    micro-credit); no exponent, NaN or infinity. The sign is the caller's rule (a price
    must be positive, a grant too); this only reads the number.
    """
    raw = text.strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise NotAnAmount(f"{text!r} is not an amount; write it like 10 or 2.5.") from None
    if not value.is_finite() or "e" in raw.lower():
        raise NotAnAmount(f"{text!r} is not an amount; write it like 10 or 2.5.")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise TooManyDecimals(
            f"{text!r} has more than six decimals; the smallest unit is 0.000001."
        )
    return int(micro)


def format_credits(micro: int, currency: str | None = None) -> str:
    """Micro-credits for people: two decimals, rounded toward minus infinity (floor),
    followed by the currency name when one is given.

    ``1_199_999`` → ``"1.19"``; ``-4_000`` → ``"-0.01"``; ``(2_500_000, "credits")`` →
    ``"2.50 credits"``. Integer arithmetic only.
    """
    cents = micro // _CENT  # floor division: toward minus infinity
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    text = f"{sign}{whole}.{part:02d}"
    return f"{text} {currency}" if currency is not None else text


def accrued(gpu_count: int, price_per_gpu_hour: int, started_at: datetime, t: datetime) -> int:
    """What ``gpu_count`` GPUs at ``price_per_gpu_hour`` micro-credits cost from
    ``started_at`` to ``t``, in micro-credits, rounded down; 0 when ``t`` is not later.

    ``floor(gpu_count * price_per_gpu_hour * elapsed_us / 3_600_000_000)``: the meter
    charges each interval as a difference of two such cumulative values, so rounding
    never accumulates (docs/billing.md).
    """
    elapsed_us = max(0, (t - started_at) // _US)
    return gpu_count * price_per_gpu_hour * elapsed_us // US_PER_HOUR
