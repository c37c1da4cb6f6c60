"""Request bodies, read bounded in size and in time; every failure is a clear 4xx.

* Over the limit: 413, before reading when Content-Length says so, or as soon as a chunked
  body passes it (reading Werkzeug's limited stream stops at the limit without telling
  whether more followed).
* Framing the server cannot parse (bad chunk sizes, missing terminators, bad trailers,
  chunk-size lines over the limits of :mod:`web.worker`) or a body shorter than its
  Content-Length: 400.
* A body not received in full within ``request_body_seconds``: 408. Under gunicorn a
  watchdog shuts the socket's read side at the deadline, so a client that sends part of a
  body and goes quiet (or drips it) holds a worker thread for that long at most. The time
  runs from when the request was queued for a thread (:func:`queued_at`, set by
  :mod:`web.worker`), as a head's does, not from when the app starts reading: 24 clients
  sending half a body, queued behind four threads, held them for six rounds of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, RequestTimeout
from werkzeug.wsgi import get_input_stream

log = logging.getLogger("sekisho.web")
READ_CHUNK = 16 * 1024
# However long a request waited for a thread, its head and then its body have at least this
# long: what waited that long is in the socket by then (at most max_request_bytes), and is
# read at once.
MIN_SECONDS = 0.2
_REQUEST = threading.local()  # .queued: when this thread's request was queued (monotonic)


@contextlib.contextmanager
def queued_at(when: float | None) -> Iterator[None]:
    """(The worker, around each request it hands to the app.) The request on this thread was
    queued for a thread at ``when`` (``time.monotonic()``): its body's time runs from then."""
    _REQUEST.queued = when
    try:
        yield
    finally:
        _REQUEST.queued = None


def time_left(seconds: float, queued: float | None) -> float:
    """``seconds`` counted from ``queued`` (``time.monotonic()``, when the request was queued
    for a thread; None: from now), at least ``MIN_SECONDS``: a request head's time in the
    worker, its body's here."""
    if queued is None:
        return seconds
    return max(min(MIN_SECONDS, seconds), seconds - (time.monotonic() - queued))


def body_seconds(seconds: float) -> float:
    """How long the body of this thread's request has left: ``seconds`` from when it was
    queued for a thread (:func:`time_left`); ``seconds`` outside the worker."""
    return time_left(seconds, getattr(_REQUEST, "queued", None))


@dataclasses.dataclass(eq=False)
class _Guard:
    sock: socket.socket | None
    deadline: float
    fired: bool = False
    done: bool = False


class _Watchdog:
    """One thread per process: shuts the read side of sockets whose body read overran."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, sock: Any, seconds: float) -> Iterator[_Guard]:
        # Plain TCP sockets only: shutting a TLS socket would make Python send the answer in
        # the clear. Not under gunicorn (the tests' client): no socket to shut.
        if type(sock) is not socket.socket:
            yield _Guard(None, 0.0)
            return
        guard = _Guard(sock, time.monotonic() + seconds)
        with self._cond:
            heapq.heappush(self._heap, (guard.deadline, next(self._order), guard))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sekisho-body-watchdog", daemon=True
                )
                self._thread.start()
            if self._heap[0][2] is guard:
                self._cond.notify()  # a new earliest deadline
        try:
            yield guard
        finally:
            with self._cond:  # after this, the watchdog never touches the socket again
                guard.done = True

    def release(self, guard: _Guard) -> None:
        """End ``guard`` before its ``with`` block does: the watchdog never touches its socket
        again."""
        with self._cond:
            guard.done = True

    def _run(self) -> None:
        try:
            while True:  # for the life of the process (a daemon thread)
                with self._cond:
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    deadline, _, guard = self._heap[0]
                    wait = deadline - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    heapq.heappop(self._heap)
                    guard.fired = True
                    # Under the lock (shutdown does not block), so a request that has finished
                    # (done) never has its socket, perhaps already serving the next request on
                    # the connection, shut behind it.
                    with contextlib.suppress(OSError):
                        assert guard.sock is not None
                        guard.sock.shutdown(socket.SHUT_RD)  # the blocked read returns
        finally:
            with self._cond:
                self._thread = None  # a later request starts a new one

    def after_fork(self) -> None:
        self._cond = threading.Condition()
        self._heap = []
        self._thread = None


WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=WATCHDOG.after_fork)


def read_body(max_bytes: int, seconds: float) -> bytes:
    """The request body, at most ``max_bytes`` and never more than the app's
    MAX_CONTENT_LENGTH (see the module docstring for the errors)."""
    app_limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if app_limit is not None:
        max_bytes = min(max_bytes, int(app_limit))
    length = request.content_length
    if length is not None and length > max_bytes:
        raise RequestEntityTooLarge(f"the body is at most {max_bytes} octets")
    environ = request.environ
    # No limit here: we count ourselves, and refuse rather than cut a body short.
    stream = get_input_stream(environ, safe_fallback=True, max_content_length=None)
    chunks: list[bytes] = []
    total = 0
    with WATCHDOG.guard(environ.get("gunicorn.socket"), body_seconds(seconds)) as guard:
        try:
            while total <= max_bytes:
                chunk = stream.read(min(READ_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except Exception as exc:  # noqa: BLE001  (the server's framing errors, resets, EOF)
            if guard.fired:
                raise RequestTimeout(f"the body did not arrive within {seconds:g} s") from None
            log.info("unreadable request body", extra={"exc_type": type(exc).__name__})
            raise BadRequest("the request body could not be read (framing)") from None
    if total > max_bytes:
        raise RequestEntityTooLarge(f"the body is at most {max_bytes} octets")
    if length is not None and total < length:
        if guard.fired:
            raise RequestTimeout(f"the body did not arrive within {seconds:g} s")
        raise BadRequest("the request body is shorter than its Content-Length")
    return b"".join(chunks)
