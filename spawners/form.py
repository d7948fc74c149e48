"""The spawn form: profiles as radio cards, options as selects built from the live offers.

Rendering is pure (profiles, offers and the user's balance in; HTML out), so it
is tested without a hub. The HTML is a Jinja template
(``templates/spawn_form.html``, shipped as package data) with autoescape on, as
JupyterHub renders its own pages: this module builds plain data for it and
never writes markup. Display names are admin-written and offers come from
providers, so every one of them is text to the template.

What the form offers follows the marketplace's ``/offers``:

- GPU models: those with offers, plus the admin's listed ones; a model with no
  offer, none free, or a name that cannot be chosen is shown disabled with the
  reason;
- GPU counts: up to what the largest node of the chosen model has free;
- regions: one select of the regions with offers;
- max price: one input, empty for no limit.

Costs are worked out here, with the one rounding rule of the money module, for
every model and count, and the page only looks them up: per hour (lowest free
price times count) and the minimum billable charge the portal names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from gpuportal.provider.money import format_credits

from .portal_client import Balance
from .profiles import FORM_PREFIX, UNLISTED, default_choice, default_profile

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Options whose values the live offers list (their unlisted choice takes those values).
LIVE_OPTIONS = {"gpu_model": "models", "region": "regions"}


@dataclass
class ModelLive:
    """One GPU model across the offers: free GPUs, the most on one node, the lowest
    price among free ones (micro-credits per GPU-hour) and whether all are demo GPUs."""

    free: int = 0
    largest: int = 0
    price: int = 0
    demo: bool = True


@dataclass
class Live:
    models: dict[str, ModelLive] = field(default_factory=dict)
    regions: dict[str, int] = field(default_factory=dict)

    @property
    def any(self) -> ModelLive:
        free = [m for m in self.models.values() if m.free > 0]
        prices = [m.price for m in free if m.price]
        return ModelLive(
            free=sum(m.free for m in free),
            largest=max((m.largest for m in free), default=0),
            price=min(prices, default=0),
            demo=bool(free) and all(m.demo for m in free),
        )


def summarize_offers(offers: list[dict[str, Any]]) -> Live:
    """Per model and per region, from the marketplace's offers; malformed rows are skipped."""
    live = Live()
    for offer in offers:
        try:
            model = str(offer["gpu_model"])
            region = str(offer.get("region") or "")
            free = max(int(offer.get("free_gpus", 0)), 0)
            largest = max(int(offer.get("largest_free_gpus", free)), 0)
            price = int(offer.get("price_per_gpu_hour", 0))
            demo = bool(offer.get("demo", False))
        except (KeyError, TypeError, ValueError):
            continue
        entry = live.models.setdefault(model, ModelLive())
        entry.free += free
        entry.largest = max(entry.largest, min(largest, free))
        entry.demo = entry.demo and demo
        if free > 0 and price > 0 and (entry.price == 0 or price < entry.price):
            entry.price = price
        if region:
            live.regions[region] = live.regions.get(region, 0) + free
    return live


def free_now(offers: list[dict[str, Any]]) -> str:
    """A sentence on what is free, for a refusal for capacity."""
    live = summarize_offers(offers)
    free = [(name, m) for name, m in sorted(live.models.items()) if m.free > 0]
    if not free:
        return "Nothing is free right now; try again later, or start a CPU-only server."
    parts = [
        f"{m.free}x {name} (up to {m.largest} on one server, from "
        f"{format_credits(m.price)} per GPU-hour)"
        for name, m in free
    ]
    regions = ", ".join(sorted(r for r, n in live.regions.items() if n > 0))
    where = f" in {regions}" if regions else ""
    return f"Free now{where}: {', '.join(parts)}."


def minutes(seconds: int) -> str:
    if seconds % 60 == 0:
        n = seconds // 60
        return f"{n} minute{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment


def _acceptable(option: Mapping[str, Any], value: str) -> bool:
    unlisted: Mapping[str, Any] = option.get("unlisted_choice") or {}
    if value in (option.get("choices") or {}):
        return True
    regex = unlisted.get("validation_regex") or ".*"
    return bool(unlisted.get("enabled")) and bool(re.fullmatch(regex, value))


def _model_choices(
    option: Mapping[str, Any], live: Live | None, current: str | None
) -> list[dict[str, Any]]:
    choices: Mapping[str, Any] = option.get("choices") or {}
    keys = list(choices)
    if live is not None and (option.get("unlisted_choice") or {}).get("enabled"):
        keys += [m for m in sorted(live.models) if m not in choices]
    views = []
    for key in keys:
        key = str(key)
        label = str((choices.get(key) or {}).get("display_name") or key)
        reason = ""
        entry = ModelLive()
        if live is not None:
            entry = live.any if key == "any" else live.models.get(key, ModelLive(demo=False))
            if not _acceptable(option, key):
                reason = "this name cannot be chosen"
            elif key != "any" and key not in live.models:
                reason = "no offers now"
            elif entry.free == 0:
                reason = "none free now"
        if live is None:
            text = f"{label} (availability unknown)"
        elif reason:
            text = f"{label} ({reason})"
        else:
            demo = ", demo GPU" if entry.demo else ""
            text = f"{label} ({entry.free} free, from {format_credits(entry.price)}/GPU-hour{demo})"
        views.append(
            {
                "value": key,
                "text": text,
                "disabled": bool(reason),
                "selected": key == current and not reason,
                "largest": entry.largest,
            }
        )
    return views


