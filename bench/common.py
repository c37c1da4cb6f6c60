"""Shared benchmark plumbing: throwaway deployments (SQLite or a temporary PostgreSQL cluster),
progress output, peak RSS, and the JSON results file.

Nothing here is measured; it only builds what the benchmarks measure.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sekisho.bootstrap import InitPlan, initialise
from sekisho.context import Actor
from sekisho.services import Services, build_services, ensure_data_dir
from sekisho.settings import load_settings

RESULTS_DIR = Path(__file__).with_name("results")
BASE_URL = "http://pki.example.com"
BENCH_ACTOR = Actor(account="bench:operator", client_ip="127.0.0.1")
PG_ROOT = Path("/usr/lib/postgresql")
PG_SUPERUSER = "sekisho"
PG_OS_USER = "postgres"
PG_START_TIMEOUT = 30.0
PG_STOP_TIMEOUT = 15.0


def progress(message: str) -> None:
    """Progress goes to stderr so stdout keeps only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return path


def databases(choice: str) -> list[str]:
    return ["sqlite", "postgres"] if choice == "both" else [choice]


# -- PostgreSQL ---------------------------------------------------------------------------------
def _pg_bin_dir() -> Path | None:
    preferred = PG_ROOT / "15" / "bin"
    if (preferred / "postgres").is_file() and (preferred / "initdb").is_file():
        return preferred
    found = sorted(PG_ROOT.glob("*/bin/postgres"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer:
    """A throwaway PostgreSQL cluster: initdb in a temporary directory, one ``postgres``
    process started by us (its PID is the server's own), stopped by that PID, directory removed.

    Durability is left at PostgreSQL's defaults (fsync on, synchronous_commit on) unless
    ``fast`` is set: the benchmark should see what a production deployment pays per commit.
    """

    def __init__(self, *, fast: bool = False) -> None:
        self.fast = fast
        self.base: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @staticmethod
    def unavailable() -> str | None:
        if _pg_bin_dir() is None:
            return f"no PostgreSQL server binaries under {PG_ROOT}/*/bin"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(PG_OS_USER)
            except KeyError:
                return f"running as root and there is no {PG_OS_USER!r} user to run PostgreSQL"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "the psycopg driver is not installed"
        return None

    def _user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": PG_OS_USER, "group": PG_OS_USER, "extra_groups": []}

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_SUPERUSER} dbname=postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgServer:
        bin_dir = _pg_bin_dir()
        assert bin_dir is not None
        self.base = Path(tempfile.mkdtemp(prefix="sekisho-bench-pg-"))
        data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_OS_USER)
            for path in (self.base, sock):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", PG_SUPERUSER,
             "--no-sync", "-E", "UTF8", "--locale=C"],
            cwd=self.base, env=env, capture_output=True, timeout=120, check=False, **self._user(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {(done.stdout + done.stderr).decode()[-2000:]}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(sock),
            "max_connections": "50",
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        last = ""
        for _ in range(3):  # the probed port can be taken before postgres binds it
            self.port = _free_port()
            cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port)]
            for key, value in settings.items():
                cmd += ["-c", f"{key}={value}"]
            self._log = open(self.base / "postgres.log", "ab")
            self.process = subprocess.Popen(
                cmd, cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, **self._user(),
            )  # fmt: skip
            if self._wait_ready():
                return self
            self._stop_process()
            last = (self.base / "postgres.log").read_text("utf-8", "replace")
        raise RuntimeError(f"PostgreSQL did not start:\n{last[-2000:]}")

    def _wait_ready(self) -> bool:
        import psycopg

        assert self.process is not None
        deadline = time.monotonic() + PG_START_TIMEOUT
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

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def _stop_process(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, PG_STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._stop_process()
        if self.base is not None:
            for _ in range(20):
                shutil.rmtree(self.base, ignore_errors=True)
                if not self.base.exists():
                    break
                time.sleep(0.1)
            self.base = None


@contextlib.contextmanager
def deployment(
    database: str, *, pg_fast: bool = False, checkpoint_every: int | None = None
) -> Iterator[Services]:
    """An initialised Sekisho deployment (root + issuing CAs ``admin`` and ``device``) in a
    temporary data directory, on SQLite or on a throwaway PostgreSQL; removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    server: PgServer | None = None
    services: Services | None = None
    try:
        overrides: dict[str, Any] = {"data_dir": tmp / "data", "base_url": BASE_URL}
        if checkpoint_every is not None:
            overrides["audit_checkpoint_every"] = checkpoint_every
        if database == "postgres":
            why = PgServer.unavailable()
            if why is not None:
                raise PgUnavailable(why)
            progress("starting a throwaway PostgreSQL cluster")
            server = PgServer(fast=pg_fast)
            try:
                server.start()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                raise PgUnavailable(str(exc)) from exc
            overrides["database_url"] = server.create_database("sekisho_bench")
        settings = load_settings(env={}, overrides=overrides)
        progress(f"initialising a deployment on {database} (keys, root, issuing CAs)")
        ensure_data_dir(settings)
        services = build_services(settings)
        initialise(services, InitPlan(organization="Bench Corp"), BENCH_ACTOR)
        yield services
    finally:
        if services is not None:
            services.close()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


class PgUnavailable(RuntimeError):
    """PostgreSQL could not be started here; the benchmark skips it and says why."""
