"""Notebook templates: what a template declares, who may see it, what it would cost.

A template is a notebook whose own metadata says what it needs, under
``metadata.gpuportal.template``::

    {"title": "PyTorch training", "description": "...", "gpu_model": "L4" | null,
     "gpu_count": 1, "min_vram_gb": 16, "expected_minutes": 20}

``gpu_model`` null means any model; ``gpu_count`` 0 means a CPU server. The metadata
travels with the notebook, so a template downloaded, edited and published again keeps
it. :func:`check_metadata` is the one validation (publishing, the shipped templates);
it raises :class:`InvalidTemplate` with a sentence for the user.

Two kinds:

* **global** templates ship in the package (``gpuportal.notebooks``), visible to
  every user, named ``global/<file stem>``;
* **team** templates are published by a team admin (:func:`publish`) and stored in
  ``team_templates``, visible to the team's members only, named ``team/<id>``. To
  anyone else a team template does not exist (:func:`visible` answers None, the API
  404), so an outsider cannot even learn that an id is taken.

The estimated cost (:func:`estimate`) is the cheapest live offer that fits the
template (model, VRAM, GPUs on one node), times the GPU count and the expected
runtime, rounded **up** to the micro-credit: an estimate never promises less than the
meter would charge at that price.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpuportal.provider.money import format_credits

from ..db import accounts, audit
from ..db.models import Account, Team, TeamMembership
from ..db.template_models import TeamTemplate
from .marketplace import MarketError

#: The largest notebook a team may publish (bytes of its JSON).
MAX_NOTEBOOK_BYTES = 1024 * 1024
#: Limits of the metadata fields.
MAX_TITLE = 80
MAX_DESCRIPTION = 500
MAX_GPUS = 8
MAX_VRAM_GB = 1024
MAX_MINUTES = 7 * 24 * 60
#: A GPU model as the marketplace spells them (the spawn form's pattern).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()/+-]{0,63}")
FIELDS = (
    "title",
    "description",
    "gpu_model",
    "gpu_count",
    "min_vram_gb",
    "expected_minutes",
)


class InvalidTemplate(MarketError):
    """A notebook or its metadata that cannot be a template; the message is a sentence."""

    status = 422
    code = "invalid_template"


class TemplateNotFound(MarketError):
    status = 404
    code = "not_found"

    def __init__(self) -> None:
        super().__init__("There is no such template.")


class NotTeamAdmin(MarketError):
    status = 403
    code = "forbidden"

    def __init__(self, team: str) -> None:
        super().__init__(f"Only an admin of team {team!r} may publish or remove its templates.")


@dataclass(frozen=True)
class Metadata:
    title: str
    description: str
    gpu_model: str | None
    gpu_count: int
    min_vram_gb: int
    expected_minutes: int

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


def _int(meta: Mapping[str, Any], name: str, label: str, low: int, high: int) -> int:
    value = meta.get(name, low)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTemplate(f"The {label} must be a whole number, not {str(value)[:20]!r}.")
    if not low <= value <= high:
        raise InvalidTemplate(f"The {label} must be between {low} and {high}, not {value}.")
    return value


def check_metadata(meta: Any) -> Metadata:
    """The template metadata of a notebook, validated; InvalidTemplate otherwise."""
    if not isinstance(meta, Mapping):
        raise InvalidTemplate(
            "The notebook has no template metadata (metadata.gpuportal.template)."
        )
    unknown = sorted(str(k)[:40] for k in meta if k not in FIELDS)
    if unknown:
        raise InvalidTemplate(
            f"The template metadata has unknown fields: {', '.join(unknown)}; "
            f"it takes {', '.join(FIELDS)}."
        )
    title = meta.get("title")
    if not isinstance(title, str) or not title.strip():
        raise InvalidTemplate("A template needs a title.")
    title = title.strip()
    if len(title) > MAX_TITLE:
        raise InvalidTemplate(f"The title is longer than {MAX_TITLE} characters.")
    description = meta.get("description", "")
    if not isinstance(description, str):
        raise InvalidTemplate("The description must be text.")
    description = description.strip()
    if len(description) > MAX_DESCRIPTION:
        raise InvalidTemplate(f"The description is longer than {MAX_DESCRIPTION} characters.")
    model = meta.get("gpu_model")
    if model is not None:
        if not isinstance(model, str) or not MODEL_NAME.fullmatch(model.strip()):
            raise InvalidTemplate(
                "The GPU model must be a model name the marketplace lists (letters, digits, "
                "spaces and ._()/+-), or empty for any model."
            )
        model = model.strip()
    count = _int(meta, "gpu_count", "GPU count", 0, MAX_GPUS)
    vram = _int(meta, "min_vram_gb", "minimum VRAM (GB)", 0, MAX_VRAM_GB)
    if "expected_minutes" not in meta:
        raise InvalidTemplate("Say how long the template is expected to run (minutes).")
    minutes = _int(meta, "expected_minutes", "expected runtime (minutes)", 1, MAX_MINUTES)
    if count == 0 and (model or vram):
        raise InvalidTemplate("A CPU template (0 GPUs) cannot ask for a GPU model or VRAM.")
    return Metadata(title, description, model, count, vram, minutes)


def parse_notebook(text: str | bytes) -> tuple[dict[str, Any], Metadata]:
    """A notebook's JSON and its checked metadata; InvalidTemplate for anything else."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_NOTEBOOK_BYTES:
        raise InvalidTemplate(
            f"The notebook is {size} bytes; a template may be at most "
            f"{MAX_NOTEBOOK_BYTES // 1024} KiB."
        )
    try:
        notebook = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise InvalidTemplate("The file is not a notebook (it is not JSON).") from None
    if (
        not isinstance(notebook, dict)
        or not isinstance(notebook.get("cells"), list)
        or not isinstance(notebook.get("metadata"), dict)
        or notebook.get("nbformat") != 4
    ):
        raise InvalidTemplate("The file is not a Jupyter notebook in format 4.")
    gp = notebook["metadata"].get("gpuportal")
    meta = check_metadata(gp.get("template") if isinstance(gp, dict) else None)
    return notebook, meta


