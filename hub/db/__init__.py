"""The portal database: engine, sessions, migrations, and every table.

Importing this package registers every table on ``models.Base`` (accounts, the
marketplace, the ledger), in this one place, so ``Base.metadata`` is complete
wherever any table is used: the service, the tests and Alembic's environment.

The portal DB is separate from JupyterHub's own database and never shares its
sessions: JupyterHub assumes it owns its DB. SQLite (WAL, foreign keys on) is
the embedded default; PostgreSQL through psycopg 3 is the production path.
Schema changes go through Alembic only; ``upgrade`` runs at service start and
from ``gpuportal db upgrade``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigError
from . import (  # noqa: F401  (registers every table)
    audit_models,
    ledger_models,
    marketplace_models,
    models,
    payout_models,
    template_models,
)

MIGRATIONS = Path(__file__).parent / "migrations"

#: Foreign keys the models declare that PostgreSQL checks once per INSERT statement, by
#: triggers over the inserted rows, instead of row by row (migration 0013: the meter
#: writes 40,000 ledger rows a tick). SQLite keeps them as foreign keys.
STATEMENT_CHECKED_FKS = frozenset(
    {
        "fk_ledger_postings_ledger_account_id_ledger_accounts",
        "fk_ledger_postings_transaction_id_ledger_transactions",
        "fk_ledger_transactions_allocation_id_allocations",
    }
)


def make_engine(url: URL) -> Engine:
    """Create the engine; on SQLite turn on WAL, foreign keys and a busy timeout; PostgreSQL
    sessions run in UTC."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif url.get_backend_name() == "postgresql":
        # Sessions in UTC whatever the server's zone: the driver then hands back
        # datetimes already in ``datetime.UTC``, which the column type passes as they
        # are (converting 60,000 of them was a tenth of a meter tick at 10,000 servers).
        kwargs["connect_args"] = {"options": "-c TimeZone=UTC"}
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the schema to ``revision``; a clear error when the DB is unreachable.

    ``heads``: each feature's migrations form their own branch off the first
    revision, so the default brings every branch up to date.
    """
    try:
        command.upgrade(alembic_config(engine), revision)
    except OperationalError as exc:
        raise ConfigError(
            f"cannot reach the portal database {engine.url.render_as_string(hide_password=True)}"
            f" (GPUPORTAL_DB_URL): {_first_line(exc.orig)}"
        ) from None


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The applied revision(s), comma-separated when several branches are applied."""
    with engine.connect() as conn:
        try:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        except Exception:
            return None
    return ",".join(sorted(rows)) or None


def check(engine: Engine) -> None:
    """Raise :class:`ConfigError` when the DB does not answer a trivial query."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise ConfigError(
            f"cannot reach the portal database {engine.url.render_as_string(hide_password=True)}"
            f" (GPUPORTAL_DB_URL): {_first_line(exc.orig)}"
        ) from None


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
