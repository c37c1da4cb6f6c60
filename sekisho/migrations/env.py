"""Alembic environment: the engine comes from the caller (``sekisho.db.upgrade``).

A run that changes the revisions of a store that had a schema leaves an
``audit_schema_changes`` row in its own transaction (when the table exists at the end of the
run): the next process that opens the store to write journals it as ``system.migrate``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Engine, insert, inspect

import sekisho.models  # noqa: F401  (registers every table on Base.metadata)
from audit.models import SchemaChange
from sekisho.clock import utcnow
from sekisho.db import Base

engine: Engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        migration = context.get_context()
        before = sorted(migration.get_current_heads())
        context.run_migrations()
        after = sorted(migration.get_current_heads())
        if before and after != before and inspect(connection).has_table(SchemaChange.__tablename__):
            connection.execute(
                insert(SchemaChange).values(
                    time=utcnow(),
                    before=",".join(before),
                    after=",".join(after),
                    process=f"uid {os.getuid()} pid {os.getpid()}",
                )
            )
    if connection.in_transaction():
        connection.commit()
