"""Wrap a signing key so a callback sees every ``sign()`` input before the signature exists.

Issuance uses this to commit its intent (reserved serial + SHA-256 of the exact TBS bytes)
*before* the CA signs; tests use it to prove that every signature goes through the backend.
The wrappers subclass cryptography's private-key ABCs, which is all its builders need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed

SignHook = Callable[[bytes], None]


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError("this key wrapper only signs; it never exports or exchanges")


class _ObservedEC(ec.EllipticCurvePrivateKey):
    def __init__(self, inner: ec.EllipticCurvePrivateKey, hook: SignHook) -> None:
        self._inner, self._hook = inner, hook

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        self._hook(bytes(data))
        return self._inner.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._inner.curve

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    exchange = private_numbers = private_bytes = _refuse

    def __copy__(self) -> _ObservedEC:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _ObservedEC:
        return self


class _ObservedRSA(rsa.RSAPrivateKey):
    def __init__(self, inner: rsa.RSAPrivateKey, hook: SignHook) -> None:
        self._inner, self._hook = inner, hook

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        self._hook(bytes(data))
        return self._inner.sign(data, padding, algorithm)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._inner.public_key()

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    decrypt = private_numbers = private_bytes = _refuse

    def __copy__(self) -> _ObservedRSA:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _ObservedRSA:
        return self


class _ObservedEd25519(ed25519.Ed25519PrivateKey):
    def __init__(self, inner: ed25519.Ed25519PrivateKey, hook: SignHook) -> None:
        self._inner, self._hook = inner, hook

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        self._hook(bytes(data))
        return self._inner.sign(data)

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._inner.public_key()

    private_bytes = private_bytes_raw = _refuse

    def __copy__(self) -> _ObservedEd25519:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _ObservedEd25519:
        return self


def observed(
    key: CertificateIssuerPrivateKeyTypes, hook: SignHook
) -> CertificateIssuerPrivateKeyTypes:
    """Return ``key`` wrapped so ``hook(data)`` runs before each signature."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _ObservedEC(key, hook)
    if isinstance(key, rsa.RSAPrivateKey):
        return _ObservedRSA(key, hook)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _ObservedEd25519(key, hook)
    raise TypeError(f"cannot observe {type(key).__name__}")
