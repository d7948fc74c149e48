"""Profiles in KubeSpawner's ``profile_list`` schema, and the user options they allow.

A profile is a dict with ``display_name``, ``slug``, ``description``, ``default``,
``spawner_override`` (``kubespawner_override`` is accepted as an alias, so a
KubeSpawner profile list ports as is) and ``profile_options``. Each option has a
``display_name``, ``choices`` (``{key: {display_name, default, spawner_override}}``)
and optionally an ``unlisted_choice`` (``{enabled, display_name,
validation_regex, validation_message, spawner_override}``) whose override values
may contain ``{value}``.

User options are *never trusted*: whatever arrives from the form or the REST API
is checked against the configured list here, and the only thing that reaches the
spawner is the admin-written ``spawner_override`` of the chosen profile and
choices (with a regex-checked ``{value}`` for unlisted choices). Everything here
is pure and side-effect free.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Form field prefix, as in KubeSpawner: ``profile-option-<profile>--<option>``.
FORM_PREFIX = "profile-option-"
UNLISTED = "unlisted-choice"
OVERRIDE_KEYS = ("spawner_override", "kubespawner_override")
#: A GPU model name a user may choose: letters, digits, spaces and ``._-()/+``, as GPU
#: names are written ("A100-80GB", "NVIDIA L4", "RTX 6000 Ada"); up to 64 characters.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._()/+-]{0,63}$"
#: A region as the marketplace names them (providers register with this pattern).
REGION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class InvalidOptions(ValueError):
    """User options that do not fit the profile list; the message is for the user."""


class InvalidProfileList(ValueError):
    """A profile list that does not follow the schema; the message is for the admin."""


@dataclass(frozen=True)
class Selection:
    """What the user chose, after validation: the profile and each option's value."""

    profile: str
    choices: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


def _override(entry: Mapping[str, Any]) -> dict[str, Any]:
    for key in OVERRIDE_KEYS:
        if key in entry:
            value = entry[key]
            if not isinstance(value, Mapping):
                raise InvalidProfileList(f"{key} must be a dict, got {type(value).__name__}")
            return dict(value)
    return {}


