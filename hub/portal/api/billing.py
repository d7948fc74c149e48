"""Portal API v1 for money: allocations, balances, grants, deposits, quotas, usage.

Who may call what:

* the spawner (a trusted hub service, ``GPUPORTAL_TRUSTED_SERVICES``) and
  admins open and close allocations and authorize launches for anyone;
* admins grant credits and set quotas;
* a user reads their own balance, allocations and usage, deposits for
  themselves, and may ask whether they could launch; anyone else's data is 403.

Every refusal is a 4xx with one sentence in the standard error shape.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from gpuportal.provider.money import format_credits

from ... import timeutil
from ...billing import (
    allocations,
    credits,
    deposits,
    ledger,
    metering,
    quotas,
    reservation_billing,
    usage,
)
from ...billing.ledger import MAX_AMOUNT, MAX_PRICE, LedgerError
from ...db import audit
from ...db.ledger_models import OPEN_STATES, Allocation
from ..auth import CurrentCaller, PortalDep, PortalUser
from ..context import Portal
from .plumbing import (
    Admin,
    ApiError,
    Trusted,
    account_from_hub,
    api_error,
    check_owner,
    in_db,
    sentence,
)

router = APIRouter()

#: Largest deposit amounts accepted before the chain is asked: all the SOL there is
#: (about 6e17 lamports), and a USDC amount worth at most MAX_AMOUNT at 1 credit/USDC.
MAX_LAMPORTS = 10**18
MAX_USDC_UNITS = MAX_AMOUNT


#: Why a user may not see another's data.
OWN_DATA_ONLY = "You can only see your own usage, balance and servers."


# --- allocations -------------------------------------------------------------------------


class AllocationCreate(BaseModel):
    """Open the bill of a live reservation; everything it costs comes from the reservation."""

    model_config = ConfigDict(extra="forbid")

    reservation_id: str = Field(min_length=1, max_length=32)
    team: str | None = Field(
        None, max_length=255, description="Team (hub group) that pays, if not the user."
    )


class AllocationClose(BaseModel):
    ended_at: AwareDatetime | None = Field(
        None, description="Stop time, or the last moment a dead node was seen; default now."
    )


class AllocationPublic(BaseModel):
    id: int
    user: str
    server: str
    gpu_count: int
    price_per_gpu_hour: int
    platform_fee_bps: int
    reservation_id: str | None
    status: str
    started_at: datetime
    last_charged_at: datetime
    ended_at: datetime | None
    stopping_at: datetime | None
    stop_reason: str | None
    runway_warned_at: datetime | None
    charged: int = Field(description="Micro-credits charged so far (ledger).")


def _public(session: Any, alloc: Allocation) -> dict[str, Any]:
    from sqlalchemy import func, select

    from ...db.ledger_models import LedgerAccount, LedgerTransaction, Posting

    charged = session.scalar(
        select(func.coalesce(-func.sum(Posting.amount), 0))
        .join(LedgerTransaction, LedgerTransaction.id == Posting.transaction_id)
        .join(LedgerAccount, LedgerAccount.id == Posting.ledger_account_id)
        .where(
            LedgerTransaction.allocation_id == alloc.id, LedgerAccount.kind.in_(usage.PAYER_KINDS)
        )
    )
    return {
        "id": alloc.id,
        "user": alloc.user_name,
        "server": alloc.server_name,
        "gpu_count": alloc.gpu_count,
        "price_per_gpu_hour": alloc.price_per_gpu_hour,
        "platform_fee_bps": alloc.platform_fee_bps,
        "reservation_id": alloc.reservation_id,
        "status": alloc.status,
        "started_at": alloc.started_at,
        "last_charged_at": alloc.last_charged_at,
        "ended_at": alloc.ended_at,
        "stopping_at": alloc.stopping_at,
        "stop_reason": alloc.stop_reason,
        "runway_warned_at": alloc.runway_warned_at,
        "charged": int(charged or 0),
    }


@router.post(
    "/api/v1/allocations", response_model=AllocationPublic, status_code=201, tags=["metering"]
)
async def open_allocation(
    body: AllocationCreate, portal: PortalDep, caller: Trusted, response: Response
) -> Any:
    """Open the billing period of a reserved server that just became ready (spawner, admins).

    Only for a live reservation, at its locked price, GPUs and provider, from
    now: no caller chooses the price, the start or the payee. Retrying returns
    the open allocation (200).
    """
    now = timeutil.utcnow()

    def work(session: Any) -> tuple[dict[str, Any], bool]:
        alloc, created = reservation_billing.open_for_reservation(
            session, portal.settings, body.reservation_id, body.team, now
        )
        return _public(session, alloc), created

    public, created = await in_db(portal, work)
    if not created:
        response.status_code = 200
    return public


@router.post(
    "/api/v1/allocations/{allocation_id}/close", response_model=AllocationPublic, tags=["metering"]
)
async def close_allocation(
    allocation_id: int, portal: PortalDep, caller: Trusted, body: AllocationClose | None = None
) -> Any:
    """End a server's billing period and charge exactly up to ``ended_at``; idempotent."""
    now = timeutil.utcnow()
    ended_at = body.ended_at if body else None

    def work(session: Any) -> dict[str, Any]:
        alloc = allocations.close_allocation(session, portal.settings, allocation_id, ended_at, now)
        return _public(session, alloc)

    return await in_db(portal, work)


