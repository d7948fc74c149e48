"""Refunds: an admin gives a customer back (part of) what one allocation cost them.

A refund is one balanced ledger transaction (kind ``refund``) that moves money
back to whoever paid (the user's wallet, or the team's budget) from the
provider's earnings and the platform's revenue, in the shares they were paid.

Limits, kept here and by the ledger:

* at most what the allocation's charges (usage less usage reversals) took from
  the payer, at the moment of the refund;
* one refund per allocation: its idempotency key is ``refund:<allocation id>``,
  so even two admins racing commit one refund, and asking again is refused
  with 409 (a sentence saying what was refunded), never a second payment;
* a reason is required; it becomes the transaction's memo.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..db.ledger_models import LedgerAccount, LedgerTransaction, Posting
from . import ledger, metering
from .allocations import get_allocation
from .ledger import InvalidAmount, LedgerError
from .usage import PAYER_KINDS

#: The transaction kinds that are charges of an allocation.
CHARGE_KINDS = ("usage", "usage_reversal")


class AlreadyRefunded(LedgerError):
    status = 409


@dataclass(frozen=True)
class Charged:
    """What one allocation cost, from the ledger: ``charged`` to the payer, of which
    ``provider`` went to the provider (the rest was the platform's fee), and what
    was ``refunded`` since."""

    charged: int
    provider: int
    refunded: int


def refund_key(allocation_id: int) -> str:
    return f"refund:{allocation_id}"


def charged(session: Session, allocation_id: int) -> Charged:
    def total(kinds: tuple[str, ...], accounts: tuple[str, ...]) -> int:
        value = session.scalar(
            select(func.coalesce(func.sum(Posting.amount), 0))
            .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
            .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
            .where(
                LedgerTransaction.allocation_id == allocation_id,
                LedgerTransaction.kind.in_(kinds),
                LedgerAccount.kind.in_(accounts),
            )
        )
        return int(value or 0)

    return Charged(
        charged=-total(CHARGE_KINDS, PAYER_KINDS),
        provider=total(CHARGE_KINDS, ("provider_earnings",)),
        refunded=total(("refund",), PAYER_KINDS),
    )


def refund(
    session: Session, allocation_id: int, amount: int | None, reason: str, by: str
) -> LedgerTransaction:
    """Refund ``amount`` micro-credits (``None``: all that was charged) of one allocation."""
    reason = reason.strip()
    if not reason:
        raise LedgerError("say why you refund: the reason goes into the ledger and the audit log.")
    alloc = get_allocation(session, allocation_id)
    key = refund_key(alloc.id)
    if session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key)):
        done = charged(session, alloc.id).refunded
        raise AlreadyRefunded(
            f"allocation {alloc.id} was already refunded ({done} micro-credits); "
            "an allocation is refunded once."
        )
    paid = charged(session, alloc.id)
    if paid.charged <= 0:
        raise InvalidAmount(f"allocation {alloc.id} has not been charged anything to refund.")
    amount = paid.charged if amount is None else ledger.positive_amount(amount)
    if amount > paid.charged:
        raise InvalidAmount(
            f"a refund of {amount} micro-credits is more than allocation {alloc.id} was "
            f"charged ({paid.charged})."
        )
    # The provider gives back its share of the refund (rounded down), the platform the rest.
    provider_back = amount * paid.provider // paid.charged
    legs = [
        ledger.Leg(metering.payer_ledger_account(session, alloc), amount),
        ledger.Leg(ledger.provider_earnings(session, alloc.provider_account_id).id, -provider_back),
        ledger.Leg(ledger.platform_revenue(session).id, -(amount - provider_back)),
    ]
    txn, _ = ledger.post(
        session,
        key,
        "refund",
        [leg for leg in legs if leg.amount != 0],
        allocation_id=alloc.id,
        memo=f"refund of {alloc.user_name}/{alloc.server_name}: {reason}",
        created_by=by,
    )
    return txn
