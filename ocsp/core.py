"""The pure core of the OCSP responder (RFC 6960, the RFC 5019 profile, RFC 9654 nonces).

No database, no HTTP, no clock: the caller passes ``now``, the served issuers (with their
signing keys) and a status lookup. Everything returned is the DER body of an
``application/ocsp-response``.

Decisions
---------
* **Parsing is strict.** First, :func:`ocsp.der.check_structure`
  walks the whole TLV tree iteratively: DER lengths only, at most ``MAX_REQUEST_SIZE`` octets,
  nesting at most ``MAX_DEPTH``, nothing after the outer SEQUENCE, DER contents for INTEGER,
  BOOLEAN, NULL and OBJECT IDENTIFIER (minimal, non-empty). Then the fields are read from
  that tree in ASN.1 order, every tag checked, nothing left over (no asn1crypto on this path:
  it cost more than building and signing the answer). Any failure, an empty
  request list, more than ``MAX_CERT_IDS`` CertIDs, a version other than v1, an unknown
  *critical* extension (request- or single-request level), any extension present twice, or a
  nonce that is not an OCTET STRING of 1..128 octets is :class:`MalformedRequest`.
  ``requestorName`` and ``optionalSignature`` are ignored (unsigned requests are fine).
* **Nonces (RFC 9654 2.1).** 1..128 octets are echoed byte for byte (16..32 is the
  recommended range; shorter or longer ones within the limit are echoed too, never refused).
  0 or more than 128 octets, or a second nonce extension: malformedRequest.
* **Who answers.** A CertID is *served* when its hash algorithm is SHA-1 or SHA-256 and both
  its issuerNameHash and issuerKeyHash equal those of one :class:`Issuer`. A CertID with any
  other hash algorithm is not served. One response has one signer, and a delegated responder
  is authorised by one CA only (RFC 6960 4.2.2.2), so **every CertID of a request must be
  served by the same Issuer**; a request with any CertID we do not serve (an unknown issuer,
  or a mix of issuers) gets the unsigned ``unauthorized`` (RFC 5019 2.2.3). The core therefore
  never signs "good" (or anything) for an issuer it does not serve. Whether a serial that was
  never issued is "unknown" or "revoked" is the lookup's decision.
* **Response shape.** BasicOCSPResponse, responderID byKey (SHA-1 of the responder's
  subjectPublicKey, RFC 6960 4.2.2.3), producedAt, one SingleResponse per CertID in request
  order with the CertID's DER echoed exactly as received, thisUpdate and nextUpdate always
  present, revocationReason only when a reason other than unspecified is known, the nonce
  echoed in responseExtensions, the delegated responder's certificate in ``certs`` (nothing
  when the CA signs itself). Times are GeneralizedTime, UTC, whole seconds (microseconds are
  truncated). The signature algorithm follows the key: ECDSA P-256/P-384/P-521 with
  SHA-256/384/512, RSA PKCS#1 v1.5 with SHA-256, Ed25519/Ed448 pure; never SHA-1. A
  signature made by any other key than ``cryptography``'s own (a PKCS#11 token, a wrapper) is
  verified against the responder certificate before the response is returned; ``cryptography``'s
  keys are matched with the certificate once, in :meth:`Issuer.create`.
* **Errors.** Error responses are unsigned and exactly ``30 03 0A 01 0X``. A lookup raising
  :class:`sekisho.errors.StoreError` and signing raising
  :class:`sekisho.errors.KeyBackendError` become ``tryLater``; anything else propagates (the
  shell maps it to ``internalError`` with :func:`error_response`).
* **Lint gate.** An issuer built with ``lint`` (``ca.lint.Linter.check_ocsp_tbs``) has the
  first response of each shape (:func:`_shape`) linted by pkilint before it is signed; a
  finding raises :class:`sekisho.errors.PolicyViolation`, and nothing is signed.
* **Validity.** ``nextUpdate - thisUpdate`` must lie within ``[MIN_VALIDITY, MAX_VALIDITY]``
  (8 h to 10 d, BR 4.9.10) and ``producedAt >= thisUpdate``; a caller breaking that gets
  ``ValueError`` (a programming error, not a client error).
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca import der as w
from ocsp import der as r
from sekisho.errors import ConfigError, KeyBackendError, MalformedInput, StoreError

MAX_REQUEST_SIZE = 32 * 1024
HTTP_MAX_BODY = 64 * 1024  # larger HTTP bodies are refused (413) before being read
MAX_DEPTH = 24
MAX_CERT_IDS = 32
MIN_NONCE = 1
MAX_NONCE = 128
MIN_VALIDITY = dt.timedelta(hours=8)
# Longest max-age either HTTP endpoint gives a pre-signed answer (RFC 5019 6.2 allows up to its
# nextUpdate): a shared cache in front re-checks at least this often, so a revocation shows
# through it within minutes, not at the cached answer's nextUpdate (days).
CACHE_MAX_AGE = 300


MAX_GET_PATH = 16 * 1024  # a GET path segment longer than this is refused unread


def decode_get_path(segment: str) -> bytes | None:
    """The request DER of a GET path segment (RFC 6960 A.1.1: base64, then URL-encoded), or
    None: the standard or URL-safe alphabet, padded or not, percent-encoded once or twice
    (clients that encode twice), a '+' that form decoding made a space put back. The web app
    and ``ocsp serve`` both read GET paths here: one URL, one answer, behind either. (On
    ``ocsp serve``'s hot path: a plain segment costs one encode and three byte scans.)"""
    if "%" in segment:
        raw = unquote_to_bytes(segment)
        if b"%" in raw:
            raw = unquote_to_bytes(raw)
    else:
        raw = segment.encode()
    raw = raw.translate(_GET_ALPHABET).strip().rstrip(b"=")
    if not raw or len(raw) > MAX_GET_PATH:
        return None
    pad = -len(raw) % 4
    if pad == 3:  # one character left over: no base64 ends so
        return None
    try:
        return binascii.a2b_base64(raw + b"=" * pad if pad else raw, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


# URL-safe base64 to the standard alphabet, and a space (a '+' form decoding changed) back.
_GET_ALPHABET = bytes.maketrans(b"-_ ", b"+/+")


def entity_tag(der: bytes) -> str:
    """The ETag (unquoted) of an answer, the same from the web app and ``ocsp serve``: a
    cache in front of both revalidates with either's (128 bits of SHA-256)."""
    return hashlib.sha256(der).hexdigest()[:32]


MAX_VALIDITY = dt.timedelta(days=10)


def response_times(der: bytes) -> tuple[dt.datetime, dt.datetime] | None:
    """(thisUpdate, nextUpdate) of a successful answer a cache may keep, pre-signed or signed
    live (the earliest of each, over its SingleResponses), else None: an error answer, an
    answer to a request with a nonce (made for that one request), one without nextUpdate.
    Both endpoints send a GET's answer so decided with caching fields, the others
    ``no-store``. Read with our DER reader: asn1crypto took about 200 us per answer, on
    ``ocsp serve``'s event loop for those signed there."""
    if len(der) <= 5 or _NONCE_OID_DER in der:  # a nonce (the same octets anywhere else in
        return None  # the answer only make it no-store)
    try:
        top = r.read_tlv(der, 0, len(der))
        status, wrapped = r.children(der, top, at_most=2)
        if status.encoding(der) != b"\x0a\x01\x00" or wrapped.tag != 0xA0:
            return None  # not successful
        (response_bytes,) = r.children(der, wrapped, at_most=1)
        kind, octets = r.children(der, response_bytes, at_most=2)
        if kind.encoding(der) != _BASIC_OID_DER or octets.tag != 0x04:
            return None
        basic = r.read_tlv(der, octets.content_start, octets.end)
        tbs = r.read_tlv(der, basic.content_start, basic.end)
        # [0] version, responderID, producedAt, responses, [1] responseExtensions
        responses = next(f for f in r.children(der, tbs, at_most=5) if f.tag == 0x30)
        this_updates, next_updates = [], []
        for single in r.children(der, responses, at_most=MAX_CERT_IDS):
            # certID, certStatus, thisUpdate, [0] nextUpdate, [1] singleExtensions
            fields = r.children(der, single, at_most=5)
            if len(fields) < 4 or fields[2].tag != 0x18 or fields[3].tag != 0xA0:
                return None
            (next_update,) = r.children(der, fields[3], at_most=1)
            this_updates.append(_generalized_time(der, fields[2]))
            next_updates.append(_generalized_time(der, r.expect(der, next_update, 0x18, "time")))
    except (ValueError, StopIteration):  # DerError is a ValueError
        return None
    if not this_updates:
        return None
    return min(this_updates), min(next_updates)


def _generalized_time(der: bytes, item: r.Tlv) -> dt.datetime:
    """A GeneralizedTime's instant (YYYYMMDDHHMMSS[.fraction]Z), to the second."""
    text = item.content(der)
    if len(text) < 15 or text[-1:] != b"Z" or not text[:14].isdigit():
        raise r.DerError("not a DER GeneralizedTime")
    return dt.datetime(
        int(text[:4]),
        int(text[4:6]),
        int(text[6:8]),
        int(text[8:10]),
        int(text[10:12]),
        int(text[12:14]),
        tzinfo=dt.UTC,
    )


OID_NONCE = "1.3.6.1.5.5.7.48.1.2"
_NONCE_OID_DER = w.oid(OID_NONCE)
OID_ACCEPTABLE_RESPONSES = "1.3.6.1.5.5.7.48.1.4"
OID_PREFERRED_SIG_ALGS = "1.3.6.1.5.5.7.48.1.8"
OID_SERVICE_LOCATOR = "1.3.6.1.5.5.7.48.1.7"
OID_BASIC = "1.3.6.1.5.5.7.48.1.1"
_BASIC_OID_DER = w.oid(OID_BASIC)
# Extensions we understand, so they may be critical.
KNOWN_REQUEST_EXTENSIONS = frozenset({OID_NONCE, OID_ACCEPTABLE_RESPONSES, OID_PREFERRED_SIG_ALGS})
KNOWN_SINGLE_EXTENSIONS = frozenset({OID_SERVICE_LOCATOR})

HASH_OIDS: Mapping[str, str] = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
}
SERVED_HASHES: tuple[str, ...] = ("sha1", "sha256")
_HASH_OID_BY_NAME = {name: oid for oid, name in HASH_OIDS.items()}


class ResponseStatus(enum.IntEnum):
    SUCCESSFUL = 0
    MALFORMED_REQUEST = 1
    INTERNAL_ERROR = 2
    TRY_LATER = 3
    SIG_REQUIRED = 5
    UNAUTHORIZED = 6


def error_response(status: ResponseStatus) -> bytes:
    """The unsigned OCSPResponse for an error status: ``30 03 0A 01 0X``."""
    if status is ResponseStatus.SUCCESSFUL:
        raise ValueError("a successful response carries a signed body")
    return bytes((0x30, 0x03, 0x0A, 0x01, int(status)))


MALFORMED_REQUEST = error_response(ResponseStatus.MALFORMED_REQUEST)
INTERNAL_ERROR = error_response(ResponseStatus.INTERNAL_ERROR)
TRY_LATER = error_response(ResponseStatus.TRY_LATER)
UNAUTHORIZED = error_response(ResponseStatus.UNAUTHORIZED)


class MalformedRequest(MalformedInput):
    """The bytes are not an OCSP request we accept; answered with malformedRequest."""

    code = "ocsp-malformed-request"


# -- requests ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CertId:
    """One requested CertID. ``hash_algorithm`` is ``"sha1"``/``"sha256"`` or, for a hash we
    do not serve, the dotted OID. ``der`` is the CertID exactly as received (echoed)."""

    hash_algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int
    der: bytes


@dataclasses.dataclass(frozen=True)
class OcspRequest:
    cert_ids: tuple[CertId, ...]
    nonce: bytes | None  # the nonce octets (the inner OCTET STRING's content)


def parse_request(der: bytes) -> OcspRequest:
    """Decode a DER OCSPRequest strictly; raise :class:`MalformedRequest` on anything else."""
    if not isinstance(der, bytes | bytearray | memoryview):
        raise MalformedRequest("an OCSP request is bytes")
    data = bytes(der)
    if not data:
        raise MalformedRequest("empty request")
    if len(data) > MAX_REQUEST_SIZE:
        raise MalformedRequest(f"request larger than {MAX_REQUEST_SIZE} octets")
    if data[0] != 0x30:
        raise MalformedRequest("an OCSP request is a SEQUENCE")
    try:
        r.check_structure(data, MAX_DEPTH)
    except r.DerError as exc:
        raise MalformedRequest(f"not DER: {exc}") from None
    try:
        return _decode(data)
    except ValueError as exc:  # DerError, or a value the decoding could not take
        raise MalformedRequest(f"not an OCSP request: {exc}") from None


def _decode(data: bytes) -> OcspRequest:
    """OCSPRequest (RFC 6960 4.1.1) read field by field from the TLV tree ``check_structure``
    validated: every tag where it must be, in order, nothing left over."""
    fields = r.children(data, r.read_tlv(data, 0, len(data)))
    if not 1 <= len(fields) <= 2 or fields[0].tag != 0x30:
        raise MalformedRequest("OCSPRequest is tbsRequest [optionalSignature]")
    if len(fields) == 2 and fields[1].tag != 0xA0:
        raise MalformedRequest("unexpected field after tbsRequest")
    tbs = r.children(data, fields[0])
    i = 0
    if i < len(tbs) and tbs[i].tag == 0xA0:  # version [0] EXPLICIT, DEFAULT v1
        version = r.children(data, tbs[i])
        if len(version) != 1 or version[0].tag != 0x02 or version[0].content(data) != b"\x00":
            raise MalformedRequest("unsupported request version")
        i += 1
    if i < len(tbs) and tbs[i].tag == 0xA1:  # requestorName: ignored
        i += 1
    if i >= len(tbs) or tbs[i].tag != 0x30:
        raise MalformedRequest("tbsRequest has no requestList")
    singles = r.children(data, tbs[i])
    i += 1
    extensions: dict[str, bytes] = {}
    if i < len(tbs) and tbs[i].tag == 0xA2:
        extensions = _extensions(data, tbs[i], KNOWN_REQUEST_EXTENSIONS)
        i += 1
    if i != len(tbs):
        raise MalformedRequest("unexpected field in tbsRequest")
    if not singles:
        raise MalformedRequest("empty request list")
    if len(singles) > MAX_CERT_IDS:
        raise MalformedRequest(f"more than {MAX_CERT_IDS} CertIDs in one request")
    cert_ids = []
    for single in singles:
        parts = r.children(data, r.expect(data, single, 0x30, "Request"))
        if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[1].tag != 0xA0):
            raise MalformedRequest("Request is reqCert [singleRequestExtensions]")
        cert_ids.append(_cert_id(data, r.expect(data, parts[0], 0x30, "CertID")))
        if len(parts) == 2:
            _extensions(data, parts[1], KNOWN_SINGLE_EXTENSIONS)
    nonce = _nonce(extensions[OID_NONCE]) if OID_NONCE in extensions else None
    return OcspRequest(tuple(cert_ids), nonce)


