"""The standalone OCSP responder: a lean asyncio ``Protocol`` HTTP/1.1 server.

Answers ``GET /ocsp/<base64>`` (RFC 5019 / RFC 6960 A.1: standard or URL-safe alphabet,
percent-encoded or not) and ``POST /ocsp`` (``application/ocsp-request``) from an in-memory
index of pre-signed responses (:mod:`ocsp.index`), plus ``GET /healthz``.

Decisions
---------
* **Hot path = one dict lookup.** A request whose DER equals the RFC 5019 request for a stored
  response is answered with the stored bytes, no ASN.1 parsing. Anything else is parsed by
  :func:`ocsp.core.parse_request`; if every CertID's status is in memory the response is
  signed with that status (nonces, SHA-256 CertIDs, several CertIDs, a stored response past
  its nextUpdate), on the event loop when the key signs in microseconds (``cryptography``'s
  EC and EdDSA keys), else in the thread pool (a token's key, an RSA key: on the loop, one
  client's nonce requests stalled every answer for as long as each signature took);
  otherwise the statuses come from the database through ``lookup`` in a thread pool and the
  response is signed there. A database error
  there answers ``tryLater`` (``StoreError``, through :func:`ocsp.core.answer`). Nothing is
  ever answered "good" without a stored status or a database answer.
* **Store unreachable.** A status held in memory is current while the follower keeps up
  (synced within the last few polls). When it does not, a held status is vouched for only
  until the nextUpdate of the stored response it came from: answers signed from it carry no
  later nextUpdate, and once less than the minimum validity (8 h) is left they go to the
  database, which answers ``tryLater`` while it is down. Stored bytes are served until their
  own nextUpdate.
* **Following the store.** A daemon thread calls ``changes_since`` every ``poll`` seconds
  (0.5 s), makes what is new into index entries itself and hands them to the loop
  (``call_soon_threadsafe``), which applies them 1,000 per step, answering requests in
  between, one batch after the other in the order they came (a mass re-sign brings 10^5
  changes at once: made into entries on the loop, that was a pause of seconds). The server
  never writes to the database, so several can run side by side against one PostgreSQL. Every
  ``issuers_every`` seconds (10 s), and once before listening, it also reloads who signs for
  which CA: a rotated responder signs the next live answer (the old one's certificate expires
  some ten days after its rotation), a CA created since start is served, and a CA taken
  offline or retired stops being served.
* **A CA coming into service** is served at once, its statuses from the database (signed live
  in the thread pool), while the follower thread reads its stored responses and makes them
  into index entries, following the store's changes between slices; automatic cycle
  collection is paused meanwhile and what was built is then frozen out of it, as for the
  initial load (the first collection to see the new entries would visit them all holding the
  GIL; entries are plain tuples it then stops tracking, see :mod:`ocsp.index`). The loop then
  swaps the CA's statuses in with one reference and merges its request keys 1,000 at a time,
  answering requests between two steps; a CA dropped leaves the same way (:mod:`ocsp.index`).
  With 10^5 responses the loop's longest pause went from the whole load (2.4 s on a 2-vCPU
  host; 4-5 s with it busy) to about 20 ms of GIL sharing with the follower thread (40-80 ms).
* **Who signs, CA by CA.** One CA whose signer cannot be loaded (its responder key out of
  reach, a responder certificate that does not fit) does not stop the reload of the others: it
  is logged once per streak (CA id and subject, our error's code and message, never key
  material) and keeps the last good signer this server used for it, same CA certificate, as
  long as that one may sign. None may whose certificate is revoked or has no issued row in the
  store (status unknown: fail closed), or is not valid until the next reload plus a minute
  (checked even when the reload itself fails); this holds for freshly loaded responders too.
  Revocation is checked at every poll as well (one small query): a responder revoked by
  another process signs no live answer from this server's next poll on, and while a CA is so
  withheld each poll asks whether the store names another responder for it (its successor,
  made by the revoking process): then the server reloads at once. A
  CA served with no signer that may sign answers live requests ``tryLater``; its pre-signed
  answers are still served until their nextUpdate. A CA whose signer never loaded in this
  process is not served (``unauthorized``) until it does.
* **HTTP limits.** Request line + headers <= 8 KiB (else 431, close); body <= 64 KiB, judged
  from Content-Length before reading (else 413, close); POST without Content-Length 411;
  Transfer-Encoding 501 (no chunked bodies, no smuggling); wrong Content-Type 415; a field
  name that is not a token (whitespace in or around it, an obsolete line folding) or a control
  character other than HTAB in the head (a NUL in a field value) 400 (RFC 9110 5.5, 5.6.2;
  RFC 9112 5.1, 5.2), as gunicorn answers them on the web app; a bare CR or LF in the head 400,
  a bare LF as soon as it arrives (a head of LF-ended lines waited for its 408); empty lines
  before a request line are ignored (RFC 9112 2.2: they were a 400); a GET path
  that is not base64 400 with the malformedRequest answer, ``no-store``, as on the web app
  (base64 of something that is not a request is an OCSP-level error: 200 malformedRequest);
  ``GET`` or ``HEAD`` of ``/ocsp`` or ``/ocsp/`` (no request in the path) 405 with ``Allow:
  POST``, as on the web app, the connection kept; a request
  not complete 10 s after its first byte gets 408 and the connection is closed; a new
  connection must send its first byte within 10 s, idle keep-alive connections are closed
  after 30 s; at most 1,024 connections, 128 from one client address: at the limit a new
  connection takes the place of the idle one whose deadline is nearest (one client's idle
  sockets held every place, and every new client was refused). Errors that
  leave unread bytes behind close the connection. Pipelined requests are answered in order.
  An HTTP/1.0 connection persists only when the client sends the ``keep-alive`` connection
  option, and the answer then says ``Connection: keep-alive`` (RFC 9112 9.3, as gunicorn
  answers on the web app; it was kept open without saying so); ``close`` wins, on any field
  line.
* **Caching (RFC 5019 6.2).** Successful answers to a GET without a nonce, pre-signed or
  signed live (a SHA-256 CertID, a serial held nowhere in memory), carry ``Cache-Control:
  public, max-age=<seconds to nextUpdate, at most 300>, no-transform, must-revalidate`` (a
  shared cache re-checks within 5 minutes, so a revocation shows through it), ``ETag`` (SHA-256
  of the DER), ``Last-Modified`` (thisUpdate), ``Expires`` (nextUpdate), as on the web
  endpoint (a live answer's times read by :func:`ocsp.core.response_times`; it was
  ``no-store`` here). A GET or HEAD of such an answer has its preconditions evaluated by
  the web endpoint's code (:func:`sekisho.httpfields.evaluate`, RFC 9110 13.2.2; every field
  line of a list): a failed
  ``If-Match`` (strong comparison) or ``If-Unmodified-Since`` is 412 (``no-store``); an
  ``If-None-Match`` (a list, weak tags, ``*``) naming its ETag gets a 304 with those same
  fields (RFC 9110 15.4.5) and no Content-Type or Content-Length (8.6). If-Modified-Since is
  not read, as on the web endpoint.
  Answers with a nonce, OCSP error answers and every answer to a POST are ``no-store``, with no
  validators, as on the web endpoint: a POST's answer depends on its body, which no cache key
  holds (RFC 9110 9.3.3 lets a cache reuse it only under a matching Content-Location, which we
  do not send), and RFC 5019 5 leaves caching to GET.
* **A crash answers internalError.** An unexpected exception while answering one request (a
  bug) is logged as one line (the exception's type, no traceback to the client) and answered
  like the web endpoint does: 200 with the ``internalError`` OCSP response, ``no-store``. The
  connection and the requests pipelined behind it carry on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import email.utils
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

from ocsp import core
from ocsp.index import (
    CHUNK,
    DER,
    ETAG,
    EXPIRES,
    ISSUER_ID,
    LAST_MODIFIED,
    NEXT_UPDATE_TS,
    SERIAL,
    THIS_UPDATE,
    CaEntries,
    Entry,
    EntryBuilder,
    ResponseIndex,
    StoredLike,
    http_date,
    simple_request,
)
from ocsp.store import ChosenFn, IssuersFn, RefusedFn, Signers
from sekisho.errors import SekishoError
from sekisho.httpfields import evaluate

log = logging.getLogger(__name__)

MAX_HEAD = 8 * 1024
MAX_BODY = core.HTTP_MAX_BODY
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 1024
MAX_PER_CLIENT = 128  # connections from one address (clients behind one NAT share it)
POLL_INTERVAL = 0.5
DEFAULT_VALIDITY = dt.timedelta(hours=24)
OCSP_REQUEST_TYPE = b"application/ocsp-request"
OCSP_RESPONSE_TYPE = b"application/ocsp-response"
FRESH_POLLS = 4  # the index is "following the store" if it synced within this many polls
FRESH_MIN = 5.0  # ... or this many seconds, whichever is longer

ChangesFn = Callable[[object], tuple[list[StoredLike], object]]
SnapshotFn = Callable[[Iterable[int]], list[StoredLike]]
Hand = Callable[..., object]  # runs a callable on the loop (call_soon_threadsafe) or now
ISSUERS_EVERY = 10.0
# The precondition fields read on GET /ocsp/<b64>, by lower-case name: If-Modified-Since is
# not (a "good" answer and the "revoked" one replacing it may share a thisUpdate second).
_CONDITIONS = {
    b"if-match": "If-Match",
    b"if-none-match": "If-None-Match",
    b"if-unmodified-since": "If-Unmodified-Since",
}
Conditions = dict[str, str]
# The Connection field line of an answer: none (HTTP/1.1, the connection persists), keep-alive
# (an HTTP/1.0 client asked for it: it persists), close (closed once the answer is sent).
_PERSIST = b""
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_NO_STORE = b"Cache-Control: no-store\r\n"  # every answer no cache may keep
# RFC 9110 5.6.2: a field name is a token; 5.5: a field value holds no CTL but HTAB (CR and LF
# are looked at apart: only as line ends). A space inside a name, a NUL in a value: 400.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BARE_LF = re.compile(rb"(?<!\r)\n")

_REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _Date:
    """The ``Date`` header value, formatted at most once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self, now: float) -> bytes:
        second = int(now)
        if second != self.second:
            self.second = second
            self.value = email.utils.formatdate(second, usegmt=True).encode()
        return self.value


