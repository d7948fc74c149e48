"""The spawn form: profiles as radio cards, options as selects, live offers beside them.

Rendering is pure (profiles + offers in, HTML out) so it is tested without a hub.
Availability and price come from the marketplace's ``/offers``; the cost per
hour of the chosen size is computed in the page from the same numbers (the
lowest listed price of the chosen model times the GPU count). Every value is
HTML-escaped: display names are admin-written, offers come from providers.

The HTML is a Jinja template (``templates/spawn_form.html``, shipped as package
data) with autoescape on, as JupyterHub renders its own pages: this module builds
plain data for it and never writes markup.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from gpuportal.provider.money import format_credits

from .profiles import FORM_PREFIX, UNLISTED, default_choice, default_profile


def summarize_offers(offers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{gpu_model: {"free": n, "price": lowest micro-credits/GPU-h among free}}``."""
    summary: dict[str, dict[str, int]] = {}
    for offer in offers:
        try:
            model = str(offer["gpu_model"])
            free = int(offer.get("free_gpus", 0))
            price = int(offer.get("price_per_gpu_hour", 0))
        except (KeyError, TypeError, ValueError):
            continue
        entry = summary.setdefault(model, {"free": 0, "price": 0})
        entry["free"] += max(free, 0)
        if free > 0 and price > 0 and (entry["price"] == 0 or price < entry["price"]):
            entry["price"] = price
    return summary


def _model_label(
    key: str, label: str, live: Mapping[str, dict[str, int]], offers_ok: bool
) -> tuple[str, int]:
    if not offers_ok:
        return f"{label} (availability unknown)", 0
    if key == "any":
        free = sum(v["free"] for v in live.values())
        prices = [v["price"] for v in live.values() if v["price"]]
        cheapest = min(prices) if prices else 0
        price = f", from {format_credits(cheapest)}/GPU-hour" if cheapest else ""
        return f"{label} ({free} free{price})", cheapest
    entry = live.get(key)
    if not entry or entry["free"] == 0:
        return f"{label} (none free now)", 0
    return f"{label} ({entry['free']} free, from {format_credits(entry['price'])}/GPU-hour)", entry[
        "price"
    ]


TEMPLATES = Path(__file__).resolve().parent / "templates"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )


def render(
    profiles: list[dict[str, Any]],
    offers: list[dict[str, Any]] | None,
    selected: Mapping[str, Any] | None = None,
) -> str:
    """The options form HTML. ``offers=None`` means the marketplace did not answer."""
    offers_ok = offers is not None
    live = summarize_offers(offers or [])
    selected = selected or {}
    chosen_profile = str(selected.get("profile") or default_profile(profiles)["slug"])
    if chosen_profile not in {p["slug"] for p in profiles}:
        chosen_profile = default_profile(profiles)["slug"]
    views = []
    for profile in profiles:
        options: Mapping[str, Any] = profile.get("profile_options") or {}
        option_views = []
        cheapest_any = 0
        for name, option in options.items():
            current = selected.get(name) if profile["slug"] == chosen_profile else None
            current = str(current) if current is not None else default_choice(option)
            choices: Mapping[str, Any] = option.get("choices") or {}
            choice_views = []
            for key, choice in choices.items():
                text = str(choice.get("display_name") or key)
                price = 0
                if name == "gpu_model":
                    text, price = _model_label(str(key), text, live, offers_ok)
                    if key == "any":
                        cheapest_any = price
                choice_views.append(
                    {"value": str(key), "text": text, "price": price, "selected": key == current}
                )
            unlisted: Mapping[str, Any] = option.get("unlisted_choice") or {}
            unlisted_view = None
            if unlisted.get("enabled"):
                is_other = current is not None and current not in choices
                unlisted_view = {
                    "label": str(unlisted.get("display_name") or "Other"),
                    "selected": is_other,
                    "value": current if is_other else "",
                }
            option_views.append(
                {
                    "field": f"{FORM_PREFIX}{profile['slug']}--{name}",
                    "label": str(option.get("display_name") or name),
                    "choices": choice_views,
                    "unlisted": unlisted_view,
                }
            )
        views.append(
            {
                "slug": profile["slug"],
                "display_name": str(profile["display_name"]),
                "description": str(profile.get("description") or ""),
                "checked": profile["slug"] == chosen_profile,
                "options": option_views,
                "has_count": "gpu_count" in options,
                "cheapest": cheapest_any,
            }
        )
    template = _environment().get_template("spawn_form.html")
    return template.render(profiles=views, offers_ok=offers_ok, unlisted_value=UNLISTED)
