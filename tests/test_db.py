"""The store's transaction scopes and connection handling.

* SQLite: a read-only scope does not queue behind a writer holding the database lock.
* PostgreSQL: pooled connections that the server dropped (restart, idle timeout, firewall) are
  replaced before the caller sees them when they sat idle; one dropped while in use fails that
  operation cleanly and the next one works."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from sekisho import db as db_module
from sekisho.db import Database
from sekisho.errors import StoreError
from tests.support import pg


def _terminate_others(cluster: pg.PgCluster, database: str) -> None:
    """End every server session on ``database`` (what a restart does to the pool)."""
    from psycopg import sql

    cluster.execute(
        sql.SQL(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = {} AND pid <> pg_backend_pid()"
        ).format(sql.Literal(database))
    )


def _one(store: Database) -> int:
    with store.scope() as session:
        return int(session.execute(text("SELECT 1")).scalar_one())


@pytest.fixture
def pg_store(
    pg_cluster: pg.PgCluster, pg_template: tuple[object, str]
) -> Iterator[tuple[pg.PgCluster, Database, str]]:
    name = "t_db_pool"
    cluster = pg_cluster
    cluster.drop_database(name)
    store = Database(cluster.create_database(name, template=pg_template[1]))
    yield cluster, store, name
    store.engine.dispose()
    cluster.drop_database(name)


@pytest.mark.postgres
def test_idle_connection_dropped_by_the_server_is_replaced(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, store, name = pg_store
    assert _one(store) == 1  # one pooled connection, now idle
    _terminate_others(cluster, name)
    monkeypatch.setattr(db_module, "IDLE_PING", 0.0)  # it has been idle "long enough"
    assert _one(store) == 1  # pinged, found dead, replaced: the caller never noticed


@pytest.mark.postgres
def test_connection_dropped_while_presumed_fresh_fails_once_then_recovers(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, store, name = pg_store
    assert _one(store) == 1
    _terminate_others(cluster, name)
    monkeypatch.setattr(db_module, "IDLE_PING", 3600.0)  # not pinged
    with pytest.raises(StoreError, match="database error"):
        _one(store)
    assert _one(store) == 1  # the pool was invalidated: a new connection


def test_sqlite_reader_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        with store.scope() as session:
            session.execute(text("CREATE TABLE t (v INTEGER)"))
            session.execute(text("INSERT INTO t VALUES (1)"))
        result: list[int] = []
        with store.scope() as writer:  # BEGIN IMMEDIATE: holds the write lock
            writer.execute(text("INSERT INTO t VALUES (2)"))

            def read() -> None:
                with store.read_scope() as reader:
                    result.append(int(reader.execute(text("SELECT count(*) FROM t")).scalar_one()))

            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            thread.join(timeout=10)
            assert not thread.is_alive(), "the reader queued behind the writer"
        assert result == [1]  # the committed snapshot, not the writer's pending row
        with store.read_scope() as reader:
            assert reader.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
    finally:
        store.engine.dispose()