class Responder:
    """OCSP decisions over the index; no HTTP, no threads (the server schedules)."""

    def __init__(
        self,
        index: ResponseIndex,
        lookup: core.Lookup | None,
        *,
        validity: dt.timedelta = DEFAULT_VALIDITY,
    ) -> None:
        self.index = index
        self.db_lookup = lookup
        self.validity = validity
        # Who signs live answers, by CA id and as a list for select_issuer; ``withheld``: CAs
        # served whose signer may not sign now (their live answers are tryLater).
        self.signers: Mapping[int, core.Issuer] = dict(index.issuers)
        self.issuers: Sequence[core.Issuer] = list(self.signers.values())
        self.withheld: Sequence[core.Issuer] = []
        # True while the index follows the store (the server sets it); until then, and while
        # the store is unreachable, a status held in memory is vouched for only until the
        # nextUpdate of the stored response it came from.
        self.store_fresh: Callable[[], bool] = lambda: False

    def set_signers(self, signing: Iterable[int]) -> None:
        """Of the CAs the index serves, those in ``signing`` sign live answers; the others'
        get tryLater (their pre-signed answers are still served)."""
        served = self.index.issuers
        chosen = set(signing)
        self.signers = {i: x for i, x in served.items() if i in chosen}
        self.issuers = list(self.signers.values())
        self.withheld = [x for i, x in served.items() if i not in chosen]

    def cached(self, request_der: bytes, now: float) -> Entry | None:
        entry = self.index.by_request.get(request_der)
        if entry is not None and entry[NEXT_UPDATE_TS] > now:
            return entry
        return None

    def held_validity(self, entries: Sequence[Entry], now: float) -> dt.timedelta | None:
        """How long an answer signed now from the statuses of ``entries`` may be valid: the
        configured validity while the index follows the store; otherwise no later than the
        earliest of their nextUpdates, and None (not usable) when that is less than the
        minimum validity away."""
        if self.store_fresh():
            return self.validity
        left = min(e[NEXT_UPDATE_TS] for e in entries) - now
        if left < core.MIN_VALIDITY.total_seconds():
            return None
        return min(self.validity, dt.timedelta(seconds=int(left)))

    def prepare(self, request_der: bytes) -> bytes | Callable[[], bytes]:
        """The response now, or a function to run off the loop (it consults the database, or
        signs with a key too slow for the loop: :func:`_signs_on_loop`)."""
        now = time.time()
        simple = simple_request(request_der)
        if simple is not None:
            hit = self.index.by_cert_id.get(simple[0])
            if hit is not None:
                algorithm, entry = hit
                # The index holds this CertID under the issuer that serves it (if it signs).
                signer = self.signers.get(entry[ISSUER_ID])
                if signer is not None:
                    validity = self.held_validity([entry], now)
                    if validity is not None:
                        cert_id = core.CertId(
                            algorithm,
                            signer.name_hashes[algorithm],
                            signer.key_hashes[algorithm],
                            entry[SERIAL],
                            simple[0],
                        )
                        request = core.OcspRequest((cert_id,), simple[1])
                        status = self.index.status(entry)
                        return self._signed(signer, request, lambda _i, _s: status, validity)
        try:
            request = core.parse_request(request_der)
        except core.MalformedRequest:
            return core.MALFORMED_REQUEST
        issuer = core.select_issuer(request, self.issuers)
        if issuer is None:
            if self.withheld and core.select_issuer(request, self.withheld) is not None:
                return core.TRY_LATER  # ours, but its signer may not sign now
            return core.UNAUTHORIZED
        entries = [self.index.entry(issuer, c.serial) for c in request.cert_ids]
        held = [e for e in entries if e is not None]
        if len(held) == len(entries):
            validity = self.held_validity(held, now)
            if validity is not None:
                known = {e[SERIAL]: self.index.status(e) for e in held}
                return self._signed(issuer, request, lambda _i, serial: known[serial], validity)
        if self.db_lookup is None:
            return core.TRY_LATER
        # Not all in memory, or not vouched for any more: every status from the database (a
        # database error answers tryLater).
        db_lookup = self.db_lookup
        chosen = issuer
        return lambda: self._answer(chosen, request, db_lookup, self.validity)

    def _signed(
        self,
        issuer: core.Issuer,
        request: core.OcspRequest,
        lookup: core.Lookup,
        validity: dt.timedelta,
    ) -> bytes | Callable[[], bytes]:
        """An answer from statuses held in memory: signed now when the key signs in
        microseconds, else a function for the thread pool (see :func:`_signs_on_loop`); in
        the pool too when the lint gate has yet to pass this answer's shape (pkilint takes
        milliseconds, and its import 0.3 s the first time)."""
        on_loop = _signs_on_loop(issuer)
        if on_loop and issuer.lint is not None:  # (the statuses looked up only for the gate)
            statuses = [lookup(issuer, cert_id.serial) for cert_id in request.cert_ids]
            on_loop = not core.lint_pending(issuer, statuses, request.nonce)
        if on_loop:
            return self._answer(issuer, request, lookup, validity)
        return lambda: self._answer(issuer, request, lookup, validity)

    def _answer(
        self,
        issuer: core.Issuer,
        request: core.OcspRequest,
        lookup: core.Lookup,
        validity: dt.timedelta,
    ) -> bytes:
        try:
            return core.answer(
                request,
                (issuer,),
                lookup,
                now=dt.datetime.now(dt.UTC),
                validity=validity,
            )
        except SekishoError as exc:  # the lint gate refused the answer (rule pkilint)
            log.error("OCSP answer not signed", extra={"code": exc.code, "detail": exc.message})
            return core.INTERNAL_ERROR
        except Exception:  # a bug must not kill the connection handler: internalError
            log.exception("OCSP answer failed")
            return core.INTERNAL_ERROR


