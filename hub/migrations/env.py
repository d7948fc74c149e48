"""Alembic environment: runs against the engine handed over by gpuportal.hub.db."""

from alembic import context

from gpuportal.hub import ledger_models  # noqa: F401  (registers the ledger tables on Base)
from gpuportal.hub.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