def _cert_id(data: bytes, cert_id: r.Tlv) -> CertId:
    parts = r.children(data, cert_id)
    if len(parts) != 4:
        raise MalformedRequest("CertID has four fields")
    algorithm = r.children(data, r.expect(data, parts[0], 0x30, "hashAlgorithm"))
    if not 1 <= len(algorithm) <= 2 or algorithm[0].tag != 0x06:
        raise MalformedRequest("hashAlgorithm is an OID and optional parameters")
    if len(algorithm) == 2 and algorithm[1].encoding(data) != b"\x05\x00":
        raise MalformedRequest("hash algorithm parameters must be absent or NULL")
    oid = r.oid_dotted(algorithm[0].content(data))
    serial = r.expect(data, parts[3], 0x02, "serialNumber").content(data)
    return CertId(
        hash_algorithm=HASH_OIDS.get(oid, oid),
        issuer_name_hash=r.expect(data, parts[1], 0x04, "issuerNameHash").content(data),
        issuer_key_hash=r.expect(data, parts[2], 0x04, "issuerKeyHash").content(data),
        serial=int.from_bytes(serial, "big", signed=True),
        der=cert_id.encoding(data),
    )


def _extensions(data: bytes, wrapper: r.Tlv, known: frozenset[str]) -> dict[str, bytes]:
    """[n] EXPLICIT Extensions -> OID -> extnValue octets. Duplicates and unknown critical
    extensions are refused."""
    inner = r.children(data, wrapper)
    if len(inner) != 1:
        raise MalformedRequest("extensions are one SEQUENCE")
    items = r.children(data, r.expect(data, inner[0], 0x30, "Extensions"))
    if not items:
        raise MalformedRequest("Extensions is SIZE (1..MAX)")
    out: dict[str, bytes] = {}
    for extension in items:
        parts = r.children(data, r.expect(data, extension, 0x30, "Extension"))
        if not 2 <= len(parts) <= 3 or parts[0].tag != 0x06 or parts[-1].tag != 0x04:
            raise MalformedRequest("Extension is extnID [critical] extnValue")
        oid = r.oid_dotted(parts[0].content(data))
        if oid in out:
            raise MalformedRequest(f"extension {oid} appears more than once")
        critical = False
        if len(parts) == 3:
            critical = r.expect(data, parts[1], 0x01, "critical").content(data) == b"\xff"
        if critical and oid not in known:
            raise MalformedRequest(f"unknown critical extension {oid}")
        out[oid] = parts[-1].content(data)
    return out


