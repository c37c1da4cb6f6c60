"""The in-memory index of pre-signed OCSP responses the standalone server answers from.

Keyed three ways, all built once per stored response (never on the hot path):

* ``by_request``: the exact DER of the RFC 5019 request a client sends for it (one SHA-1
  CertID with NULL hash parameters, no nonce, no extensions) -> entry. A request equal to it
  byte for byte is answered without parsing: one dict lookup.
* ``by_cert_id``: SHA-1 and SHA-256 CertID DER -> (its hash algorithm, entry), for requests
  in the common shape with a nonce or a SHA-256 CertID.
* ``by_serial``: issuer id -> serial -> entry, for requests that must be signed on the fly
  (a nonce, a SHA-256 CertID, several CertIDs): the *status* they carry is the stored
  response's, decoded from its DER the first time it is needed (:meth:`ResponseIndex.status`).

Responses for an issuer that is not loaded are dropped (never answered "good" by default), and
so are those of a served CA whose responses are not loaded yet (``by_serial`` has no entry for
it): its snapshot, read after it was added, holds them.

**Never a long pause on the event loop.** The index lives on the server's event loop, which
also answers every request. A CA's whole snapshot (10^5..10^6 responses, some 20 us each to
make into entries) is built off the loop by :class:`EntryBuilder`;
:meth:`ResponseIndex.install` then swaps its statuses in with one reference and merges its
request keys ``CHUNK`` at a time, :meth:`ResponseIndex.update` applies the store's changes (a
mass re-sign: 10^5 at once), also made into entries off the loop, ``CHUNK`` at a time, and
:meth:`ResponseIndex.set_issuers` drops the responses of CAs no longer served the same way:
each returns an iterator of the remaining steps, and the caller lets the loop answer requests
between two steps. Until a response's request keys are merged its requests are signed on the
fly from the status in ``by_serial``: never a wrong answer, only a slower one.

**Nothing for the cycle collector to walk.** An entry is a plain tuple of ints, bytes, str,
float and datetimes, and ``by_cert_id`` holds (str, entry) tuples: CPython stops tracking such
a tuple once a young collection finds nothing tracked in it, so a full collection does not walk
the 10^5..10^6 responses held (with objects, some five per response, it took over a second per
10^6 with the GIL held: one pause of the event loop) however often they are replaced as the
store re-signs them. A bulk load (a snapshot, the initial load) is built with automatic
collection paused and then frozen (:func:`gc.freeze`), so that no collection has to visit its
new tuples even once.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, Protocol

from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509

from ca import der as w
from ocsp import core
from ocsp import der as r


class StoredLike(Protocol):
    """What :class:`ocsp.store.StoredResponse` offers (structural, so tests may pass fakes)."""

    @property
    def issuer_id(self) -> int: ...
    @property
    def serial(self) -> int: ...
    @property
    def der(self) -> bytes: ...
    @property
    def this_update(self) -> dt.datetime: ...
    @property
    def next_update(self) -> dt.datetime: ...


def rfc5019_request(issuer: core.Issuer, serial: int) -> bytes:
    """The DER OCSPRequest an RFC 5019 client sends: one SHA-1 CertID, nothing else."""
    return w.sequence(w.sequence(w.sequence(w.sequence(issuer.cert_id(serial, "sha1").der))))


def http_date(value: dt.datetime) -> str:
    return email.utils.format_datetime(value.astimezone(dt.UTC), usegmt=True)


# One stored response as the server holds it: a plain tuple (see the module doc), its fields
# read by the indices below.
Entry = tuple[int, int, bytes, dt.datetime, dt.datetime, float, str, str, str, bytes]
ISSUER_ID: Final = 0
SERIAL: Final = 1
DER: Final = 2  # the stored response, served byte for byte
THIS_UPDATE: Final = 3
NEXT_UPDATE: Final = 4
NEXT_UPDATE_TS: Final = 5  # POSIX seconds, compared with time.time() on the hot path
ETAG: Final = 6
LAST_MODIFIED: Final = 7  # HTTP date of thisUpdate
EXPIRES: Final = 8  # HTTP date of nextUpdate
REQUEST_DER: Final = 9  # the RFC 5019 request it answers
STATUS_CACHE = 65_536  # decoded statuses kept (about 40 us each to decode)


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def status_of(response_der: bytes) -> core.Status:
    """The certStatus of the (single) SingleResponse of a stored OCSP response."""
    parsed = asn1_ocsp.OCSPResponse.load(response_der)
    basic = parsed["response_bytes"]["response"].parsed
    cert_status = basic["tbs_response_data"]["responses"][0]["cert_status"]
    if cert_status.name == "good":
        return core.GOOD
    if cert_status.name == "revoked":
        info = cert_status.chosen
        reason_name = info["revocation_reason"].native
        reason = getattr(x509.ReasonFlags, reason_name) if reason_name else None
        return core.Revoked(info["revocation_time"].native, reason)
    return core.UNKNOWN


# An entry and its ``by_cert_id`` items: (CertID DER, (its hash, the entry)), one per served
# hash (core.SERVED_HASHES); made with the entry, so that the loop allocates nothing to hold it.
Keyed = tuple[Entry, tuple[tuple[bytes, tuple[str, Entry]], ...]]


def _make_entry(issuer_id: int, issuer: core.Issuer, stored: StoredLike) -> Keyed:
    """The entry of one stored response, and the ``by_cert_id`` items that answer with it."""
    this_update = _utc(stored.this_update)
    next_update = _utc(stored.next_update)
    entry: Entry = (
        issuer_id,
        stored.serial,
        stored.der,
        this_update,
        next_update,
        next_update.timestamp(),
        '"' + core.entity_tag(stored.der) + '"',
        http_date(this_update),
        http_date(next_update),
        rfc5019_request(issuer, stored.serial),
    )
    return entry, tuple(
        (issuer.cert_id(stored.serial, h).der, (h, entry)) for h in core.SERVED_HASHES
    )


CHUNK = 1_000  # entries per step of a bounded change on the event loop (about 1 ms to merge)


@dataclasses.dataclass(frozen=True, slots=True)
class CaEntries:
    """One CA's stored responses made into entries off the event loop (:class:`EntryBuilder`):
    its whole snapshot for :meth:`ResponseIndex.install`, or some of its changes for
    :meth:`ResponseIndex.update`."""

    issuer_id: int
    certificate: x509.Certificate  # the CA's: the keys below hash its name and key
    by_serial: dict[int, Entry]
    keys: list[Keyed]
    # Serials whose held answer is to go (withdrawn: behind the certificate's status).
    withdrawn: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.by_serial)


class EntryBuilder:
    """Makes one CA's stored responses into entries, off the event loop, a slice at a time
    (:meth:`add`); a response read later replaces the one read before it. The store's changes
    read while a snapshot is being built (:meth:`follow`) win over every row of that snapshot,
    also over those added after them: the whole snapshot was read before them."""

    def __init__(self, issuer_id: int, issuer: core.Issuer) -> None:
        self.issuer_id = issuer_id
        self.issuer = issuer
        self.by_serial: dict[int, Entry] = {}
        self.keys: list[Keyed] = []
        self.followed: set[int] = set()  # serials taken from changes read after the snapshot
        self.withdrawn: set[int] = set()  # serials whose last word was "withdrawn"

    def add(self, rows: Iterable[StoredLike]) -> None:
        """Take the responses of this CA among ``rows`` (the others are skipped), except
        those a change given to :meth:`follow` holds a newer answer for."""
        followed = self.followed
        for stored in rows:
            if stored.issuer_id != self.issuer_id or stored.serial in followed:
                continue
            self._take(stored)

    def follow(self, rows: Iterable[StoredLike]) -> None:
        """Take the responses of this CA among ``rows``, changes of the store read after the
        rows given to :meth:`add` so far and to come (a later slice of the snapshot must not
        put back an older answer: a revoked certificate answered "good" from memory)."""
        for stored in rows:
            if stored.issuer_id != self.issuer_id:
                continue
            self.followed.add(stored.serial)
            self._take(stored)

    def _take(self, stored: StoredLike) -> None:
        if not stored.der:  # withdrawn: its keys, made before, are skipped (not in by_serial)
            self.by_serial.pop(stored.serial, None)
            self.withdrawn.add(stored.serial)
            return
        self.withdrawn.discard(stored.serial)
        current = self.by_serial.get(stored.serial)
        if current is not None and current[DER] == stored.der:
            return
        keyed = _make_entry(self.issuer_id, self.issuer, stored)
        self.by_serial[stored.serial] = keyed[0]
        self.keys.append(keyed)

    def done(self) -> CaEntries:
        return CaEntries(
            self.issuer_id,
            self.issuer.certificate,
            self.by_serial,
            self.keys,
            frozenset(self.withdrawn),
        )


class ResponseIndex:
    """Read and changed on one thread only (the server's event loop); see the module doc."""

    def __init__(self, issuers: Mapping[int, core.Issuer]) -> None:
        self.issuers = dict(issuers)
        self._issuer_ids = {id(issuer): issuer_id for issuer_id, issuer in self.issuers.items()}
        self.by_request: dict[bytes, Entry] = {}
        # SHA-1 and SHA-256 CertID DER (as OpenSSL writes them) -> (its hash, entry)
        self.by_cert_id: dict[bytes, tuple[str, Entry]] = {}
        # issuer id -> serial -> entry; the issuers given here take their responses by apply()
        self.by_serial: dict[int, dict[int, Entry]] = {i: {} for i in self.issuers}
        # stored response DER -> its certStatus, decoded when first needed (status()).
        self._statuses: dict[bytes, core.Status] = {}

    def __len__(self) -> int:
        return sum(len(held) for held in self.by_serial.values())

    def set_issuers(self, issuers: Mapping[int, core.Issuer]) -> Iterator[None]:
        """Serve ``issuers`` from now on (a responder rotated, a CA added, taken offline or
        retired). An issuer whose CA and responder certificates are unchanged keeps its object.
        A CA not served so far, or whose certificate changed under the same id, takes no
        responses until its snapshot is installed. The responses of CAs no longer served (or
        whose certificate changed) stop being looked up at once; their request keys are
        dropped by the returned iterator, one bounded step per item."""
        old = self.issuers
        gone = {
            i for i, x in old.items() if i not in issuers or issuers[i].certificate != x.certificate
        }
        kept = {
            i: (
                old[i]
                if i in old
                and i not in gone
                and old[i].responder_certificate == issuer.responder_certificate
                else issuer
            )
            for i, issuer in issuers.items()
        }
        self.issuers = kept
        self._issuer_ids = {id(issuer): issuer_id for issuer_id, issuer in kept.items()}
        dropped = [(old[i], held) for i in sorted(gone) if (held := self.by_serial.pop(i, None))]
        return self._drop(dropped)

    def install(self, built: CaEntries) -> Iterator[None]:
        """Hold the responses of one CA, built off the loop: its statuses at once (one
        reference swap), the request and CertID keys of its pre-signed answers by the returned
        iterator, ``CHUNK`` at a time. Skipped when that CA is not served under that
        certificate any more; responses it held before are replaced."""
        issuer = self.issuers.get(built.issuer_id)
        if issuer is None or issuer.certificate != built.certificate:
            return iter(())
        old = self.by_serial.get(built.issuer_id)
        self.by_serial[built.issuer_id] = built.by_serial
        if old:  # read again: then drop the keys the new entries did not take over
            return itertools.chain(self._merge(built), self._drop([(issuer, old)]))
        return self._merge(built)

    def _merge(self, built: CaEntries) -> Iterator[None]:
        held = built.by_serial
        for start in range(0, len(built.keys), CHUNK):
            if self.by_serial.get(built.issuer_id) is not held:
                return  # dropped, or replaced by a newer snapshot, meanwhile
            for entry, cert_ids in built.keys[start : start + CHUNK]:
                if held.get(entry[SERIAL]) is not entry:
                    continue  # apply() put a newer answer in its place (with its keys)
                self._keys(entry, cert_ids)
            yield

    def _keys(self, entry: Entry, cert_ids: tuple[tuple[bytes, tuple[str, Entry]], ...]) -> None:
        """Answer ``entry``'s RFC 5019 request and its CertIDs with it."""
        self.by_request[entry[REQUEST_DER]] = entry
        for cert_id, hit in cert_ids:
            self.by_cert_id[cert_id] = hit

    def update(self, parts: Iterable[CaEntries]) -> Iterator[None]:
        """Take changes of the store made into entries off the loop (one :class:`CaEntries`
        per CA), ``CHUNK`` at a time by the returned iterator. Which CAs take them is decided
        now, when the loop receives them: a CA not held now (not served, its snapshot not
        installed yet) takes none, and one whose held responses are replaced meanwhile (its
        snapshot read again, or dropped) takes no more; the snapshot, read later, holds these
        changes or newer ones. The caller applies updates in the order the store gave them,
        one after the other: an older change never lands after a newer one."""
        targets = []
        for built in parts:
            issuer = self.issuers.get(built.issuer_id)
            held = self.by_serial.get(built.issuer_id)
            if issuer is not None and held is not None and issuer.certificate == built.certificate:
                targets.append((built, held))
        return self._update(targets)

    def _update(self, targets: list[tuple[CaEntries, dict[int, Entry]]]) -> Iterator[None]:
        done = 0
        for built, held in targets:
            for serial in built.withdrawn:
                done += 1
                if done % CHUNK == 0:
                    yield
                if self.by_serial.get(built.issuer_id) is not held:
                    break  # replaced by a newer snapshot, or dropped, meanwhile
                self._withdraw(self.issuers[built.issuer_id], held, serial)
            for entry, cert_ids in built.keys:
                done += 1
                if done % CHUNK == 0:
                    yield
                if self.by_serial.get(built.issuer_id) is not held:
                    break  # replaced by a newer snapshot, or dropped, meanwhile
                serial = entry[SERIAL]
                if built.by_serial.get(serial) is not entry:
                    continue  # a later change of the same response came with it
                current = held.get(serial)
                if current is not None and current[DER] == entry[DER]:
                    continue  # held already
                self._keys(entry, cert_ids)
                held[serial] = entry

    def _withdraw(self, issuer: core.Issuer, held: dict[int, Entry], serial: int) -> None:
        """Stop answering ``serial`` from memory: its status is then looked up when asked."""
        entry = held.pop(serial, None)
        if entry is not None:
            self._forget(issuer, entry)

    def _forget(self, issuer: core.Issuer, entry: Entry) -> None:
        """Remove ``entry``'s request and CertID keys (only where they still map to it: a key
        may already serve a newer one)."""
        if self.by_request.get(entry[REQUEST_DER]) is entry:
            del self.by_request[entry[REQUEST_DER]]
        for algorithm in core.SERVED_HASHES:
            key = issuer.cert_id(entry[SERIAL], algorithm).der
            hit = self.by_cert_id.get(key)
            if hit is not None and hit[1] is entry:
                del self.by_cert_id[key]

    def _drop(self, dropped: list[tuple[core.Issuer, dict[int, Entry]]]) -> Iterator[None]:
        """Remove the request and CertID keys of entries no longer held (only where they
        still map to those entries: a key may already serve a newer one)."""
        for issuer, held in dropped:
            # Nothing changes ``held`` any more: it left by_serial before this runs.
            entries = iter(held.values())
            while chunk := list(itertools.islice(entries, CHUNK)):
                for entry in chunk:
                    self._forget(issuer, entry)
                yield

    def issuer_id(self, issuer: core.Issuer) -> int | None:
        return self._issuer_ids.get(id(issuer))

    def apply(self, responses: Iterable[StoredLike]) -> int:
        """Insert or replace; returns how many changed (responses of issuers not served, or
        whose snapshot is not installed yet, are skipped)."""
        taken = 0
        for stored in responses:
            issuer = self.issuers.get(stored.issuer_id)
            held = self.by_serial.get(stored.issuer_id)
            if issuer is None or held is None:
                continue
            if not stored.der:  # withdrawn: behind the certificate's status
                taken += stored.serial in held
                self._withdraw(issuer, held, stored.serial)
                continue
            current = held.get(stored.serial)
            if current is not None and current[DER] == stored.der:
                continue  # seen already (changes_since overlaps its windows)
            entry, cert_ids = _make_entry(stored.issuer_id, issuer, stored)
            self._keys(entry, cert_ids)
            held[stored.serial] = entry
            taken += 1
        return taken

    def entry(self, issuer: core.Issuer, serial: int) -> Entry | None:
        """The stored response of ``serial`` under ``issuer``, or None when not in memory."""
        issuer_id = self.issuer_id(issuer)
        held = self.by_serial.get(issuer_id) if issuer_id is not None else None
        return held.get(serial) if held is not None else None

    def status(self, entry: Entry) -> core.Status:
        """The certStatus of ``entry``'s stored response, for an answer signed now: decoded
        the first time (some 40 us), then kept (at most ``STATUS_CACHE``, forgotten all at
        once beyond: the entry itself stays a plain tuple)."""
        der = entry[DER]
        status = self._statuses.get(der)
        if status is None:
            status = status_of(der)
            if len(self._statuses) >= STATUS_CACHE:
                self._statuses.clear()
            self._statuses[der] = status
        return status


_NONCE_OID = w.oid(core.OID_NONCE)


def simple_request(data: bytes) -> tuple[bytes, bytes | None] | None:
    """(CertID DER, nonce or None) when ``data`` is exactly the common shape
    ``SEQ{ SEQ{ SEQ{ SEQ{CertID} } [, [2]{ SEQ{ SEQ{nonce OID, OCTET{OCTET nonce}} } }] } }``
    (one CertID, no version, no requestor, at most a non-critical nonce of 1..128 octets);
    None for anything else, which then takes :func:`ocsp.core.parse_request`. Only a CertID
    found byte for byte in the index is used from it, so its content needs no decoding."""
    try:
        top = r.read_tlv(data, 0, len(data))
        if top.tag != 0x30 or top.end != len(data):
            return None
        tbs = r.children(data, top, at_most=1)
        if len(tbs) != 1 or tbs[0].tag != 0x30:
            return None
        parts = r.children(data, tbs[0], at_most=2)
        if not 1 <= len(parts) <= 2 or parts[0].tag != 0x30:
            return None
        requests = r.children(data, parts[0], at_most=1)
        if len(requests) != 1 or requests[0].tag != 0x30:
            return None
        cert_ids = r.children(data, requests[0], at_most=1)
        if len(cert_ids) != 1 or cert_ids[0].tag != 0x30:
            return None
        cert_id = cert_ids[0].encoding(data)
        if len(parts) == 1:
            return cert_id, None
        if parts[1].tag != 0xA2:
            return None
        wrapper = r.children(data, parts[1], at_most=1)
        if len(wrapper) != 1 or wrapper[0].tag != 0x30:
            return None
        extensions = r.children(data, wrapper[0], at_most=1)
        if len(extensions) != 1 or extensions[0].tag != 0x30:
            return None
        fields = r.children(data, extensions[0], at_most=2)
        if len(fields) != 2 or fields[0].encoding(data) != _NONCE_OID or fields[1].tag != 0x04:
            return None
        nonce = r.only(fields[1].content(data), 0x04, "nonce")
    except r.DerError:
        return None
    if not core.MIN_NONCE <= len(nonce) <= core.MAX_NONCE:
        return None
    return cert_id, nonce


def get_path(request_der: bytes) -> str:
    """The RFC 5019 GET path segment: standard base64 of the DER request."""
    return base64.b64encode(request_der).decode("ascii")
