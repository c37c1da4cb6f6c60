"""The store's transaction scopes and connection handling.

* ``write_tx`` with ``Prepared`` statements (the hot paths) writes what SQLAlchemy reads back,
  maps a unique violation to DuplicateKey, rolls back whole, and never reports a commit of a
  transaction the database ended.

* SQLite: a read-only scope does not queue behind a writer holding the database lock; every
  commit is synced to disk before it returns.
* PostgreSQL: pooled connections that the server dropped (restart, idle timeout, firewall) are
  replaced before the caller sees them when they sat idle; one dropped while in use fails that
  operation cleanly and the next one works."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)

from ca.models import CertStatus
from sekisho import db as db_module
from sekisho.db import Database, Prepared, UTCDateTime, str_enum
from sekisho.errors import AuditError, Conflict, DuplicateKey, StoreError
from sekisho.services import Services
from tests.support import pg

# What a failed statement raises inside the block: the driver's own error (write_tx maps it
# on the way out).
DuplicateKeyDriver = (sqlite3.IntegrityError, psycopg.IntegrityError)


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


# -- write_tx and Prepared: the hot-path statements, on both stores ---------------------------
_META = MetaData()
_ITEMS = Table(
    "fast_items",
    _META,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), unique=True, nullable=False),
    Column("status", str_enum(CertStatus, 16), nullable=False),
    Column("at", UTCDateTime, nullable=True),
    Column("blob", LargeBinary, nullable=True),
)
_INSERT = Prepared(
    insert(_ITEMS).returning(_ITEMS.c.id), ("name", "status", "at", "blob"), columns=True
)
_RENAME = Prepared(
    update(_ITEMS)
    .where(_ITEMS.c.name == bindparam("old"))
    .where(_ITEMS.c.status == CertStatus.RESERVED)
    .values(name=bindparam("new"), status=CertStatus.ISSUED),
    ("old", "new"),
)
_SELECT = Prepared(
    select(_ITEMS.c.status, _ITEMS.c.at).where(_ITEMS.c.name == bindparam("name")), ("name",)
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        store = Database(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
        cluster.drop_database("t_db_fast")
        store = Database(cluster.create_database("t_db_fast"))
    _META.create_all(store.engine)
    yield store
    store.engine.dispose()
    if request.param == "postgres":
        cluster.drop_database("t_db_fast")


def _item(name: str | None) -> dict[str, object]:
    """Values for ``_INSERT``: a reserved row with no time and no blob."""
    return {"name": name, "status": CertStatus.RESERVED, "at": None, "blob": None}


def _write_then_lose_the_connection(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> Database:
    """Row "a" written through the pool, then the server ends every other backend (as a
    restart would), with the pooled connections not pinged before their next use."""
    cluster, store, name = pg_store
    _META.create_all(store.engine)
    with store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
    _terminate_others(cluster, name)
    monkeypatch.setattr(db_module, "IDLE_PING", 3600.0)
    return store


def _names(store: Database) -> list[str]:
    with store.read_scope() as session:
        return sorted(session.scalars(select(_ITEMS.c.name)))


def test_prepared_rows_read_back_as_the_orm_wrote_them(any_store: Database) -> None:
    at = dt.datetime(2026, 11, 25, 12, 30, 1, 123456, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    with any_store.write_tx() as tx:
        row = tx.first(
            _INSERT, {"name": "a", "status": CertStatus.RESERVED, "at": at, "blob": b"\0x"}
        )
        assert row is not None and row[0] >= 1
        tx.execute(_INSERT, _item("b"))
        assert tx.execute(_RENAME, {"old": "a", "new": "a2"}) == 1
        assert tx.execute(_RENAME, {"old": "a2", "new": "a3"}) == 0  # no longer reserved
        assert tx.first(_SELECT, {"name": "a2"}) == (CertStatus.ISSUED, at.astimezone(dt.UTC))
    # Through SQLAlchemy (ORM types), as any other reader sees them.
    with any_store.read_scope() as session:
        rows = session.execute(select(_ITEMS).order_by(_ITEMS.c.name)).all()
    assert [(r.name, r.status, r.at, r.blob) for r in rows] == [
        ("a2", CertStatus.ISSUED, at.astimezone(dt.UTC), b"\0x"),
        ("b", CertStatus.RESERVED, None, None),
    ]
    assert rows[0].at.tzinfo is not None


def test_write_tx_duplicate_key_rolls_back_everything(any_store: Database) -> None:
    with any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
    with pytest.raises(DuplicateKey) as info, any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("b"))
        tx.execute(_INSERT, _item("a"))
    assert isinstance(info.value, StoreError) and "Traceback" not in info.value.message
    assert _names(any_store) == ["a"]  # "b" went with the failed transaction
    with any_store.write_tx() as tx:  # the pooled connection is usable again
        tx.execute(_INSERT, _item("c"))
    assert _names(any_store) == ["a", "c"]


def test_write_tx_domain_error_passes_through_after_rollback(any_store: Database) -> None:
    with pytest.raises(Conflict), any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
        raise Conflict("changed state")
    assert _names(any_store) == []


def test_write_tx_never_commits_after_a_swallowed_statement_error(any_store: Database) -> None:
    """A failed statement whose error the caller swallows: SQLite ended nothing (the
    statement alone is undone) and the transaction commits the rest; PostgreSQL aborted the
    whole transaction, and write_tx must say so rather than report a commit."""
    sqlite = any_store.engine.dialect.name == "sqlite"
    with contextlib.ExitStack() as outer:
        if not sqlite:
            outer.enter_context(pytest.raises(StoreError, match="lost"))
        with any_store.write_tx() as tx:
            tx.execute(_INSERT, _item("a"))
            with contextlib.suppress(DuplicateKeyDriver):
                tx.execute(_INSERT, _item("a"))
    assert _names(any_store) == (["a"] if sqlite else [])


def test_single_statement_transactions(any_store: Database) -> None:
    """``write_tx(single=True)``: one statement, committed (autocommit on PostgreSQL); a second
    statement is refused; the pooled connection goes back transactional."""
    with any_store.write_tx(single=True) as tx:
        row = tx.first(_INSERT, _item("a"))
        assert row is not None
    assert _names(any_store) == ["a"]
    with pytest.raises(DuplicateKey), any_store.write_tx(single=True) as tx:
        tx.execute(_INSERT, _item("a"))
    with pytest.raises(RuntimeError, match="second statement"):
        with any_store.write_tx(single=True) as tx:
            tx.execute(_SELECT, {"name": "a"})
            tx.execute(_SELECT, {"name": "a"})
    # The same pooled connection (pool of one in use at a time here) is transactional again:
    # a failure in the second statement takes the first one with it.
    with pytest.raises(DuplicateKey), any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("b"))
        tx.execute(_INSERT, _item("a"))
    assert _names(any_store) == ["a"]


@pytest.mark.postgres
def test_single_statement_after_an_idle_ping(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ping of a connection that sat idle must not leave it inside a transaction, where
    autocommit cannot be switched on (found by the issuance benchmark)."""
    _cluster, store, _name = pg_store
    _META.create_all(store.engine)
    monkeypatch.setattr(db_module, "IDLE_PING", 0.0)  # every checkout pings
    for name in ("a", "b"):
        with store.write_tx(single=True) as tx:
            tx.execute(_INSERT, _item(name))
    assert _names(store) == ["a", "b"]