def _nonce(extn_value: bytes) -> bytes:
    try:
        nonce = r.only(extn_value, 0x04, "nonce")
    except r.DerError as exc:
        raise MalformedRequest(f"nonce is not an OCTET STRING: {exc}") from None
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise MalformedRequest(f"nonce of {len(nonce)} octets (RFC 9654: {MIN_NONCE}..{MAX_NONCE})")
    return nonce


# -- issuers and signers ----------------------------------------------------------------------
def _cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _subject_and_key_bits(cert_der: bytes) -> tuple[bytes, bytes]:
    """(DER of the subject Name, subjectPublicKey BIT STRING value without unused-bits)."""
    top = r.read_tlv(cert_der, 0, len(cert_der))
    tbs = r.children(cert_der, top)[0]
    fields = r.children(cert_der, tbs)
    if fields and fields[0].tag == 0xA0:  # [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    subject = r.expect(cert_der, fields[4], 0x30, "subject")
    spki = r.expect(cert_der, fields[5], 0x30, "subjectPublicKeyInfo")
    bits = r.expect(cert_der, r.children(cert_der, spki)[1], 0x03, "subjectPublicKey")
    value = bits.content(cert_der)
    if not value or value[0] != 0:
        raise r.DerError("subjectPublicKey with unused bits")
    return subject.encoding(cert_der), value[1:]


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclasses.dataclass(frozen=True)
class Issuer:
    """A CA we answer for, and who signs its responses.

    Build with :meth:`create`. ``responder_certificate`` is the delegated responder's
    certificate, or the CA certificate itself when the CA signs its own responses."""

    certificate: x509.Certificate
    responder_certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    name_hashes: Mapping[str, bytes]  # "sha1"/"sha256" -> hash of the subject Name DER
    key_hashes: Mapping[str, bytes]  # "sha1"/"sha256" -> hash of the subjectPublicKey bits
    responder_key_id: bytes  # SHA-1 of the responder's subjectPublicKey (responderID byKey)
    # Check every signature before it leaves: true unless ``key`` is one of cryptography's own
    # (OpenSSL, in this process), whose match with the certificate ``create`` checked once.
    verify_each: bool = True
    # The lint gate: (ResponseData DER, a function wrapping a signature over it into the whole
    # OCSPResponse) -> None, raising PolicyViolation to refuse; None: no gate.
    lint: Callable[[bytes, Callable[[bytes], bytes]], None] | None = None
    # The shapes whose first response the gate passed (for as long as this signer is loaded;
    # ``ocsp.store.Signers`` hands them on to the same signer reloaded): the later ones of a
    # shape are not linted. ``lint_lock``: one lint of a shape at a time (32 clients asking at
    # once linted it 32 times over, and each waited for all of them).
    linted: set[tuple[bool, bool, frozenset[str]]] = dataclasses.field(
        default_factory=set, compare=False, repr=False
    )
    lint_lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, compare=False, repr=False
    )

    @property
    def delegated(self) -> bool:
        return self.responder_certificate is not self.certificate

    # Parts of every response that depend on the issuer alone, encoded once.
    @functools.cached_property
    def signing(self) -> tuple[bytes, _Signer]:
        """(signatureAlgorithm DER, sign function) for ``key``."""
        return _signature_algorithm(self.key)

    @functools.cached_property
    def responder_id_der(self) -> bytes:
        return w.explicit(2, w.octet_string(self.responder_key_id))  # responderID byKey

    @functools.cached_property
    def certs_der(self) -> bytes:
        """The ``certs`` field: the delegated responder's certificate, or nothing."""
        if not self.delegated:
            return b""
        return w.explicit(0, w.sequence(_cert_der(self.responder_certificate)))

    @classmethod
    def create(
        cls,
        certificate: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
        responder_certificate: x509.Certificate | None = None,
        lint: Callable[[bytes, Callable[[bytes], bytes]], None] | None = None,
    ) -> Issuer:
        """``key`` signs the responses: the delegated responder's key when
        ``responder_certificate`` is given, else the CA's own key. Refuses (ConfigError) a key
        that does not match its certificate, and a delegated responder that is not issued
        directly by the CA or lacks id-kp-OCSPSigning (RFC 6960 4.2.2.2)."""
        signer = responder_certificate if responder_certificate is not None else certificate
        if _spki(key.public_key()) != _spki(signer.public_key()):
            raise ConfigError("the OCSP signing key does not match the responder certificate")
        if responder_certificate is not None:
            _check_delegated(certificate, responder_certificate)
        subject, key_bits = _subject_and_key_bits(_cert_der(certificate))
        return cls(
            certificate=certificate,
            responder_certificate=signer,
            key=key,
            name_hashes={h: hashlib.new(h, subject).digest() for h in SERVED_HASHES},
            key_hashes={h: hashlib.new(h, key_bits).digest() for h in SERVED_HASHES},
            responder_key_id=responder_key_hash(signer),
            verify_each=not type(key).__module__.startswith("cryptography."),
            lint=lint,
        )

    def serves(self, cert_id: CertId) -> bool:
        name_hash = self.name_hashes.get(cert_id.hash_algorithm)
        key_hash = self.key_hashes.get(cert_id.hash_algorithm)
        return (
            name_hash is not None
            and key_hash is not None
            and cert_id.issuer_name_hash == name_hash
            and cert_id.issuer_key_hash == key_hash
        )

    def cert_id(self, serial: int, hash_algorithm: str = "sha1") -> CertId:
        """The CertID a client builds for ``serial`` (hash parameters NULL, as OpenSSL)."""
        if hash_algorithm not in SERVED_HASHES:
            raise ValueError(f"unsupported CertID hash {hash_algorithm}")
        name_hash = self.name_hashes[hash_algorithm]
        key_hash = self.key_hashes[hash_algorithm]
        encoded = w.sequence(
            w.sequence(w.oid(_HASH_OID_BY_NAME[hash_algorithm]), b"\x05\x00"),
            w.octet_string(name_hash),
            w.octet_string(key_hash),
            _integer(serial),
        )
        return CertId(hash_algorithm, name_hash, key_hash, serial, encoded)


