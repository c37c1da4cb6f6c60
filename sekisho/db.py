"""Database kernel: one declarative ``Base``, engines, one-transaction scopes, migrations.

SQLite (the embedded default) runs in WAL mode and opens every transaction with
``BEGIN IMMEDIATE``: writers queue on the database lock at the start instead of failing to
upgrade a read lock half-way (the classic "database is locked" under concurrency).
PostgreSQL uses the same code; serialisation points take row locks (``FOR UPDATE``).

A ``Database(url, read_only=True)`` never writes: SQLite is opened with ``mode=ro`` (so that
it works on a directory nobody may write, such as an auditor's read-only copy), PostgreSQL
sessions are read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import functools
import itertools
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Enum,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from sekisho.clock import as_utc
from sekisho.errors import ConfigError, DuplicateKey, StoreError
from sekisho.files import exclusive_lock

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
READ_ONLY = "sekisho_read_only"  # execution option set by Database.read_scope()
# Key of ``Table.info``: the privileges the application role is granted on the table when the
# schema has an owner of its own (``sekisho.roles``); other tables get ``roles.READ_WRITE``.
APP_PRIVILEGES = "app_privileges"
# A pooled PostgreSQL connection idle this long (seconds) is pinged before it is handed out.
IDLE_PING = 5.0
log = logging.getLogger("sekisho.db")


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
        return None if value is None else as_utc(value)


def str_enum(cls: type[enum.StrEnum], length: int) -> Enum:
    """A portable enum column storing the members' *values* (readable in SQL)."""
    return Enum(
        cls, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e]
    )


class Base(DeclarativeBase):
    pass


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite database URL names; None for another database, an in-memory one or
    a ``file:`` URI."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    return None if database.startswith("file:") else Path(database)


def read_only_sqlite_uri(path: Path) -> tuple[str, bool]:
    """A URI that opens the SQLite database ``path`` without writing, and whether it is opened
    as immutable.

    ``mode=ro`` first: a WAL database opened so needs its ``-shm`` file, present (a writer has
    the database open, or the file was copied along) or created beside it. In a directory that
    cannot be written (a read-only mount, an auditor's copy) with no ``-shm`` file, it cannot be
    opened so. Then no connection has the database open (each one keeps the ``-shm`` file), and
    ``immutable=1`` reads it: no locks, correct only while nothing writes the file, so not when
    a ``-wal`` file holds changes an immutable reader would not see (refused: StoreError)."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise StoreError(f"cannot read the database {path}: {exc.strerror or exc}") from None
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return uri, False
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorname != "SQLITE_CANTOPEN":
            raise StoreError(f"cannot read the database {path}: {exc}") from None
    shm, wal = Path(f"{path}-shm"), Path(f"{path}-wal")
    if os.path.lexists(shm):
        raise StoreError(f"cannot read the database {path}: {shm.name} cannot be opened")
    if os.path.lexists(wal) and wal.stat().st_size > 0:
        raise StoreError(
            f"cannot read the database {path} read-only: {wal.name} holds changes and there "
            f"is no {shm.name} file, nor can one be created there; copy the database with both "
            "files, or read the copy in a directory this user may write"
        )
    return f"{uri}&immutable=1", True


def sqlite_files_state(path: Path) -> tuple[tuple[int, ...] | None, ...]:
    """What a write to the SQLite database ``path`` changes: the identity, size and times of
    the file and of its ``-wal`` and ``-shm`` files (None for one that does not exist). A
    writer that opens the database creates the other two; a checkpoint rewrites the file."""

    def state(name: str) -> tuple[int, ...] | None:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the database {path}: {exc.strerror or exc}") from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    return tuple(state(f"{path}{suffix}") for suffix in ("", "-wal", "-shm"))


CONNECT_TIMEOUT = 5  # seconds (libpq connect_timeout)
_PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _pg_connect_defaults() -> dict[str, Any]:
    """libpq parameters, with a lock timeout as SQLite's: a statement that waits WRITER_WAIT
    for a row or table lock (a process stopped, or a signer hung, while holding one) fails
    with "database busy" instead of waiting for good, and every operation behind it with it."""
    return {**_PG_CONNECT_DEFAULTS, "options": f"-c lock_timeout={round(WRITER_WAIT * 1000)}"}


def make_engine(
    url: str, *, echo: bool = False, read_only: bool = False, sqlite_uri: str | None = None
) -> Engine:
    """``read_only``: every transaction only reads (SQLite: plain ``BEGIN``, the journal mode
    left as it is; PostgreSQL: read-only sessions). ``sqlite_uri``: connect to this SQLite URI
    (``read_only_sqlite_uri``) instead of the file the URL names."""
    if url.startswith("sqlite"):
        options: dict[str, Any] = {}
        if sqlite_uri is not None:
            options["creator"] = functools.partial(
                sqlite3.connect, sqlite_uri, uri=True, timeout=60, check_same_thread=False
            )
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8,
            max_overflow=8,
            **options,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is DEFERRED).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit is on disk (the WAL is synced) before it returns. NORMAL would
            # lose the last commits on power failure or a kernel crash: an intent row that
            # must exist before a signature, a certificate already handed out, a revocation
            # already confirmed (docs/decisions.md, Store).
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()
            # SQLite's lower() folds ASCII only; DN search (ILIKE, which SQLAlchemy writes as
            # lower() LIKE lower() here) must ignore case in any script, as PostgreSQL does
            # with a UTF-8 LC_CTYPE.
            dbapi_conn.create_function("lower", 1, _unicode_lower, deterministic=True)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Readers (read_scope) take no write lock: in WAL mode they never wait for writers.
            reads = read_only or conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if reads else "BEGIN IMMEDIATE")

        return engine
    # Not pool_pre_ping: it costs a round trip on every checkout (three per issuance). A
    # connection is pinged only when it sat idle in the pool for IDLE_PING seconds, the case
    # where a server restart or a firewall may have dropped it; a dead one is replaced before
    # the caller sees it. A connection that dies while busy fails that one operation with
    # StoreError, and SQLAlchemy then invalidates the rest of the pool.
    given = make_url(url).query
    engine = create_engine(
        url,
        echo=echo,
        pool_size=10,
        max_overflow=10,
        pool_recycle=1800,
        # A server that does not answer (blackholed, a firewall dropping packets) fails the
        # operation with StoreError instead of hanging it for the kernel's TCP timeouts
        # (minutes): connecting within CONNECT_TIMEOUT s; a connection whose data goes
        # unacknowledged for TCP_USER_TIMEOUT_MS, or idle and unanswered by keepalives, is
        # dropped. Whatever the URL sets itself is left as it is.
        connect_args={k: v for k, v in _pg_connect_defaults().items() if k not in given},
    )

    if read_only:

        @event.listens_for(engine, "connect")
        def _read_only_session(dbapi_conn: Any, _record: Any) -> None:
            with contextlib.closing(dbapi_conn.cursor()) as cur:
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_conn.commit()

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING:
            return
        try:
            with contextlib.closing(dbapi_conn.cursor()) as cur:
                cur.execute("SELECT 1")
            # The driver opened a transaction for the ping: end it, so the caller gets the
            # connection idle (autocommit cannot be switched on inside a transaction).
            dbapi_conn.rollback()
        except Exception as exc:  # the driver's own error classes: any failure means dead
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"idle connection dropped: {type(exc).__name__}") from exc

    return engine


_PG_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout expired
PG_INSUFFICIENT_PRIVILEGE = "42501"


def _pg_message(driver_exc: BaseException | None) -> str:
    """PostgreSQL's own one-line message of a driver error ("permission denied for table x")."""
    diag = getattr(driver_exc, "diag", None)
    return str(getattr(diag, "message_primary", None) or type(driver_exc).__name__)


