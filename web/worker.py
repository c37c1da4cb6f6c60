"""The gunicorn worker: gthread, with a deadline on each request head.

gunicorn's threaded worker waits (5 s) for a new connection's first bytes without taking a
thread, but once they arrive it reads the request head in a worker thread with no time limit:
eight clients that send half a head and stop held every thread of a two-worker server, and
CRLs, OCSP and /healthz stopped answering for as long as they stayed. Here a request head must
arrive within ``request_body_seconds`` of its first bytes: the body watchdog (:mod:`web.body`)
shuts the socket's read side at that deadline, the blocked read ends, and gunicorn closes the
connection. Once the head is parsed this guard ends; reading the body has its own deadline
(408), and writing the answer is never limited (a large CRL to a slow client keeps going).
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from web.body import WATCHDOG


class GuardedThreadWorker(ThreadWorker):  # type: ignore[misc]
    # Set by ``web.server`` from the settings before the workers fork.
    request_seconds = 10.0

    def handle(self, conn: Any) -> Any:
        with WATCHDOG.guard(conn.sock, self.request_seconds) as guard:
            conn.sekisho_head_guard = guard
            return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        guard = getattr(conn, "sekisho_head_guard", None)
        if guard is not None:
            WATCHDOG.release(guard)  # the head is in: the body's own deadline takes over
        return super().handle_request(req, conn)
