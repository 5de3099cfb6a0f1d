"""Alembic's environment for the service's schema: always given a connection by
:mod:`imaging.service.schema` (no alembic.ini, no URL of its own)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
