"""The key-backend protocol and key types.

A backend is tiny: generate, public_key, signing_key, close. ``signing_key`` returns an object
implementing ``cryptography``'s private-key interface, so certificate, CRL, OCSP and
checkpoint builders sign through it without knowing where the key lives.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
    PublicKeyTypes,
)

from sekisho.errors import PolicyViolation


class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"

    @property
    def rsa_bits(self) -> int | None:
        return int(self.value.split("-")[1]) if self.value.startswith("rsa-") else None


CA_KEY_TYPES = (
    KeyType.EC_P256,
    KeyType.EC_P384,
    KeyType.RSA_3072,
    KeyType.RSA_4096,
    KeyType.ED25519,
)


def key_type_of(key: PublicKeyTypes) -> KeyType:
    """Classify a public key; anything we do not issue for is a policy violation."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        raise PolicyViolation("key-type", f"elliptic curve {key.curve.name} is not allowed")
    if isinstance(key, rsa.RSAPublicKey):
        try:
            return KeyType(f"rsa-{key.key_size}")
        except ValueError:
            raise PolicyViolation("key-size", f"RSA-{key.key_size} is not allowed") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    raise PolicyViolation("key-type", f"{type(key).__name__} keys are not allowed")


def signature_hash(key_type: KeyType) -> hashes.HashAlgorithm | None:
    """The hash a CA of this key type signs with (None for Ed25519, which hashes itself)."""
    if key_type is KeyType.ED25519:
        return None
    if key_type in (KeyType.EC_P384, KeyType.RSA_4096):
        return hashes.SHA384()
    return hashes.SHA256()


def sign_bytes(key: CertificateIssuerPrivateKeyTypes, key_type: KeyType, data: bytes) -> bytes:
    """Sign raw bytes the way the X.509 builders would (same algorithm and hash)."""
    algorithm = signature_hash(key_type)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    assert algorithm is not None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), algorithm)
    raise TypeError(f"cannot sign with {type(key).__name__}")


def verify_bytes(
    public: CertificateIssuerPublicKeyTypes, key_type: KeyType, signature: bytes, data: bytes
) -> bool:
    """Whether ``signature`` is ``sign_bytes``'s signature of ``data`` under ``public``."""
    algorithm = signature_hash(key_type)
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey) and algorithm is not None:
            public.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey) and algorithm is not None:
            public.verify(signature, data, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


@runtime_checkable
class KeyBackend(Protocol):
    name: str

    def generate(self, label: str, key_type: KeyType) -> str:
        """Create a key; return its reference (``file:<label>`` or a PKCS#11 URI)."""

    def reference(self, label: str) -> str:
        """A reference that finds the key ``generate(label, ...)`` made, by its label."""

    def public_key(self, ref: str) -> CertificateIssuerPublicKeyTypes:
        """The public half of the referenced key."""

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        """An object implementing cryptography's private-key interface for ``ref``."""

    def has_key(self, ref: str) -> bool:
        """Whether ``ref`` is usable now (an offline root's key is not)."""

    def close(self) -> None:
        """Release sessions and forget cached key material."""
