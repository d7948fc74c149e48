"""Team notebook templates: notebooks a team admin published for the team's members.

Global templates ship in the package (``gpuportal.notebooks``) and are not stored;
a team's are stored here, one row per (team, slug): publishing a notebook with the
same slug again replaces it. The notebook (JSON text, capped by the portal API)
carries its own metadata (``metadata.gpuportal.template``); the columns repeat the
validated metadata so a listing need not parse every notebook.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, UTCDateTime, column_now


class TeamTemplate(Base):
    __tablename__ = "team_templates"
    __table_args__ = (
        UniqueConstraint("team_id", "slug"),
        CheckConstraint("length(slug) > 0", name="slug_not_empty"),
        CheckConstraint("gpu_count >= 0", name="gpu_count_not_negative"),
        CheckConstraint("min_vram_gb >= 0", name="min_vram_not_negative"),
        CheckConstraint("expected_minutes > 0", name="expected_minutes_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    slug: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(String(500), default="")
    #: None: any GPU model.
    gpu_model: Mapped[str | None] = mapped_column(String(64), default=None)
    gpu_count: Mapped[int] = mapped_column(Integer)
    min_vram_gb: Mapped[int] = mapped_column(Integer, default=0)
    expected_minutes: Mapped[int] = mapped_column(Integer)
    #: The notebook as nbformat JSON text, metadata included.
    notebook: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    published_by: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )
