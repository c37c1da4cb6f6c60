"""Database kernel: one declarative ``Base``, engines, one-transaction scopes, migrations.

SQLite (the embedded default) runs in WAL mode and opens every transaction with
``BEGIN IMMEDIATE``: writers queue on the database lock at the start instead of failing to
upgrade a read lock half-way (the classic "database is locked" under concurrency).
PostgreSQL uses the same code; serialisation points take row locks (``FOR UPDATE``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Enum, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from sekisho.errors import StoreError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass UTC-aware values")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def str_enum(cls: type[enum.StrEnum], length: int) -> Enum:
    """A portable enum column storing the members' *values* (readable in SQL)."""
    return Enum(
        cls, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e]
    )


class Base(DeclarativeBase):
    pass


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8,
            max_overflow=8,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is DEFERRED).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a process crash; the last
            # transactions may be lost on power failure but the database never corrupts.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=True)


class Database:
    """An engine plus a session factory; ``scope()`` is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def scope(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error.

        Driver errors become StoreError so callers (web, CLI) map them once; domain errors
        raised inside pass through unchanged after the rollback.
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (OperationalError, DBAPIError) as exc:
            session.rollback()
            raise StoreError(f"database error: {exc.__class__.__name__}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def upgrade(self) -> None:
        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command

    try:
        command.upgrade(alembic_config(engine), "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"migration failed: {exc}") from exc