@router.get("/api/v1/allocations", response_model=list[AllocationPublic], tags=["metering"])
async def list_allocations(
    portal: PortalDep,
    caller: CurrentCaller,
    user: Annotated[str | None, Query(max_length=255)] = None,
    server: Annotated[str | None, Query(max_length=255)] = None,
    open_only: bool = False,
) -> Any:
    """Allocations of one user (yourself by default), newest first."""
    from sqlalchemy import select

    name = user or caller.name
    check_owner(caller, name, OWN_DATA_ONLY)

    def work(session: Any) -> list[dict[str, Any]]:
        query = select(Allocation).where(Allocation.user_name == name)
        if server is not None:
            query = query.where(Allocation.server_name == server)
        if open_only:
            query = query.where(Allocation.status.in_(OPEN_STATES))
        rows = session.scalars(query.order_by(Allocation.id.desc()).limit(500))
        return [_public(session, a) for a in rows]

    return await in_db(portal, work)


@router.get(
    "/api/v1/allocations/{allocation_id}", response_model=AllocationPublic, tags=["metering"]
)
async def get_allocation(allocation_id: int, portal: PortalDep, caller: CurrentCaller) -> Any:
    def work(session: Any) -> dict[str, Any]:
        alloc = allocations.get_allocation(session, allocation_id)
        check_owner(caller, alloc.user_name, OWN_DATA_ONLY)
        return _public(session, alloc)

    return await in_db(portal, work)


# --- balances and grants -------------------------------------------------------------------


class BalancePublic(BaseModel):
    user: str
    balance: int = Field(description="Micro-credits, from the ledger.")
    available: int = Field(
        description="Balance less what running servers owe since their last charge."
    )
    display: str
    currency: str
    rate_per_hour: int
    runway_seconds: float | None
    warning: str | None
    allocations: list[AllocationPublic]
    min_billable_seconds: int = Field(
        description="A launch needs credit for at least this long (seconds); the spawn "
        "form shows it."
    )


