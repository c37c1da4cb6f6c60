"""Password-protected PKCS#12 bundles for server-side key generation.

Modern default: PBES2 with AES-256-CBC and PBKDF2-HMAC-SHA256 at 600,000 iterations, SHA-256
MAC. The MAC's own iteration count stays at OpenSSL's 2048 whatever we ask (see
docs/decisions.md), so the password's randomness is the real protection: generated passwords
carry at least 96 bits. ``legacy=True`` gives 3DES/SHA-1 for old Windows/macOS importers.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from sekisho.errors import InputError

KDF_ROUNDS = 600_000
MIN_PASSWORD_BYTES = 12


def check_password(password: bytes) -> None:
    """Refuse, before anything is issued, a PKCS#12 password that would not protect the key
    or that importers would not read as given: under MIN_PASSWORD_BYTES characters (counted
    as characters: six "ä" are not twelve), not UTF-8 text, holding a control character (a
    NUL, as a UTF-16 file read as UTF-8 holds, made bundles no tool could open; OpenSSL's
    ``-passin file:`` reads one line), or a character beyond the Basic Multilingual Plane
    (RFC 7292 B.1 carries the password as a BMPString)."""
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("PKCS#12 password must be UTF-8 text") from None
    if len(text) < MIN_PASSWORD_BYTES:
        raise InputError(f"PKCS#12 password must have at least {MIN_PASSWORD_BYTES} characters")
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            raise InputError(
                f"PKCS#12 password holds a control character (U+{ord(ch):04X}); is the file "
                "UTF-16? give UTF-8 text on one line"
            )
        if ord(ch) > 0xFFFF:
            raise InputError(
                "PKCS#12 password holds a character beyond U+FFFF, which a PKCS#12 password "
                "(a BMPString) cannot carry"
            )


def pkcs12_bundle(
    key: PrivateKeyTypes,
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    password: bytes,
    *,
    legacy: bool = False,
) -> bytes:
    check_password(password)
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:
        encryption = (
            builder.kdf_rounds(50_000)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303  (old importers need it)
            .build(password)
        )
    else:
        encryption = (
            builder.kdf_rounds(KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
    return pkcs12.serialize_key_and_certificates(
        friendly_name(cert),
        key,  # type: ignore[arg-type]
        cert,
        list(chain),
        encryption,
    )


FRIENDLY_NAME_OCTETS = 64


def friendly_name(cert: x509.Certificate) -> bytes:
    """The subject DN as the bundle's friendlyName (what key stores list), UTF-8, at most 64
    octets, cut on a character boundary: cut inside a multi-byte character, the library
    refused the name after the certificate was issued, and the new key was lost with it."""
    encoded = cert.subject.rfc4514_string().encode()
    if len(encoded) <= FRIENDLY_NAME_OCTETS:
        return encoded
    return encoded[:FRIENDLY_NAME_OCTETS].decode("utf-8", "ignore").encode()
