"""The spawn form: profiles as radio cards, options as selects, live offers beside them.

Rendering is pure (profiles + offers in, HTML out) so it is tested without a hub.
Availability and price come from the marketplace's ``/offers``; the cost per
hour of the chosen size is computed in the page from the same numbers (the
lowest listed price of the chosen model times the GPU count). Every value is
HTML-escaped: display names are admin-written, offers come from providers.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from gpuportal.provider.money import format_credits

from .profiles import FORM_PREFIX, UNLISTED, default_choice, default_profile

_SCRIPT = """
<script>
(function () {
  function update() {
    var form = document.getElementById("gpuportal-profiles");
    if (!form) { return; }
    var checked = form.querySelector("input[name=profile]:checked");
    form.querySelectorAll(".gpuportal-options").forEach(function (el) {
      el.hidden = !checked || el.dataset.profile !== checked.value;
      el.querySelectorAll("select,input").forEach(function (i) { i.disabled = el.hidden; });
    });
    if (!checked) { return; }
    var slug = checked.value;
    var model = form.querySelector("[name='profile-option-" + slug + "--gpu_model']");
    var count = form.querySelector("[name='profile-option-" + slug + "--gpu_count']");
    var out = form.querySelector("#gpuportal-cost-" + slug);
    if (!out || !count) { return; }
    var opt = model ? model.options[model.selectedIndex] : null;
    var price = parseInt((opt && opt.dataset.price) || out.dataset.cheapest || "0", 10);
    var n = parseInt(count.value, 10) || 0;
    out.textContent = price > 0 && n > 0
      ? "Cost: about " + (price * n / 1000000).toFixed(2) + " credits per hour"
      : "Cost: no live price for this choice right now";
  }
  document.addEventListener("change", update);
  document.addEventListener("DOMContentLoaded", update);
  update();
})();
</script>
"""


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
    parts = ['<div id="gpuportal-profiles" class="gpuportal-profiles">']
    if not offers_ok:
        parts.append(
            '<p class="alert alert-warning">Live GPU availability is not available '
            "right now; you can still choose, and the spawn will say if nothing "
            "fits.</p>"
        )
    for profile in profiles:
        slug = escape(profile["slug"])
        checked = " checked" if profile["slug"] == chosen_profile else ""
        parts.append(
            f'<div class="card mb-2"><div class="card-body">'
            f'<label class="form-check-label"><input class="form-check-input" type="radio" '
            f'name="profile" value="{slug}"{checked}> '
            f"<strong>{escape(str(profile['display_name']))}</strong></label>"
        )
        if profile.get("description"):
            parts.append(f'<p class="text-muted mb-1">{escape(str(profile["description"]))}</p>')
        options: Mapping[str, Any] = profile.get("profile_options") or {}
        parts.append(f'<div class="gpuportal-options" data-profile="{slug}">')
        cheapest_any = 0
        for name, option in options.items():
            field = f"{FORM_PREFIX}{profile['slug']}--{name}"
            label = escape(str(option.get("display_name") or name))
            current = selected.get(name) if profile["slug"] == chosen_profile else None
            current = str(current) if current is not None else default_choice(option)
            parts.append(
                f'<div class="mb-1"><label class="form-label">{label} '
                f'<select class="form-select" name="{escape(field)}">'
            )
            choices: Mapping[str, Any] = option.get("choices") or {}
            for key, choice in choices.items():
                text = str(choice.get("display_name") or key)
                price = 0
                if name == "gpu_model":
                    text, price = _model_label(str(key), text, live, offers_ok)
                    if key == "any":
                        cheapest_any = price
                sel = " selected" if str(key) == current else ""
                data = f' data-price="{price}"' if price else ""
                parts.append(
                    f'<option value="{escape(str(key))}"{data}{sel}>{escape(text)}</option>'
                )
            unlisted: Mapping[str, Any] = option.get("unlisted_choice") or {}
            if unlisted.get("enabled"):
                is_other = current is not None and current not in choices
                sel = " selected" if is_other else ""
                parts.append(
                    f'<option value="{UNLISTED}"{sel}>'
                    f"{escape(str(unlisted.get('display_name') or 'Other'))}</option>"
                )
            parts.append("</select></label>")
            if unlisted.get("enabled"):
                value = escape(current) if current is not None and current not in choices else ""
                parts.append(
                    f'<input class="form-control" type="text" '
                    f'name="{escape(field)}--{UNLISTED}" value="{value}" '
                    f'placeholder="{escape(str(unlisted.get("display_name") or ""))}">'
                )
            parts.append("</div>")
        if "gpu_count" in options:
            parts.append(
                f'<p class="fw-bold" id="gpuportal-cost-{slug}" data-cheapest="{cheapest_any}"></p>'
            )
        parts.append("</div></div></div>")
    parts.append("</div>")
    parts.append(_SCRIPT)
    return "\n".join(parts)
