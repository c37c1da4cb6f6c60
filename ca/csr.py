"""CSR intake: size limit, PEM or DER, proof of possession, and what the CSR asks for."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtensionOID

from ca.tbs import SanEntry
from ocsp.der import DerError, read_tlv
from sekisho.errors import (
    BadSignature,
    InputError,
    MalformedInput,
    PolicyViolation,
    TooLarge,
    shown,
)

MAX_CSR_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class CsrRequest:
    public_key: CertificateIssuerPublicKeyTypes
    subject: x509.Name
    sans: tuple[SanEntry, ...]


# RFC 7468 encapsulation boundaries; the label is what lies between "BEGIN " and "-----".
_PEM_BEGIN = re.compile(rb"-----BEGIN ([^\r\n]{0,64}?)-----")
_PEM_END = re.compile(rb"-----END [^\r\n]{0,64}?-----")
_CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")  # RFC 7468 7 (and legacy)
_DER_SEQUENCE = 0x30


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """One CSR, DER or PEM: nothing may follow the DER encoding or the PEM block's END line
    but whitespace, and a PEM input holds one block, without headers; explanatory text before
    the BEGIN line is allowed (RFC 7468 2)."""
    if len(data) > MAX_CSR_BYTES:
        raise TooLarge(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
    if not data.strip():
        raise MalformedInput("CSR is empty")
    start = data.lstrip()
    # PEM when what comes before the first BEGIN line is text (RFC 7468 2: explanatory text,
    # which may start with "0", the octet a DER SEQUENCE starts with); a DER encoding has
    # binary octets before any text a name of it holds, and a DER CSR followed by a PEM one is
    # DER followed by data (refused), never the PEM one issued.
    begin = _PEM_BEGIN.search(data)
    pem = begin is not None and _is_text(data[: begin.start()])
    if not pem and start[0] != _DER_SEQUENCE:
        raise MalformedInput(
            "CSR is neither PEM (no -----BEGIN CERTIFICATE REQUEST----- line) nor DER (which "
            "starts with a SEQUENCE, byte 0x30)"
        )
    try:
        if pem:
            return x509.load_pem_x509_csr(_one_pem_block(data))
        _nothing_after_der(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise MalformedInput(f"CSR cannot be parsed: {_parse_problem(exc)}") from None


# The ASN.1 parser's errors come as Rust debug text ("ParseError { kind: ShortData { needed:
# 91 } }"): said in words where the kind is known, else as they are.
_PARSE_KINDS = (
    (re.compile(r"ShortData \{ needed: (\d+)"), "truncated ({} more bytes expected)"),
    (re.compile(r"kind: UnexpectedTag"), "not a PKCS#10 CertificationRequest (unexpected element)"),
    (re.compile(r"kind: InvalidLength"), "a length is not valid DER"),
    (re.compile(r"kind: ExtraData"), "bytes follow the CertificationRequest"),
    (re.compile(r"kind: (InvalidValue|EncodedDefault|IntegerOverflow)"), "a value is not valid"),
)


def _parse_problem(exc: Exception) -> str:
    text = str(exc)
    for pattern, words in _PARSE_KINDS:
        found = pattern.search(text)
        if found:
            return words.format(*found.groups())
    return text


def _one_pem_block(data: bytes) -> bytes:
    """The one PEM block of ``data``. A second block is refused rather than ignored: a file
    of two CSRs would otherwise issue for whichever came first, and a CSR beside a private
    key means the key is about to travel with it. Data after the END line is refused too:
    RFC 7468 provides for none, and it is usually a cut-off second object."""
    begins = list(_PEM_BEGIN.finditer(data))
    labels = [m.group(1) for m in begins]
    if len(labels) > 1:
        if all(label in _CSR_LABELS for label in labels):
            raise MalformedInput(f"the input holds {len(labels)} CSRs; give one")
        kinds = [shown(label.decode("ascii", "replace")) for label in labels[:4]]
        more = ", ..." if len(labels) > 4 else ""
        raise MalformedInput(
            f"the input holds {len(labels)} PEM blocks ({', '.join(kinds)}{more}); "
            "give the CSR alone"
        )
    if not begins:
        raise MalformedInput("CSR PEM has no BEGIN line")
    begin = begins[0]
    end = _PEM_END.search(data, begin.end())
    if end is None:
        raise MalformedInput("CSR PEM block has no END line")
    if data[end.end() :].strip():
        raise MalformedInput("CSR PEM block is followed by data after its END line")
    if b":" in data[begin.end() : end.start()]:
        # RFC 1421 headers (Proc-Type: 4,ENCRYPTED ...), which the PEM reader skipped: RFC
        # 7468 permits none, and base64 has no colon.
        raise MalformedInput("CSR PEM block holds header lines; RFC 7468 permits none")
    return data[begin.start() : end.end()] + b"\n"


def _is_text(octets: bytes) -> bool:
    """UTF-8 (a byte order mark first allowed) with no control character but tab, CR, LF."""
    try:
        text = octets.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def _nothing_after_der(data: bytes) -> None:
    """Refuse octets after the DER encoding by name (a CSR, then a newline or a second
    object); an encoding that does not even frame is left to the parser's own message."""
    if data[0] != _DER_SEQUENCE:
        return
    try:
        top = read_tlv(data, 0, len(data))
    except DerError:
        return
    if top.end < len(data):
        raise MalformedInput(
            f"CSR is followed by {len(data) - top.end} octets after its DER encoding"
        )


