"""Alembic environment: the engine comes from the caller (``sekisho.db.upgrade``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

import sekisho.models  # noqa: F401  (registers every table on Base.metadata)
from sekisho.db import Base

engine: Engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()
