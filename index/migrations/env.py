"""Alembic environment for the scan ledger: runs on the connection that index.ledger.upgrade passes in."""

from alembic import context

from superweight.index.ledger import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
