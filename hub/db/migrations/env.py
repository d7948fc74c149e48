"""Alembic environment: runs against the engine handed over by gpuportal.hub.db."""

from alembic import context

# Importing any module of gpuportal.hub.db registers every table on Base.
from gpuportal.hub.db.models import Base

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