def _signs_on_loop(issuer: core.Issuer) -> bool:
    """Whether ``issuer``'s key signs on the event loop: an EC or EdDSA key held in this
    process (tens of microseconds). A token's key (:mod:`hsm.pkcs11`: a call into the module
    under its process-wide lock, a network round trip, maybe a re-initialisation after a
    device error; then a verification) or an RSA key (3 ms at 3072 bits, 10 ms at 4096) signs
    in the thread pool: on the loop, one client's nonce requests held up every other answer,
    the pre-signed hot path and /healthz included, for as long as each signature took."""
    key = issuer.key
    if type(key).__module__.startswith("hsm.pkcs11"):
        return False
    return isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
    )


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Automatic cycle collection paused while stored responses are read and made into
    entries in bulk (a CA's snapshot, the initial load), and all that is then frozen
    (:func:`gc.freeze`). A collection on the way would traverse every row read and every
    entry made (the first collection to see a new entry tuple is the one that untracks it)
    holding the GIL: a pause of the event loop as long as building on it. Entries hold no
    reference cycles: refcounting frees those replaced or dropped, frozen or not."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def initial_index(
    issuers: Mapping[int, core.Issuer], read: Callable[[], tuple[Sequence[StoredLike], object]]
) -> tuple[ResponseIndex, object]:
    """The index ``ocsp serve`` starts with, from ``read()`` (every stored response, and the
    cursor to follow the store from), and that cursor. Built as a CA's snapshot is, with
    automatic cycle collection paused, then frozen: with 10^6 responses the first full
    collection would otherwise walk every one of them with the event loop stopped."""
    with _no_cycle_collection():
        rows, cursor = read()
        index = ResponseIndex(issuers)
        index.apply(rows)
        del rows
    return index, cursor