def responder_key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of ``certificate``'s subjectPublicKey bits: the responderID byKey (RFC 6960
    4.2.1) of every response its key signs."""
    _, key_bits = _subject_and_key_bits(_cert_der(certificate))
    return hashlib.sha1(key_bits, usedforsecurity=False).digest()


def responder_id_by_key(certificate: x509.Certificate) -> bytes:
    """The DER responderID (byKey) of the responses ``certificate``'s key signs."""
    return w.explicit(2, w.octet_string(responder_key_hash(certificate)))


def _check_delegated(ca: x509.Certificate, responder: x509.Certificate) -> None:
    if responder.issuer != ca.subject:
        raise ConfigError("the delegated OCSP responder is not issued by this CA")
    try:
        responder.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError("the delegated OCSP responder is not signed by this CA") from None
    try:
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ConfigError("the delegated OCSP responder has no extendedKeyUsage") from None
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise ConfigError("the delegated OCSP responder lacks id-kp-OCSPSigning")


@dataclasses.dataclass(frozen=True)
class SignerDown:
    """A CA we serve whose signer could not be loaded (its key, or its responder certificate):
    the CA certificate, and why, fit for a log (no key material, no passphrase)."""

    certificate: x509.Certificate
    reason: str


def find_issuer(issuers: Iterable[Issuer], cert_id: CertId) -> Issuer | None:
    for issuer in issuers:
        if issuer.serves(cert_id):
            return issuer
    return None


