"""CSR intake: size limit, PEM or DER, proof of possession, and what the CSR asks for."""

from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from ca.tbs import SanEntry
from sekisho.errors import BadSignature, InputError, MalformedInput, PolicyViolation, TooLarge

MAX_CSR_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class CsrRequest:
    public_key: CertificateIssuerPublicKeyTypes
    subject: x509.Name
    sans: tuple[SanEntry, ...]


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    if len(data) > MAX_CSR_BYTES:
        raise TooLarge(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
    if not data.strip():
        raise MalformedInput("CSR is empty")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise MalformedInput(f"CSR cannot be parsed: {exc}") from None


def parse_csr(data: bytes) -> CsrRequest:
    """Parse and check proof of possession. Subject and SANs are *requests*: the caller's
    authorisation decides what is used (``ca.issuance`` never takes them blindly)."""
    csr = load_csr(data)
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
    sans: tuple[SanEntry, ...] = ()
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = tuple(SanEntry.from_general_name(n) for n in ext.value)
    except x509.ExtensionNotFound:
        pass
    except (ValueError, x509.DuplicateExtension) as exc:
        raise MalformedInput(f"CSR extensions cannot be parsed: {exc}") from None
    except InputError:
        raise
    return CsrRequest(public_key=key, subject=csr.subject, sans=sans)