def _region_choices(
    option: Mapping[str, Any], live: Live | None, current: str | None
) -> list[dict[str, Any]]:
    choices: Mapping[str, Any] = option.get("choices") or {}
    views = [
        {
            "value": str(key),
            "text": str(choice.get("display_name") or key),
            "disabled": False,
            "selected": str(key) == current,
        }
        for key, choice in choices.items()
    ]
    if live is not None:
        for region, free in sorted(live.regions.items()):
            if region in choices:
                continue
            reason = "" if _acceptable(option, region) else "this name cannot be chosen"
            reason = reason or ("" if free else "none free now")
            views.append(
                {
                    "value": region,
                    "text": f"{region} ({reason or f'{free} GPUs free'})",
                    "disabled": bool(reason),
                    "selected": region == current and not reason,
                }
            )
    return views


def _count_choices(
    option: Mapping[str, Any], largest: int | None, current: str | None
) -> list[dict[str, Any]]:
    views = []
    for key, choice in (option.get("choices") or {}).items():
        override = dict(choice.get("spawner_override") or choice.get("kubespawner_override") or {})
        count = override.get("gpu_count", key)
        try:
            n = int(count)
        except (TypeError, ValueError):
            n = 0
        too_many = largest is not None and n > largest
        views.append(
            {
                "value": str(key),
                "text": str(choice.get("display_name") or key),
                "count": n,
                "disabled": too_many,
                "selected": str(key) == current and not too_many,
            }
        )
    return views