def select_issuer(request: OcspRequest, issuers: Sequence[Issuer]) -> Issuer | None:
    """The one Issuer serving every CertID of the request, or None (answer unauthorized)."""
    chosen: Issuer | None = None
    for cert_id in request.cert_ids:
        issuer = find_issuer(issuers, cert_id)
        if issuer is None or (chosen is not None and issuer is not chosen):
            return None
        chosen = issuer
    return chosen


# -- statuses ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Good:
    pass


@dataclasses.dataclass(frozen=True)
class Revoked:
    time: dt.datetime
    reason: x509.ReasonFlags | None = None


@dataclasses.dataclass(frozen=True)
class Unknown:
    pass


Status = Good | Revoked | Unknown
GOOD = Good()
UNKNOWN = Unknown()
Lookup = Callable[[Issuer, int], Status]

CRL_REASON_CODES: Mapping[x509.ReasonFlags, int] = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}


# -- responses --------------------------------------------------------------------------------
def _utc_seconds(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(dt.UTC).replace(microsecond=0)


def _integer(value: int) -> bytes:
    """DER INTEGER, negative values included (a CertID echoes whatever a client sent)."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return w.tlv(0x02, value.to_bytes(size, "big", signed=True))


def _cert_status(status: Status) -> bytes:
    if isinstance(status, Good):
        return b"\x80\x00"  # good [0] IMPLICIT NULL
    if isinstance(status, Unknown):
        return b"\x82\x00"  # unknown [2] IMPLICIT NULL
    if isinstance(status, Revoked):
        revoked = w.generalized_time(_utc_seconds(status.time, "revocationTime"))
        if status.reason is not None and status.reason is not x509.ReasonFlags.unspecified:
            code = CRL_REASON_CODES[status.reason]
            revoked += w.explicit(0, w.tlv(0x0A, bytes((code,))))
        return w.tlv(0xA1, revoked)  # revoked [1] IMPLICIT RevokedInfo
    raise TypeError(f"not an OCSP status: {status!r}")


_Signer = Callable[[bytes], bytes]


def _signature_algorithm(key: CertificateIssuerPrivateKeyTypes) -> tuple[bytes, _Signer]:
    """(AlgorithmIdentifier DER, sign function) for the key; SHA-1 never."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve: dict[str, tuple[str, hashes.HashAlgorithm]] = {
            "secp256r1": ("1.2.840.10045.4.3.2", hashes.SHA256()),
            "secp384r1": ("1.2.840.10045.4.3.3", hashes.SHA384()),
            "secp521r1": ("1.2.840.10045.4.3.4", hashes.SHA512()),
        }
        if key.curve.name not in by_curve:
            raise ConfigError(f"cannot sign OCSP responses with curve {key.curve.name}")
        oid, digest = by_curve[key.curve.name]
        ec_key = key
        return w.sequence(w.oid(oid)), lambda data: ec_key.sign(data, ec.ECDSA(digest))
    if isinstance(key, rsa.RSAPrivateKey):
        rsa_key = key
        return (
            w.sequence(w.oid("1.2.840.113549.1.1.11"), b"\x05\x00"),
            lambda data: rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return w.sequence(w.oid("1.3.101.112")), key.sign
    if isinstance(key, ed448.Ed448PrivateKey):
        return w.sequence(w.oid("1.3.101.113")), key.sign
    raise ConfigError(f"cannot sign OCSP responses with {type(key).__name__}")


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    """Check ``signature`` over ``data`` with ``cert``'s key, as this module signs (see
    :func:`_signature_algorithm`); KeyBackendError when it does not verify."""
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            digests = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}
            digest = digests.get(public.curve.key_size)
            if digest is None:  # a curve we never sign with
                raise KeyBackendError(f"cannot verify with curve {public.curve.name}")
            public.verify(signature, data, ec.ECDSA(digest))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public.verify(signature, data)
        else:
            raise KeyBackendError(f"cannot verify with {type(public).__name__}")
    except InvalidSignature:
        raise KeyBackendError("the OCSP response signature does not verify") from None


