"""Production serving: gunicorn (not Flask's development server) plus the CRL refresher.

No database connection may cross a fork: SQLite keeps per-process lock state for each open
file (a worker forked while the parent was inside a transaction waits for a lock nobody holds)
and a PostgreSQL socket shared by two processes corrupts both sessions. So the arbiter only
migrates the schema, then closes every connection before gunicorn forks; workers build their
own services after the fork; and the CRL refresher runs in a separate process, a fresh
interpreter (``python -m web.server``, settings as JSON on stdin), stopped by its PID when the
server stops and exiting by itself if its parent disappears.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from sekisho.services import build_services
from sekisho.settings import Settings, load_settings

REFRESHER_STOP_TIMEOUT = 10.0


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from web import create_app

        return create_app(build_services(self.settings, migrate=False))


def refresher_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of the refresher process: publish CRLs until told to stop or orphaned."""
    from sekisho.logs import setup_logging
    from sekisho.workers import CrlRefresher

    setup_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the arbiter decides when we stop
    services = build_services(settings, migrate=False)
    refresher = CrlRefresher(services)
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


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    # Migrate once, before any worker starts; then drop every connection before forking.
    build_services(settings).close()
    refresher: list[subprocess.Popen[bytes]] = []

    def when_ready(_server: Any) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "web.server", str(os.getpid())], stdin=subprocess.PIPE
        )
        assert proc.stdin is not None
        proc.stdin.write(_settings_json(settings).encode())
        proc.stdin.close()
        refresher.append(proc)

    def on_exit(_server: Any) -> None:
        for proc in refresher:
            proc.terminate()
            try:
                proc.wait(REFRESHER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(REFRESHER_STOP_TIMEOUT)

    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": 4,
        "timeout": 60,
        "graceful_timeout": 10,
        "limit_request_line": 4094,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "when_ready": when_ready,
        "on_exit": on_exit,
        "proc_name": "sekisho",
        # No runtime control socket in $HOME: the service is managed by its PID and signals.
        "control_socket_disable": True,
    }
    _Gunicorn(settings, options).run()


def main() -> None:
    """``python -m web.server PARENT_PID`` with the settings as JSON on stdin."""
    parent_pid = int(sys.argv[1])
    settings = load_settings(env={}, overrides=json.loads(sys.stdin.read()))
    refresher_main(settings, parent_pid)


if __name__ == "__main__":
    main()