def _store_error(driver_exc: BaseException | None, named: BaseException) -> StoreError:
    """The StoreError for a driver error (``named``: the exception whose class the message
    names). A lock wait that ran out is "database busy", as on SQLite; a privilege the
    database role lacks is named (PostgreSQL's message names the object, never a value)."""
    sqlstate = getattr(driver_exc, "sqlstate", None)
    if sqlstate == _PG_LOCK_NOT_AVAILABLE:
        return StoreError("database busy: another session held a lock too long")
    if sqlstate == PG_INSUFFICIENT_PRIVILEGE:
        return StoreError(f"database error: {_pg_message(driver_exc)} ({ROLE_HINT})")
    if driver_exc is not None and _unique_violation(driver_exc):
        return DuplicateKey(f"database error: {named.__class__.__name__}")
    # The driver's code for it (SQLITE_FULL, SQLITE_IOERR_WRITE; PostgreSQL's SQLSTATE, 53100
    # for a full disk): a name from a fixed list, never data. "OperationalError" alone left
    # the operator of a full disk guessing.
    code = getattr(driver_exc, "sqlite_errorname", None) or sqlstate
    named_code = (
        isinstance(code, str)
        and 0 < len(code) <= 40
        and code.isascii()
        and code.replace("_", "").isalnum()
    )
    suffix = f" ({code})" if named_code else ""
    return StoreError(f"database error: {named.__class__.__name__}{suffix}")


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Driver errors (connection lost, lock timeout, constraint) become StoreError."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        raise _store_error(exc.orig, exc) from exc


class UndecodableText(bytes):
    """A SQLite TEXT value that is not UTF-8, as read inside ``undecodable_text(keep=True)``.
    SQLite does not check what it stores as text: only an edit of the file writes one."""


def _keep_undecodable(raw: bytes) -> str | UndecodableText:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return UndecodableText(raw)


def _refuse_undecodable(raw: bytes) -> str:
    return raw.decode("utf-8")  # UnicodeDecodeError, a ValueError, for a value that is not