def build_response(
    issuer: Issuer,
    answers: Sequence[tuple[CertId, Status]],
    *,
    produced_at: dt.datetime,
    this_update: dt.datetime,
    next_update: dt.datetime,
    nonce: bytes | None = None,
) -> bytes:
    """A successful OCSPResponse carrying a BasicOCSPResponse signed by ``issuer``'s
    responder, one SingleResponse per (CertID, status) in order."""
    if not answers:
        raise ValueError("a response answers at least one CertID")
    for cert_id, _ in answers:
        if not issuer.serves(cert_id):
            raise ValueError("refusing to answer for a CertID this issuer does not serve")
    produced = _utc_seconds(produced_at, "producedAt")
    this = _utc_seconds(this_update, "thisUpdate")
    next_ = _utc_seconds(next_update, "nextUpdate")
    if produced < this:
        raise ValueError("producedAt must not precede thisUpdate")
    if not MIN_VALIDITY <= next_ - this <= MAX_VALIDITY:
        raise ValueError(f"validity {next_ - this} outside {MIN_VALIDITY}..{MAX_VALIDITY}")
    if nonce is not None and not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise ValueError("nonce length outside 1..128")

    singles = b"".join(
        w.sequence(
            cert_id.der,
            _cert_status(status),
            w.generalized_time(this),
            w.explicit(0, w.generalized_time(next_)),
        )
        for cert_id, status in answers
    )
    parts = [issuer.responder_id_der, w.generalized_time(produced), w.sequence(singles)]
    if nonce is not None:
        parts.append(w.explicit(1, w.sequence(w.extension(OID_NONCE, w.octet_string(nonce)))))
    tbs = w.sequence(*parts)

    algorithm, sign = issuer.signing
    if issuer.lint is not None:
        shape = _shape([status for _, status in answers], nonce)
        if shape not in issuer.linted:
            with issuer.lint_lock:
                if shape not in issuer.linted:
                    issuer.lint(
                        tbs, lambda signature: _wrap(tbs, algorithm, signature, issuer.certs_der)
                    )
                    issuer.linted.add(shape)
    signature = sign(tbs)
    if issuer.verify_each:
        # A token's fault, or a key object that is not what it says, never reaches a client.
        verify_signature(issuer.responder_certificate, signature, tbs)
    return _wrap(tbs, algorithm, signature, issuer.certs_der)


