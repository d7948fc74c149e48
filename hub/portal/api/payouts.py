"""Portal API v1 for provider payouts (docs/payouts.md).

* a provider reads their own payout history: amount, status, signature, and an
  explorer link on real chains;
* admins list pending and failed payouts with the treasury's balance, run a
  payout round on demand, and retry a failed payout.

HTTP only: parse, authorise, call one function of ``billing.payouts``. Nothing
here returns the treasury key or a signed transaction's bytes.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from ...billing import payouts
from ...billing.ledger import LedgerError
from ...db import audit
from ...db.models import Account
from ...db.payout_models import PAYOUT_STATES
from ..auth import CurrentCaller, PortalDep
from ..context import Portal
from .plumbing import Admin, ApiError, api_error, check_owner, in_db, sentence

router = APIRouter()
Status = Literal["pending", "signed", "sent", "settled", "failed"]


class PayoutPublic(BaseModel):
    id: int
    provider: str | None
    period_start: datetime
    period_end: datetime
    amount: int
    asset: str
    units: int
    wallet: str
    chain: str
    status: str
    signature: str | None
    explorer_url: str | None
    reason: str | None
    retries: int
    created_at: datetime
    settled_at: datetime | None


class TreasuryPublic(BaseModel):
    address: str
    chain: str
    asset: str
    lamports: int
    usdc_mint: str | None
    usdc_units: int | None


class PayoutAdminView(BaseModel):
    treasury: TreasuryPublic | None
    treasury_error: str | None = None
    pending: list[PayoutPublic]
    failed: list[PayoutPublic]
    totals: dict[str, int]


class RunPublic(BaseModel):
    period_start: datetime
    period_end: datetime
    created: list[int]
    advanced: dict[int, str]
    errors: dict[str, str]


async def _side(portal: Portal) -> tuple[Any, Any, str | None]:
    try:
        return await run_in_threadpool(portal.payout_side)
    except LedgerError as exc:
        raise api_error(exc) from None


def _chain_for_links(portal: Portal) -> Any:
    """The chain, for explorer links only: none is made just to read the history."""
    return portal.chain if portal.chain is not None else _NoChain()


class _NoChain:
    name = "none"
    real = False


@router.get("/api/v1/payouts", response_model=list[PayoutPublic], tags=["payouts"])
async def list_payouts(
    portal: PortalDep,
    caller: CurrentCaller,
    provider: Annotated[str | None, Query(max_length=255)] = None,
    status: Annotated[Status | None, Query()] = None,
) -> Any:
    """Your payout history, newest first; admins may name any ``provider``."""
    if provider is not None:
        check_owner(caller, provider, "You can only see your own payouts.")
    if provider is None and caller.kind != "user":
        raise ApiError(400, "Name the provider whose payouts you want (?provider=NAME).")
    chain = _chain_for_links(portal)

    def work(session: Any) -> list[dict[str, Any]]:
        if provider is None:
            account_id: int | None = caller.account_id
        else:
            account_id = session.scalar(select(Account.id).where(Account.hub_name == provider))
            if account_id is None:
                raise payouts.PayoutNotFound(f"there is no account {provider!r}.")
        rows = payouts.history(
            session, account_id=account_id, statuses=(status,) if status else None
        )
        return [payouts.public(p, portal.settings, chain, name) for p, name in rows]

    return await in_db(portal, work)


@router.get("/api/v1/payouts/admin", response_model=PayoutAdminView, tags=["payouts"])
async def payouts_admin(portal: PortalDep, caller: Admin) -> Any:
    """Pending (not yet settled) and failed payouts, totals per status, and the treasury."""
    treasury: dict[str, Any] | None = None
    problem: str | None = None
    try:
        chain, vault, _ = await run_in_threadpool(portal.payout_side)
        treasury = await run_in_threadpool(payouts.treasury_view, portal.settings, chain, vault)
    except LedgerError as exc:  # a misconfigured treasury must not hide the payouts
        problem = sentence(str(exc))
        chain = _chain_for_links(portal)

    def work(session: Any) -> dict[str, Any]:
        def listed(states: tuple[str, ...]) -> list[dict[str, Any]]:
            rows = payouts.history(session, statuses=states)
            return [payouts.public(p, portal.settings, chain, name) for p, name in rows]

        return {
            "pending": listed(("pending", "signed", "sent")),
            "failed": listed(("failed",)),
            "totals": {state: payouts.totals(session).get(state, 0) for state in PAYOUT_STATES},
        }

    view = await in_db(portal, work)
    return {**view, "treasury": treasury, "treasury_error": problem}


@router.post("/api/v1/payouts/run", response_model=RunPublic, tags=["payouts"])
async def run_payouts(portal: PortalDep, caller: Admin) -> Any:
    """Run a payout round now: this period's payouts (once each), then every open one."""
    chain, vault, mint = await _side(portal)
    try:
        result = await run_in_threadpool(
            payouts.run, portal.sessions, portal.settings, chain, vault, None, mint
        )
    except LedgerError as exc:
        raise api_error(exc) from None

    def note(session: Any) -> None:
        audit.record(
            session,
            actor=caller.name,
            action="payout.run",
            target_kind="payout",
            target=f"{result.period_start:%Y-%m-%d}..{result.period_end:%Y-%m-%d}",
            detail={"created": result.created, "errors": result.errors},
        )

    await in_db(portal, note)
    return result.__dict__


@router.post("/api/v1/payouts/{payout_id}/retry", response_model=PayoutPublic, tags=["payouts"])
async def retry_payout(payout_id: int, portal: PortalDep, caller: Admin) -> Any:
    """Try a failed payout again (its amount moves out of earnings once more)."""
    chain, vault, mint = await _side(portal)

    def work(session: Any) -> int:
        payout = payouts.retry(session, payout_id)
        # The admin panel's audit log, in the retry's own transaction.
        audit.record(
            session,
            actor=caller.name,
            action="payout.retry",
            target_kind="payout",
            target=str(payout.id),
            detail={"amount": payout.amount, "retries": payout.retries},
        )
        return payout.id

    await in_db(portal, work)
    with suppress(LedgerError):  # if this fails it stays pending; the loop tries again
        await run_in_threadpool(
            lambda: payouts.advance(
                portal.sessions, portal.settings, chain, vault, payout_id, mint=mint
            )
        )

    def read(session: Any) -> dict[str, Any]:
        payout, name = payouts.one(session, payout_id)
        return payouts.public(payout, portal.settings, chain, name)

    return await in_db(portal, read)