def _costs(
    live: Live | None, model_keys: list[str], counts: list[int], min_seconds: int | None
) -> dict[str, dict[str, list[str]]]:
    """``{model: {count: [per hour, minimum charge]}}`` as display text, for the page."""
    if live is None:
        return {}
    table: dict[str, dict[str, list[str]]] = {}
    for key in model_keys:
        entry = live.any if key == "any" else live.models.get(key)
        if entry is None or not entry.price:
            continue
        table[key] = {}
        for n in counts:
            hourly = entry.price * n
            minimum = -(-hourly * min_seconds // 3600) if min_seconds else 0
            table[key][str(n)] = [format_credits(hourly), format_credits(minimum)]
    return table


def _cost_text(
    costs: dict[str, dict[str, list[str]]],
    option_views: list[dict[str, Any]],
    balance: Balance | None,
) -> str:
    """The cost line as the page's script writes it, for the choice shown first."""
    chosen = {
        v["name"]: next((c["value"] for c in v.get("choices", []) if c["selected"]), None)
        for v in option_views
    }
    row = costs.get(chosen.get("gpu_model") or "any", {}).get(chosen.get("gpu_count") or "")
    if not row:
        return "Cost: no live price for this choice right now"
    currency = balance.currency if balance is not None else "credits"
    text = f"About {row[0]} {currency} per hour"
    if balance is None:
        return text + "."
    return (
        f"{text}; at least {row[1]} {currency} "
        f"({minutes(balance.min_billable_seconds)}) once it starts."
    )


def _option_view(
    profile: Mapping[str, Any],
    name: str,
    option: Mapping[str, Any],
    live: Live | None,
    current: str | None,
    largest: int | None,
) -> dict[str, Any]:
    field_name = f"{FORM_PREFIX}{profile['slug']}--{name}"
    label = str(option.get("display_name") or name)
    choices: Mapping[str, Any] = option.get("choices") or {}
    unlisted: Mapping[str, Any] = option.get("unlisted_choice") or {}
    view: dict[str, Any] = {
        "name": name,
        "field": field_name,
        "label": label,
        "kind": "select",
        "other": None,
    }
    if name == "gpu_model":
        view["choices"] = _model_choices(option, live, current)
    elif name == "region":
        view["choices"] = _region_choices(option, live, current)
    elif name == "gpu_count":
        view["choices"] = _count_choices(option, largest, current)
    elif unlisted.get("enabled") and len(choices) <= 1:
        # One input: empty means the one listed choice (e.g. "No limit").
        fallback: Mapping[str, Any] = next(iter(choices.values()), {})
        view.update(
            kind="text",
            placeholder=str(fallback.get("display_name") or unlisted.get("display_name") or ""),
            value=current if current is not None and current not in choices else "",
            hint=str(unlisted.get("display_name") or ""),
        )
        return view
    else:
        view["choices"] = [
            {
                "value": str(key),
                "text": str(choice.get("display_name") or key),
                "disabled": False,
                "selected": str(key) == current,
            }
            for key, choice in choices.items()
        ]
        if unlisted.get("enabled"):
            is_other = current is not None and current not in choices
            view["other"] = {
                "label": str(unlisted.get("display_name") or "Other"),
                "selected": is_other,
                "value": current if is_other else "",
            }
    if not any(c["selected"] for c in view["choices"]):
        for choice in view["choices"]:  # the first choice that can be placed
            if not choice["disabled"]:
                choice["selected"] = True
                break
    return view


def render(
    profiles: list[dict[str, Any]],
    offers: list[dict[str, Any]] | None,
    selected: Mapping[str, Any] | None = None,
    *,
    balance: Balance | None = None,
    refusal: Mapping[str, Any] | None = None,
    add_credit_url: str = "",
    teams: Sequence[str | Mapping[str, Any]] | None = None,
) -> str:
    """The options form HTML.

    ``offers=None``: the marketplace did not answer (nothing is disabled then).
    ``selected``: the user's options to show; after a refusal the spawner passes
    only the profile, so the choices that caused it are not kept.
    ``refusal``: ``{"message", "credit"}`` of the last refusal, shown with what to do.
    ``teams``: the teams the user may bill the server to ("Bill to"; none: no choice):
    names, or ``{"name", "default_profile", "can_pay", "why"}`` from the portal. A team
    that cannot pay is shown disabled, with why; choosing a team with a default
    profile selects that profile (and it is preselected when the options bill the
    team and name no profile).
    """
    live = summarize_offers(offers) if offers is not None else None
    selected = selected or {}
    team_views = [_team_view(t) for t in teams or ()]
    bill_to = str(selected.get("bill_to") or "")
    paying = {t["name"]: t for t in team_views if t["can_pay"]}
    if bill_to not in paying:
        bill_to = ""
    slugs = {p["slug"] for p in profiles}
    for view in team_views:
        if view["profile"] not in slugs:
            view["profile"] = ""
    team_profile = paying[bill_to]["profile"] if bill_to else ""
    chosen = str(selected.get("profile") or team_profile or default_profile(profiles)["slug"])
    if chosen not in {p["slug"] for p in profiles}:
        chosen = default_profile(profiles)["slug"]
    min_seconds = balance.min_billable_seconds if balance is not None else None
    views = []
    for profile in profiles:
        options: Mapping[str, Any] = profile.get("profile_options") or {}
        mine = profile["slug"] == chosen
        currents: dict[str, str | None] = {}
        for name, option in options.items():
            value = selected.get(name) if mine else None
            currents[name] = str(value) if value is not None else default_choice(option)
        largest: int | None = None
        unavailable = ""
        if live is not None and "gpu_count" in options:
            model = currents.get("gpu_model") or "any"
            entry = live.any if model == "any" else live.models.get(model, ModelLive())
            largest = entry.largest if entry.free else live.any.largest
            if live.any.free == 0:
                unavailable = "No GPUs are free right now."
        option_views = [
            _option_view(profile, name, option, live, currents[name], largest)
            for name, option in options.items()
        ]
        model_keys = [
            c["value"] for v in option_views if v["name"] == "gpu_model" for c in v["choices"]
        ]
        counts = [
            c["count"] for v in option_views if v["name"] == "gpu_count" for c in v["choices"]
        ]
        override = dict(
            profile.get("spawner_override") or profile.get("kubespawner_override") or {}
        )
        costs = _costs(live, model_keys or ["any"], counts, min_seconds) if counts else {}
        views.append(
            {
                "slug": profile["slug"],
                "display_name": str(profile["display_name"]),
                "description": str(profile.get("description") or ""),
                "checked": mine and not unavailable,
                "unavailable": unavailable,
                "options": option_views,
                "has_count": "gpu_count" in options,
                "free": override.get("gpu_count", 1) == 0 and not options,
                "costs": costs,
                "cost": _cost_text(costs, option_views, balance),
            }
        )
    if not any(v["checked"] for v in views):
        for view in views:
            if not view["unavailable"]:
                view["checked"] = True
                break
    demo = live is not None and any(m.demo and m.free for m in live.models.values())
    account = None
    if balance is not None:
        account = {
            "owed": format_credits(-balance.balance) if balance.balance < 0 else "",
            "balance": format_credits(balance.balance),
            "available": format_credits(balance.available),
            "currency": balance.currency,
            "min_billable": minutes(balance.min_billable_seconds),
        }
    template = _environment().get_template("spawn_form.html")
    return template.render(
        profiles=views,
        offers_ok=live is not None,
        account=account,
        demo=demo,
        refusal=dict(refusal) if refusal else None,
        add_credit_url=add_credit_url,
        unlisted_value=UNLISTED,
        teams=team_views,
        bill_to=bill_to,
    )


def _team_view(team: str | Mapping[str, Any]) -> dict[str, Any]:
    """One "Bill to" entry: a team's name, default profile, whether it can pay now."""
    if isinstance(team, str):
        return {"name": team, "profile": "", "can_pay": True, "why": ""}
    return {
        "name": str(team.get("name") or ""),
        "profile": str(team.get("default_profile") or ""),
        "can_pay": team.get("can_pay", True) is not False,
        "why": str(team.get("why") or "")[:200],
    }