# The hashes a CSR's self-signature may use (Ed25519 has none of its own): SHA-1 and MD5
# collisions are practical, so such a signature proves possession of nothing (BR 7.1.3.2).
_CSR_HASHES = frozenset({"sha256", "sha384", "sha512"})


def _strong_signature_hash(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return  # named by the signature check below ("signature algorithm unsupported")
    if algorithm is not None and algorithm.name not in _CSR_HASHES:
        raise PolicyViolation(
            "weak-signature",
            f"the CSR is signed with {algorithm.name.upper()}; sign it with SHA-256 or stronger",
        )


# Extension requests the CA reads (subjectAltName) or whose content every profile decides
# itself (a CSR's keyUsage, extendedKeyUsage, basicConstraints and key identifier are never
# copied): asked for as critical, they are no demand the certificate could fail to meet.
_KNOWN_REQUESTS = frozenset(
    {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }
)


def _no_unknown_critical_request(extensions: x509.Extensions) -> None:
    """A critical extension the CA does not understand is refused, not dropped: the
    requester marked it as one the certificate must honour (RFC 5280 4.2), and issuing
    without it would hand out a certificate that silently lacks what was required."""
    for ext in extensions:
        if ext.critical and ext.oid not in _KNOWN_REQUESTS:
            raise PolicyViolation(
                "csr-extension",
                f"the CSR requests extension {ext.oid.dotted_string} as critical, which this "
                "CA does not understand; leave it out or mark it non-critical",
            )


_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")


def parse_csr(data: bytes) -> CsrRequest:
    """Parse and check proof of possession. Subject and SANs are *requests*: the caller's
    authorisation decides what is used (``ca.issuance`` never takes them blindly)."""
    csr = load_csr(data)
    _strong_signature_hash(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedInput(f"CSR signature cannot be checked: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (unsupported algorithms raise several types)
        raise MalformedInput(
            f"CSR signature algorithm unsupported: {exc.__class__.__name__}"
        ) from None
    if not valid:
        raise BadSignature("CSR signature does not verify (no proof of possession)")
    try:
        key = csr.public_key()
    except ValueError as exc:
        raise MalformedInput(f"CSR public key cannot be loaded: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise PolicyViolation("key-type", f"CSR public key unsupported: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise PolicyViolation("key-type", f"{type(key).__name__} keys are not allowed")
    try:
        # The subject is decoded lazily: a string that is not what its type says (invalid
        # UTF-8 in a UTF8String) surfaces here, not later inside the issuance.
        subject = csr.subject
        subject.rfc4514_string()
    except (ValueError, TypeError) as exc:
        # (TypeError: an attribute other than x500UniqueIdentifier as a BIT STRING.)
        raise MalformedInput(f"CSR subject cannot be decoded: {exc}") from None
    try:
        extensions = csr.extensions
    except x509.UnsupportedGeneralNameType as exc:
        # x400Address, ediPartyName: forms no profile certifies and the library cannot read.
        raise MalformedInput(
            f"CSR subjectAltName holds a name form we cannot read: {exc}"
        ) from None
    except (ValueError, TypeError, x509.DuplicateExtension) as exc:
        # (TypeError: a directoryName SAN whose attribute is a BIT STRING, as in a subject.)
        raise MalformedInput(f"CSR extensions cannot be parsed: {exc}") from None
    _no_unknown_critical_request(extensions)
    try:
        requests = sum(a.oid == _EXTENSION_REQUEST for a in csr.attributes)
    except ValueError as exc:
        raise MalformedInput(f"CSR attributes cannot be parsed: {exc}") from None
    if requests > 1:
        # PKCS#9 (RFC 2985 5.4.2): one extensionRequest; with two, which one a reader takes
        # is its own choice (we, the rules and `openssl req -text` took the first).
        raise MalformedInput(f"CSR holds {requests} extensionRequest attributes; give one")
    sans: tuple[SanEntry, ...] = ()
    try:
        ext = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        sans = tuple(SanEntry.from_general_name(n) for n in ext.value)
    return CsrRequest(public_key=key, subject=subject, sans=sans)


_Signed = x509.Certificate | x509.CertificateSigningRequest
_KEY_PEM_LABELS: dict[bytes, Callable[[bytes], _Signed]] = {
    b"CERTIFICATE": x509.load_pem_x509_certificate,
    b"CERTIFICATE REQUEST": x509.load_pem_x509_csr,
    b"NEW CERTIFICATE REQUEST": x509.load_pem_x509_csr,
}


def public_key_of(data: bytes) -> CertificateIssuerPublicKeyTypes:
    """The public key of a certificate, a CSR or a bare public key (SubjectPublicKeyInfo),
    PEM or DER: what a key reported compromised comes as. A private key is refused (it must
    not travel to the CA), as is a file of several PEM blocks (which one is meant?); so is any
    key type we never certify."""
    if not data.strip():
        raise MalformedInput("the key file is empty")
    labels = [m.group(1) for m in _PEM_BEGIN.finditer(data)]
    if any(label.endswith(b"PRIVATE KEY") for label in labels) or _private_key_der(data):
        raise InputError("this is a private key: give the certificate, the CSR or the public key")
    if len(labels) > 1:
        raise MalformedInput(
            f"the file holds {len(labels)} PEM blocks; give the certificate, the CSR or the "
            "public key alone"
        )
    key: object
    try:
        if labels:
            label = labels[0]
            loader = _KEY_PEM_LABELS.get(label)
            key = (
                loader(data).public_key()
                if loader is not None
                else serialization.load_pem_public_key(data)
            )
        else:
            key = _public_key_of_der(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise MalformedInput(f"no certificate, CSR or public key can be read: {exc}") from None
    except UnsupportedAlgorithm:
        raise PolicyViolation("key-type", "this key type is never certified here") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise PolicyViolation("key-type", f"{type(key).__name__} keys are never certified here")
    return key


def _private_key_der(data: bytes) -> bool:
    """``data`` is an unencrypted private key in DER (PKCS#8, or PKCS#1/SEC 1)."""
    try:
        serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _public_key_of_der(data: bytes) -> object:
    for load in (x509.load_der_x509_certificate, x509.load_der_x509_csr):
        try:
            return load(data).public_key()
        except (ValueError, x509.InvalidVersion):
            continue
    return serialization.load_der_public_key(data)
