"""Alembic environment for the round store; run by ``server.store.migrate`` (no alembic.ini needed)."""

from alembic import context

from pollinate.server.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