def check_profile_list(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate the admin's profile list once, so mistakes show at hub start.

    Fills in a slug from the display name where missing (as KubeSpawner does).
    """
    seen: set[str] = set()
    checked: list[dict[str, Any]] = []
    defaults = 0
    for i, raw in enumerate(profiles):
        if not isinstance(raw, Mapping) or not raw.get("display_name"):
            raise InvalidProfileList(f"profile #{i + 1} needs a display_name")
        profile = dict(raw)
        slug = str(profile.get("slug") or slugify(str(profile["display_name"])))
        if slug in seen:
            raise InvalidProfileList(f"two profiles have the slug {slug!r}")
        seen.add(slug)
        profile["slug"] = slug
        defaults += bool(profile.get("default"))
        _override(profile)
        options = profile.get("profile_options") or {}
        if not isinstance(options, Mapping):
            raise InvalidProfileList(f"profile {slug!r}: profile_options must be a dict")
        for name, option in options.items():
            if not isinstance(option, Mapping):
                raise InvalidProfileList(f"profile {slug!r} option {name!r} must be a dict")
            choices = option.get("choices") or {}
            unlisted = option.get("unlisted_choice") or {}
            if not choices and not unlisted.get("enabled"):
                raise InvalidProfileList(
                    f"profile {slug!r} option {name!r} has no choices and no unlisted_choice"
                )
            if sum(bool(c.get("default")) for c in choices.values()) > 1:
                raise InvalidProfileList(f"profile {slug!r} option {name!r}: two defaults")
            for choice in choices.values():
                _override(choice)
            if unlisted.get("enabled"):
                re.compile(unlisted.get("validation_regex") or ".*")
                _override(unlisted)
        checked.append(profile)
    if defaults > 1:
        raise InvalidProfileList("more than one profile is marked default")
    return checked


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "profile"


def default_profile(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    for profile in profiles:
        if profile.get("default"):
            return profile
    return profiles[0]


def default_choice(option: Mapping[str, Any]) -> str | None:
    choices = option.get("choices") or {}
    for key, choice in choices.items():
        if choice.get("default"):
            return str(key)
    return str(next(iter(choices))) if choices else None


#: The user option that names the team paying for the server ("Bill to"); absent or
#: empty: the user's own wallet. Checked by the spawner (membership) and the portal.
BILL_TO = "bill_to"


def options_from_form(form_data: Mapping[str, list[str]]) -> dict[str, Any]:
    """Form fields (lists of strings) to flat user options, like the REST API's.

    ``profile-option-gpu--gpu_count=2`` becomes ``gpu_count: "2"``, but only for
    the selected profile; an unlisted choice is replaced by its text field.
    No validation and no side effects here: :func:`select` does the checking.
    """

    def first(key: str) -> str | None:
        values: Any = form_data.get(key) or []
        if isinstance(values, str):
            return values
        value = values[0] if isinstance(values, list) and values else None
        return value if isinstance(value, str) else None

    profile = first("profile")
    options: dict[str, Any] = {}
    bill_to = first(BILL_TO)
    if bill_to:
        options[BILL_TO] = bill_to
    if profile is None:
        return options
    options["profile"] = profile
    prefix = f"{FORM_PREFIX}{profile}--"
    for key in form_data:
        if not key.startswith(prefix) or key.endswith(f"--{UNLISTED}"):
            continue
        name = key[len(prefix) :]
        value = first(key)
        if value == UNLISTED:
            value = first(f"{key}--{UNLISTED}")
            if value is not None and not value.strip():
                value = None  # an empty free-text box (e.g. "No limit"): the default
        if value is not None:
            options[name] = value
    return options


def _as_text(name: str, value: Any) -> str:
    """REST clients send numbers as numbers; choices are keyed by text."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise InvalidOptions(f"{name} must be a string or a number.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _fill(override: Mapping[str, Any], value: str) -> dict[str, Any]:
    return {
        k: (v.replace("{value}", value) if isinstance(v, str) else v) for k, v in override.items()
    }


def select(profiles: list[dict[str, Any]], user_options: Any) -> Selection:
    """Check ``user_options`` against the profile list; raise InvalidOptions with a sentence.

    ``{}`` selects the default profile with its default choices. Unknown keys,
    unknown profiles and values outside the choices are refused, never ignored.
    """
    if user_options is None:
        user_options = {}
    if not isinstance(user_options, Mapping):
        raise InvalidOptions("Server options must be a JSON object.")
    by_slug = {p["slug"]: p for p in profiles}
    slug = user_options.get("profile")
    if slug is None:
        profile = default_profile(profiles)
    else:
        slug = _as_text("profile", slug)
        if slug not in by_slug:
            raise InvalidOptions(
                f"There is no profile {slug[:64]!r}; choose one of: {', '.join(by_slug)}."
            )
        profile = by_slug[slug]
    options: Mapping[str, Any] = profile.get("profile_options") or {}
    unknown = [
        str(k)[:64] for k in user_options if k not in ("profile", BILL_TO) and k not in options
    ]
    if unknown:
        allowed = ", ".join(options) or "no options"
        raise InvalidOptions(
            f"The {profile['slug']} profile does not take {', '.join(unknown)}; "
            f"it accepts: {allowed}."
        )
    overrides = _override(profile)
    chosen: dict[str, str] = {}
    for name, option in options.items():
        choices: Mapping[str, Any] = option.get("choices") or {}
        unlisted: Mapping[str, Any] = option.get("unlisted_choice") or {}
        label = option.get("display_name") or name
        if name in user_options:
            value = _as_text(name, user_options[name])
        else:
            default = default_choice(option)
            if default is None:
                raise InvalidOptions(f"Choose a value for {label}.")
            value = default
        if value in choices:
            chosen[name] = value
            overrides.update(_override(choices[value]))
        elif unlisted.get("enabled"):
            regex = unlisted.get("validation_regex") or ".*"
            if len(value) > 256 or not re.fullmatch(regex, value):
                hint = unlisted.get("validation_message") or (
                    f"choose one of: {', '.join(choices)}" if choices else f"match {regex}"
                )
                raise InvalidOptions(f"{value[:64]!r} is not a valid {label}: {hint}.")
            chosen[name] = value
            overrides.update(_fill(_override(unlisted), value))
        else:
            raise InvalidOptions(
                f"{value[:64]!r} is not a valid {label}; choose one of: {', '.join(choices)}."
            )
    return Selection(profile["slug"], chosen, overrides)


COMMON_MODELS = {
    "A100-80GB": "NVIDIA A100 80GB",
    "H100-80GB": "NVIDIA H100 80GB",
    "L4": "NVIDIA L4",
}


def default_profile_list(models: Iterable[str] = ()) -> list[dict[str, Any]]:
    """A CPU profile (the default: free, and always placeable) and a GPU profile
    (model, count, region, max price).

    ``models``: GPU model names to list besides the common ones (e.g. the house
    node's), as the marketplace spells them. The form offers what the live offers
    have; any model or region the marketplace lists can be chosen (the unlisted
    choice), since providers join after the hub starts.
    """
    names = dict(COMMON_MODELS)
    for model in models:
        names.setdefault(model, model.replace("-", " "))
    model_choices: dict[str, Any] = {
        "any": {
            "display_name": "Any model",
            "default": True,
            "spawner_override": {"gpu_model": ""},
        },
    }
    for model, label in names.items():
        model_choices[model] = {"display_name": label, "spawner_override": {"gpu_model": model}}
    return [
        {
            "display_name": "CPU only",
            "slug": "cpu",
            "description": "A notebook server without a GPU, for editing and light work. Free.",
            "default": True,
            "spawner_override": {"gpu_count": 0},
        },
        {
            "display_name": "GPU",
            "slug": "gpu",
            "description": "A notebook server on a provider's GPU, billed per second "
            "at the price shown.",
            "profile_options": {
                "gpu_model": {
                    "display_name": "GPU model",
                    "choices": model_choices,
                    "unlisted_choice": {
                        "enabled": True,
                        "display_name": "Model name",
                        "validation_regex": MODEL_NAME,
                        "validation_message": "name a GPU model the marketplace lists",
                        "spawner_override": {"gpu_model": "{value}"},
                    },
                },
                "gpu_count": {
                    "display_name": "GPUs",
                    "choices": {
                        str(n): {
                            "display_name": str(n),
                            "default": n == 1,
                            "spawner_override": {"gpu_count": n},
                        }
                        for n in (1, 2, 4, 8)
                    },
                },
                "region": {
                    "display_name": "Region",
                    "choices": {
                        "any": {
                            "display_name": "Any region",
                            "default": True,
                            "spawner_override": {"region": ""},
                        }
                    },
                    "unlisted_choice": {
                        "enabled": True,
                        "display_name": "Region name",
                        "validation_regex": REGION_NAME,
                        "validation_message": "use letters, digits, dots, dashes and "
                        "underscores, as the marketplace names regions",
                        "spawner_override": {"region": "{value}"},
                    },
                },
                "max_price": {
                    "display_name": "Max price per GPU-hour (credits)",
                    "choices": {
                        "any": {
                            "display_name": "No limit",
                            "default": True,
                            "spawner_override": {"max_price": ""},
                        }
                    },
                    "unlisted_choice": {
                        "enabled": True,
                        "display_name": "Max credits per GPU-hour, e.g. 2.00",
                        "validation_regex": r"^\d{1,6}(\.\d{1,6})?$",
                        "validation_message": "give a number of credits such as 2 or 1.50",
                        "spawner_override": {"max_price": "{value}"},
                    },
                },
            },
        },
    ]
