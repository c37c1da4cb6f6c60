"""The gunicorn worker: gthread, with a deadline on each request head, strict chunked bodies and
the server's own error pages in our style.

gunicorn's threaded worker waited for a new connection's first bytes in a worker thread, up to
5 s: a client opening a few empty connections a second kept every thread of a two-worker
server waiting, and /healthz waited 10 s behind twelve of them. Here a new connection with
nothing to read yet goes back to the worker's poller at once, without waiting in the thread
(gunicorn closes it there after ``keepalive`` seconds), and is taken up when its first bytes
arrive. Once they arrive, gunicorn reads the request head in a worker thread with no time limit:
eight clients that send half a head and stop held every thread of a two-worker server, and
CRLs, OCSP and /healthz stopped answering for as long as they stayed. Here a request head must
arrive within ``request_body_seconds`` of its first bytes: the body watchdog (:mod:`web.body`)
shuts the socket's read side at that deadline, the blocked read ends, and gunicorn closes the
connection. Once the head is parsed this guard ends; reading the body has its own deadline
(408), also counted from when the request was queued for a thread (:func:`web.body.queued_at`).

Writing the answer must make progress: a client that stops reading (its receive window shut,
pipelined requests piling answers up) held a thread for as long as it stayed, and eight of
them stopped a two-worker server. Each connection's socket gets ``SO_SNDTIMEO`` of
``request_seconds``: a send that moves no byte for that long fails, and the connection is
closed (logged, no traceback). A slow client that keeps reading is never cut off, however long
a large CRL takes it, for the limit is on each send, not on the whole answer. gunicorn's
``sendfile`` path is off: it would wait for the socket without a limit.

One client address holds at most ``max_per_client`` of a worker's connections (the setting
``max_connections_per_client``): its next one is closed at once. Before, one address could take
all of gunicorn's ``worker_connections`` with idle sockets, and every other client waited.

A chunked body is read by :class:`StrictChunkedReader`: gunicorn accepts a chunk-size line of
any length once its CRLF has arrived (and waits for up to 8 KiB of one that has not), so a
size of 1000 hex digits was taken as a chunk of 16^1000 octets and the request sat until its
408. Here a size has at most ``CHUNK_SIZE_DIGITS`` hex digits and the extensions of a whole
body at most ``CHUNK_EXTENSION_OCTETS``; beyond either the read fails at once (400).

Requests gunicorn refuses before the app sees them (bad request line, URI or header fields
too large, unsupported transfer coding ...), and HTTP/1.1 requests without a Host field (RFC
9112 3.2: 400; gunicorn answered them), are answered by :meth:`handle_error`: gunicorn's
page was HTML without our security headers and quoted the request back. Ours is a short
text/plain page with the app's security headers, ``Cache-Control: no-store`` and a request
ID (the one logged), naming the status only: nothing from the request is echoed.
"""

from __future__ import annotations

import collections
import errno
import http
import logging
import socket
import ssl
import struct
import time
from typing import Any