def undecodable_argument(exc: BaseException) -> bool:
    """``exc`` is SQLite failing a statement because a Python function of ours (``lower``,
    the only one: it raises nothing itself) was given TEXT that is not UTF-8. sqlite3
    decodes the arguments before the call and reports only "user-defined function raised
    exception", with no row; the DN filter of a journal search meets it on a tampered row."""
    orig = getattr(exc, "orig", None)
    return isinstance(orig, sqlite3.OperationalError) and str(orig) == (
        "user-defined function raised exception"
    )


@contextlib.contextmanager
def undecodable_text(session: Session, *, keep: bool) -> Iterator[None]:
    """How SQLite TEXT that is not UTF-8 is read in this block, on the session's connection.

    sqlite3 fails the whole statement with a driver error (a store error, exit 74), naming
    neither the row nor the column. Here such a value comes back as ``UndecodableText``
    (``keep``: for a reader that reports it at its row), or fails the statement with
    ``UnicodeDecodeError`` (a ValueError, which readers of a tampered row already expect).
    PostgreSQL refuses invalid UTF-8 on the way in: nothing changes there."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        yield
        return
    raw: Any = conn.connection.driver_connection  # the sqlite3 connection
    previous = raw.text_factory
    raw.text_factory = _keep_undecodable if keep else _refuse_undecodable
    try:
        yield
    finally:
        raw.text_factory = previous  # the pooled connection goes back as it came


WRITER_WAIT = 60.0  # seconds a hot-path writer queues before "database busy" (busy_timeout)


class _WriterQueue:
    """Mutual exclusion for SQLite hot-path writers: a thread lock, plus ``flock`` on
    ``<db>-writer`` across processes. Only an ordering aid: SQLite's own locks still guarantee
    correctness, and writers that do not queue here (ORM scopes, other tools) fall back to the
    busy handler. A writer that cannot get its turn within WRITER_WAIT fails with StoreError,
    as it would in SQLite's busy handler."""

    def __init__(self, database: str | None) -> None:
        self._thread = threading.Lock()
        usable = database and database != ":memory:" and not database.startswith("file:")
        self._path: str | None = f"{database}-writer" if usable else None
        self._fd: int | None = None
        self._pid = 0
        self._held: int | None = None

    def _open(self) -> int | None:
        if self._path is None:
            return None
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        if self._fd is not None:
            # Inherited across fork: a lock on it would be shared with the parent.
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._path, flags, 0o600)
        except OSError as exc:
            self._give_up(f"cannot open it ({exc.__class__.__name__})")
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            self._give_up("it is not a regular file of this user")
            return None
        self._fd, self._pid = fd, os.getpid()
        return fd

    def _give_up(self, why: str) -> None:
        log.warning(
            "SQLite writer lock file not used; writers queue in SQLite's busy handler",
            extra={"path": self._path, "reason": why},
        )
        self._path = None

    def __enter__(self) -> None:
        if not self._thread.acquire(timeout=WRITER_WAIT):
            raise StoreError("database busy: another writer in this process did not finish")
        try:
            fd = self._open()
            if fd is not None:
                _flock_within(fd, WRITER_WAIT)
                self._held = fd
        except BaseException:
            self._thread.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        if self._held is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._held, fcntl.LOCK_UN)
            self._held = None
        self._thread.release()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _flock_within(fd: int, seconds: float) -> None:
    """``flock(LOCK_EX)`` with a deadline (the blocking call has none): short sleeps, 50 µs
    doubling to 2 ms, so the next writer starts soon after the holder lets go."""
    deadline = time.monotonic() + seconds
    delay = 0.00005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise StoreError("database busy: another process held the writer lock too long")
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