def _wrap(tbs: bytes, algorithm: bytes, signature: bytes, certs: bytes) -> bytes:
    """The successful OCSPResponse of a BasicOCSPResponse: ``tbs`` (ResponseData) signed."""
    basic = w.sequence(tbs, algorithm, w.bit_string(signature), certs)
    response_bytes = w.sequence(w.oid(OID_BASIC), w.octet_string(basic))
    return w.sequence(b"\x0a\x01\x00", w.explicit(0, response_bytes))  # successful


def _shape(statuses: Sequence[Status], nonce: bytes | None) -> tuple[bool, bool, frozenset[str]]:
    """What the lint gate tells responses apart by: a nonce or none, one CertID or more, and
    the kinds of status carried (a revocation with a reason code or without one)."""
    kinds = frozenset(
        "revoked-reason"
        if isinstance(status, Revoked)
        and status.reason is not None
        and status.reason is not x509.ReasonFlags.unspecified
        else type(status).__name__.lower()
        for status in statuses
    )
    return nonce is not None, len(statuses) > 1, kinds


def lint_pending(issuer: Issuer, statuses: Sequence[Status], nonce: bytes | None) -> bool:
    """Whether a response of ``statuses`` (one per CertID) and ``nonce`` signed by ``issuer``
    would be linted first: its shape not yet passed by the gate (milliseconds of pkilint, and
    its import the first time)."""
    return issuer.lint is not None and _shape(statuses, nonce) not in issuer.linted