@router.get("/api/v1/balance", response_model=BalancePublic, tags=["billing"])
async def get_balance(
    portal: PortalDep,
    caller: CurrentCaller,
    user: Annotated[str | None, Query(max_length=255)] = None,
) -> Any:
    """A wallet's balance, burn rate and runway (yourself by default)."""
    from sqlalchemy import select

    name = user or caller.name
    check_owner(caller, name, OWN_DATA_ONLY)
    now = timeutil.utcnow()
    settings = portal.settings

    def work(session: Any) -> dict[str, Any]:
        account = allocations.account_named(session, name)
        wallet = ledger.wallet(session, account.id)
        running = list(
            session.scalars(
                select(Allocation).where(
                    Allocation.account_id == account.id,
                    Allocation.team_id.is_(None),
                    Allocation.status.in_(OPEN_STATES),
                )
            )
        )
        state = metering.payer_state(session, wallet.id, running, now)
        warning = None
        if state.runway is not None and state.runway < metering.warning_threshold_seconds(settings):
            warning = (
                f"Your credit runs out in about {quotas.minutes(state.runway)}; your "
                "servers stop when it does. Add credits to keep them running."
            )
        stopping = [a for a in running if a.stopping_at is not None]
        if stopping:
            warning = (
                f"Out of {settings.currency_name}: your servers stop at "
                f"{min(a.stopping_at for a in stopping if a.stopping_at).isoformat()}"
                ". Save your work, or add credits now."
            )
        return {
            "user": name,
            "balance": state.balance,
            "available": state.available,
            "display": format_credits(state.balance, settings.currency_name),
            "currency": settings.currency_name,
            "rate_per_hour": state.rate_per_hour,
            "runway_seconds": state.runway,
            "warning": warning,
            "allocations": [_public(session, a) for a in running],
            "min_billable_seconds": settings.min_billable_seconds,
        }

    return await in_db(portal, work)


class GrantCreate(BaseModel):
    user: str | None = Field(None, max_length=255)
    team: str | None = Field(None, max_length=255)
    amount: StrictInt = Field(
        description=f"Micro-credits (1 credit = 1,000,000); above zero, at most {MAX_AMOUNT}."
    )
    source: Literal["grants", "promo"] = "grants"
    memo: str = Field("", max_length=300)
    idempotency_key: str | None = Field(None, min_length=1, max_length=150)


class TransactionPublic(BaseModel):
    id: int
    idempotency_key: str
    kind: str
    amount: int
    created: bool
    created_at: datetime


@router.post(
    "/api/v1/credits/grants", response_model=TransactionPublic, status_code=201, tags=["billing"]
)
async def grant_credits(
    body: GrantCreate, portal: PortalDep, caller: Admin, response: Response
) -> Any:
    """Credit a user's wallet or a team's budget (admins). Same key again: the first grant.

    A hub user who has not used the portal yet (e.g. just created by an admin)
    is looked up in the hub on demand.
    """
    try:
        ledger.positive_amount(body.amount)
    except LedgerError as exc:
        raise api_error(exc) from None
    if body.user is not None:
        await account_from_hub(portal, body.user)

    def work(session: Any) -> dict[str, Any]:
        txn, created = credits.grant(
            session,
            user=body.user,
            team=body.team,
            amount=body.amount,
            source=body.source,
            key=body.idempotency_key and f"grant:{body.idempotency_key}",
            by=caller.name,
            memo=body.memo,
        )
        if created:
            audit.record(
                session,
                actor=caller.name,
                action="credits.grant",
                target_kind="user" if body.user is not None else "team",
                target=str(body.user if body.user is not None else body.team),
                reason=body.memo,
                detail={"amount": body.amount, "source": body.source, "transaction": txn.id},
            )
        return {
            "id": txn.id,
            "idempotency_key": txn.idempotency_key,
            "kind": txn.kind,
            "amount": body.amount,
            "created": created,
            "created_at": txn.created_at,
        }

    result = await in_db(portal, work)
    if not result["created"]:
        response.status_code = 200
    return result


class SignupApproval(BaseModel):
    user: str = Field(min_length=1, max_length=255)


class SignupPublic(BaseModel):
    user: str
    credited: int = Field(
        description="Micro-credits credited now: 0 if already welcomed, or today's sign-up "
        "budget is spent."
    )
    balance: int


@router.post("/api/v1/credits/signup", response_model=SignupPublic, tags=["billing"])
async def approve_signup(body: SignupApproval, portal: PortalDep, caller: Admin) -> Any:
    """Vouch for a person (admins): their account gets the sign-up credit, once.

    Under ``GPUPORTAL_SIGNUP_CREDIT_POLICY=approved`` (the default with open
    sign-up) this is the only way to the sign-up credit; the daily budget applies.
    """
    await account_from_hub(portal, body.user)

    def work(session: Any) -> dict[str, Any]:
        account = allocations.account_named(session, body.user)
        micro = credits.welcome(session, portal.settings, account.id, approved_by=caller.name)
        audit.record(
            session,
            actor=caller.name,
            action="credits.signup",
            target_kind="user",
            target=body.user,
            detail={"credited": micro},
        )
        return {
            "user": body.user,
            "credited": micro,
            "balance": ledger.balance(session, ledger.wallet(session, account.id).id),
        }

    return await in_db(portal, work)


