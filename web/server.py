"""Production serving: gunicorn (not Flask's development server) plus the CRL refresher.

Workers build their own services after the fork (an engine must not cross a fork); the
arbiter process runs the CRL refresher thread so CRLs are built once, not once per worker.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from sekisho.services import build_services
from sekisho.settings import Settings


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


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    from sekisho.workers import CrlRefresher

    services = build_services(settings)  # migrates once, before workers start
    refresher = CrlRefresher(services)

    def when_ready(_server: Any) -> None:
        refresher.start()

    def on_exit(_server: Any) -> None:
        refresher.stop()
        services.close()

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