from gunicorn import util
from gunicorn.http.body import ChunkedReader
from gunicorn.http.errors import (
    ConfigurationProblem,
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.workers.gthread import _DEFER, ThreadWorker

from sekisho.context import new_request_id
from web import SECURITY_HEADERS
from web.body import WATCHDOG, queued_at, time_left

log = logging.getLogger("sekisho.web")

CHUNK_SIZE_DIGITS = 16  # 2^64 - 1: far beyond any body we accept, leading zeros included
CHUNK_EXTENSION_OCTETS = 1024  # in a whole body: we use none; a body is not to be all framing
_HEX = frozenset(b"0123456789abcdefABCDEF")
REFUSED_LOG_SECONDS = 10.0  # connections refused at the per-client cap: one warning at most

# Which status a request gunicorn cannot take gets; any other ParseException is a 400.
# Checked in order: the first class the exception is an instance of wins.
_Kinds = type[BaseException] | tuple[type[BaseException], ...]
_STATUS_BY_ERROR: tuple[tuple[_Kinds, int], ...] = (
    # A header the app tried to send is the app's fault, not the client's.
    ((InvalidResponseHeader, InvalidResponseHeaderName), 500),
    (ConfigurationProblem, 500),
    (LimitRequestLine, 414),
    (LimitRequestHeaders, 431),
    (UnsupportedTransferCoding, 501),
    (ExpectationFailed, 417),
    ((ForbiddenProxyRequest, ssl.SSLError), 403),
    (ParseException, 400),
)


def error_status(exc: BaseException) -> int:
    """The status of the answer to a request that failed in gunicorn with ``exc``."""
    for kinds, status in _STATUS_BY_ERROR:
        if isinstance(exc, kinds):
            return status
    return 500


def error_page(status: int, request_id: str) -> bytes:
    """A whole HTTP/1.1 error response: small, text/plain, nothing taken from the request."""
    reason = http.HTTPStatus(status).phrase
    body = f"{status} {reason} (request ID {request_id})\n".encode("ascii")
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
        "Cache-Control": "no-store",
        **SECURITY_HEADERS,
        "X-Request-Id": request_id,
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("ascii") + body


def _size_digits(line: bytes | bytearray) -> int:
    """How many hex digits a chunk-size line starts with."""
    return next((i for i, byte in enumerate(line) if byte not in _HEX), len(line))


class StrictChunkedReader(ChunkedReader):  # type: ignore[misc]
    """gunicorn's chunked reader with bounded chunk-size lines (see the module docstring)."""

    def __init__(self, req: Any, unreader: Any) -> None:
        super().__init__(req, unreader)
        self.extension_octets_left = CHUNK_EXTENSION_OCTETS

    def _check_line(self, line: bytes | bytearray) -> None:
        """Refuse a chunk-size line, or the part of it received so far, that is too long.
        Whatever follows the size (whitespace, ``;``, names, values) counts as extension."""
        digits = _size_digits(line)
        if digits > CHUNK_SIZE_DIGITS:
            raise InvalidChunkSize(b"chunk size over %d hex digits" % CHUNK_SIZE_DIGITS)
        if len(line) - digits > self.extension_octets_left:
            raise InvalidChunkExtension(
                f"chunk extensions over {CHUNK_EXTENSION_OCTETS} octets in one body"
            )

    def parse_chunk_size(self, unreader: Any, data: bytes | None = None) -> Any:
        buf = bytearray(data or b"")
        while (end := buf.find(b"\r\n")) < 0:
            self._check_line(buf)  # before waiting for more: the CRLF may never come
            self.read_into(unreader, buf)
        line = buf[:end]
        self._check_line(line)
        self.extension_octets_left -= len(line) - _size_digits(line)
        # The whole line is in ``buf``: gunicorn checks its syntax without reading again.
        return super().parse_chunk_size(unreader, data=bytes(buf))


class GuardedThreadWorker(ThreadWorker):  # type: ignore[misc]
    # Set by ``web.server`` from the settings before the workers fork.
    request_seconds = 10.0
    max_per_client = 0  # connections one client address may hold in this worker; 0: no cap

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Run on the worker's main thread only (accept, the poller's callbacks, closes).
        self.per_client: collections.Counter[str] = collections.Counter()
        self.refused = 0  # connections refused at the cap since the last warning
        self.refused_peer = ""  # the address refused last
        self.refused_logged = 0.0

    def enqueue_req(self, conn: Any) -> None:
        if not hasattr(conn, "sekisho_client") and not self._admit(conn):
            return
        conn.sekisho_queued = time.monotonic()  # its head's time runs from here (handle)
        super().enqueue_req(conn)

    def _admit(self, conn: Any) -> bool:
        """Count a new connection against its client address, or close it at once if that
        address holds ``max_per_client`` of this worker's connections already: one client's
        idle or slow sockets took every one of the worker's places (gunicorn's
        ``worker_connections``), and every other client waited. Its count goes down when
        gunicorn closes it (``TConn.close``, every path); a Unix-socket peer is not capped."""
        peer = conn.client[0] if isinstance(conn.client, tuple) and conn.client else None
        conn.sekisho_client = peer
        if peer is None or self.max_per_client <= 0:
            return True
        if self.per_client[peer] >= self.max_per_client:
            conn.sekisho_client = None
            self.nr_conns -= 1  # (counted by gunicorn's accept)
            util.close(conn.sock)
            self._note_refused(peer)
            return False
        self.per_client[peer] += 1
        close = conn.close

        def closed(graceful: bool = False) -> None:
            if conn.sekisho_client is not None:
                self.per_client[peer] -= 1
                if self.per_client[peer] <= 0:
                    del self.per_client[peer]
                conn.sekisho_client = None
                # The connection and this function referred to each other: a cycle per
                # connection, freed only by the cyclic garbage collector.
                vars(conn).pop("close", None)
            close(graceful=graceful)

        conn.close = closed
        return True

    def _note_refused(self, peer: str) -> None:
        """A warning at most every REFUSED_LOG_SECONDS, naming the address refused last and
        how many connections this worker refused since its last such warning, from any
        address (they are counted, not each logged: a flood of connections must not become a
        flood of log lines). The last ones of a burst are reported by the worker's loop once
        the interval has passed (``murder_pending``), not with the next refusal, maybe days
        later."""
        self.refused += 1
        self.refused_peer = peer
        self._report_refused()

    def _report_refused(self, *, at_exit: bool = False) -> None:
        now = time.monotonic()
        if self.refused and (at_exit or now - self.refused_logged >= REFUSED_LOG_SECONDS):
            log.warning(
                "connections refused: too many from one client address",
                extra={"client_ip": self.refused_peer, "refused": self.refused,
                       "max_per_client": self.max_per_client},
            )  # fmt: skip
            self.refused, self.refused_logged = 0, now

    def murder_pending(self) -> None:
        """(The worker's loop, about once a second.) Also: report refusals left uncounted."""
        super().murder_pending()
        self._report_refused()

    def run(self) -> None:
        try:
            super().run()
        finally:  # (a worker stopped, restarted or orphaned: what it counted is still said)
            self._report_refused(at_exit=True)

    def head_seconds(self, conn: Any) -> float:
        """The time a connection's request head has left: ``request_seconds`` from when it
        was queued for a thread, not from when one took it up (32 clients sending half a
        head, queued behind eight threads, held them for four rounds of 10 s), but at least
        ``web.body.MIN_SECONDS``: a head that waited that long for a thread is in the socket
        by then, and is read at once (:func:`web.body.time_left`)."""
        return time_left(float(self.request_seconds), getattr(conn, "sekisho_queued", None))

    def handle(self, conn: Any) -> Any:
        if not conn.initialized and not conn.wait_for_data(0.0):
            # Nothing sent yet: wait in the poller, not in this thread (gunicorn's own wait
            # here is up to 5 s, and a stream of empty connections held every thread).
            return _DEFER
        if not getattr(conn, "sekisho_send_limited", False):
            seconds = max(self.request_seconds, 0.001)
            whole = int(seconds)
            limit = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            except OSError:
                return False  # the connection is gone already
            conn.sekisho_send_limited = True
        with WATCHDOG.guard(conn.sock, self.head_seconds(conn)) as guard:
            conn.sekisho_head_guard = guard
            return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        guard = getattr(conn, "sekisho_head_guard", None)
        if guard is not None:
            WATCHDOG.release(guard)  # the head is in: the body's own deadline takes over
        if req.version > (1, 1):
            # RFC 9110 2.5 and 6.2: processed and answered as HTTP/1.1, the highest 1.x we
            # conform to (gunicorn echoed the request's: "HTTP/1.9 200 OK").
            req.version = (1, 1)
        if req.version >= (1, 1) and not any(name == "HOST" for name, _ in req.headers):
            # RFC 9112 3.2: MUST be 400 (gunicorn answered it); the connection closes.
            raise InvalidHeader("HOST")
        if type(req.body.reader) is ChunkedReader:  # nothing of the body has been read yet
            req.body.reader = StrictChunkedReader(req, req.unreader)
        try:
            with queued_at(getattr(conn, "sekisho_queued", None)):  # the body's time too
                answered = super().handle_request(req, conn)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            # SO_SNDTIMEO: the client read nothing of the answer for request_seconds.
            peer = conn.client[0] if isinstance(conn.client, tuple) and conn.client else ""
            log.warning(
                "client stopped reading the answer: connection closed",
                extra={"client_ip": peer, "seconds": self.request_seconds},
            )
            util.close(conn.sock)
            raise StopIteration() from None  # gunicorn closes the connection, quietly
        req.sekisho_answered = True
        return answered

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer a request gunicorn could not take (or that failed outside the app) with our
        own error page; log it once, with the request ID the page carries."""
        status = error_status(exc)
        request_id = new_request_id()
        peer = addr[0] if isinstance(addr, tuple) and addr else ""
        extra = {
            "status": status,
            "error": type(exc).__name__,
            "client_ip": peer,
            "request_id": request_id,
        }
        if getattr(req, "sekisho_answered", False):
            # Draining the unread body of an answered request failed (bad chunked framing):
            # the connection closes; a second response would answer a request never sent.
            log.info("unread request body could not be drained", extra=extra)
            return
        if status == 500:
            log.error("request failed in the server", exc_info=exc, extra=extra)
        else:
            log.warning("request refused by the server", extra=extra)
        try:
            util.write_nonblock(client, error_page(status, request_id))
        except OSError:
            log.debug("error page not sent", extra={"request_id": request_id})