# --- Solana deposits -----------------------------------------------------------------------


class DepositCreate(BaseModel):
    signature: str = Field(min_length=1, max_length=120)
    lamports: StrictInt = Field(
        description=f"Lamports sent to the deposit address; at most {MAX_LAMPORTS}."
    )


class DepositPublic(BaseModel):
    signature: str
    lamports: int
    credited: int
    created: bool
    balance: int


class DepositInfo(BaseModel):
    address: str
    memo: str = Field(
        description="Put this text in an SPL Memo instruction of every deposit: a deposit is "
        "credited only to the account whose memo it carries."
    )
    chain: str
    micro_credits_per_sol: int
    currency: str
    usdc_mint: str | None = Field(
        None, description="The USDC mint; null when USDC deposits are not configured."
    )
    usdc_token_account: str | None = Field(
        None, description="Send USDC here: the deposit address's associated token account."
    )
    micro_credits_per_usdc: int


class UsdcDepositCreate(BaseModel):
    signature: str = Field(min_length=1, max_length=120)
    amount: StrictInt = Field(
        description="USDC base units (10^-6 USDC) sent to the token account; at most "
        f"{MAX_USDC_UNITS}."
    )


class UsdcDepositPublic(BaseModel):
    signature: str
    amount: int
    credited: int
    created: bool
    balance: int


def chain_of(portal: Portal) -> deposits.Chain:
    if portal.chain is None:
        portal.chain = deposits.make_chain(portal.settings)
    chain: deposits.Chain = portal.chain
    return chain


@router.get("/api/v1/deposits/solana", response_model=DepositInfo, tags=["billing"])
async def deposit_info(portal: PortalDep, caller: CurrentCaller) -> Any:
    """Where to send SOL, and what it is worth."""
    try:
        address = await run_in_threadpool(deposits.deposit_address, portal.settings)
        chain = chain_of(portal)
    except LedgerError as exc:
        raise ApiError(503, sentence(str(exc))) from None
    try:  # SOL deposits work without a USDC mint, so its absence only blanks these two
        mint: str | None = await run_in_threadpool(deposits.usdc_mint, portal.settings, chain)
    except LedgerError:
        mint = None
    return {
        "address": address,
        "memo": deposits.deposit_memo(address, caller.account_id),
        "chain": chain.name,
        "micro_credits_per_sol": portal.settings.solana_micro_credits_per_sol,
        "currency": portal.settings.currency_name,
        "usdc_mint": mint,
        "usdc_token_account": deposits.associated_token_account(address, mint) if mint else None,
        "micro_credits_per_usdc": portal.settings.micro_credits_per_usdc,
    }


async def _credit_deposit(
    portal: Portal,
    caller: PortalUser,
    response: Response,
    signature: str,
    field: str,
    amount: int,
    credit: Callable[..., tuple[int, bool]],
) -> dict[str, Any]:
    """Credit a verified deposit to the caller once; a replay answers 200, not 201."""

    def work(session: Any) -> dict[str, Any]:
        micro, created = credit(
            session,
            portal.settings,
            account_id=caller.account_id,
            signature=signature,
            by=caller.name,
            **{field: amount},
        )
        return {
            "signature": signature,
            field: amount,
            "credited": micro,
            "created": created,
            "balance": ledger.balance(session, ledger.wallet(session, caller.account_id).id),
        }

    result = await in_db(portal, work)
    if not result["created"]:
        response.status_code = 200
    return result


