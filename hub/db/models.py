"""Portal DB models (SQLAlchemy 2.0, typed).

Invariants live in the schema, not only in Python: role values, unique hub
names, membership pairs. Money columns (later issues) are integers of
micro-credits; every timestamp is an aware UTC datetime, also on SQLite.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .. import timeutil
from ..timeutil import as_utc

#: Roles an account can hold, most privileged last. Derived from hub groups.
ROLES = ("customer", "provider", "admin")
#: Roles a member holds in a team: a team admin manages its membership and templates.
TEAM_ROLES = ("member", "admin")

# Stable constraint names make migrations portable between SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def column_now() -> datetime:
    """A column's default time, read through ``timeutil`` at each insert (not bound at
    import), so the tests' clock reaches it."""
    return timeutil.utcnow()


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the portal DB; use gpuportal.hub.timeutil")
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    """One per hub user. Never deleted (ledger rows will refer to it): deactivated."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("role IN ('customer', 'provider', 'admin')", name="role_known"),
        CheckConstraint("length(hub_name) > 0", name="hub_name_not_empty"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="customer")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )

    memberships: Mapped[list[TeamMembership]] = relationship(
        back_populates="account", cascade="all, delete-orphan"
    )


class Team(Base):
    """One per hub group. Team budgets and templates hang off it in later issues."""

    __tablename__ = "teams"
    __table_args__ = (CheckConstraint("length(hub_group) > 0", name="hub_group_not_empty"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_group: Mapped[str] = mapped_column(String(255), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    #: The GPU profile (a slug of the spawn form's profiles) the team's members start with.
    default_profile: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=column_now, onupdate=column_now
    )

    memberships: Mapped[list[TeamMembership]] = relationship(
        back_populates="team", cascade="all, delete-orphan"
    )


class TeamMembership(Base):
    __tablename__ = "team_memberships"
    __table_args__ = (
        UniqueConstraint("team_id", "account_id"),
        CheckConstraint("role IN ('member', 'admin')", name="team_role_known"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    #: ``member`` or ``admin`` (manages the team's membership and templates). The hub
    #: group holds who is a member; the portal holds who of them is a team admin.
    role: Mapped[str] = mapped_column(String(16), default="member", server_default="member")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=column_now)

    team: Mapped[Team] = relationship(back_populates="memberships")
    account: Mapped[Account] = relationship(back_populates="memberships")