def with_metadata(notebook: dict[str, Any], meta: Metadata) -> dict[str, Any]:
    """The notebook with ``meta`` written into its own metadata (a copy)."""
    out = dict(notebook)
    metadata = dict(out.get("metadata") or {})
    gp = dict(metadata.get("gpuportal") or {})
    gp["template"] = meta.as_dict()
    metadata["gpuportal"] = gp
    out["metadata"] = metadata
    return out


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64].strip("-")
    return slug or "template"


# --- where templates come from ------------------------------------------------


def global_dir() -> Path:
    import gpuportal.notebooks

    return Path(next(iter(gpuportal.notebooks.__path__)))


@cache
def _global_templates(folder: Path) -> dict[str, tuple[Metadata, str]]:
    found: dict[str, tuple[Metadata, str]] = {}
    for path in sorted(folder.glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        _, meta = parse_notebook(text)  # a shipped template that fails is a bug: raise
        found[path.stem] = (meta, text)
    return found


def global_templates(folder: Path | None = None) -> dict[str, tuple[Metadata, str]]:
    """The shipped templates by file stem: (metadata, notebook text)."""
    return _global_templates(folder or global_dir())


def _team_entry(row: TeamTemplate, team: str) -> dict[str, Any]:
    return {
        "id": f"team/{row.id}",
        "kind": "team",
        "team": team,
        "filename": f"{row.slug}.ipynb",
        "sha256": row.sha256,
        "updated_at": row.updated_at,
        **Metadata(
            row.title,
            row.description,
            row.gpu_model,
            row.gpu_count,
            row.min_vram_gb,
            row.expected_minutes,
        ).as_dict(),
    }


def _global_entry(stem: str, meta: Metadata, text: str) -> dict[str, Any]:
    return {
        "id": f"global/{stem}",
        "kind": "global",
        "team": None,
        "filename": f"{stem}.ipynb",
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "updated_at": None,
        **meta.as_dict(),
    }


def _member_team_ids(session: Session, account: Account) -> dict[int, str]:
    rows = session.execute(
        select(Team.id, Team.hub_group)
        .join(TeamMembership, TeamMembership.team_id == Team.id)
        .where(TeamMembership.account_id == account.id, Team.active)
    )
    return {team_id: name for team_id, name in rows}


def listing(session: Session, account: Account | None) -> list[dict[str, Any]]:
    """The templates ``account`` may see: the global ones, then its teams' (by title)."""
    entries = [_global_entry(s, m, t) for s, (m, t) in global_templates().items()]
    if account is not None:
        teams = _member_team_ids(session, account)
        rows = session.scalars(
            select(TeamTemplate)
            .where(TeamTemplate.team_id.in_(teams))
            .order_by(TeamTemplate.title, TeamTemplate.id)
        )
        entries.extend(_team_entry(row, teams[row.team_id]) for row in rows)
    return entries


def visible(session: Session, account: Account | None, template_id: str) -> dict[str, Any] | None:
    """One template with its notebook (``notebook``: JSON text) if ``account`` may see it;
    None when it does not exist *or* belongs to a team the account is not in."""
    kind, _, key = template_id.partition("/")
    if kind == "global":
        found = global_templates().get(key)
        if found is None:
            return None
        meta, text = found
        return {**_global_entry(key, meta, text), "notebook": text}
    if kind != "team" or not key.isdigit() or len(key) > 18 or account is None:
        return None
    row = session.get(TeamTemplate, int(key))
    if row is None:
        return None
    teams = _member_team_ids(session, account)
    if row.team_id not in teams:
        return None
    return {**_team_entry(row, teams[row.team_id]), "notebook": row.notebook}


def publish(
    session: Session, account: Account, team_name: str, text: str | bytes
) -> dict[str, Any]:
    """Store a notebook as a template of ``team_name``; only a team admin may.

    The slug comes from the title, so publishing the same title again replaces the
    team's template (a new version); the metadata is the notebook's own, checked.
    """
    team = session.scalar(select(Team).where(Team.hub_group == team_name, Team.active))
    if team is None or not accounts.is_team_admin(session, team, account):
        # An outsider learns nothing about which teams exist.
        raise NotTeamAdmin(team_name[:64])
    notebook, meta = parse_notebook(text)
    stored = json.dumps(with_metadata(notebook, meta), ensure_ascii=False)
    if len(stored.encode()) > MAX_NOTEBOOK_BYTES:
        raise InvalidTemplate(f"The notebook is larger than {MAX_NOTEBOOK_BYTES // 1024} KiB.")
    slug = slugify(meta.title)
    row = session.scalar(
        select(TeamTemplate).where(TeamTemplate.team_id == team.id, TeamTemplate.slug == slug)
    )
    if row is None:
        row = TeamTemplate(team_id=team.id, slug=slug)
        session.add(row)
    row.title, row.description = meta.title, meta.description
    row.gpu_model, row.gpu_count = meta.gpu_model, meta.gpu_count
    row.min_vram_gb, row.expected_minutes = meta.min_vram_gb, meta.expected_minutes
    row.notebook = stored
    row.sha256 = hashlib.sha256(stored.encode()).hexdigest()
    row.published_by = account.id
    session.flush()
    # In the admin panel's audit log, with the action, in the same transaction.
    audit.record(
        session,
        actor=account.hub_name,
        action="template.publish",
        target_kind="team",
        target=team.hub_group,
        detail={"template": f"team/{row.id}", "title": meta.title, "sha256": row.sha256},
    )
    return _team_entry(row, team.hub_group)


def remove(session: Session, account: Account, template_id: str) -> None:
    """Delete a team template; only an admin of its team may (404 for outsiders)."""
    kind, _, key = template_id.partition("/")
    if kind != "team" or not key.isdigit() or len(key) > 18:
        raise TemplateNotFound()
    row = session.get(TeamTemplate, int(key))
    if row is None:
        raise TemplateNotFound()
    team = session.get(Team, row.team_id)
    if team is None or not accounts.is_team_admin(session, team, account):
        if team is None or accounts.membership(session, team, account) is None:
            raise TemplateNotFound()
        raise NotTeamAdmin(team.hub_group)
    audit.record(
        session,
        actor=account.hub_name,
        action="template.remove",
        target_kind="team",
        target=team.hub_group,
        detail={"template": f"team/{row.id}", "title": row.title},
    )
    session.delete(row)
    session.flush()


# --- cost -----------------------------------------------------------------------


def _needs(meta: Metadata | Mapping[str, Any]) -> dict[str, Any]:
    return dict(meta) if isinstance(meta, Mapping) else meta.as_dict()


def fits(meta: Metadata | Mapping[str, Any], offer: Mapping[str, Any]) -> bool:
    """Whether one offer could host the template (free GPUs aside)."""
    get = _needs(meta).get
    model = get("gpu_model")
    if model and offer["gpu_model"] != model:
        return False
    return bool(
        offer["vram_gb"] >= int(get("min_vram_gb") or 0)
        and offer["total_gpus"] >= int(get("gpu_count") or 0)
    )


def estimate(
    meta: Metadata | Mapping[str, Any],
    offers: Iterable[Mapping[str, Any]],
    currency: str | None = None,
) -> dict[str, Any]:
    """The estimated cost of one run at the cheapest live offer that fits.

    ``cost``: micro-credits (None when no offer fits; 0 for a CPU template),
    ``price_per_gpu_hour`` the price used, ``free_now``: whether an offer that fits
    has enough GPUs free on one node right now, and ``cost_display`` a phrase.
    """
    needs = _needs(meta)
    count, minutes = int(needs["gpu_count"]), int(needs["expected_minutes"])
    if count == 0:
        return {
            "cost": 0,
            "price_per_gpu_hour": 0,
            "free_now": True,
            "cost_display": "free (CPU server)",
        }
    fitting = [o for o in offers if fits(meta, o)]
    if not fitting:
        return {
            "cost": None,
            "price_per_gpu_hour": None,
            "free_now": False,
            "cost_display": "no provider offers this GPU now",
        }
    cheapest = min(int(o["price_per_gpu_hour"]) for o in fitting)
    # price per GPU-hour x GPUs x minutes / 60, rounded up (never under the meter's charge)
    cost = -(-(cheapest * count * minutes) // 60)
    free_now = any(int(o["largest_free_gpus"]) >= count for o in fitting)
    return {
        "cost": cost,
        "price_per_gpu_hour": cheapest,
        "free_now": free_now,
        "cost_display": f"about {format_credits(cost, currency)} for {minutes} min",
    }