def answer(
    request: OcspRequest,
    issuers: Sequence[Issuer],
    lookup: Lookup,
    *,
    now: dt.datetime,
    validity: dt.timedelta | Callable[[], dt.timedelta],
) -> bytes:
    """Answer a parsed request signed online: thisUpdate = producedAt = ``now``. ``validity``
    may be a callable, asked after the lookups (a caller that answered a lookup from a status
    it holds until some time shortens the validity to that time); below ``MIN_VALIDITY`` the
    answer is ``tryLater``."""
    issuer = select_issuer(request, issuers)
    if issuer is None:
        return UNAUTHORIZED
    try:
        answers = [(cert_id, lookup(issuer, cert_id.serial)) for cert_id in request.cert_ids]
    except StoreError:
        return TRY_LATER
    this_update = _utc_seconds(now, "now")
    lifetime = validity() if callable(validity) else validity
    if lifetime < MIN_VALIDITY:
        return TRY_LATER  # we cannot vouch for the status long enough (a held status ending)
    try:
        return build_response(
            issuer,
            answers,
            produced_at=this_update,
            this_update=this_update,
            next_update=this_update + lifetime,
            nonce=request.nonce,
        )
    except KeyBackendError:
        return TRY_LATER


def respond(
    request_der: bytes,
    issuers: Sequence[Issuer],
    lookup: Lookup,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
) -> bytes:
    """Bytes in, bytes out: malformedRequest, unauthorized, tryLater or a signed response."""
    try:
        request = parse_request(request_der)
    except MalformedRequest:
        return MALFORMED_REQUEST
    return answer(request, issuers, lookup, now=now, validity=validity)


def precompute(
    issuer: Issuer,
    serial: int,
    status: Status,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> bytes:
    """A pre-signed response for the pre-signed store: one SHA-1 CertID (as RFC 5019 clients
    send it), no nonce, producedAt = thisUpdate."""
    return build_response(
        issuer,
        [(issuer.cert_id(serial, "sha1"), status)],
        produced_at=this_update,
        this_update=this_update,
        next_update=next_update,
    )