def _hold_write_tx(
    path: str, entered: multiprocessing.synchronize.Event, go: multiprocessing.synchronize.Event
) -> None:
    store = Database(f"sqlite:///{path}")
    with store.write_tx() as tx:
        tx.execute(_INSERT, _item("held"))
        entered.set()
        go.wait(30)
    store.dispose()


def test_sqlite_writers_in_other_processes_queue_on_a_lock_file(tmp_path: Path) -> None:
    """A process inside ``write_tx`` holds ``<db>-writer`` (flock): another process's writer
    sleeps in the kernel until it is released, not in SQLite's polling busy handler."""
    path = tmp_path / "store.db"
    store = Database(f"sqlite:///{path}")
    _META.create_all(store.engine)
    lock_file = Path(f"{path}-writer")
    ctx = multiprocessing.get_context("spawn")
    entered, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_write_tx, args=(str(path), entered, go))
    child.start()
    try:
        assert entered.wait(60), "the child never entered write_tx"
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
        fd = os.open(lock_file, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            go.set()
            child.join(60)
            assert child.exitcode == 0
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the transaction
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        go.set()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join(10)
    with store.write_tx() as tx:
        tx.execute(_INSERT, _item("after"))
    assert _names(store) == ["after", "held"]
    store.dispose()


def test_prepared_refuses_keys_that_do_not_match(any_store: Database) -> None:
    wrong = Prepared(update(_ITEMS).values(name=bindparam("new")), ("new", "extra"))
    unbound = Prepared(update(_ITEMS).values(name=bindparam("new")), ())
    with pytest.raises(ValueError, match="extra"), any_store.write_tx() as tx:
        tx.execute(wrong, {"new": "x", "extra": 1})
    with pytest.raises(ValueError, match="new"), any_store.write_tx() as tx:
        tx.execute(unbound, {})


@pytest.mark.postgres
def test_write_tx_on_a_dropped_connection_fails_once_then_recovers(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _write_then_lose_the_connection(pg_store, monkeypatch)
    with pytest.raises(StoreError, match="database error"), store.write_tx() as tx:
        tx.execute(_INSERT, _item("b"))
    with store.write_tx() as tx:  # the dead connection left the pool
        tx.execute(_INSERT, _item("c"))
    assert _names(store) == ["a", "c"]


@pytest.mark.postgres
def test_write_tx_drops_a_dead_connection_behind_a_domain_error(
    pg_store: tuple[pg.PgCluster, Database, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The journal wraps driver errors in AuditError: write_tx still sees the dead connection
    behind it and invalidates it, rather than handing it back to the pool to fail its reset."""
    store = _write_then_lose_the_connection(pg_store, monkeypatch)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.pool")
    with pytest.raises(AuditError, match="journal"), store.write_tx() as tx:
        try:
            tx.execute(_INSERT, _item("b"))
        except psycopg.OperationalError as exc:
            raise AuditError("the audit journal could not be written") from exc
    assert not [r for r in caplog.records if "reset" in r.getMessage().lower()]
    with store.write_tx() as tx:
        tx.execute(_INSERT, _item("c"))
    assert _names(store) == ["a", "c"]


_STREAM = Prepared(
    select(_ITEMS.c.name, _ITEMS.c.at).where(_ITEMS.c.name >= bindparam("from_name"))
    .order_by(_ITEMS.c.name),
    ("from_name",),
)  # fmt: skip


def test_stream_raw_reads_batches_as_the_driver_gives_them(any_store: Database) -> None:
    """``stream_raw`` (the full CRL's read): every row once, in order, ``batch`` at a time,
    the values unprocessed (SQLite's stored text, psycopg's datetimes), on the read's own
    connection; then the pool's connections still work."""
    at = dt.datetime(2026, 11, 27, 22, 31, 24, 5, tzinfo=dt.UTC)
    with any_store.write_tx() as tx:
        for i in range(25):
            tx.execute(_INSERT, {**_item(f"n{i:02d}"), "at": at})
    with any_store.read_scope() as session:
        batches = list(
            db_module.stream_raw(session.connection(), _STREAM, {"from_name": "n03"}, 10)
        )
    assert [len(b) for b in batches] == [10, 10, 2]
    rows = [tuple(r) for b in batches for r in b]
    assert [name for name, _ in rows] == [f"n{i:02d}" for i in range(3, 25)]
    stored = rows[0][1]
    if any_store.engine.dialect.name == "sqlite":
        assert stored == "2026-11-27 22:31:24.000005"
    else:
        assert stored == at
    assert _names(any_store)[:2] == ["n00", "n01"]


def test_a_stream_closed_after_its_transaction_leaves_the_next_one_alone(
    any_store: Database,
) -> None:
    """A stream left unfinished when its read ended, and closed later (collected) while the
    pooled connection runs another transaction: that transaction commits what it wrote. (On
    PostgreSQL the late CLOSE of the server-side cursor failed inside it, and its COMMIT then
    rolled everything back without an error.)"""
    with any_store.write_tx() as tx:
        for i in range(25):
            tx.execute(_INSERT, _item(f"n{i:02d}"))
    with any_store.read_scope() as session:
        stream = db_module.stream_raw(session.connection(), _STREAM, {"from_name": ""}, 10)
        assert len(next(stream)) == 10
    with any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("zz"))
        stream.close()
    assert "zz" in _names(any_store)


def test_stream_raw_turns_driver_errors_into_store_errors(any_store: Database) -> None:
    missing = Table("no_such_items", MetaData(), Column("name", String(32)))
    query = Prepared(select(missing.c.name).where(missing.c.name == bindparam("n")), ("n",))
    # The message names the driver's code for it (SQLite's error name, PostgreSQL's
    # SQLSTATE: 42P01, undefined table), never data.
    with (
        pytest.raises(StoreError, match=r"database error: \w+ \((SQLITE_ERROR|42P01)\)$"),
        any_store.read_scope() as session,
    ):
        list(db_module.stream_raw(session.connection(), query, {"n": "x"}, 10))
    assert _names(any_store) == []  # the pool still serves


def test_a_full_disk_is_named_in_the_store_error(any_store: Database) -> None:
    """A write that the file system refuses (here: RLIMIT_FSIZE, as a full disk) is a
    StoreError naming SQLite's code (it said "database error: OperationalError" alone), and
    nothing of the transaction is kept."""
    if any_store.engine.dialect.name != "sqlite":
        pytest.skip("the file-size limit is this process's: SQLite only")
    import resource
    import signal

    _META.create_all(any_store.engine)
    with any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("before"))
    path = db_module.sqlite_file(str(any_store.engine.url))
    assert path is not None
    limit = max(path.stat().st_size, 1) + 4096
    wal = path.with_name(path.name + "-wal")
    limit = max(limit, wal.stat().st_size + 4096 if wal.exists() else 0)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with (
            pytest.raises(StoreError, match=r"\((SQLITE_FULL|SQLITE_IOERR\w*)\)") as info,
            any_store.write_tx() as tx,
        ):
            tx.execute(_INSERT, {**_item("big"), "blob": b"x" * (4 * limit)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "database error" in info.value.message
    assert _names(any_store) == ["before"]


@pytest.mark.postgres
def test_stream_raw_on_a_connection_lost_mid_read_fails_then_recovers(
    pg_store: tuple[pg.PgCluster, Database, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server ends the session between two batches (a restart): StoreError, not the
    driver's error (a 500 on the web, exit 70 on the CLI), and the dead connection leaves the
    pool invalidated, not handed back to fail its reset."""
    cluster, store, name = pg_store
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.pool")
    _META.create_all(store.engine)
    with store.write_tx() as tx:
        for i in range(30):
            tx.execute(_INSERT, _item(f"n{i:02d}"))
    monkeypatch.setattr(db_module, "IDLE_PING", 3600.0)
    with pytest.raises(StoreError, match="database error"), store.read_scope() as session:
        stream = db_module.stream_raw(session.connection(), _STREAM, {"from_name": ""}, 10)
        assert len(next(stream)) == 10
        _terminate_others(cluster, name)
        list(stream)
    assert not [r for r in caplog.records if "reset" in r.getMessage().lower()]
    assert len(_names(store)) == 30


def test_write_tx_never_commits_a_transaction_the_database_ended(any_store: Database) -> None:
    """The database ends the whole transaction (SQLite does that on SQLITE_FULL or an I/O
    error; here a ROLLBACK does it) and the caller goes on: write_tx must fail, not report a
    commit that stored nothing."""
    with pytest.raises(StoreError, match="lost"), any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
        tx.cursor.execute("ROLLBACK")
    assert _names(any_store) == []
    with any_store.write_tx() as tx:  # the connection is usable again
        tx.execute(_INSERT, _item("b"))
    assert _names(any_store) == ["b"]


def test_only_unique_violations_are_duplicate_keys(any_store: Database) -> None:
    """A NOT NULL (or foreign key) failure is a store error, never a key collision that a
    caller would retry with another key."""
    with pytest.raises(StoreError) as info, any_store.write_tx() as tx:
        tx.execute(_INSERT, _item(None))
    assert not isinstance(info.value, DuplicateKey)
    with any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
    with pytest.raises(DuplicateKey), any_store.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))


def test_prepared_refuses_python_side_defaults(any_store: Database) -> None:
    """SQLAlchemy computes a Python-side column default per execution; a compiled plan would
    freeze it (as NULL), so such a statement is refused unless the value is passed."""
    table = Table(
        "fast_defaults",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("label", String(8), default="dflt"),
    )
    missing = Prepared(insert(table), ("id",), columns=True)
    given = Prepared(insert(table), ("id", "label"), columns=True)
    with pytest.raises(ValueError, match="defaults"), any_store.write_tx() as tx:
        tx.execute(missing, {"id": 1})
    table.create(any_store.engine)
    with any_store.write_tx() as tx:
        tx.execute(given, {"id": 1, "label": "x"})


@pytest.mark.postgres
def test_a_disconnect_in_write_tx_renews_the_whole_pool(
    pg_store: tuple[pg.PgCluster, Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a server restart every pooled connection is dead: the first write fails, and the
    pool checks the others before their next use instead of failing one write each."""
    cluster, store, name = pg_store
    _META.create_all(store.engine)
    held = [store.engine.raw_connection() for _ in range(3)]  # three connections in the pool
    for conn in held:
        conn.close()
    _terminate_others(cluster, name)
    monkeypatch.setattr(db_module, "IDLE_PING", 3600.0)  # not pinged
    outcomes = []
    for label in ("a", "b", "c"):
        try:
            with store.write_tx() as tx:
                tx.execute(
                    _INSERT,
                    _item(label),
                )
            outcomes.append("ok")
        except StoreError:
            outcomes.append("failed")
    assert outcomes == ["failed", "ok", "ok"]
    assert _names(store) == ["b", "c"]


def _show_lock_timeout(store: Database) -> str:
    with store.scope() as session:
        return str(session.execute(text("SHOW lock_timeout")).scalar_one())


@pytest.mark.postgres
def test_a_postgresql_lock_held_too_long_gives_database_busy(
    pg_cluster: pg.PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that holds a row lock and never ends (a process stopped, a signer hung)
    made every writer of that row wait for good on PostgreSQL (no lock_timeout), where SQLite
    gives "database busy" after WRITER_WAIT. Now both stores fail the waiter after
    WRITER_WAIT, on the hot path (write_tx) and through the ORM (scope), and the row is
    written once the lock is gone."""
    cluster = pg_cluster
    cluster.drop_database("t_db_lock")
    url = cluster.create_database("t_db_lock")
    holder = Database(url)
    _META.create_all(holder.engine)
    with holder.write_tx() as tx:
        tx.execute(_INSERT, _item("a"))
    monkeypatch.setattr(db_module, "WRITER_WAIT", 1.0)
    waiter = Database(url)
    try:
        with holder.write_tx() as held:
            held.execute(_RENAME, {"old": "a", "new": "a1"})  # row "a" locked, not committed
            started = time.monotonic()
            with pytest.raises(StoreError, match="database busy"), waiter.write_tx() as tx:
                tx.execute(_RENAME, {"old": "a", "new": "a2"})
            with pytest.raises(StoreError, match="database busy"), waiter.scope() as session:
                session.execute(text("UPDATE fast_items SET name = 'a3' WHERE name = 'a'"))
            assert 1.8 <= time.monotonic() - started < 10
        assert _names(waiter) == ["a1"]
        with waiter.write_tx() as tx:  # the lock is gone: the waiter writes
            tx.execute(_RENAME, {"old": "a1", "new": "a2"})  # (a1 is ISSUED now: no match)
        with waiter.scope() as session:
            session.execute(text("UPDATE fast_items SET name = 'b' WHERE name = 'a1'"))
        assert _names(waiter) == ["b"]
        # The timeout rides on libpq's ``options``: a URL that sets its own keeps them.
        own = Database(f"{url}{'&' if '?' in url else '?'}options=-c%20lock_timeout%3D7s")
        try:
            assert _show_lock_timeout(waiter) == "1s" and _show_lock_timeout(own) == "7s"
        finally:
            own.dispose()
    finally:
        waiter.dispose()
        holder.dispose()
        cluster.drop_database("t_db_lock")


_MIGRATE = "import sys; from sekisho.db import Database; Database(sys.argv[1]).upgrade()"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_migration_waits_for_the_one_under_way(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two first runs at once applied the same migration twice ("duplicate column", exit
    74), SQLite running Alembic's DDL outside a transaction. A process migrating a store now
    waits for the one under way, then finds the schema current."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
        cluster.drop_database("t_db_migrate")
        url = cluster.create_database("t_db_migrate")
    store = Database(url)
    try:
        with db_module.migration_lock(store.engine):
            child = subprocess.Popen(
                [sys.executable, "-c", _MIGRATE, url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                time.sleep(1.5)
                assert child.poll() is None, child.communicate()
                assert store.schema_revisions() is None  # it waited: nothing migrated yet
            except BaseException:
                child.kill()
                child.wait()
                raise
        _out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert set(store.schema_revisions() or ()) == set(db_module.head_revisions())
        # Several at once, nothing held: every one succeeds.
        fresh = url.replace("store.db", "store2.db") if backend == "sqlite" else url
        racers = [
            subprocess.Popen([sys.executable, "-c", _MIGRATE, fresh],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]  # fmt: skip
        for racer in racers:
            _out, err = racer.communicate(timeout=120)
            assert racer.returncode == 0, err
    finally:
        store.dispose()
        if backend == "postgres":
            cluster.drop_database("t_db_migrate")


# -- the SQLite writer queue ------------------------------------------------------------------
def test_a_writer_that_waits_too_long_gets_database_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.db"
    store = Database(f"sqlite:///{path}")
    _META.create_all(store.engine)
    with store.write_tx() as tx:  # creates the lock file
        tx.execute(_INSERT, _item("a"))
    monkeypatch.setattr(db_module, "WRITER_WAIT", 0.3)
    fd = os.open(f"{path}-writer", os.O_RDWR)  # another process's turn, held and not released
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(StoreError, match="busy"), store.write_tx() as tx:
            tx.execute(_INSERT, _item("b"))
        assert 0.25 <= time.monotonic() - started < 5
    finally:
        os.close(fd)
    with store.write_tx() as tx:  # the thread lock was released with the failure
        tx.execute(_INSERT, _item("c"))
    assert _names(store) == ["a", "c"]
    store.dispose()


def test_the_writer_lock_file_is_never_followed_through_a_symlink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sekisho.db")
    path = tmp_path / "store.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    Path(f"{path}-writer").symlink_to(elsewhere)
    store = Database(f"sqlite:///{path}")
    _META.create_all(store.engine)
    with store.write_tx() as tx:  # no lock file: writers queue in SQLite's busy handler
        tx.execute(_INSERT, _item("a"))
    assert elsewhere.read_text() == "not ours"
    assert _names(store) == ["a"]
    assert [r for r in caplog.records if "lock file not used" in r.getMessage()]
    store.dispose()


def _enter_writer_queue(store: Database, result: multiprocessing.Queue[str]) -> None:
    db_module.WRITER_WAIT = 0.3
    assert store._writer is not None
    # The thread lock was copied locked (held by a parent thread that does not exist here);
    # what this checks is the lock file.
    store._writer._thread = threading.Lock()
    try:
        with store._writer or contextlib.nullcontext():
            result.put("entered")
    except StoreError:
        result.put("busy")


def test_a_forked_process_reopens_the_lock_file(tmp_path: Path) -> None:
    """flock belongs to the open file: a descriptor inherited across fork would share the
    parent's lock, so a child reopens the file and really waits for its turn."""
    path = tmp_path / "store.db"
    store = Database(f"sqlite:///{path}")
    _META.create_all(store.engine)
    ctx = multiprocessing.get_context("fork")
    result: multiprocessing.Queue[str] = ctx.Queue()
    with store.write_tx() as tx:  # the parent holds its turn while the child tries
        tx.execute(_INSERT, _item("a"))
        child = ctx.Process(target=_enter_writer_queue, args=(store, result))
        child.start()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    assert result.get(timeout=10) == "busy"
    store.dispose()


def test_migration_0003_backfills_and_downgrades_with_rows_in_place(services: Services) -> None:
    """0003 gives existing CAs the thisUpdate of their newest CRL (so the next one is never
    earlier), and its downgrade works with CRL and certificate rows pointing at the CAs."""
    from alembic import command

    from ca.models import CertificateAuthority, Crl

    def state() -> dict[int, tuple[dt.datetime | None, dt.datetime | None]]:
        with services.db.scope() as session:
            newest = dict(
                session.execute(
                    select(Crl.issuer_id, func.max(Crl.this_update)).group_by(Crl.issuer_id)
                ).all()  # type: ignore[arg-type]
            )
            return {
                ca.id: (ca.crl_this_update, newest.get(ca.id))
                for ca in session.scalars(select(CertificateAuthority))
            }

    services.crls.generate("admin", services.clock())
    before = state()
    assert any(newest is not None for _, newest in before.values())
    cfg = db_module.alembic_config(services.db.engine)
    command.downgrade(cfg, "0002")
    with services.db.engine.connect() as conn:
        assert "crl_this_update" not in {
            c["name"] for c in inspect(conn).get_columns("ca_authorities")
        }
    command.upgrade(cfg, "head")
    after = state()
    assert after.keys() == before.keys()
    for kept, newest in after.values():
        assert kept == newest  # None for a CA without CRLs (the root, until it signs one)


def test_migration_0004_backfills_key_hashes_and_blocks_compromised_keys(
    services: Services,
) -> None:
    """0004 gives every stored certificate its key's hash (from its DER) and blocks the keys
    of certificates already revoked for keyCompromise; its downgrade drops both."""
    from alembic import command
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.models import BlockedKey, Certificate
    from ca.revocation import Reason
    from ca.tbs import spki_sha256
    from tests.ca.helpers import request_for
    from tests.conftest import TEST_ACTOR

    key = ec.generate_private_key(ec.SECP256R1())
    request = dataclasses.replace(request_for("admin-client"), public_key=key.public_key())
    compromised = services.ca.issue(request, TEST_ACTOR)
    services.ca.issue(request_for("device"), TEST_ACTOR)
    services.revoker.revoke("admin", compromised.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)

    def hashes() -> dict[int, str | None]:
        with services.db.scope() as session:
            return dict(session.execute(select(Certificate.id, Certificate.spki_sha256)).all())  # type: ignore[arg-type]

    before = hashes()
    assert before and all(before.values())
    cfg = db_module.alembic_config(services.db.engine)
    command.downgrade(cfg, "0003")
    with services.db.engine.connect() as conn:
        assert "blocked_keys" not in inspect(conn).get_table_names()
        assert "spki_sha256" not in {c["name"] for c in inspect(conn).get_columns("certificates")}
    command.upgrade(cfg, "head")
    assert hashes() == before
    with services.db.scope() as session:
        (blocked,) = session.scalars(select(BlockedKey)).all()
    assert blocked.spki_sha256 == spki_sha256(key.public_key())
    assert blocked.comment and "before migration 0004" in blocked.comment


_COMMITS = """
import sys
from sqlalchemy import text
from sekisho.db import Database
from tests.test_db import _INSERT, _META, _item
store = Database(f"sqlite:///{sys.argv[1]}")
_META.create_all(store.engine)
for n in range(3):
    with store.scope() as session:
        session.execute(text("UPDATE fast_items SET name = name"))
    with store.write_tx(single=n == 0) as tx:
        tx.execute(_INSERT, _item(f"item{n}"))
print("committed")
"""


_STRACE = ("strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_sqlite_syncs_every_commit_before_it_returns(tmp_path: Path) -> None:
    """A commit that a power loss can take back would break the rule the CA stands on: the
    intent row must be on disk before the signature exists, and a certificate handed out or a
    revocation confirmed must not vanish. SQLite's ``synchronous=NORMAL`` in WAL mode syncs
    only at checkpoints; the store must sync the WAL on every commit (seen with strace)."""
    path = tmp_path / "store.db"
    trace = tmp_path / "trace"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [*_STRACE, str(trace), sys.executable, "-c", _COMMITS, str(path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "committed"
    wal_syncs = [line for line in trace.read_text().splitlines() if f"<{path}-wal>" in line]
    # Six write transactions (three through the ORM scope, three prepared) after the tables.
    assert len(wal_syncs) >= 6, trace.read_text()[-2000:]


def test_the_migrated_schema_is_the_models_schema(services: Services) -> None:
    """Alembic's own comparison finds nothing between the models and the database the
    migrations built: no table, column, index or constraint one has and the other lacks."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from sekisho.db import Base

    with services.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migration_0005_indexes_per_ca_work(services: Services) -> None:
    from alembic import command

    cfg = db_module.alembic_config(services.db.engine)
    added = {
        ("certificates", "ix_certificates_issuer_epoch"): ["issuer_id", "status_epoch"],
        ("ocsp_responses", "ix_ocsp_responses_issuer_next_update"): ["issuer_id", "next_update"],
    }

    def indexes() -> dict[tuple[str, str], list[str | None]]:
        with services.db.engine.connect() as conn:
            return {
                (table, str(ix["name"])): list(ix["column_names"])
                for table in ("certificates", "ocsp_responses")
                for ix in inspect(conn).get_indexes(table)
            }

    dropped = {
        ("certificates", "ix_certificates_status_epoch"): ["status_epoch"],
        ("certificates", "ix_certificates_issuer_id"): ["issuer_id"],
        ("ocsp_responses", "ix_ocsp_responses_next_update"): ["next_update"],
    }
    assert added.items() <= indexes().items() and not dropped.keys() & indexes().keys()
    command.downgrade(cfg, "0004")
    assert not added.keys() & indexes().keys() and dropped.items() <= indexes().items()
    command.upgrade(cfg, "head")
    assert added.items() <= indexes().items() and not dropped.keys() & indexes().keys()


def test_migration_0012_stores_crls_with_lz4_on_postgresql(
    services: Services, db_backend: str
) -> None:
    """0012: a CRL's DER is compressed with lz4 on PostgreSQL (pglz took twice the time on a
    50 MB CRL); the downgrade gives the column back its default; a CRL stored either way
    reads back whole. SQLite: nothing to do, nothing done."""
    from alembic import command

    from ca.models import Crl

    cfg = db_module.alembic_config(services.db.engine)

    def compression() -> str | None:
        with services.db.engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT attcompression FROM pg_attribute "
                "WHERE attrelid = 'crls'::regclass AND attname = 'der'"
            ).scalar_one()

    def stored() -> list[bytes]:
        with services.db.read_scope() as session:
            return [bytes(d) for d in session.scalars(select(Crl.der).order_by(Crl.id))]

    before = stored()
    assert before  # init published each CA's CRLs
    if db_backend != "postgres":
        command.downgrade(cfg, "0011")
        command.upgrade(cfg, "head")
        assert stored() == before
        return
    assert compression() == "l"
    command.downgrade(cfg, "0011")
    assert compression() == ""  # the server's default_toast_compression
    command.upgrade(cfg, "head")
    assert compression() == "l"
    assert stored() == before


def test_migration_0006_keeps_one_active_responder_per_ca(services: Services) -> None:
    """A store where the race left two active responders for one CA: the upgrade keeps the
    one whose certificate ends last (the one the signer loader chose) and adds the index."""
    from alembic import command

    from ocsp.models import OcspResponder

    cfg = db_module.alembic_config(services.db.engine)
    command.downgrade(cfg, "0005")
    with services.db.scope() as session:
        current = list(session.scalars(select(OcspResponder).where(OcspResponder.active)))
        assert len(current) == 2  # one per issuing CA
        older = current[0]
        twin = {c.key: getattr(older, c.key) for c in OcspResponder.__table__.columns}
        twin.pop("id")
        twin["not_after"] = older.not_after + dt.timedelta(days=1)
        session.add(OcspResponder(**twin))  # no index yet: a second active one for that CA
    command.upgrade(cfg, "head")
    with services.db.scope() as session:
        active = {
            r.issuer_id: r
            for r in session.scalars(select(OcspResponder).where(OcspResponder.active))
        }
        demoted = session.get(OcspResponder, older.id)
    assert len(active) == 2 and active[older.issuer_id].not_after == twin["not_after"]
    assert demoted is not None and not demoted.active and demoted.deactivated_at is not None
    with pytest.raises(DuplicateKey), services.db.scope() as session:
        session.add(OcspResponder(**{**twin, "not_after": twin["not_after"]}))
    command.downgrade(cfg, "0005")  # and back, for the schema checks of other tests
    command.upgrade(cfg, "head")


def test_migration_0007_guards_the_journal_and_its_downgrade_lifts_the_guard(
    services: Services,
) -> None:
    """0007 adds the append-only triggers (and on PostgreSQL their function); its downgrade
    removes them all, and the upgrade after it guards the journal again."""
    from alembic import command

    cfg = db_module.alembic_config(services.db.engine)
    postgres = services.db.engine.dialect.name == "postgresql"
    change = "UPDATE audit_checkpoints SET key_ref = key_ref WHERE seq = 1"

    def guard() -> list[str]:
        with services.db.engine.connect() as conn:
            if postgres:
                found = conn.execute(
                    text(
                        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal UNION ALL "
                        "SELECT proname FROM pg_proc WHERE proname LIKE 'sekisho_%'"
                    )
                )
            else:
                found = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            return sorted(found.scalars())

    # At the head: 0007's guard of records and checkpoints, and 0008's of the tombstones
    # (on PostgreSQL the records' DELETE has a trigger of its own there).
    tables = ("audit_checkpoints", "audit_purged", "audit_records")
    if postgres:
        expected = [f"{t}_{w}" for t in tables for w in ("append_only", "no_truncate")]
        expected += ["audit_purged_for_a_record", "audit_records_purge_only"]
        expected += ["sekisho_append_only", "sekisho_purge_only", "sekisho_tombstone_for_a_record"]
        expected += ["audit_records_not_purged", "sekisho_seq_not_purged"]
    else:
        expected = [f"{t}_{w}" for t in tables for w in ("no_delete", "no_replace", "no_update")]
    assert guard() == sorted(expected)
    with pytest.raises(StoreError), services.db.scope() as session:
        session.execute(text(change))
    command.downgrade(cfg, "0006")
    assert guard() == []
    with services.db.scope() as session:
        assert session.execute(text(change)).rowcount == 1
    command.upgrade(cfg, "head")
    assert guard() == sorted(expected)
    with pytest.raises(StoreError), services.db.scope() as session:
        session.execute(text(change))


def test_migration_0009_adds_the_frontier_column_and_keeps_the_journal_guarded(
    services: Services,
) -> None:
    """0009 adds ``audit_checkpoints.merkle_frontier`` in place: the append-only triggers of
    0007 stay (a table rebuild on SQLite would drop them), and its downgrade drops only the
    column."""
    from alembic import command

    cfg = db_module.alembic_config(services.db.engine)

    def columns() -> list[str]:
        with services.db.engine.connect() as conn:
            return [c["name"] for c in inspect(conn).get_columns("audit_checkpoints")]

    def refused() -> bool:
        try:
            with services.db.scope() as session:
                session.execute(text("UPDATE audit_checkpoints SET key_ref = key_ref"))
        except StoreError:
            return True
        return False

    assert "merkle_frontier" in columns() and refused()
    command.downgrade(cfg, "0008")
    assert "merkle_frontier" not in columns() and refused()
    command.upgrade(cfg, "head")
    assert columns()[-1] == "merkle_frontier" and refused()
    with services.db.scope() as session:
        stored = session.execute(text("SELECT merkle_frontier FROM audit_checkpoints")).scalars()
        assert set(stored) == {None}  # rows written before keep none: rebuilt from record 1


def test_a_postgresql_server_that_never_answers_fails_within_the_connect_timeout() -> None:
    """A server that accepts the TCP connection and then says nothing (a hung server, a
    middlebox swallowing the traffic): the operation fails with StoreError once
    ``CONNECT_TIMEOUT`` has passed, instead of hanging. Before: no timeout at all (libpq's
    default), so an OCSP lookup or a revocation waited for good."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nothing is ever accepted
        port = listener.getsockname()[1]
        store = Database(f"postgresql+psycopg://sekisho@127.0.0.1:{port}/sekisho")
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                _one(store)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)
            else:
                outcome.append(None)

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(timeout=30)  # CONNECT_TIMEOUT is 5 s
        try:
            assert not worker.is_alive(), "still waiting for a server that never answers"
            assert len(outcome) == 1 and isinstance(outcome[0], StoreError), outcome
        finally:
            store.dispose()


def test_a_new_store_beside_tables_not_sekishos_is_still_migrated(tmp_path: Path) -> None:
    """A database without alembic_version is a new store, whatever other tables it holds (an
    extension's, another application's in a shared database): it is migrated, as before the
    check for damaged bookkeeping, which took it for an emptied alembic_version ("names no
    migration, yet the store has tables") and refused to create the schema."""
    path = tmp_path / "shared.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)")
        conn.commit()
    engine = db_module.make_engine(f"sqlite:///{path}")
    try:
        migrated = db_module.upgrade(engine)
        heads = tuple(sorted(db_module.head_revisions()))
        assert migrated is not None and migrated.before == () and migrated.after == heads
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("stamped", "named"),
    [
        ("", "which is no revision"),
        ("base", "which is no revision"),
        ("head", "which is no revision"),
        ("heads", "which is no revision"),
        ("001", "does not know"),  # a prefix of 0010 and 0011: no revision of ours either
    ],
)
def test_an_alembic_version_naming_no_revision_is_damaged_bookkeeping(
    tmp_path: Path, stamped: str, named: str
) -> None:
    """alembic_version edited to a name Alembic resolves itself (or cannot): "base" had 0001
    applied over the existing tables (a multi-line CREATE TABLE error), "head" and "heads"
    passed for the schema, "" failed with an AssertionError (exit 70). Each is named, in one
    line, and nothing is migrated."""
    path = tmp_path / "store.db"
    engine = db_module.make_engine(f"sqlite:///{path}")
    try:
        db_module.upgrade(engine)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("UPDATE alembic_version SET version_num = ?", (stamped,))
            conn.commit()
        problem = db_module.schema_problem((stamped,), True)
        assert problem is not None and named in problem, problem
        with pytest.raises(StoreError) as refused:
            db_module.upgrade(engine)
        assert refused.value.message == problem
        assert db_module.current_revisions(engine) == (stamped,)
    finally:
        engine.dispose()
