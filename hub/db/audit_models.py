"""The admin audit log: one row per admin action, written in the action's own transaction.

Who (the hub name of the admin), what (``action``, e.g. ``node.block``), the
target (``target_kind`` and ``target``, e.g. ``node`` / ``node-a``), when (UTC)
and why (the admin's reason). ``detail`` holds the action's parameters as JSON
(an amount, a quota) so the log says what was done, not only that something was.
Rows are never changed: the log only grows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, UTCDateTime, column_now


class AuditRecord(Base):
    __tablename__ = "admin_audit"
    __table_args__ = (
        CheckConstraint("length(actor) > 0", name="actor_not_empty"),
        CheckConstraint("length(action) > 0", name="action_not_empty"),
        Index("ix_admin_audit_at", "at"),
        Index("ix_admin_audit_action", "action"),
        Index("ix_admin_audit_target", "target_kind", "target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target_kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(500), default="")
    detail: Mapped[str] = mapped_column(Text, default="{}")
