"""Writing and reading the admin audit log (:class:`AuditRecord`).

:func:`record` is called inside the admin action's own DB transaction, so an
action and its record commit together or not at all: no action goes unlogged,
and a refused action leaves no record.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit_models import AuditRecord

#: The most records one read returns.
MAX_ROWS = 1000


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_kind: str,
    target: str,
    reason: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditRecord:
    """Add one audit record (flushed, so it has its id and time)."""
    row = AuditRecord(
        actor=actor[:255],
        action=action[:64],
        target_kind=target_kind[:32],
        target=target[:255],
        reason=reason[:500],
        detail=json.dumps(detail or {}, sort_keys=True, default=str),
    )
    session.add(row)
    session.flush()
    return row


def view(row: AuditRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at,
        "actor": row.actor,
        "action": row.action,
        "target_kind": row.target_kind,
        "target": row.target,
        "reason": row.reason,
        "detail": json.loads(row.detail or "{}"),
    }


def search(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target_kind: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Records matching every filter given (exact matches; ``action`` also matches a
    prefix ending in a dot, ``node.`` for every node action), newest first."""
    query = select(AuditRecord)
    if actor:
        query = query.where(AuditRecord.actor == actor)
    if action:
        if action.endswith("."):
            query = query.where(AuditRecord.action.startswith(action, autoescape=True))
        else:
            query = query.where(AuditRecord.action == action)
    if target_kind:
        query = query.where(AuditRecord.target_kind == target_kind)
    if target:
        query = query.where(AuditRecord.target == target)
    if since is not None:
        query = query.where(AuditRecord.at >= since)
    if until is not None:
        query = query.where(AuditRecord.at < until)
    limit = max(1, min(limit, MAX_ROWS))
    rows = session.scalars(query.order_by(AuditRecord.id.desc()).limit(limit))
    return [view(row) for row in rows]
