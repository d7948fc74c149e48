"""The portal DB on SQLite and PostgreSQL: migrations, invariants, UTC times, hub sync."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from gpuportal.hub import db as portal_db
from gpuportal.hub.db import accounts
from gpuportal.hub.db.models import Account, Base, Team, TeamMembership


def heads() -> str:
    """Every branch head, as ``current_revision`` reports them (features add branches)."""
    from alembic.script import ScriptDirectory

    return ",".join(sorted(ScriptDirectory(str(portal_db.MIGRATIONS)).get_heads()))


def test_migrations_match_models(db: Engine) -> None:
    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    if db.dialect.name == "postgresql":
        # These three are checked per statement by triggers there (migration 0013;
        # test_ledger_refs.py proves the triggers refuse what the keys refused).
        per_statement = [d for d in diff if d[0] == "add_fk"]
        names = {d[1].name for d in per_statement}
        assert names == portal_db.STATEMENT_CHECKED_FKS
        diff = [d for d in diff if d[0] != "add_fk"]
    assert diff == []
    assert portal_db.current_revision(db) == heads()


def test_downgrade_and_upgrade_again(db: Engine) -> None:
    portal_db.downgrade(db, "base")
    assert portal_db.current_revision(db) is None
    portal_db.upgrade(db)
    assert portal_db.current_revision(db) == heads()


def test_sqlite_pragmas(tmp_path) -> None:
    from gpuportal.hub.settings import load_settings

    engine = portal_db.make_engine(load_settings(data_dir=tmp_path).database_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_role_is_constrained(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        session.add(Account(hub_name="mallory", role="superuser"))


def test_hub_names_are_unique(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    with portal_db.transaction(sessions) as session:
        session.add(Account(hub_name="ann", role="customer"))
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        session.add(Account(hub_name="ann", role="customer"))


def test_membership_needs_real_rows(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    with pytest.raises(IntegrityError), portal_db.transaction(sessions) as session:
        session.add(TeamMembership(team_id=999, account_id=999))


def test_times_are_aware_utc(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    tokyo = datetime(2026, 1, 2, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    with portal_db.transaction(sessions) as session:
        session.add(Account(hub_name="kenji", role="customer", created_at=tokyo))
    with portal_db.transaction(sessions) as session:
        account = session.scalar(select(Account).where(Account.hub_name == "kenji"))
        assert account is not None
        assert account.created_at == datetime(2026, 1, 2, 0, 0, tzinfo=UTC)
        assert account.created_at.tzinfo is not None


def test_naive_times_are_refused(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    with pytest.raises(StatementError, match="naive"), portal_db.transaction(sessions) as s:
        s.add(Account(hub_name="naive", role="customer", created_at=datetime(2026, 1, 1)))  # noqa: DTZ001


@pytest.mark.parametrize(
    ("user", "role"),
    [
        ({"name": "a", "admin": False, "groups": []}, "customer"),
        ({"name": "a", "admin": False, "groups": ["customers"]}, "customer"),
        ({"name": "a", "admin": False, "groups": ["providers", "ml"]}, "provider"),
        ({"name": "a", "admin": False, "groups": ["admins"]}, "admin"),
        ({"name": "a", "admin": True, "groups": ["providers"]}, "admin"),
    ],
)
def test_role_from_hub_model(user: dict, role: str) -> None:
    assert accounts.role_for(user) == role


def test_sync_mirrors_hub_users_and_groups(db: Engine) -> None:
    sessions = portal_db.session_factory(db)
    users = [
        {"name": "admin", "admin": True, "groups": ["admins"]},
        {"name": "ann", "admin": False, "groups": ["ml-team"]},
        {"name": "a-b", "admin": False, "groups": ["providers"]},
        {"name": "zoë", "admin": False, "groups": ["ml-team"]},
    ]
    groups = [
        {"name": "admins", "users": ["admin"]},
        {"name": "providers", "users": ["a-b"]},
        {"name": "ml-team", "users": ["ann", "zoë"]},
    ]
    with portal_db.transaction(sessions) as session:
        counts = accounts.sync(session, users, groups)
    assert counts == {"accounts": 4, "teams": 1, "deactivated": 0}
    with portal_db.transaction(sessions) as session:
        roles = dict(session.execute(select(Account.hub_name, Account.role)).all())
        assert roles == {"admin": "admin", "ann": "customer", "a-b": "provider", "zoë": "customer"}
        zoe = session.scalar(select(Account).where(Account.hub_name == "zoë"))
        assert accounts.teams_of(session, zoe) == ["ml-team"]
        # Role groups are not teams.
        assert session.scalars(select(Team.hub_group)).all() == ["ml-team"]

    # ann leaves the hub, zoë leaves the team, the team is renamed away.
    users2 = [u for u in users if u["name"] != "ann"]
    groups2 = [g for g in groups if g["name"] != "ml-team"] + [{"name": "vision", "users": ["zoë"]}]
    with portal_db.transaction(sessions) as session:
        counts = accounts.sync(session, users2, groups2)
    assert counts == {"accounts": 0, "teams": 1, "deactivated": 2}
    with portal_db.transaction(sessions) as session:
        ann = session.scalar(select(Account).where(Account.hub_name == "ann"))
        assert ann is not None and ann.active is False  # kept for the ledger, not deleted
        zoe = session.scalar(select(Account).where(Account.hub_name == "zoë"))
        assert accounts.teams_of(session, zoe) == ["vision"]
        ml = session.scalar(select(Team).where(Team.hub_group == "ml-team"))
        assert ml is not None and ml.active is False

    # A second identical sync changes nothing.
    with portal_db.transaction(sessions) as session:
        assert accounts.sync(session, users2, groups2) == {
            "accounts": 0,
            "teams": 0,
            "deactivated": 0,
        }


def test_team_admins_survive_sync_and_lose_the_role_with_membership(db: Engine) -> None:
    """A team role lives on the membership: a sync keeps it; leaving the hub group ends it;
    only a member can hold it; a portal admin manages every active team."""
    sessions = portal_db.session_factory(db)
    users = [
        {"name": "root", "admin": True, "groups": []},
        {"name": "lea", "admin": False, "groups": ["ml"]},
        {"name": "max", "admin": False, "groups": ["ml"]},
        {"name": "out", "admin": False, "groups": []},
    ]
    groups = [{"name": "ml", "users": ["lea", "max"]}]
    with portal_db.transaction(sessions) as session:
        accounts.sync(session, users, groups)
        ml = session.scalar(select(Team).where(Team.hub_group == "ml"))
        by = {a.hub_name: a for a in session.scalars(select(Account))}
        assert not accounts.is_team_admin(session, ml, by["lea"])
        accounts.set_team_role(session, ml, by["lea"], "admin")
        with pytest.raises(LookupError):
            accounts.set_team_role(session, ml, by["out"], "admin")
        with pytest.raises(ValueError):
            accounts.set_team_role(session, ml, by["max"], "owner")
    with portal_db.transaction(sessions) as session:
        accounts.sync(session, users, groups)  # an unchanged sync keeps the role
        ml = session.scalar(select(Team).where(Team.hub_group == "ml"))
        by = {a.hub_name: a for a in session.scalars(select(Account))}
        assert accounts.is_team_admin(session, ml, by["lea"])
        assert not accounts.is_team_admin(session, ml, by["max"])
        assert not accounts.is_team_admin(session, ml, by["out"])
        assert accounts.is_team_admin(session, ml, by["root"])  # portal admin
        assert accounts.teams_managed_by(session, by["lea"]) == ["ml"]
        assert accounts.teams_managed_by(session, by["max"]) == []
    # lea leaves the hub group: she is no longer a member, so no longer a team admin,
    # and coming back makes her a plain member again.
    with portal_db.transaction(sessions) as session:
        accounts.sync(session, users, [{"name": "ml", "users": ["max"]}])
    with portal_db.transaction(sessions) as session:
        accounts.sync(session, users, groups)
        ml = session.scalar(select(Team).where(Team.hub_group == "ml"))
        lea = session.scalar(select(Account).where(Account.hub_name == "lea"))
        assert not accounts.is_team_admin(session, ml, lea)