class Database:
    """An engine plus a session factory; ``scope()`` is one transaction."""

    def __init__(self, url: str, *, read_only: bool = False, owner_url: str | None = None) -> None:
        """``read_only``: nothing is written through this object (see ``make_engine``); a
        SQLite file is opened with ``read_only_sqlite_uri``, and ``immutable`` says whether it
        had to be opened as immutable. ``owner_url`` (PostgreSQL): the schema owner's
        connection, through which ``upgrade`` migrates and grants (never kept open; a store
        opened read-only never migrates and ignores it)."""
        self.url = url
        self.read_only = read_only
        self.owner_url = None if read_only else owner_url or None
        self.migrated: Migrated | None = None  # what upgrade() changed, if anything
        self.immutable = False
        # An immutable reader takes no lock and trusts its page cache: a writer that starts
        # meanwhile (e.g. the service, seeing the same directory read-write) gives it torn
        # reads, which `audit verify` took for tampering. Each transaction checks afterwards
        # that the files are as they were when opened (``check_unchanged``).
        self._immutable_path: Path | None = None
        self._immutable_state: tuple[tuple[int, ...] | None, ...] = ()
        uri = None
        path = sqlite_file(url) if read_only else None
        if path is not None:
            state = sqlite_files_state(path)
            uri, self.immutable = read_only_sqlite_uri(path)
            if self.immutable:
                self._immutable_path, self._immutable_state = path, state
        self.engine = make_engine(url, read_only=read_only, sqlite_uri=uri)
        self._sqlite = is_sqlite(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Hot-path writers on SQLite queue here rather than in SQLite's busy handler, which
        # polls with sleeps of up to 100 ms: threads on a lock, processes on a lock file.
        writes = self._sqlite and not read_only
        self._writer = _WriterQueue(self.engine.url.database) if writes else None

    @contextlib.contextmanager
    def scope(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error.

        Driver errors become StoreError so callers (web, CLI) map them once; domain errors
        raised inside pass through unchanged after the rollback.
        """
        session = self._sessions()
        try:
            with self._unchanged(), store_errors():
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.close()

    @contextlib.contextmanager
    def read_scope(self, *, snapshot: bool = False) -> Iterator[Session]:
        """A transaction that only reads; it is never committed (closing the session ends it
        with a rollback, and the objects read stay loaded, detached). On SQLite it opens with a
        plain (deferred) ``BEGIN`` instead of ``BEGIN IMMEDIATE``: readers see a consistent
        snapshot and never queue behind writers (WAL). ``snapshot``: on PostgreSQL too, every
        statement sees the same snapshot (``REPEATABLE READ``), for a reader that compares what
        several statements read. Driver errors become StoreError."""
        with self._unchanged(), store_errors(), self.engine.connect() as conn:
            options: dict[str, Any] = {READ_ONLY: True}
            if snapshot and not self._sqlite:
                options["isolation_level"] = "REPEATABLE READ"
            conn.execution_options(**options)
            with self._sessions(bind=conn) as session:
                yield session

    def check_unchanged(self) -> None:
        """Of a database read as immutable: a StoreError (exit 74) once a process has written
        it since it was opened, for then what was read may be torn (pages of before and after
        the write, in a listing or a verification) and must not be reported."""
        path = self._immutable_path
        if path is None or sqlite_files_state(path) == self._immutable_state:
            return
        raise StoreError(
            f"the database {path} was written while it was read as an immutable file (a "
            "process opened it meanwhile): what was read cannot be trusted; run the command "
            "again"
        )

    @contextlib.contextmanager
    def _unchanged(self) -> Iterator[None]:
        """``check_unchanged`` when the block ends, however it ends: a verdict reached on torn
        reads (a chain "broken" by them) gives way to the StoreError."""
        if self._immutable_path is None:
            yield
            return
        try:
            yield
        finally:
            self.check_unchanged()

    @contextlib.contextmanager
    def connection_scope(self) -> Iterator[Connection]:
        """One transaction on a bare Core connection, for hot paths that run plain statements.

        Same contract as ``scope()`` (commit on success, roll back on any error, driver errors
        become StoreError, domain errors pass through) without a Session's bookkeeping.
        """
        with store_errors(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def write_tx(self, *, single: bool = False) -> Iterator[WriteTx]:
        """One write transaction run on the driver's connection with ``Prepared`` statements:
        the hot paths (issuance), where SQLAlchemy's per-statement work cost more than the
        database's. Same contract as ``connection_scope()``: commit on success, roll back on
        any error, driver errors become StoreError (a unique-constraint violation becomes
        DuplicateKey), domain errors pass through; a dead connection is dropped from the pool.

        ``single``: the transaction is one statement, which PostgreSQL then runs in autocommit
        (one round trip instead of BEGIN, statement, COMMIT); a second statement is refused.
        There the statement is durable as soon as it ran: an error raised after it in the
        block does not undo it (on SQLite it does). Use it where that is the point (the
        issuance intent).
        """
        with self._writer or contextlib.nullcontext():
            with store_errors():
                fairy = self.engine.raw_connection()  # pool checkout; checkout events run
            autocommit = single and not self._sqlite
            tx = None
            try:
                if autocommit:
                    _set_autocommit(fairy, True)
                tx = WriteTx(fairy, self.engine.dialect, single=single)
                if self._sqlite:
                    tx.cursor.execute("BEGIN IMMEDIATE")
                yield tx
                if not autocommit:
                    self._check_still_open(fairy, tx)
                    fairy.commit()
            except BaseException as exc:
                tx_rollback(fairy)
                dialect = self.engine.dialect
                driver_error = dialect.loaded_dbapi.Error
                # The driver's error, raised as is or wrapped by a domain error (the journal
                # turns any failure into AuditError): a dead connection leaves the pool, and
                # the pool's other connections are checked before their next use.
                cause = exc if isinstance(exc, driver_error) else exc.__cause__
                if isinstance(cause, driver_error):
                    cursor = tx.cursor if tx is not None else None
                    if dialect.is_disconnect(cause, fairy, cursor):
                        # (What SQLAlchemy's own Connection does on a disconnect.)
                        self.engine.pool._invalidate(fairy, cause)
                if isinstance(exc, driver_error):
                    if _unique_violation(exc):
                        raise DuplicateKey(f"database error: {exc.__class__.__name__}") from exc
                    raise _store_error(exc, exc) from exc
                raise
            finally:
                if tx is not None:
                    tx.close()
                if autocommit and fairy.is_valid:
                    try:
                        _set_autocommit(fairy, False)
                    except (self.engine.dialect.loaded_dbapi.Error, StoreError) as exc:
                        fairy.invalidate(exc)  # never pool a connection left in autocommit
                fairy.close()  # back to the pool, which resets it

    def _check_still_open(self, fairy: Any, tx: WriteTx) -> None:
        """Refuse to "commit" a transaction the database already ended: a COMMIT there would
        silently do nothing (SQLite) or roll back (PostgreSQL), and the caller would believe
        its writes were stored."""
        if not tx.executed:
            return
        driver = fairy.driver_connection
        if self._sqlite:
            open_ = bool(driver.in_transaction)
        else:
            open_ = driver.info.transaction_status.name == "INTRANS"
        if not open_:
            raise StoreError("database error: the transaction was lost")

    def upgrade(self) -> Migrated | None:
        """Migrate to the newest schema; what changed (also kept in ``migrated``, for the
        journal once it is open), None when nothing. With ``owner_url``: through an engine of
        the owner's, made for this call and disposed of after it (no other connection of the
        process acts as the owner), and then the role this object connects as is granted what
        Sekisho uses (``sekisho.roles``), every time, so that tables a migration adds are
        covered."""
        if self.owner_url is None:
            return self._migrated(upgrade(self.engine))
        from sekisho import roles

        with store_errors(), self.engine.connect() as conn:
            app = roles.whoami(conn)
        owner_engine = make_engine(self.owner_url)
        try:
            with store_errors(), owner_engine.connect() as conn:
                roles.check_pair(roles.whoami(conn), app)
                target = conn.execute(text("SELECT current_schema()")).scalar_one()
            # Before the owner migrates or grants: what the application's role planted in a
            # schema it may create in would run as the owner there (docs/decisions.md, Store);
            # the owner's own schema too, where a first migration creates the tables.
            with store_errors(), self.engine.connect() as conn:
                if roles.escapes(conn, [target]):
                    found = roles.problems(conn, separate=True, schemas=[target])
                    raise roles.refusal(app.name, found, separate=True)
            return self._migrated(upgrade(owner_engine, grant_to=app.name))
        finally:
            owner_engine.dispose()

    def _migrated(self, result: Migrated | None) -> Migrated | None:
        if result is not None:
            self.migrated = result
        return result

    def check_roles(self, *, regrant: bool = False) -> None:
        """PostgreSQL: a ConfigError (exit 78) unless the role this object connects as holds
        every privilege Sekisho uses on the tables there are and, with ``owner_url`` or when
        another role owns the journal (two roles, served without the owner's URL), nothing
        more (``sekisho.roles.problems``). ``regrant``, with ``owner_url``: a role found
        wanting is granted again first (by ``upgrade``, which also migrates a schema that is
        behind, as the command would next). Run before anything reads the tables: a missing
        privilege is a settings error, not a failed read."""
        if self._sqlite:
            return
        from sekisho import roles

        separate = self.owner_url is not None or self.journal_owned_by_another()
        role, found = self._role_problems(separate)
        if found and regrant and self.owner_url is not None:
            self.upgrade()
            role, found = self._role_problems(separate)
        if found:
            # (Only grants missing: the one-role wording, which says how to grant them.)
            surplus = not all(": lacks " in problem for problem in found)
            raise roles.refusal(role, found, separate=surplus)

    def journal_owned_by_another(self) -> bool:
        """The journal's records belong to a role other than this connection's (two roles):
        then what the role may do beyond the grants is checked without the owner's URL too
        (a role later made a member of the owner served on unchecked)."""
        from sekisho import roles

        with store_errors(), self.engine.connect() as conn:
            return roles.journal_owned_by_another(conn)

    def _role_problems(self, separate: bool) -> tuple[str, list[str]]:
        from sekisho import roles

        with store_errors(), self.engine.connect() as conn:
            return roles.whoami(conn).name, roles.problems(conn, separate=separate)

    def schema_revisions(self) -> tuple[str, ...] | None:
        """The migrations the store is at; None when it has no schema (never initialised)."""
        with self._unchanged(), store_errors(), self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            return _stamped(conn)

    def has_tables(self) -> bool:
        """Whether the store holds tables besides ``alembic_version`` (read only)."""
        with self._unchanged(), store_errors(), self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            return has_tables(conn)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._writer is not None:
            self._writer.close()


_SQLITE_UNIQUE = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


def _unique_violation(exc: BaseException) -> bool:
    """A unique or primary-key violation (not any integrity error: a foreign key or NOT NULL
    failure is a bug or a vanished row, and must not look like a key collision)."""
    if getattr(exc, "sqlstate", None) == "23505":  # psycopg: unique_violation
        return True
    return getattr(exc, "sqlite_errorname", None) in _SQLITE_UNIQUE


def _set_autocommit(fairy: Any, on: bool) -> None:
    driver = fairy.driver_connection
    if driver is None:
        raise StoreError("database error: the connection is closed")
    driver.autocommit = on


def tx_rollback(fairy: Any) -> None:
    """Roll back, ignoring a failure (a dead connection is invalidated by the caller)."""
    with contextlib.suppress(Exception):
        fairy.rollback()


class Prepared:
    """A Core statement compiled once per dialect and run on the driver's cursor by
    ``WriteTx``. ``keys`` are the parameters a caller passes; every other bound value in the
    statement (literals such as ``status == 'reserved'``) is fixed at compile time. Values go
    through the column types' bind processors, so rows read back through the ORM are the
    same as if SQLAlchemy had written them."""

    def __init__(
        self,
        statement: Any,
        keys: Sequence[str],
        *,
        columns: bool = False,
        by_dialect: Callable[[str], Any] | None = None,
    ) -> None:
        """``columns``: ``statement`` is a bare ``insert(table)`` / ``update(table)`` and
        ``keys`` are the columns it sets (compiled with only those columns). ``by_dialect``
        builds the statement for a dialect name instead (upserts differ per dialect)."""
        self.statement = statement
        self.by_dialect = by_dialect
        self.keys = tuple(keys)
        self.columns = columns
        self._plans: dict[str, _Plan] = {}

    def plan(self, dialect: Dialect) -> _Plan:
        found = self._plans.get(dialect.name)
        if found is None:
            found = self._plans[dialect.name] = _Plan.compile(self, dialect)
        return found


class _Plan:
    """What one dialect runs for a ``Prepared``: SQL text, how to build its parameters, and
    how to convert the columns it returns."""

    def __init__(
        self,
        sql: str,
        positional: bool,
        binds: Sequence[tuple[str, str | None, Any, Callable[[Any], Any] | None]],
        results: Sequence[Callable[[Any], Any] | None],
    ) -> None:
        self.sql = sql
        self.positional = positional
        self.binds = tuple(binds)  # (bind name, caller's key or None, fixed value, processor)
        self.results = tuple(results)

    @classmethod
    def compile(cls, prepared: Prepared, dialect: Dialect) -> _Plan:
        statement = prepared.by_dialect(dialect.name) if prepared.by_dialect else prepared.statement
        kwargs: dict[str, Any] = {"column_keys": list(prepared.keys)} if prepared.columns else {}
        compiled = statement.compile(dialect=dialect, **kwargs)
        if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
            # SQLAlchemy computes those per execution; a plan would freeze them (as NULL).
            raise ValueError("Prepared statements take Python-side column defaults as keys")
        names = list(compiled.positiontup or []) if compiled.positional else list(compiled.binds)
        if getattr(compiled, "escaped_bind_names", None):
            raise ValueError("Prepared statements need plain bind names")
        binds = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name in prepared.keys:
                binds.append((name, name, None, processor))
            elif bind.callable is None and not bind.required:
                value = bind.value
                binds.append((name, None, processor(value) if processor else value, None))
            else:
                raise ValueError(f"statement parameter {name!r} is not among the keys")
        missing = set(prepared.keys) - set(names)
        if missing:
            raise ValueError(f"keys not used by the statement: {sorted(missing)}")
        # RETURNING columns, or a SELECT's columns (none for a plain INSERT/UPDATE).
        returned: Sequence[Any] = (
            getattr(statement, "_returning", None)
            or getattr(statement, "selected_columns", None)
            or ()
        )
        results = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in returned
        ]
        return cls(str(compiled), compiled.positional, binds, results)

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        out = [
            (
                name,
                fixed
                if key is None
                else (processor(values[key]) if processor is not None else values[key]),
            )
            for name, key, fixed, processor in self.binds
        ]
        if self.positional:
            return tuple(value for _, value in out)
        return dict(out)

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            fn(value) if fn is not None else value
            for fn, value in zip(self.results, raw, strict=True)
        )


def stream_raw(
    conn: Connection, prepared: Prepared, values: Mapping[str, Any], batch: int
) -> Iterator[list[Any]]:
    """The rows of a read in ``conn``'s transaction, ``batch`` at a time, as the driver gives
    them: no result processing (a caller that reads the stored form itself, such as the full
    CRL's 10^6 rows, where SQLAlchemy's result streaming cost a tenth of the build). On
    PostgreSQL through a server-side cursor, so the rows stay on the server until fetched; on
    SQLite the statement's own stepping. Driver errors become StoreError."""
    plan = prepared.plan(conn.dialect)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    driver: Any = conn.connection.driver_connection
    transaction = conn.get_transaction()
    cursor = None
    try:
        if conn.dialect.name == "postgresql":
            cursor = driver.cursor(name=f"sekisho_stream_{next(_STREAMS)}")
        else:
            cursor = driver.cursor()
        cursor.execute(plan.sql, plan.parameters(values))
        while rows := cursor.fetchmany(batch):
            yield rows
    except dbapi_error as exc:
        # (A dead connection is invalidated by SQLAlchemy when the transaction's rollback
        # meets it: the pool does not hand it out again.)
        raise _store_error(exc, exc) from exc
    finally:
        # Only in its own transaction: a stream closed late (collected after the read ended)
        # would send its CLOSE into whatever transaction the pooled connection runs by then,
        # fail there, and leave that one aborted, to roll back at its COMMIT without a word.
        # The end of its own transaction closed the server's cursor already.
        if cursor is not None and not conn.closed and conn.get_transaction() is transaction:
            with contextlib.suppress(dbapi_error):
                cursor.close()


_STREAMS = itertools.count(1)  # names of server-side cursors, one per stream in a process


class WriteTx:
    """The transaction ``Database.write_tx()`` hands out: ``Prepared`` statements on one
    driver cursor."""

    def __init__(self, fairy: Any, dialect: Dialect, *, single: bool = False) -> None:
        """``fairy``: a pooled DBAPI connection, already in a transaction (``write_tx``) or
        the one under a SQLAlchemy ``Connection`` (see ``on()``). ``single``: at most one
        statement (it may run in autocommit)."""
        self.dialect = dialect
        self.cursor = fairy.cursor()
        self.single = single
        self.executed = 0  # statements sent

    def _run(self, prepared: Prepared, values: Mapping[str, Any] | None) -> _Plan:
        if self.single and self.executed:
            raise RuntimeError("a single-statement transaction cannot run a second statement")
        plan = prepared.plan(self.dialect)
        self.executed += 1
        self.cursor.execute(plan.sql, plan.parameters(values or {}))
        return plan

    @classmethod
    @contextlib.contextmanager
    def on(cls, conn: Connection) -> Iterator[WriteTx]:
        """Prepared statements inside a SQLAlchemy connection's own transaction."""
        tx = cls(conn.connection, conn.dialect)
        try:
            yield tx
        finally:
            tx.close()

    def execute(self, prepared: Prepared, values: Mapping[str, Any] | None = None) -> int:
        """Run a statement; returns the number of rows it changed."""
        self._run(prepared, values)
        if self.cursor.description is not None:
            # Rows it returns (RETURNING) are read: SQLite cannot commit a statement in progress.
            self.cursor.fetchall()
        return int(self.cursor.rowcount)

    def first(
        self, prepared: Prepared, values: Mapping[str, Any] | None = None
    ) -> tuple[Any, ...] | None:
        """Run a statement that returns rows (SELECT, RETURNING); the first row, converted."""
        plan = self._run(prepared, values)
        raw = self.cursor.fetchone()
        if raw is None:
            return None
        # Drain (PostgreSQL may hold further rows; SQLite steps to the end of the statement).
        self.cursor.fetchall()
        return plan.row(raw)

    def all(
        self, prepared: Prepared, values: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a statement that returns rows; every row, converted."""
        plan = self._run(prepared, values)
        return [plan.row(raw) for raw in self.cursor.fetchall()]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cursor.close()


def alembic_config(engine: Engine | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


@functools.cache
def _scripts() -> Any:
    """This code's migrations (read once per process: Alembic parses every file, 16 ms)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def head_revisions() -> tuple[str, ...]:
    """The migrations this version of the code brings the schema to."""
    return tuple(_scripts().get_heads())


MIGRATION_LOCK_KEY = 0x5E15_4010  # PostgreSQL advisory lock: one migrating process at a time
ROLE_HINT = "the database role lacks a privilege: docs/decisions.md, Store"


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """One process migrates a store at a time; the next, let in, finds the schema current.
    Two first runs at once used to apply the same migration twice ("duplicate column"): on
    SQLite, Alembic runs DDL outside a transaction. SQLite: ``<db>-migrate.lock`` beside the
    file (flock); PostgreSQL: a session advisory lock, held on a connection of its own."""
    if engine.dialect.name == "sqlite":
        path = sqlite_file(str(engine.url))
        if path is None:
            yield  # in memory: this process's own
            return
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive_lock(Path(f"{path}-migrate.lock")))
            except OSError as exc:
                raise StoreError(
                    f"cannot lock {path} to migrate it: {exc.strerror or exc}"
                ) from None
            yield
        return
    with store_errors(), engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()


def _stamped(conn: Connection) -> tuple[str, ...] | None:
    """The revisions ``alembic_version`` holds on ``conn``; None when there is no such table."""
    from alembic.runtime.migration import MigrationContext

    if not inspect(conn).has_table("alembic_version"):
        return None
    return tuple(MigrationContext.configure(conn).get_current_heads())


def current_revisions(engine: Engine) -> tuple[str, ...] | None:
    """The migrations the store is at, sorted (stamped by the last step of each, so a
    migration under way elsewhere is not mistaken for done); None when it has no schema."""
    with store_errors(), engine.connect() as conn:
        stamped = _stamped(conn)
    return None if stamped is None else tuple(sorted(stamped))


@dataclasses.dataclass(frozen=True)
class Migrated:
    """What an upgrade changed: the revisions before (empty for a new store) and after."""

    before: tuple[str, ...]
    after: tuple[str, ...]


def has_tables(conn: Connection) -> bool:
    """Whether the store holds tables besides Alembic's ``alembic_version``."""
    return any(name != "alembic_version" for name in inspect(conn).get_table_names())


def schema_problem(revisions: Sequence[str], tables: bool) -> str | None:
    """Why this code cannot migrate a store stamped ``revisions`` (``tables``: it has tables
    besides ``alembic_version``); None when it can. A revision it does not know: a newer
    version of Sekisho wrote the store. No revision over existing tables, or two revisions
    one of which follows the other: ``alembic_version`` was damaged (edited by hand, a bad
    restore), and migrating would fail half-way or skip migrations."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    advice = "restore a backup, or stamp the revision the schema is at (alembic stamp)"
    if not revisions:
        if tables:
            return f"alembic_version names no migration, yet the store has tables: {advice}"
        return None
    # Each one a revision of ours, spelt in full: get_revision also resolved "base" (then
    # 0001 was applied over the tables), "head" and "heads" (taken for the schema), unique
    # prefixes, and failed on "" with an AssertionError.
    known = {script.revision for script in _scripts().walk_revisions()}
    if any(not revision or revision in {"base", "head", "heads"} for revision in revisions):
        return (
            f"alembic_version holds {', '.join(map(repr, revisions))}, which is no revision: "
            f"its bookkeeping is damaged; {advice}"
        )
    if any(revision not in known for revision in revisions):
        return (
            f"the database schema is at {', '.join(revisions)}, which this version of Sekisho "
            "does not know (a newer version wrote it): run that version, or restore a backup "
            "made with this one"
        )
    try:
        list(_scripts().iterate_revisions("heads", tuple(revisions)))
    except (CommandError, RevisionError):
        return (
            f"alembic_version holds {', '.join(revisions)}, one of which follows the other: "
            f"its bookkeeping is damaged; {advice}"
        )
    return None


def pending_migrations(revisions: Sequence[str]) -> list[tuple[str, str]]:
    """(revision, first line of its description) of each migration this code would apply to
    a store at ``revisions``, oldest first (check :func:`schema_problem` first: ValueError
    for revisions it names)."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        steps = list(_scripts().iterate_revisions("heads", tuple(revisions) or "base"))
    except (CommandError, RevisionError) as exc:
        raise ValueError(str(exc)) from None
    return [(step.revision, (step.doc or "").strip().splitlines()[0]) for step in reversed(steps)]


def upgrade(engine: Engine, *, grant_to: str | None = None) -> Migrated | None:
    """Bring the schema to the newest migration (idempotent; one process at a time); what it
    changed, None when nothing. ``grant_to``: then, under the same lock, grant that role what
    Sekisho uses and no more (``sekisho.roles.grant``; ``engine`` is the schema owner's)."""
    from alembic import command

    heads = tuple(sorted(head_revisions()))
    if grant_to is None and current_revisions(engine) == heads:
        return None  # nothing to migrate and nothing to grant: no lock, no Alembic (16 ms)
    with migration_lock(engine):
        stamped = current_revisions(engine)
        before = stamped or ()
        if stamped is not None and before != heads:
            # Only a store with an alembic_version is judged: without one it is new, and
            # tables beside it are not Sekisho's (another application's in a shared database,
            # an extension's such as PostGIS's spatial_ref_sys), as they always were.
            with store_errors(), engine.connect() as conn:
                problem = schema_problem(before, has_tables(conn))
            if problem is not None:
                raise StoreError(problem)
        try:
            if before != heads:
                command.upgrade(alembic_config(engine), "head")
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            if getattr(orig, "sqlstate", None) == PG_INSUFFICIENT_PRIVILEGE:
                # A role that does not own the schema (one set up by a DBA for the application)
                # cannot migrate it: a settings matter, not a failed store.
                raise ConfigError(
                    f"the database role may not migrate the schema ({_pg_message(orig)}): set "
                    "database_owner_url to the schema owner's connection, through which "
                    "Sekisho migrates and then grants this role what it uses "
                    "(docs/decisions.md, Store)"
                ) from None
            raise StoreError(f"migration failed: {exc}") from exc
        if grant_to is not None:
            from sekisho.roles import grant

            with store_errors(), engine.begin() as conn:
                grant(conn, grant_to)
        after = current_revisions(engine) or ()
    return Migrated(before, after) if after != before else None