def _cache_fields(
    etag: str, last_modified: str, expires: str, next_update: float, now: float
) -> bytes:
    """The caching fields and validators of an answer a cache may keep (its 200 and its 304):
    ``etag`` quoted, the HTTP-dates of its thisUpdate and nextUpdate, the POSIX time of the
    latter."""
    max_age = max(0, min(int(next_update - now), core.CACHE_MAX_AGE))
    return (
        f"Cache-Control: public, max-age={max_age}, no-transform, must-revalidate\r\n"
        f"ETag: {etag}\r\nLast-Modified: {last_modified}\r\nExpires: {expires}\r\n"
    ).encode()


def _call_now(fn: Callable[..., object], *args: object) -> None:
    fn(*args)


def _signers(issuers: Mapping[int, core.Issuer]) -> dict[int, tuple[object, object]]:
    """What identifies who signs for which CA: the CA and responder certificates, by id."""
    return {i: (x.certificate, x.responder_certificate) for i, x in issuers.items()}


class Server:
    """Shared state of one listening server: index, responder, connections, follower."""

    def __init__(
        self,
        responder: Responder,
        *,
        changes_since: ChangesFn | None = None,
        cursor: object = None,
        poll: float = POLL_INTERVAL,
        load_issuers: IssuersFn | None = None,
        refused_signers: RefusedFn | None = None,
        chosen_responders: ChosenFn | None = None,
        snapshot: SnapshotFn | None = None,
        issuers_every: float = ISSUERS_EVERY,
        executor_workers: int = 4,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_per_client: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # POSIX seconds: is a signer's certificate valid now?
        # Connections one address may hold; 0: no limit (behind a proxy every connection
        # comes from the proxy's address, which limits its own clients).
        self.max_per_client = MAX_PER_CLIENT if max_per_client is None else max_per_client
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.responder = responder
        self.index = responder.index
        self.changes_since = changes_since
        self.cursor = cursor
        self.poll = poll
        self.load_issuers = load_issuers
        self.snapshot = snapshot
        self.issuers_every = issuers_every
        self.issuers_ok = True
        # What the follower handed to the loop (read and written by the follower only, once
        # started): who signs for which CA (the issuers served, those that sign, the signer
        # troubles reported), and the CAs whose responses were given (by CA certificate).
        self.signers = Signers(
            load_issuers or (lambda: (dict(self.index.issuers), {})),
            refused_signers,
            issuers_every,
            log,
            self.index.issuers,
            chosen_responders,
        )
        self.loaded: dict[int, x509.Certificate] = {
            i: x.certificate for i, x in self.index.issuers.items()
        }
        # (Follower.) The last batch's responses, by (CA id, serial): changes_since windows
        # overlap, and a response handed over already is not made into an entry again.
        self.handed: dict[tuple[int, int], bytes] = {}
        # (Loop.) The store's changes being applied, a bounded step at a time, in order.
        self.updates: collections.deque[Iterator[None]] = collections.deque()
        self.date = _Date()
        self.connections: set[HttpProtocol] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=executor_workers, thread_name_prefix="ocsp-lookup"
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event = threading.Event()
        self.last_sync = time.time()
        self.store_ok = True
        self.follower: threading.Thread | None = None
        responder.store_fresh = self.store_fresh

    # -- store following --------------------------------------------------------------------
    def start_follower(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Loop, before listening.) Decide who signs now, then follow the store."""
        self.loop = loop
        if self.load_issuers is not None:
            self._reload_issuers(_call_now, follow=False)
        if self.changes_since is None:
            return
        self.follower = threading.Thread(target=self._follow, name="ocsp-follow", daemon=True)
        self.follower.start()

    def _follow(self) -> None:
        assert self.changes_since is not None and self.loop is not None
        issuers_due = time.monotonic() + self.issuers_every
        while not self.stop_event.wait(self.poll):
            if self.load_issuers is not None and time.monotonic() >= issuers_due:
                issuers_due = time.monotonic() + self.issuers_every
                self._reload_issuers(self.loop.call_soon_threadsafe, follow=True)
            elif self.load_issuers is not None and self._withdraw_refused(
                self.loop.call_soon_threadsafe
            ):
                issuers_due = time.monotonic() + self.issuers_every
                self._reload_issuers(self.loop.call_soon_threadsafe, follow=True)
            self._follow_store()

    def _follow_store(self, building: EntryBuilder | None = None) -> None:
        """(Follower thread.) Hand the store's changes to the loop; a CA whose snapshot is
        being built meanwhile (the loop skips its rows until it is installed) takes its own."""
        assert self.changes_since is not None and self.loop is not None
        try:
            batch, cursor = self.changes_since(self.cursor)
        except Exception:  # the store is away: keep serving what we have
            if self.store_ok:
                log.warning("following the OCSP store failed", exc_info=True)
            self.store_ok = False
            return
        self.store_ok = True
        self.cursor = cursor
        self.last_sync = time.time()
        handed = self.handed
        # A certificate may come twice in a batch (its status change, then the window): its
        # last row is what it is now, and is compared with what the last batch left it at.
        last = {(r.issuer_id, r.serial): r for r in batch}
        self.handed = {key: r.der for key, r in last.items()}
        fresh = [r for key, r in last.items() if handed.get(key) != r.der]
        parts = self._entries(fresh)
        if parts:
            self.loop.call_soon_threadsafe(self.update, parts)
        if building is not None:
            building.follow(batch)

    def _entries(self, rows: Sequence[StoredLike]) -> list[CaEntries]:
        """(Follower thread.) ``rows`` of the CAs whose responses the loop holds, made into
        entries here. A young collection after every ``CHUNK`` stops tracking the tuples just
        made (unless a bulk load has collection paused: it freezes them), so that no later
        collection on the loop has to visit a whole mass re-sign's worth of them at once."""
        by_ca: dict[int, list[StoredLike]] = {}
        for row in rows:
            by_ca.setdefault(row.issuer_id, []).append(row)
        parts = []
        for ca_id, group in sorted(by_ca.items()):
            issuer = self.signers.served.get(ca_id)
            if issuer is None or self.loaded.get(ca_id) != issuer.certificate:
                continue  # not held: its snapshot, read later, has these
            building = EntryBuilder(ca_id, issuer)
            for start in range(0, len(group), CHUNK):
                building.add(group[start : start + CHUNK])
                if gc.isenabled():
                    gc.collect(0)
            parts.append(building.done())
        return parts

    def _reload_issuers(self, hand: Hand, *, follow: bool) -> None:
        """(Follower thread; at start, the loop before it listens.) Load who signs for which CA,
        one CA at a time, and hand what changed to the loop (``hand``); then, CA by CA, the
        stored responses of CAs not held so far, made into entries here, off the loop (the
        store's changes keep being followed meanwhile when ``follow``). Who may sign is
        decided by :class:`ocsp.store.Signers` (the web app's endpoint follows the same rules):
        a CA served with no signer that may sign gets tryLater for live answers; its pre-signed
        answers are served until their nextUpdate."""
        assert self.load_issuers is not None
        now = self.clock()
        signers = self.signers
        before = (_signers(signers.served), signers.signing)
        try:
            signers.reload(now)
        except Exception:  # the store is away: keep signing as before, while that may sign
            if self.issuers_ok:
                log.warning("reloading the OCSP issuers failed", exc_info=True)
            self.issuers_ok = False
            if signers.withdraw_ending(now):
                hand(self.responder.set_signers, signers.signing)
            return
        served, signing = signers.served, signers.signing
        if (_signers(served), signing) != before:
            log.info(
                "OCSP issuers changed",
                extra={"issuers": sorted(served), "signing": sorted(signing)},
            )
            self.loaded = {
                i: c for i, c in self.loaded.items() if i in served and served[i].certificate == c
            }
            hand(self.set_issuers, served, signing)
        for ca_id, issuer in sorted(served.items()):
            if self.loaded.get(ca_id) == issuer.certificate:
                continue
            try:
                if not self._load_responses(ca_id, issuer, hand, follow=follow):
                    return  # stopping
            except Exception:  # the store is away: read them at the next reload
                if self.issuers_ok:
                    log.warning("reading the stored OCSP responses failed", exc_info=True)
                self.issuers_ok = False
                return
            self.loaded[ca_id] = issuer.certificate
        self.issuers_ok = True

    def _withdraw_refused(self, hand: Hand) -> bool:
        """(Follower thread, every poll between two reloads.) A responder revoked since the
        last reload (by another process: its successor is made there) signs no live answer
        from the next poll on, not from the next reload on; a store error leaves it to the
        reload. True when a withheld CA's successor is in the store: reload now (its live
        answers were tryLater until the next reload, up to ``issuers_every``)."""
        try:
            if self.signers.withdraw_refused():
                hand(self.responder.set_signers, self.signers.signing)
            return self.signers.successor_waiting()
        except Exception:  # the store is away: the reload decides (and warns) then
            log.debug("checking the OCSP signers' status failed", exc_info=True)
            return False

    def _load_responses(self, ca_id: int, issuer: core.Issuer, hand: Hand, *, follow: bool) -> bool:
        """(Follower thread.) Read the stored responses of one CA, make them into entries here,
        a slice at a time, following the store between slices (``follow``), and hand the whole
        to the loop, which swaps it in without a long pause. False when stopping."""
        with _no_cycle_collection():
            rows = self.snapshot([ca_id]) if self.snapshot is not None else []
            building = EntryBuilder(ca_id, issuer)
            follow_due = time.monotonic() + self.poll
            for start in range(0, len(rows), CHUNK):
                if self.stop_event.is_set():
                    return False
                building.add(rows[start : start + CHUNK])
                if follow and self.changes_since is not None and time.monotonic() >= follow_due:
                    self._follow_store(building)
                    follow_due = time.monotonic() + self.poll
            del rows
        built = building.done()
        log.info("OCSP responses of a CA loaded", extra={"ca_id": ca_id, "responses": len(built)})
        hand(self.install, built)
        return True

    def set_issuers(self, issuers: Mapping[int, core.Issuer], signing: Iterable[int]) -> None:
        """(Loop.) Serve ``issuers`` from now on; those in ``signing`` sign live answers."""
        steps = self.index.set_issuers(issuers)
        self.responder.set_signers(signing)
        self._steps(steps)

    def install(self, built: CaEntries) -> None:
        """(Loop.) Hold the responses of one CA, made into entries off the loop."""
        self._steps(self.index.install(built))

    def update(self, parts: list[CaEntries]) -> None:
        """(Loop.) The store's changes, made into entries by the follower: applied ``CHUNK``
        at a time, after those handed over before them (an older change never lands after a
        newer one; which CAs take them is decided now, see ResponseIndex.update)."""
        self.updates.append(self.index.update(parts))
        if len(self.updates) == 1:
            self._next_update()

    def _next_update(self) -> None:
        """(Loop.) One step of the oldest update; the next one once the loop has gone round
        (not serving: all at once)."""
        while self.updates:
            try:
                next(self.updates[0])
            except StopIteration:
                self.updates.popleft()
            if self.loop is not None:
                if self.updates:
                    self.loop.call_soon(self._next_update)
                return

    def _steps(self, steps: Iterator[None]) -> None:
        """(Loop.) One bounded step of a change to the index now, the next one once the loop
        has gone round (answered the requests that came in meanwhile)."""
        if self.loop is None:  # not serving: all at once
            for _ in steps:
                pass
            return
        try:
            next(steps)
        except StopIteration:
            return
        self.loop.call_soon(self._steps, steps)

    def apply(self, batch: Iterable[StoredLike]) -> int:
        return self.index.apply(batch)

    def store_fresh(self) -> bool:
        """The index followed the store successfully within the last few polls."""
        if self.changes_since is None or not self.store_ok:
            return False
        return time.time() - self.last_sync <= max(FRESH_MIN, FRESH_POLLS * self.poll)

    def health(self) -> bytes:
        doc = {
            "status": "ok",
            "responses": len(self.index),
            "store": "ok" if self.store_ok else "unreachable",
            "last_sync_age": round(time.time() - self.last_sync, 3),
        }
        return json.dumps(doc).encode()

    # -- timeouts ---------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Close connections past their deadline; once a second (no per-request timers)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadline(now)

    def close(self) -> None:
        self.stop_event.set()
        for conn in list(self.connections):
            conn.abort()
        self.executor.shutdown(wait=False, cancel_futures=True)


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "body_len",
        "buf",
        "busy",
        "client",
        "closing",
        "deadline",
        "eof",
        "head",
        "server",
        "transport",
        "write_paused",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closing = False
        self.deadline = 0.0
        # method, target, the Connection field of its answer, precondition fields (None: none)
        self.head: tuple[bytes, bytes, bytes, Conditions | None] | None = None
        self.body_len = 0
        self.write_paused = False
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.client: str | None = None  # its address, while counted in server.per_client

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if 0 < server.max_per_client <= server.per_client[client]:
            self.closing = True
            transport.abort()
            return
        if len(server.connections) >= MAX_CONNECTIONS:
            idle = [c for c in server.connections if c.idle()]
            if not idle:
                self.closing = True
                transport.abort()
                return
            min(idle, key=lambda c: c.deadline).abort()  # its place goes to this one
        server.connections.add(self)
        self.client = client
        server.per_client[client] += 1
        # The first request's first byte within the request timeout, not the idle one.
        self.deadline = time.monotonic() + server.request_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._leave()

    def _leave(self) -> None:
        """Out of the server's connections and its count for this client (once)."""
        server = self.server
        server.connections.discard(self)
        if self.client is not None:
            server.per_client[self.client] -= 1
            if server.per_client[self.client] <= 0:
                del server.per_client[self.client]
            self.client = None

    def idle(self) -> bool:
        """Between requests: nothing received, nothing being answered (its place may go to a
        new connection)."""
        return not (
            self.closing or self.busy or self.buf or self.head is not None or self.write_paused
        )

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.buf and self.head is None:
            self.deadline = time.monotonic() + self.server.request_timeout
        self.buf += data
        if not self.busy:
            self._process()
        elif len(self.buf) > MAX_HEAD + MAX_BODY and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """The client shut its sending side (``shutdown(SHUT_WR)``, as some clients do once
        the request is out): the requests it sent are still answered. While a lookup is in
        the thread pool the transport stays open for writing and ``done`` closes it once
        every complete request is answered; otherwise everything complete has been
        answered already, and it closes once they are sent (``finish``: bounded, so a client
        that reads nothing does not keep it). Before, asyncio closed it at once: answers
        looked up in the database were never sent."""
        self.eof = True
        if not self.busy and not self.closing:
            self.finish()
        return True  # this protocol closes the transport itself

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests until it does.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def check_deadline(self, now: float) -> None:
        if self.busy or now < self.deadline:
            return
        if self.closing:
            # Closed after its last answer (finish), which the client has not taken in
            # time: dropped, and its place freed (else a client that never reads would keep
            # sockets open past every limit).
            if self.transport is not None:
                self.transport.abort()
            self._leave()
            return
        if self.write_paused and self.transport is not None:
            self.closing = True
            self.transport.abort()  # it does not read: close() would wait for it forever
            return
        if self.buf or self.head is not None:
            self._error(408, b"request not complete in time\n")
        else:
            self.abort()

    def abort(self) -> None:
        """Close now: at once when nothing waits to be sent, else dropped (RST); its place is
        free at once (connection_lost comes later)."""
        self.closing = True
        self._leave()
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()  # close() would wait for a client that may never read
            else:
                transport.close()

    def finish(self) -> None:
        """Close once what was written has been sent: the connection keeps its place until
        then, for at most the request timeout (then ``check_deadline`` drops it)."""
        self.closing = True
        self.deadline = time.monotonic() + self.server.request_timeout
        if self.transport is not None:
            self.transport.close()

    # -- parsing ----------------------------------------------------------------------------
    def _process(self) -> None:
        buf = self.buf
        while not self.closing and not self.busy:
            if self.head is None:
                while buf[:2] == b"\r\n":
                    # RFC 9112 2.2: empty lines before a request line are ignored (a client
                    # that ends a POST body with CRLF); they were read as an empty request line.
                    del buf[:2]
                if not buf:
                    return
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._error(431, b"request head over 8 KiB\n")
                    elif _BARE_LF.search(buf, 0, MAX_HEAD + 4) is not None:
                        # Lines ended by LF alone: the head that ends "\n\n" never matched
                        # the CRLF end above and waited for its 408 (10 s). Refused at once,
                        # as _parse_head refuses a bare LF inside a head (RFC 9112 2.2).
                        self._error(400, b"bad header line\n")
                    return
                raw = bytes(buf[:end])
                del buf[: end + 4]
                if not self._parse_head(raw):
                    return
                if self.head is None:  # answered from the head alone
                    continue
            if len(buf) < self.body_len:
                return
            method, target, connection, conditions = self.head
            body = bytes(buf[: self.body_len])
            del buf[: self.body_len]
            self.head = None
            self._dispatch(method, target, connection, body, conditions)
            if not self.closing and not self.busy:
                self.deadline = time.monotonic() + (
                    self.server.request_timeout if buf else self.server.idle_timeout
                )

    def _parse_head(self, raw: bytes) -> bool:
        """Validate the head; set ``self.head`` (and the body length) or answer an error."""
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._error(400, b"bad request line\n")
            return False
        method, target, version = parts
        if target[:1] != b"/" and (
            target[:7].lower() == b"http://" or target[:8].lower() == b"https://"
        ):
            # Absolute form (RFC 9112 3.2.2: a server must accept it): its path is the target.
            rest = target.split(b"//", 1)[1]
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            self._error(505 if version.startswith(b"HTTP/") else 400, b"HTTP/1.x only\n")
            return False
        length: bytes | None = None
        content_type = b""
        conditions: Conditions | None = None
        expect = False
        close = keep_alive = False  # the connection options "close", "keep-alive"
        hosts = 0
        crlf = len(lines) - 1
        if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
            # A bare CR or LF inside the head: RFC 9112 2.2 lets us refuse it, and a proxy in
            # front may read it as a line break. (One look at the whole head.)
            self._error(400, b"bad header line\n")
            return False
        if _CTL.search(raw) is not None:  # in a value (5.5), a name or the request line
            self._error(400, b"control character in the request head\n")
            return False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or _TOKEN.fullmatch(name) is None:
                self._error(400, b"bad header line\n")
                return False
            name = name.lower()
            value = value.strip()
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                if length is not None and length != value:
                    self._error(400, b"conflicting Content-Length\n")
                    return False
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"connection":  # a list of options; every field line counts
                options = [option.strip(b" \t") for option in value.lower().split(b",")]
                close = close or b"close" in options
                keep_alive = keep_alive or b"keep-alive" in options
            elif name == b"transfer-encoding":
                self._error(501, b"Transfer-Encoding is not supported\n")
                return False
            elif name in _CONDITIONS:  # several field lines are one list (RFC 9110 5.3)
                if conditions is None:
                    conditions = {}
                field, text = _CONDITIONS[name], value.decode("latin-1")
                before = conditions.get(field)
                conditions[field] = text if before is None else f"{before}, {text}"
            elif name == b"expect":
                if value.lower() != b"100-continue":
                    self._error(400, b"unsupported Expect\n")  # RFC 9110 wants 417; rare
                    return False
                # RFC 9110 10.1.1: MUST be ignored in an HTTP/1.0 request (no 1xx there).
                expect = version == b"HTTP/1.1"
        if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
            self._error(400, b"an HTTP/1.1 request has exactly one Host field\n")  # RFC 9112 3.2
            return False
        body_len = 0
        if length is not None:
            if not length.isdigit() or len(length) > 12:
                self._error(400, b"bad Content-Length\n")
                return False
            body_len = int(length)
        if method == b"POST":
            if length is None:
                self._error(411, b"Content-Length required\n")
                return False
            if body_len > MAX_BODY:
                self._error(413, b"body over 64 KiB\n")
                return False
            media = content_type.split(b";", 1)[0].strip().lower()
            if target.split(b"?", 1)[0] not in (b"/ocsp", b"/ocsp/", b"/"):
                self._error(404, b"not found\n")
                return False
            if media != OCSP_REQUEST_TYPE:
                self._error(415, b"Content-Type must be application/ocsp-request\n")
                return False
            if expect and self.transport is not None and len(self.buf) < body_len:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif method in (b"GET", b"HEAD"):
            if body_len:
                self._error(400, b"GET with a body\n")
                return False
        else:
            self._error(405, b"GET or POST\n", extra=b"Allow: GET, HEAD, POST\r\n")
            return False
        # RFC 9112 9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive", and
        # then the answer says so (before, it did not, and the connection stayed open).
        if close or (version == b"HTTP/1.0" and not keep_alive):
            connection = _CLOSE
        else:
            connection = _PERSIST if version == b"HTTP/1.1" else _KEEP_ALIVE
        self.head = (method, target, connection, conditions)
        self.body_len = body_len
        return True

    # -- answering --------------------------------------------------------------------------
    def _dispatch(
        self,
        method: bytes,
        target: bytes,
        connection: bytes,
        body: bytes,
        conditions: Conditions | None,
    ) -> None:
        """Answer one request. Whatever it raises is a bug: logged in one line and answered
        internalError, never allowed up to the transport (which would drop the connection and
        the requests pipelined on it without an answer)."""
        try:
            self._handle(method, target, connection, body, conditions)
        except Exception as exc:
            log.error(
                "OCSP request failed",
                exc_info=exc,
                extra={"method": method.decode("latin-1"), "error": type(exc).__name__},
            )
            self._ocsp(core.INTERNAL_ERROR, connection, method, time.time())

    def _handle(
        self,
        method: bytes,
        target: bytes,
        connection: bytes,
        body: bytes,
        conditions: Conditions | None,
    ) -> None:
        server = self.server
        now = time.time()
        if method == b"POST":
            request_der = body
        else:
            path = target.split(b"?", 1)[0]
            if path in (b"/ocsp", b"/ocsp/"):  # POST's resource, no request in the path
                fields = b"Allow: POST\r\n" + _NO_STORE
                self._send(405, b"POST only\n", b"text/plain", connection, method, now, fields)
                return
            if path.startswith(b"/ocsp/"):
                decoded = core.decode_get_path(path[6:].decode("latin-1"))
                if decoded is None:  # not base64: 400, with the OCSP answer (as the web app)
                    self._send(
                        400, core.MALFORMED_REQUEST, OCSP_RESPONSE_TYPE, connection, method, now,
                        _NO_STORE,
                    )  # fmt: skip
                    return
                request_der = decoded
            elif path == b"/healthz":
                self._send(200, server.health(), b"application/json", connection, method, now)
                return
            else:
                self._send(404, b"not found\n", b"text/plain", connection, method, now)
                return
        entry = server.responder.cached(request_der, now)
        if entry is not None:
            self._reply(entry[DER], connection, method, now, conditions, entry)
            return
        result = server.responder.prepare(request_der)
        if isinstance(result, bytes):
            self._reply(result, connection, method, now, conditions)
            return
        loop = server.loop or asyncio.get_running_loop()
        future = loop.run_in_executor(server.executor, result)
        self.busy = True  # once handed over: a failure to hand it is answered internalError

        def done(fut: asyncio.Future[bytes]) -> None:
            self.busy = False
            if self.closing:
                return
            try:
                der = fut.result()
            except Exception:
                log.exception("OCSP lookup failed")
                der = core.INTERNAL_ERROR
            self._reply(der, connection, method, time.time(), conditions)
            if not self.closing:
                if self.transport is not None and not self.write_paused:
                    self.transport.resume_reading()
                self.deadline = time.monotonic() + (
                    self.server.request_timeout if self.buf else self.server.idle_timeout
                )
                self._process()
            if self.eof and not self.busy and not self.closing:
                self.finish()  # every complete request answered; nothing more can come

        future.add_done_callback(done)

    def _reply(
        self,
        der: bytes,
        connection: bytes,
        method: bytes,
        now: float,
        conditions: Conditions | None,
        entry: Entry | None = None,
    ) -> None:
        """Send an OCSP answer: pre-signed (``entry``) or signed live. One a cache may keep (a
        successful answer to a GET or HEAD, without a nonce) carries the caching fields and
        validators, and the request's preconditions are evaluated against it (RFC 9110
        13.2.2, by the web endpoint's code); any other is ``no-store``, as a POST's answer."""
        if method == b"POST":
            self._ocsp(der, connection, method, now)
            return
        if entry is not None:
            etag, this_update = entry[ETAG], entry[THIS_UPDATE]
            fields = _cache_fields(
                etag, entry[LAST_MODIFIED], entry[EXPIRES], entry[NEXT_UPDATE_TS], now
            )
        else:
            times = core.response_times(der)
            if times is None:
                self._ocsp(der, connection, method, now)
                return
            this_update, next_update = times
            etag = f'"{core.entity_tag(der)}"'
            fields = _cache_fields(
                etag, http_date(this_update), http_date(next_update), next_update.timestamp(), now
            )
        if conditions is not None:
            status = evaluate(
                method.decode("latin-1"),
                conditions,
                etag[1:-1],  # quoted here
                this_update,
                dt.datetime.fromtimestamp(now, dt.UTC),
                modified_since=False,
            )
            if status == 304:
                self._send(304, b"", b"", connection, b"HEAD", now, fields)
                return
            if status == 412:  # not stored by caches, as the web endpoint's problem
                self._send(
                    412,
                    b"precondition failed\n",
                    b"text/plain",
                    connection,
                    method,
                    now,
                    _NO_STORE,
                )
                return
        self._send(200, der, OCSP_RESPONSE_TYPE, connection, method, now, fields)

    def _ocsp(self, der: bytes, connection: bytes, method: bytes, now: float) -> None:
        """Send an OCSP answer no cache may keep."""
        self._send(200, der, OCSP_RESPONSE_TYPE, connection, method, now, _NO_STORE)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        connection: bytes,
        method: bytes,
        now: float,
        extra: bytes = b"",
    ) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if status == 304:  # no representation metadata, no Content-Length (RFC 9110 8.6, 15.4.5)
            framing = b""
        else:
            framing = b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body))
        head = b"HTTP/1.1 %d %s\r\nDate: %s\r\n%s%s%s\r\n" % (
            status,
            _REASONS[status].encode(),
            self.server.date.now(now),
            framing,
            extra,
            connection,
        )
        transport.write(head if method == b"HEAD" else head + body)
        if connection == _CLOSE:
            self.finish()

    def _error(self, status: int, message: bytes, extra: bytes = b"") -> None:
        """An HTTP-level error; the connection is closed (unread bytes may follow)."""
        self.head = None
        self._send(status, message, b"text/plain", _CLOSE, b"GET", time.time(), extra)
        if not self.closing:
            self.finish()


async def serve(
    server: Server,
    host: str,
    port: int,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Listen on (host, port) until ``stop`` is set (or forever); ``ready(port)`` once bound."""
    loop = asyncio.get_running_loop()
    server.start_follower(loop)
    listener = await loop.create_server(
        lambda: HttpProtocol(server), host, port, backlog=1024, reuse_address=True
    )
    sweeper = asyncio.create_task(server.sweep())
    try:
        bound = listener.sockets[0].getsockname()[1]
        if ready is not None:
            ready(bound)
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        sweeper.cancel()
        listener.close()
        server.close()


def run(
    server: Server,
    host: str,
    port: int,
    *,
    ready: Callable[[int], None] | None = None,
    use_uvloop: bool = True,
) -> None:
    """Run until SIGINT/SIGTERM (the caller's process)."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(server, host, port, ready=ready, stop=stop)

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        uvloop.run(main())
    else:
        asyncio.run(main())
