"""Software key backend: keys generated in-process, stored as strong PBES2 PKCS#8 files.

Files are ``<keys_dir>/<label>.key`` (PEM ``ENCRYPTED PRIVATE KEY``, mode 0600). References
look like ``file:<label>``. Decrypted keys are cached per process (loading costs ~0.2 s by
design of the KDF).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)

from hsm.base import KeyType
from hsm.pbes2 import (
    CURRENT,
    KeyEncryption,
    decrypt_private_key,
    describe,
    encrypt_private_key,
)
from sekisho.errors import (
    PATH_SHOWN,
    Conflict,
    KeyBackendError,
    NotFound,
    SekishoError,
    WrongPassphrase,
    shown,
)
from sekisho.files import create_synced, exclusive_lock, replace_synced, sync_directory

_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # whole label: fullmatch
PEM_LABEL = "ENCRYPTED PRIVATE KEY"


def generate_private_key(key_type: KeyType) -> CertificateIssuerPrivateKeyTypes:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    bits = key_type.rsa_bits
    assert bits is not None
    return rsa.generate_private_key(65537, bits)


def pem_wrap(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        f"-----BEGIN {label}-----\n".encode()
        + b"\n".join(lines)
        + f"\n-----END {label}-----\n".encode()
    )


def pem_unwrap(pem: bytes, label: str) -> bytes:
    text = pem.decode("ascii", "replace")
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if begin not in text or end not in text:
        raise KeyBackendError(f"not a PEM {label}")
    if text.count(begin) > 1:
        # Only the first would be read: a file of two keys brought online would put back
        # whichever came first, and say nothing of the other.
        raise KeyBackendError(f"holds {text.count(begin)} PEM {label} blocks: give one")
    body = "".join(text.split(begin, 1)[1].split(end, 1)[0].split())
    try:
        # validate: a character out of the alphabet is refused, not skipped over.
        return base64.b64decode(body, validate=True)
    except ValueError:  # binascii.Error: bad padding, a stray character
        raise KeyBackendError(f"not a PEM {label}: its base64 is damaged") from None


class Rewrap(NamedTuple):
    """A key file's re-encryption (``SoftwareBackend.rewrapped``): how the file was
    encrypted, and its PEM before and after."""

    was: KeyEncryption
    old: bytes
    new: bytes


class SoftwareBackend:
    name = "software"

    def __init__(self, keys_dir: Path, passphrase: bytes, source: str | None = None) -> None:
        self.keys_dir = keys_dir
        self._passphrase = passphrase
        # Where the passphrase came from ("the file ...", "the environment variable ..."),
        # named when it does not open a key: which one to check.
        self.source = source
        self._cache: dict[str, CertificateIssuerPrivateKeyTypes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the passphrase
        return f"SoftwareBackend({str(self.keys_dir)!r})"

    def key_path(self, ref: str) -> Path:
        if not ref.startswith("file:"):
            raise KeyBackendError(f"software backend cannot use key reference {ref!r}")
        label = ref[5:]
        if not _LABEL.fullmatch(label):
            raise KeyBackendError(f"bad key label {label!r}")
        return self.keys_dir / f"{label}.key"

    def reference(self, label: str) -> str:
        return f"file:{label}"

    def generate(self, label: str, key_type: KeyType) -> str:
        ref = self.reference(label)
        key = generate_private_key(key_type)
        self.store(ref, encrypt_private_key(key, self._passphrase))
        with self._lock:
            self._cache[ref] = key
        return ref

    def store(self, ref: str, encrypted_der: bytes) -> None:
        """Write an encrypted key file (0600); refuse to overwrite an existing key.

        The key is written to a temporary file in the keys directory, synced, and linked to
        its name only once whole: a write that fails part way (disk full) leaves no truncated
        key behind to block the label. ``link`` fails if the name exists, where ``rename``
        would replace it. A failure is a KeyBackendError (exit 69)."""
        path = self.key_path(ref)
        data = pem_wrap(encrypted_der, PEM_LABEL)
        try:
            self._make_keys_dir()
            try:
                # (The temporary file's name starts with a dot: never the name of a key,
                # whose labels start with a letter or digit.)
                create_synced(path, data)
            except FileExistsError:
                raise Conflict(f"key {ref} already exists") from None
        except OSError as exc:
            raise KeyBackendError(f"cannot write key {ref}: {exc.strerror or exc}") from None

    def _make_keys_dir(self) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the keys directory's lock (``flock``; processes and threads alike wait):
        for what decides from a key file's presence whether to write or remove it (``ca
        online``, ``ca offline``), so that no other such decision runs in between."""
        with contextlib.ExitStack() as held:
            try:
                self._make_keys_dir()
                held.enter_context(exclusive_lock(self.keys_dir))
            except OSError as exc:
                raise KeyBackendError(
                    f"cannot use {self.keys_dir}: {exc.strerror or exc}"
                ) from None
            yield

    def decrypt(self, encrypted_der: bytes) -> CertificateIssuerPrivateKeyTypes:
        """Decrypt an exported key under this backend's passphrase (to check it first)."""
        key = decrypt_private_key(encrypted_der, self._passphrase)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise KeyBackendError("unsupported key type")
        return key

    def export_encrypted(self, ref: str) -> bytes:
        """The key file's PEM, still encrypted under the backend passphrase."""
        path = self.key_path(ref)
        if not path.exists():
            raise NotFound(f"key {ref} is not in the online store")
        return path.read_bytes()

    def remove(self, ref: str) -> None:
        path = self.key_path(ref)
        with self._lock:
            self._cache.pop(ref, None)
        try:
            if path.exists():
                # Overwrite before unlinking; best effort on journaling file systems.
                size = path.stat().st_size
                with path.open("r+b") as fh:
                    fh.write(os.urandom(size))
                    fh.flush()
                    os.fsync(fh.fileno())
                path.unlink()
        except OSError as exc:
            raise KeyBackendError(f"cannot remove key {ref}: {exc.strerror or exc}") from None

    def set_aside(self, ref: str, suffix: str) -> Path:
        """Rename the key file of ``ref`` to ``<label>.key.<suffix>`` (kept, out of the way of
        a new key under the label); its new path."""
        path = self.key_path(ref)
        aside = path.with_name(f"{path.name}.{suffix}")
        with self._lock:
            self._cache.pop(ref, None)
        try:
            os.rename(path, aside)
            sync_directory(self.keys_dir)
        except OSError as exc:
            raise KeyBackendError(f"cannot set key {ref} aside: {exc.strerror or exc}") from None
        return aside

    def has_key(self, ref: str) -> bool:
        return self.key_path(ref).exists()

    def labels(self) -> list[str]:
        """The labels of the key files in the online store, sorted."""
        if not self.keys_dir.is_dir():
            return []
        return sorted(p.stem for p in self.keys_dir.glob("*.key") if _LABEL.fullmatch(p.stem))

    def rewrapped(self, ref: str) -> Rewrap | None:
        """The key file of ``ref`` encrypted the way new files are (``hsm.pbes2.CURRENT``)
        if it is encrypted otherwise (PBKDF2, written before stop 20); None if it is current
        already. The new encryption is decrypted and compared with the key before it is
        returned. Nothing is written: ``replace`` writes it. Hold ``exclusive()`` from the
        read to the write, so that no other process removes or replaces the file between."""
        old = self._read(ref, missing=NotFound)
        der = pem_unwrap(old, PEM_LABEL)
        before = describe(der)
        if before == CURRENT:
            return None
        key = self.decrypt(der)
        new = encrypt_private_key(key, self._passphrase)
        if _private_der(self.decrypt(new)) != _private_der(key):
            raise KeyBackendError(f"key {ref}: the new encryption does not hold the key")
        return Rewrap(before, old, pem_wrap(new, PEM_LABEL))

    def _read(self, ref: str, *, missing: type[SekishoError]) -> bytes:
        """The key file of ``ref``; ``missing`` (NotFound, or KeyBackendError where a key is
        needed) if there is none, a KeyBackendError if it cannot be read."""
        try:
            return self.key_path(ref).read_bytes()
        except FileNotFoundError:
            raise missing(f"key {ref} is not in the online store (offline?)") from None
        except OSError as exc:
            raise KeyBackendError(f"cannot read key {ref}: {exc.strerror or exc}") from None

    def replace(self, ref: str, pem: bytes) -> None:
        """Put ``pem`` in place of the key file of ``ref`` (a synced temporary file renamed
        over it, 0600): the file is the old or the new one, never a part of either."""
        try:
            replace_synced(self.key_path(ref), pem)
        except OSError as exc:
            raise KeyBackendError(f"cannot write key {ref}: {exc.strerror or exc}") from None

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        with self._lock:
            cached = self._cache.get(ref)
        if cached is not None:
            return cached
        try:
            key = self.decrypt(pem_unwrap(self._read(ref, missing=KeyBackendError), PEM_LABEL))
        except WrongPassphrase:
            where = f" (the key passphrase from {self.source})" if self.source else ""
            raise WrongPassphrase(
                f"cannot decrypt key file {shown(self.key_path(ref), PATH_SHOWN)}: wrong "
                f"passphrase{where} or a corrupt file"
            ) from None
        with self._lock:
            self._cache[ref] = key
        return key

    def public_key(self, ref: str) -> CertificateIssuerPublicKeyTypes:
        return self.signing_key(ref).public_key()

    def close(self) -> None:
        with self._lock:
            self._cache.clear()


def _private_der(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