@router.post(
    "/api/v1/deposits/solana", response_model=DepositPublic, status_code=201, tags=["billing"]
)
async def deposit(
    body: DepositCreate, portal: PortalDep, caller: CurrentCaller, response: Response
) -> Any:
    """Credit a SOL transfer to the deposit address, once (yourself only)."""
    if caller.kind != "user":
        raise ApiError(403, "Deposits are credited to the hub user who submits them.")
    try:
        ledger.positive_amount(body.lamports, "lamports", MAX_LAMPORTS)
        signature = deposits.check_signature(body.signature)
        address = await run_in_threadpool(deposits.deposit_address, portal.settings)
        chain = chain_of(portal)
        found = await run_in_threadpool(chain.lookup, signature)
        lamports = deposits.verify(
            found,
            signature=signature,
            address=address,
            lamports=body.lamports,
            memo=deposits.deposit_memo(address, caller.account_id),
        )
    except LedgerError as exc:
        raise api_error(exc) from None

    return await _credit_deposit(
        portal, caller, response, signature, "lamports", lamports, deposits.credit
    )


@router.post(
    "/api/v1/deposits/usdc", response_model=UsdcDepositPublic, status_code=201, tags=["billing"]
)
async def deposit_usdc(
    body: UsdcDepositCreate, portal: PortalDep, caller: CurrentCaller, response: Response
) -> Any:
    """Credit a USDC transfer to the platform's USDC token account, once (yourself only)."""
    if caller.kind != "user":
        raise ApiError(403, "Deposits are credited to the hub user who submits them.")
    try:
        ledger.positive_amount(body.amount, "amount", MAX_USDC_UNITS)
        signature = deposits.check_signature(body.signature)
        address = await run_in_threadpool(deposits.deposit_address, portal.settings)
        chain = chain_of(portal)
        mint = await run_in_threadpool(deposits.usdc_mint, portal.settings, chain)
        found = await run_in_threadpool(chain.lookup, signature)
        amount = deposits.verify_usdc(
            found,
            signature=signature,
            token_account=deposits.associated_token_account(address, mint),
            mint=mint,
            amount=body.amount,
            memo=deposits.deposit_memo(address, caller.account_id),
        )
    except LedgerError as exc:
        raise api_error(exc) from None

    return await _credit_deposit(
        portal, caller, response, signature, "amount", amount, deposits.credit_usdc
    )


# --- quotas and authorize ---------------------------------------------------------------------


class QuotaSet(BaseModel):
    user: str | None = Field(None, max_length=255)
    team: str | None = Field(None, max_length=255)
    window: Literal["day", "week", "month"] = "day"
    gpu_hours: float | None = Field(None, ge=0, le=quotas.MAX_QUOTA_GPU_HOURS)
    spend_cap_per_hour: StrictInt | None = Field(
        None, ge=0, le=quotas.MAX_SPEND_CAP, description="Micro-credits per hour."
    )
    reason: str = Field("", max_length=500, description="Why (goes into the audit log).")


class QuotaPublic(BaseModel):
    window: str
    gpu_hours: float | None
    gpu_hours_used: float
    spend_cap_per_hour: int | None


@router.put("/api/v1/quotas", response_model=QuotaPublic, tags=["quotas"])
async def put_quota(body: QuotaSet, portal: PortalDep, caller: Admin) -> Any:
    """Set (replace) the quota of one user or one team (admins); a hub user who has not
    used the portal yet is looked up in the hub on demand."""
    now = timeutil.utcnow()
    if body.user is not None:
        await account_from_hub(portal, body.user)

    def work(session: Any) -> dict[str, Any]:
        quota = quotas.set_quota(
            session,
            user=body.user,
            team=body.team,
            window=body.window,
            gpu_hours=body.gpu_hours,
            spend_cap_per_hour=body.spend_cap_per_hour,
        )
        audit.record(
            session,
            actor=caller.name,
            action="quota.set",
            target_kind="user" if body.user is not None else "team",
            target=str(body.user if body.user is not None else body.team),
            reason=body.reason,
            detail={
                "window": body.window,
                "gpu_hours": body.gpu_hours,
                "spend_cap_per_hour": body.spend_cap_per_hour,
            },
        )
        return quotas.quota_view(session, quota, now)

    return await in_db(portal, work)


