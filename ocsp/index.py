"""The in-memory index of pre-signed OCSP responses the standalone server answers from.

Keyed two ways, both built once per stored response (never on the hot path):

* ``by_request``: the exact DER of the RFC 5019 request a client sends for it (one SHA-1
  CertID with NULL hash parameters, no nonce, no extensions) -> entry. A request equal to it
  byte for byte is answered without parsing: one dict lookup.
* ``by_serial``: (issuer id, serial) -> entry, for requests that must be signed on the fly (a
  nonce, a SHA-256 CertID, several CertIDs): the *status* they carry is the stored response's,
  decoded lazily from its DER the first time it is needed.

Responses for an issuer that is not loaded are dropped (never answered "good" by default).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import hashlib
from collections.abc import Iterable, Mapping
from typing import Protocol

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


@dataclasses.dataclass(slots=True)
class Entry:
    issuer_id: int
    serial: int
    der: bytes
    this_update: dt.datetime
    next_update: dt.datetime
    next_update_ts: float  # POSIX seconds, compared with time.time() on the hot path
    etag: str
    last_modified: str
    expires: str
    request_der: bytes
    _status: core.Status | None = None

    @property
    def status(self) -> core.Status:
        if self._status is None:
            self._status = status_of(self.der)
        return self._status


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


class ResponseIndex:
    def __init__(self, issuers: Mapping[int, core.Issuer]) -> None:
        self.issuers = dict(issuers)
        self._issuer_ids = {id(issuer): issuer_id for issuer_id, issuer in self.issuers.items()}
        self.by_request: dict[bytes, Entry] = {}
        self.by_serial: dict[tuple[int, int], Entry] = {}
        # SHA-1 and SHA-256 CertID DER (as OpenSSL writes them) -> (CertId, entry)
        self.by_cert_id: dict[bytes, tuple[core.CertId, Entry]] = {}

    def __len__(self) -> int:
        return len(self.by_serial)

    def unheld(self, issuers: Mapping[int, core.Issuer]) -> set[int]:
        """The ids of ``issuers`` whose stored responses this index does not hold: CAs it does
        not serve yet, or whose certificate changed under the same id."""
        old = self.issuers
        return {
            i for i, x in issuers.items() if i not in old or old[i].certificate != x.certificate
        }

    def set_issuers(self, issuers: Mapping[int, core.Issuer]) -> set[int]:
        """Serve ``issuers`` from now on (a responder rotated, a CA added, taken offline or
        retired). An issuer whose CA and responder certificates are unchanged keeps its object;
        the responses of CAs no longer served are dropped. Returns :meth:`unheld` as it was
        before: the ids whose stored responses are still to be applied."""
        old = self.issuers
        fresh = self.unheld(issuers)
        gone = {i for i in old if i not in issuers or i in fresh}
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
        if gone:
            self.by_serial = {k: e for k, e in self.by_serial.items() if e.issuer_id not in gone}
            self.by_request = {k: e for k, e in self.by_request.items() if e.issuer_id not in gone}
            self.by_cert_id = {
                k: v for k, v in self.by_cert_id.items() if v[1].issuer_id not in gone
            }
        self.issuers = kept
        self._issuer_ids = {id(issuer): issuer_id for issuer_id, issuer in kept.items()}
        return fresh

    def issuer_id(self, issuer: core.Issuer) -> int | None:
        return self._issuer_ids.get(id(issuer))

    def apply(self, responses: Iterable[StoredLike]) -> int:
        """Insert or replace; returns how many changed (unknown issuers are skipped)."""
        taken = 0
        for stored in responses:
            issuer = self.issuers.get(stored.issuer_id)
            if issuer is None:
                continue
            current = self.by_serial.get((stored.issuer_id, stored.serial))
            if current is not None and current.der == stored.der:
                continue  # seen already (changes_since overlaps its windows)
            this_update = _utc(stored.this_update)
            next_update = _utc(stored.next_update)
            request_der = rfc5019_request(issuer, stored.serial)
            entry = Entry(
                issuer_id=stored.issuer_id,
                serial=stored.serial,
                der=stored.der,
                this_update=this_update,
                next_update=next_update,
                next_update_ts=next_update.timestamp(),
                etag='"' + hashlib.sha256(stored.der).hexdigest()[:32] + '"',
                last_modified=http_date(this_update),
                expires=http_date(next_update),
                request_der=request_der,
            )
            self.by_request[request_der] = entry
            for algorithm in core.SERVED_HASHES:
                cert_id = issuer.cert_id(stored.serial, algorithm)
                self.by_cert_id[cert_id.der] = (cert_id, entry)
            self.by_serial[(stored.issuer_id, stored.serial)] = entry
            taken += 1
        return taken

    def entry(self, issuer: core.Issuer, serial: int) -> Entry | None:
        """The stored response of ``serial`` under ``issuer``, or None when not in memory."""
        issuer_id = self.issuer_id(issuer)
        if issuer_id is None:
            return None
        return self.by_serial.get((issuer_id, serial))


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
        tbs = r.children(data, top)
        if len(tbs) != 1 or tbs[0].tag != 0x30:
            return None
        parts = r.children(data, tbs[0])
        if not 1 <= len(parts) <= 2 or parts[0].tag != 0x30:
            return None
        requests = r.children(data, parts[0])
        if len(requests) != 1 or requests[0].tag != 0x30:
            return None
        cert_ids = r.children(data, requests[0])
        if len(cert_ids) != 1 or cert_ids[0].tag != 0x30:
            return None
        cert_id = cert_ids[0].encoding(data)
        if len(parts) == 1:
            return cert_id, None
        if parts[1].tag != 0xA2:
            return None
        wrapper = r.children(data, parts[1])
        if len(wrapper) != 1 or wrapper[0].tag != 0x30:
            return None
        extensions = r.children(data, wrapper[0])
        if len(extensions) != 1 or extensions[0].tag != 0x30:
            return None
        fields = r.children(data, extensions[0])
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
