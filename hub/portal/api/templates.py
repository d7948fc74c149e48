"""Notebook templates API v1: the gallery's list, one template, publishing.

Who may do what:

- any hub user lists and fetches the global templates and those of their own teams;
  another team's template answers 404, as if it did not exist;
- a team admin (or a portal admin) publishes a notebook as a template of that team
  and removes the team's templates; a read-only token (a user server's own) cannot;
- every answer carries the estimated cost of one run at the live prices.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from ...db import accounts
from ...db.models import Account
from ...market import marketplace, templates
from ...market.marketplace import rules_of
from ..auth import CurrentCaller, PortalDep, PortalUser
from ..context import Portal
from .plumbing import ApiError, in_db

router = APIRouter(tags=["templates"])

#: A publish request's largest body: the notebook's cap plus room for the JSON around it.
MAX_PUBLISH_BYTES = templates.MAX_NOTEBOOK_BYTES + 64 * 1024


class TemplatePublic(BaseModel):
    id: str = Field(description="global/<name> or team/<number>.")
    kind: str
    team: str | None
    title: str
    description: str
    gpu_model: str | None = Field(description="None: any GPU model.")
    gpu_count: int = Field(description="0: a CPU server.")
    min_vram_gb: int
    expected_minutes: int
    filename: str
    sha256: str
    estimated_cost: int | None = Field(
        description="Micro-credits for one run of expected_minutes at the cheapest live "
        "offer that fits; None when no offer fits."
    )
    estimated_cost_display: str
    price_per_gpu_hour: int | None
    free_now: bool = Field(description="An offer that fits has the GPUs free on one node now.")


class TemplateWithNotebook(TemplatePublic):
    notebook: str = Field(description="The notebook's JSON text, its metadata included.")


class TemplatePublish(BaseModel):
    """A notebook (nbformat 4 JSON text) whose metadata.gpuportal.template says what it needs."""

    model_config = ConfigDict(extra="forbid")

    team: str = Field(min_length=1, max_length=255)
    notebook: str = Field(min_length=2, max_length=templates.MAX_NOTEBOOK_BYTES)


async def publish_body_size(request: Request) -> None:
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_PUBLISH_BYTES:
        raise ApiError(
            413,
            f"A template may be at most {templates.MAX_NOTEBOOK_BYTES // 1024} KiB.",
            "too_large",
        )


def _account(session: Session, caller: PortalUser) -> Account | None:
    if caller.is_service:
        return None
    return session.get(Account, caller.account_id)


def _priced(entry: dict[str, Any], offers: list[dict[str, Any]], currency: str) -> dict[str, Any]:
    cost = templates.estimate(entry, offers, currency)
    return {
        **entry,
        "estimated_cost": cost["cost"],
        "estimated_cost_display": cost["cost_display"],
        "price_per_gpu_hour": cost["price_per_gpu_hour"],
        "free_now": cost["free_now"],
    }


def _offers(portal: Portal, session: Session) -> list[dict[str, Any]]:
    return marketplace.offers(session, rules_of(portal.settings))


@router.get("/api/v1/templates", response_model=list[TemplatePublic])
async def list_templates(caller: CurrentCaller, portal: PortalDep) -> Any:
    """The templates the caller may see, each with its GPU needs and estimated cost."""
    currency = portal.settings.currency_name

    def load(session: Session) -> list[dict[str, Any]]:
        offers = _offers(portal, session)
        entries = templates.listing(session, _account(session, caller))
        return [_priced(e, offers, currency) for e in entries]

    return await in_db(portal, load)


@router.get("/api/v1/templates/{kind}/{key}", response_model=TemplateWithNotebook)
async def get_template(kind: str, key: str, caller: CurrentCaller, portal: PortalDep) -> Any:
    """One template with its notebook; 404 when it does not exist or is another team's."""
    currency = portal.settings.currency_name

    def load(session: Session) -> dict[str, Any] | None:
        found = templates.visible(session, _account(session, caller), f"{kind}/{key}")
        return None if found is None else _priced(found, _offers(portal, session), currency)

    found = await in_db(portal, load)
    if found is None:
        raise ApiError(404, "There is no such template.", "not_found")
    return found


@router.post(
    "/api/v1/templates",
    response_model=TemplatePublic,
    status_code=201,
    dependencies=[Depends(publish_body_size)],
)
async def publish_template(body: TemplatePublish, caller: CurrentCaller, portal: PortalDep) -> Any:
    """Publish a notebook as a template of a team (team admins only); the same title
    again replaces it."""
    if caller.is_service:
        raise ApiError(403, "Templates are published by a team admin, not by a service.")
    currency = portal.settings.currency_name

    def work(session: Session) -> dict[str, Any]:
        account = session.get(Account, caller.account_id)
        if account is None:  # pragma: no cover - the caller's account exists
            raise ApiError(403, "You have no portal account.")
        entry = templates.publish(session, account, body.team, body.notebook)
        return _priced(entry, _offers(portal, session), currency)

    return await in_db(portal, work)


@router.delete("/api/v1/templates/{kind}/{key}", status_code=204)
async def delete_template(kind: str, key: str, caller: CurrentCaller, portal: PortalDep) -> None:
    """Remove a team template (an admin of its team only)."""
    if caller.is_service:
        raise ApiError(403, "Templates are removed by a team admin, not by a service.")

    def work(session: Session) -> None:
        account = session.get(Account, caller.account_id)
        if account is None:  # pragma: no cover
            raise templates.TemplateNotFound()
        templates.remove(session, account, f"{kind}/{key}")

    await in_db(portal, work)


@router.get("/api/v1/templates-teams", response_model=list[str])
async def publishable_teams(caller: CurrentCaller, portal: PortalDep) -> Any:
    """The teams the caller may publish templates to (those they are a team admin of)."""

    def load(session: Session) -> list[str]:
        account = _account(session, caller)
        return [] if account is None else accounts.teams_managed_by(session, account)

    return await in_db(portal, load)
