"""Production serving: gunicorn (not Flask's development server) plus the CRL refresher.

No database connection may cross a fork: SQLite keeps per-process lock state for each open
file (a worker forked while the parent was inside a transaction waits for a lock nobody holds)
and a PostgreSQL socket shared by two processes corrupts both sessions; a PKCS#11 module must
be initialised in the process that uses it. So the arbiter opens nothing: a child interpreter
(``python -m web.server check``) migrates the schema and checks the key backend (token there,
PIN accepted) before gunicorn starts; workers build their own services after the fork; and
the CRL refresher runs in a separate process, a fresh interpreter (``python -m web.server
PARENT_PID``, settings as JSON on stdin), stopped by its PID when the server stops and exiting
by itself if its parent disappears.

The listening socket is bound before all that and handed to gunicorn (``fd://``): an address
in use is one line and exit 78 at once, not gunicorn's five one-second retries and exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from flask import Flask
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from ca.weakkeys import installed_ok, lists_dir
from sekisho.errors import (
    ConfigError,
    KeyBackendError,
    SekishoError,
    StoreError,
    WrongPassphrase,
)
from sekisho.files import private_temps
from sekisho.logs import JsonFormatter
from sekisho.services import build_services, open_deployment
from sekisho.settings import Settings, load_settings
from sekisho.workers import heartbeat_age, heartbeat_file

log = logging.getLogger("sekisho.serve")

REFRESHER_STOP_TIMEOUT = 10.0
REFRESHER_BACKOFF_MAX = 60.0  # seconds between restarts of a refresher that keeps dying
REFRESHER_STABLE = 60.0  # a refresher that ran this long before dying starts the backoff over
STARTUP_CHECK_TIMEOUT = 300.0
ERRORS_BY_EXIT: dict[int, type[SekishoError]] = {
    KeyBackendError.exit_code: KeyBackendError,
    WrongPassphrase.exit_code: WrongPassphrase,
    StoreError.exit_code: StoreError,
    ConfigError.exit_code: ConfigError,
}


class _RefresherSupervisor:
    """The refresher process (CRLs, OCSP, audit checkpoints), a child of the arbiter: started
    when gunicorn is ready, restarted when it dies (an OOM kill, a crash in a PKCS#11 module,
    a failure at its start), after 1, 2, 4 .. 60 s, and stopped with the arbiter. Before, a
    refresher that died stayed dead while /healthz said ok and CRLs and OCSP answers went
    stale. Checked from the arbiter's own loop (no thread in a process that forks)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.wanted = False  # set when gunicorn is ready (``launch``)
        self.stopping = False
        self.killed = False

    def launch(self) -> None:
        """Start the refresher now, or (failing: no process could be made, no heartbeat file
        could be written) later: never raised into the arbiter, whose loop it would end and
        the whole server with it."""
        self.wanted = True
        try:
            self._start()
        except OSError as exc:
            delay = min(REFRESHER_BACKOFF_MAX, 2.0**self.failures)
            self.failures += 1
            log.error(
                "the refresher process could not be started; trying again",
                extra={"detail": exc.strerror or str(exc), "restart_in_s": delay},
            )
            self.restart_at = time.monotonic() + delay

    def _start(self) -> None:
        # The heartbeat counts from this arbiter's first start (a file an older arbiter of the
        # same PID left is not read as this one's, its time nor the failures it holds: PID 1
        # in a container, after an unclean stop): a refresher that never goes round is
        # stale, and stuck, like one that stopped. A restart leaves its time alone: one that
        # dies at every start shows stale too, the time of the last round it finished.
        beat = heartbeat_file(self.settings, os.getpid())
        beat.parent.mkdir(mode=0o700, exist_ok=True)
        if self.proc is None:
            for leftover in private_temps(beat):  # its body's, from a refresher killed writing
                with contextlib.suppress(OSError):
                    leftover.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            os.close(os.open(beat, flags, 0o600))
            os.utime(beat)
        else:
            os.close(os.open(beat, os.O_WRONLY | os.O_CREAT, 0o600))
        proc = subprocess.Popen(
            [sys.executable, "-m", "web.server", str(os.getpid())], stdin=subprocess.PIPE
        )
        assert proc.stdin is not None
        proc.stdin.write(_settings_json(self.settings).encode())
        proc.stdin.close()
        self.proc, self.started_at = proc, time.monotonic()
        self.killed = False

    def check(self) -> None:
        """(Arbiter loop, about once a second.) Restart a refresher that died."""
        if not self.wanted or self.stopping:
            return
        now = time.monotonic()
        proc = self.proc
        if self.restart_at is None and proc is not None:
            # The arbiter reaps every child; then poll() cannot learn the status and says 0.
            if proc.poll() is None:
                self._kill_if_stuck(proc, now)
                return
            if now - self.started_at >= REFRESHER_STABLE:
                self.failures = 0
            delay = min(REFRESHER_BACKOFF_MAX, 2.0**self.failures)
            self.failures += 1
            log.error(
                "the refresher process exited; restarting it",
                extra={"pid": proc.pid, "exit": proc.returncode, "restart_in_s": delay},
            )
            self.restart_at = now + delay
        elif self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            self.launch()

    def _kill_if_stuck(self, proc: subprocess.Popen[bytes], now: float) -> None:
        """A refresher whose loop has not gone round for ``refresher_stuck_seconds`` (a lock
        never released, a token call that never returns) is killed; ``check`` restarts it."""
        stuck = self.settings.refresher_stuck_seconds
        if self.killed or now - self.started_at < stuck:
            return
        age = heartbeat_age(self.settings, os.getpid())
        if age is None or age >= stuck:
            log.error(
                "the refresher process is stuck; killing it",
                extra={"pid": proc.pid, "seconds_since_last_round": age},
            )
            self.killed = True
            proc.kill()

    def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(REFRESHER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(REFRESHER_STOP_TIMEOUT)
        # After it is gone: a round it finished meanwhile would touch the file again.
        beat = heartbeat_file(self.settings, os.getpid())
        for path in (beat, *private_temps(beat)):
            with contextlib.suppress(OSError):
                path.unlink()


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, also keeping the refresher process alive."""

    def manage_workers(self) -> None:
        super().manage_workers()
        self.app.refresher.check()


class JsonGunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's own messages (arbiter, workers) as the JSON lines every other log line is:
    its default format was plain text on the same stderr."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        self.refresher = _RefresherSupervisor(settings)
        super().__init__()

    def run(self) -> None:
        try:
            _Arbiter(self).run()
        except RuntimeError as exc:  # as BaseApplication.run
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from web import create_app

        return create_app(build_services(self.settings, migrate=False))


def refresher_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of the refresher process: publish CRLs until told to stop or orphaned."""
    from sekisho.logs import setup_logging
    from sekisho.workers import CrlRefresher, HeartbeatWriter

    setup_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the arbiter decides when we stop
    services = build_services(settings, migrate=False)
    refresher = CrlRefresher(services)
    beat = heartbeat_file(settings, parent_pid)
    beat.parent.mkdir(mode=0o700, exist_ok=True)
    refresher.heartbeat = HeartbeatWriter(beat)
    refresher.start()
    try:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                break
    finally:
        refresher.stop()
        services.close()


def _settings_json(settings: Settings) -> str:
    return json.dumps(
        {
            f.name: str(v) if isinstance(v := getattr(settings, f.name), os.PathLike) else v
            for f in dataclasses.fields(settings)
        }
    )


def check_main(settings: Settings) -> int:
    """Start-up check, in a child process: the deployment must exist (``serve`` creates none;
    ``run`` initialises first), migrate the store, open the key backend (a PKCS#11 token must
    be there and accept the PIN). Prints the error and returns its exit code."""
    try:
        services = open_deployment(settings)
        try:
            check = getattr(services.backend, "check", None)
            if check is not None:
                check()
        finally:
            services.close()
    except SekishoError as exc:
        sys.stderr.write(json.dumps({"code": exc.code, "message": exc.message}) + "\n")
        return exc.exit_code
    return 0


def _startup_check(settings: Settings) -> None:
    """Run :func:`check_main` in a fresh interpreter: neither a database connection nor an
    initialised PKCS#11 module may cross gunicorn's fork (modules must be initialised in the
    process that uses them)."""
    proc = subprocess.run(
        [sys.executable, "-m", "web.server", "check"],
        input=_settings_json(settings).encode(),
        capture_output=True,
        timeout=STARTUP_CHECK_TIMEOUT,
        check=False,
    )
    if proc.returncode == 0:
        return
    try:
        doc = json.loads(proc.stderr.decode().strip().splitlines()[-1])
        message = str(doc["message"])
    except (ValueError, KeyError, IndexError):
        message = f"start-up check failed (exit {proc.returncode})"
    error = ERRORS_BY_EXIT.get(proc.returncode, ConfigError)
    raise error(message)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (SO_REUSEADDR, as gunicorn binds): a port in
    use or an address not ours is a ConfigError (exit 78) naming it, as for ``ocsp serve``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:  # socket.gaierror included: a host name that does not resolve
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # gunicorn's default backlog
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    listener = listen(host, port)
    try:
        # Migrate once and check the key backend before any worker starts, in a child process.
        _startup_check(settings)
    except BaseException:
        listener.close()
        raise
    lists = lists_dir()
    if not installed_ok(lists):
        log.warning(
            "the Debian weak-key lists are not installed (or damaged): RSA-2048 and RSA-4096"
            " keys received are refused until `sekisho key install-weak-lists` runs",
            extra={"directory": str(lists)},
        )

    def when_ready(server: Any) -> None:
        server.app.refresher.launch()

    def on_exit(server: Any) -> None:
        server.app.refresher.stop()

    from web.worker import GuardedThreadWorker

    GuardedThreadWorker.request_seconds = settings.request_body_seconds
    GuardedThreadWorker.max_per_client = settings.max_connections_per_client
    options = {
        # gunicorn takes the descriptor over (and closes it when it stops).
        "bind": f"fd://{listener.detach()}",
        "workers": workers,
        "worker_class": "web.worker.GuardedThreadWorker",
        "threads": 4,
        # Answers are written by send(), each limited by SO_SNDTIMEO (web.worker); sendfile
        # would wait on the socket without a limit.
        "sendfile": False,
        "timeout": 60,
        "graceful_timeout": 10,
        "limit_request_line": 4094,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "accesslog": None,
        "errorlog": "-",
        "logger_class": JsonGunicornLogger,
        "loglevel": settings.log_level.lower(),
        "when_ready": when_ready,
        "on_exit": on_exit,
        "proc_name": "sekisho",
        # No runtime control socket in $HOME: the service is managed by its PID and signals.
        "control_socket_disable": True,
    }
    _Gunicorn(settings, options).run()


def main() -> None:
    """``python -m web.server PARENT_PID`` (the refresher) or ``python -m web.server check``
    (the start-up check), with the settings as JSON on stdin."""
    settings = load_settings(env={}, overrides=json.loads(sys.stdin.read()))
    if sys.argv[1] == "check":
        raise SystemExit(check_main(settings))
    refresher_main(settings, int(sys.argv[1]))


if __name__ == "__main__":
    main()