@router.get("/api/v1/quotas", response_model=QuotaPublic | None, tags=["quotas"])
async def get_quota(
    portal: PortalDep,
    caller: CurrentCaller,
    user: Annotated[str | None, Query(max_length=255)] = None,
) -> Any:
    """Your quota (or a user's, for admins); null when there is none."""
    name = user or caller.name
    check_owner(caller, name, OWN_DATA_ONLY)
    now = timeutil.utcnow()

    def work(session: Any) -> dict[str, Any] | None:
        account = allocations.account_named(session, name)
        quota = metering.quota_for(session, account_id=account.id)
        return None if quota is None else quotas.quota_view(session, quota, now)

    return await in_db(portal, work)


class AuthorizeRequest(BaseModel):
    user: str = Field(min_length=1, max_length=255)
    gpu_count: StrictInt = Field(gt=0, le=1024)
    price_per_gpu_hour: StrictInt = Field(ge=0, le=MAX_PRICE)
    team: str | None = Field(None, max_length=255)


class AuthorizePublic(BaseModel):
    allowed: bool
    user: str
    payer: str
    balance: int
    available: int
    rate_per_hour: int
    runway_seconds: float | None
    min_billable_seconds: int


@router.post("/api/v1/authorize", response_model=AuthorizePublic, tags=["quotas"])
async def check_launch(body: AuthorizeRequest, portal: PortalDep, caller: CurrentCaller) -> Any:
    """May ``user`` launch this now? 402 or 403 with the reason and what to do.

    The spawner calls it before it submits; a user may ask about themselves.
    """
    check_owner(caller, body.user, OWN_DATA_ONLY)
    now = timeutil.utcnow()

    def work(session: Any) -> dict[str, Any]:
        ok = quotas.authorize_launch(
            session,
            portal.settings,
            user=body.user,
            gpu_count=body.gpu_count,
            price_per_gpu_hour=body.price_per_gpu_hour,
            team=body.team,
            now=now,
        )
        return {
            "allowed": True,
            "user": ok.user,
            "payer": ok.payer,
            "balance": ok.balance,
            "available": ok.available,
            "rate_per_hour": ok.rate_per_hour,
            "runway_seconds": ok.runway_seconds,
            "min_billable_seconds": portal.settings.min_billable_seconds,
        }

    return await in_db(portal, work)


# --- usage ------------------------------------------------------------------------------------


@router.get("/api/v1/usage", tags=["billing"], response_model=None)
async def get_usage(
    portal: PortalDep,
    caller: CurrentCaller,
    user: Annotated[str | None, Query(max_length=255)] = None,
    by: Annotated[Literal["server", "day"], Query()] = "server",
    format: Annotated[Literal["json", "csv"], Query()] = "json",
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
) -> Any:
    """What your servers cost, per server or per day; ``format=csv`` for a spreadsheet."""
    name = user or caller.name
    check_owner(caller, name, OWN_DATA_ONLY)

    def work(session: Any) -> list[dict[str, Any]]:
        account = allocations.account_named(session, name)
        return usage.usage(session, account.id, by, since, until)

    rows = await in_db(portal, work)
    if format == "csv":
        return PlainTextResponse(
            usage.to_csv(rows, by),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="usage-by-{by}.csv"'},
        )
    return {"user": name, "by": by, "currency": portal.settings.currency_name, "rows": rows}


class TopUpPublic(BaseModel):
    kind: str = Field(description="grant, promo, signup, deposit, ... (the transaction's kind).")
    memo: str
    created_at: datetime
    amount: int = Field(description="Micro-credits into the wallet (negative: a correction).")
    display: str


@router.get("/api/v1/credits/history", response_model=list[TopUpPublic], tags=["billing"])
async def credit_history(
    portal: PortalDep,
    caller: CurrentCaller,
    user: Annotated[str | None, Query(max_length=255)] = None,
) -> Any:
    """Grants, sign-up credit and deposits into a wallet (yourself by default), newest first."""
    name = user or caller.name
    check_owner(caller, name, OWN_DATA_ONLY)
    currency = portal.settings.currency_name

    def work(session: Any) -> list[dict[str, Any]]:
        account = allocations.account_named(session, name)
        rows = usage.top_ups(session, account.id)
        return [{**row, "display": format_credits(row["amount"], currency)} for row in rows]

    return await in_db(portal, work)
