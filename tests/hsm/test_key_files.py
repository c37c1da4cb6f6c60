"""Key files of the software backend on disk: written whole or not at all, and a damaged one
refused as a key-backend error, never as an uncaught exception."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.base import KeyType
from hsm.pbes2 import decrypt_private_key, describe, encrypt_private_key
from hsm.software import PEM_LABEL, SoftwareBackend, pem_unwrap
from sekisho.errors import Conflict, KeyBackendError

PASSPHRASE = b"correct horse battery staple 42"


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A "disk full" after ``limit`` bytes of any file this process writes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_key_write_that_fails_part_way_leaves_nothing_and_is_a_key_backend_error(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    backend = SoftwareBackend(keys, PASSPHRASE)
    with file_size_limit(256), pytest.raises(KeyBackendError, match="cannot write key"):
        backend.generate("ca-new", KeyType.EC_P384)
    assert sorted(os.listdir(keys)) == []  # no truncated key, no temporary file
    # The label is not blocked: the retry writes the key, which a fresh backend loads.
    ref = backend.generate("ca-new", KeyType.EC_P384)
    assert sorted(os.listdir(keys)) == ["ca-new.key"]
    assert (keys / "ca-new.key").stat().st_mode & 0o777 == 0o600
    SoftwareBackend(keys, PASSPHRASE).signing_key(ref)


def test_store_never_replaces_an_existing_key_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    backend = SoftwareBackend(keys, PASSPHRASE)
    ref = backend.generate("k1", KeyType.EC_P256)
    before = (keys / "k1.key").read_bytes()
    other = SoftwareBackend(tmp_path / "other", PASSPHRASE)
    other_der = pem_unwrap(other.export_encrypted(other.generate("k1", KeyType.EC_P256)), PEM_LABEL)
    with pytest.raises(Conflict, match="already exists"):
        backend.store(ref, other_der)
    assert (keys / "k1.key").read_bytes() == before
    assert sorted(os.listdir(keys)) == ["k1.key"]


def test_an_unwritable_keys_directory_is_a_key_backend_error(tmp_path: Path) -> None:
    blocker = tmp_path / "keys"
    blocker.write_text("a file where the keys directory should be\n")
    backend = SoftwareBackend(blocker, PASSPHRASE)
    with pytest.raises(KeyBackendError, match="cannot write key"):
        backend.generate("k1", KeyType.EC_P256)


@pytest.mark.parametrize(
    "damage",
    [
        lambda body: body + "A",  # one base64 character too many (a cut-short file, padded)
        lambda body: body[:10] + "!" + body[10:],  # a stray character out of the alphabet
        lambda body: body[:-3],  # cut short: the padding is wrong
    ],
    ids=["extra-char", "stray-char", "truncated"],
)
def test_a_key_file_with_damaged_base64_is_a_key_backend_error(
    tmp_path: Path, damage: Callable[[str], str]
) -> None:
    keys = tmp_path / "keys"
    ref = SoftwareBackend(keys, PASSPHRASE).generate("k1", KeyType.EC_P256)
    pem = (keys / "k1.key").read_text()
    head, rest = pem.split("-----\n", 1)
    body, tail = rest.split("\n-----END", 1)
    damaged = f"{head}-----\n{damage(body.replace(chr(10), ''))}\n-----END{tail}"
    (keys / "k1.key").write_text(damaged)
    with pytest.raises(KeyBackendError, match="base64"):
        pem_unwrap(damaged.encode(), PEM_LABEL)
    with pytest.raises(KeyBackendError):
        SoftwareBackend(keys, PASSPHRASE).signing_key(ref)


def test_a_corrupted_key_structure_is_a_key_backend_error() -> None:
    der = encrypt_private_key(ec.generate_private_key(ec.SECP256R1()), PASSPHRASE)
    # scrypt's cost parameter's INTEGER tag made a REAL: asn1crypto then raised AttributeError.
    at = der.index(bytes([0x02, 0x02]) + (2**14).to_bytes(2, "big"))
    corrupted = der[:at] + b"\x09" + der[at + 1 :]
    with pytest.raises(KeyBackendError, match="not a valid EncryptedPrivateKeyInfo"):
        describe(corrupted)
    with pytest.raises(KeyBackendError, match="not a valid EncryptedPrivateKeyInfo"):
        decrypt_private_key(corrupted, PASSPHRASE)
