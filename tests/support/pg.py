"""A throwaway PostgreSQL cluster for tests: initdb into a temporary directory, one
``postgres`` process whose PID we own, trust authentication on 127.0.0.1 only, durability
switched off (tests do not survive power cuts; ``fast=False`` keeps PostgreSQL's defaults,
as the benchmarks want), removed again on ``stop()``.

PostgreSQL refuses to run as root: when the tests run as root (CI does) the directory is
handed to the ``postgres`` user and ``initdb`` / ``postgres`` are started as that user
(``Popen(user=..., group=...)``, so the PID we hold is the server's own, not a wrapper's).

Usage::

    with PgCluster() as pg:
        url = pg.create_database("t1")  # postgresql+psycopg://sekisho@127.0.0.1:PORT/t1
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "sekisho"
OS_USER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
INITDB_TIMEOUT = 120.0
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose; keep the log short
}


# With ``fast`` (the default): no fsync, commits acknowledged before they reach the WAL on disk.
def utf8_ctype() -> str | None:
    """A UTF-8 locale this machine has (glibc ships C.UTF-8), or None."""
    try:
        listed = subprocess.run(
            ["locale", "-a"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    for name in ("C.utf8", "C.UTF-8", "en_US.utf8", "en_US.UTF-8"):
        if name in listed:
            return name
    return None


FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _version_key(path: Path) -> tuple[int, ...]:
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (0,)


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding both initdb and postgres."""
    candidates = [
        d for d in PG_ROOT.glob("*/bin") if (d / "initdb").is_file() and (d / "postgres").is_file()
    ]
    return max(candidates, key=_version_key) if candidates else None


def _running_as_root() -> bool:
    return os.geteuid() == 0


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    if find_bin_dir() is None:
        return f"PostgreSQL server binaries not found under {PG_ROOT}/*/bin (run tools/sysdeps.sh)"
    if _running_as_root():
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root but there is no {OS_USER!r} user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must match {_NAME.pattern}")
    return name


class PgError(RuntimeError):
    """The cluster could not be created, started or used."""


class PgCluster:
    """One temporary cluster. ``start()`` / ``stop()``, or use it as a context manager."""

    def __init__(self, bin_dir: Path | None = None, *, fast: bool = True) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise PgError(available() or "PostgreSQL binaries not found")
        self.bin_dir = found
        self.fast = fast
        self.base: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        # Safety net: a cluster never outlives the interpreter, even if nobody called stop()
        # (weakref.finalize also runs at interpreter exit). The finalizer sees only this dict.
        self._shared: dict[str, Any] = {"process": None, "base": None}
        self._finalizer = weakref.finalize(self, PgCluster._cleanup, self._shared)

    # -- paths and URLs ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "cluster not started"
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None, "cluster not started"
        return self.base / "sock"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "cluster not started"
        return self.base / "postgres.log"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the maintenance database ``postgres``."""
        return self.url_for("postgres")

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres"

    # -- lifecycle ----------------------------------------------------------------------------
    def _as_postgres(self) -> dict[str, Any]:
        if not _running_as_root():
            return {}
        return {"user": OS_USER, "group": OS_USER, "extra_groups": []}

    def start(self) -> PgCluster:
        if self.process is not None:
            raise PgError("cluster already started")
        self.base = Path(tempfile.mkdtemp(prefix="sekisho-pg-"))
        self._shared["base"] = self.base
        try:
            self.socket_dir.mkdir()
            if _running_as_root():
                owner = pwd.getpwnam(OS_USER)
                for path in (self.base, self.socket_dir):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            self._initdb()
            self._launch_with_retries()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            SUPERUSER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
            # Byte-order collation (fast, as C), but Unicode case mapping for ILIKE / lower(),
            # as a production cluster with a UTF-8 locale has.
            *([f"--lc-ctype={ctype}"] if (ctype := utf8_ctype()) else []),
        ]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        try:
            done = subprocess.run(
                cmd,
                cwd=self.base,
                env=env,
                capture_output=True,
                timeout=INITDB_TIMEOUT,
                check=False,
                **self._as_postgres(),
            )
        except subprocess.TimeoutExpired as exc:
            raise PgError(f"initdb did not finish within {INITDB_TIMEOUT:.0f} s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode("utf-8", "replace")
            raise PgError(f"initdb failed ({done.returncode}):\n{output}")

    def _launch_with_retries(self, attempts: int = 3) -> None:
        # The free port can be taken between probing and binding: retry with another one.
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            if self._launch():
                return
            last = self.log_text()
            if "already in use" not in last and "could not bind" not in last:
                break
        raise PgError(f"PostgreSQL did not start:\n{last[-4000:]}")

    def _launch(self) -> bool:
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        settings = {**SERVER_SETTINGS, "unix_socket_directories": str(self.socket_dir)}
        if self.fast:
            settings.update(FAST_SETTINGS)
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        self._log = open(self.log_path, "ab")  # closed in _stop_process()
        self.process = subprocess.Popen(
            cmd,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            **self._as_postgres(),
        )
        self._shared["process"] = self.process
        if self._wait_ready():
            return True
        self._stop_process()
        return False

    def _wait_ready(self) -> bool:
        import psycopg

        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def _stop_process(self) -> None:
        proc = self.process
        self.process = None
        self._shared["process"] = None
        if proc is not None:
            _terminate(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (by its PID) and remove every file of the cluster."""
        self._stop_process()
        if self.base is not None:
            _remove_tree(self.base)
            self.base = None
            self._shared["base"] = None

    @staticmethod
    def _cleanup(state: dict[str, Any]) -> None:
        proc = state.get("process")
        if proc is not None:
            _terminate(proc)
        base = state.get("base")
        if base is not None:
            _remove_tree(base)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ------------------------------------------------------------------------------
    def execute(self, statement: Any) -> None:
        """Run one statement on the maintenance database, outside a transaction."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create ``name`` (optionally as a copy of ``template``); return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(_check_name(name)))
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            if template is not None:
                stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(_check_name(template)))
                # PostgreSQL 15 copies a template block by block through the WAL by default;
                # copying its files is twice as fast for a small database (a checkpoint, cheap
                # with fsync off), and what older versions always did.
                if conn.info.server_version >= 150000:
                    stmt = sql.SQL("{} STRATEGY FILE_COPY").format(stmt)
            conn.execute(stmt)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it (PostgreSQL 13+)."""
        from psycopg import sql

        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(_check_name(name))
            )
        )

    def databases(self) -> list[str]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")
            return sorted(str(r[0]) for r in rows.fetchall())


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back sessions, checkpoint, exit), then immediate
    (SIGQUIT), then SIGKILL; each step bounded. Only ever this one PID."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _remove_tree(base: Path) -> None:
    # Backends exit a moment after the postmaster: retry briefly if files are still changing.
    for _ in range(20):
        shutil.rmtree(base, ignore_errors=True)
        if not base.exists():
            return
        time.sleep(0.1)
