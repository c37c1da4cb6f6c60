"""Password-protected PKCS#12 bundles for server-side key generation.

Modern default: PBES2 with AES-256-CBC and PBKDF2-HMAC-SHA256 at 600,000 iterations, and an
HMAC-SHA256 MAC whose key derivation runs 600,000 iterations too. ``cryptography`` writes the
MAC with 2048 iterations whatever is asked: a wrong password was then rejected by the MAC in
a third of a millisecond, and guessing never had to pay for the 600,000. The MAC is written
again here (RFC 7292 B.2 key derivation, HMAC over the same AuthenticatedSafe octets), as
``openssl pkcs12 -export -iter 600000`` writes it. ``legacy=True`` gives 3DES/SHA-1, with
the library's MAC, for old Windows/macOS importers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata
from collections.abc import Sequence

from asn1crypto import pkcs12 as asn1_pkcs12
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
    bundle = pkcs12.serialize_key_and_certificates(
        friendly_name(cert),
        key,  # type: ignore[arg-type]
        cert,
        list(chain),
        encryption,
    )
    return bundle if legacy else with_mac_rounds(bundle, password, KDF_ROUNDS)


MAC_SALT_OCTETS = 16
_BLOCK = 64  # SHA-256's input block: v in RFC 7292 B.2
_MAC_KEY_ID = 3  # RFC 7292 B.3: the key derivation for the integrity (MAC) key


def mac_key(password: bytes, salt: bytes, rounds: int) -> bytes:
    """RFC 7292 B.2 with SHA-256, ID 3: the 32-octet HMAC-SHA256 key of a PKCS#12 MAC (one
    hash block, so the I-update of B.2 step 6C never runs). The password is a BMPString,
    big-endian with a two-octet terminator, as OpenSSL derives it from UTF-8."""

    def filled(octets: bytes) -> bytes:  # copies of ``octets`` to a multiple of the block
        length = _BLOCK * -(-len(octets) // _BLOCK)
        return (octets * (length // len(octets) + 1))[:length] if octets else b""

    bmp = password.decode("utf-8").encode("utf-16-be") + b"\0\0"
    digest = hashlib.sha256(bytes([_MAC_KEY_ID]) * _BLOCK + filled(salt) + filled(bmp)).digest()
    for _ in range(rounds - 1):
        digest = hashlib.sha256(digest).digest()
    return digest


def with_mac_rounds(bundle: bytes, password: bytes, rounds: int) -> bytes:
    """``bundle`` with its MAC made again: HMAC-SHA256 over the same AuthenticatedSafe, a
    new 128-bit salt, ``rounds`` iterations. Nothing else changes (the encoded AuthSafe is
    kept as it is)."""
    pfx = asn1_pkcs12.Pfx.load(bundle)
    auth_safe = pfx["auth_safe"]
    covered = auth_safe["content"].native  # the AuthenticatedSafe's DER: what the MAC covers
    salt = secrets.token_bytes(MAC_SALT_OCTETS)
    digest = hmac.new(mac_key(password, salt, rounds), covered, hashlib.sha256).digest()
    mac_data = asn1_pkcs12.MacData(
        {
            "mac": {"digest_algorithm": {"algorithm": "sha256"}, "digest": digest},
            "mac_salt": salt,
            "iterations": rounds,
        }
    )
    rebuilt = asn1_pkcs12.Pfx(
        {"version": pfx["version"], "auth_safe": auth_safe, "mac_data": mac_data}
    )
    return bytes(rebuilt.dump())


FRIENDLY_NAME_OCTETS = 64


def friendly_name(cert: x509.Certificate) -> bytes:
    """The subject DN as the bundle's friendlyName (what key stores list), UTF-8, at most 64
    octets, cut on a character boundary: cut inside a multi-byte character, the library
    refused the name after the certificate was issued, and the new key was lost with it."""
    encoded = cert.subject.rfc4514_string().encode()
    if len(encoded) <= FRIENDLY_NAME_OCTETS:
        return encoded
    return encoded[:FRIENDLY_NAME_OCTETS].decode("utf-8", "ignore").encode()
