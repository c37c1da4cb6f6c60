"""PKCS#8 encryption with strong parameters (RFC 8018 6.2 PBES2, RFC 7914 7 scrypt).

``cryptography``'s ``BestAvailableEncryption`` uses PBKDF2 with only 2048 iterations for
PKCS#8 and offers no way to change it, but it *reads* any PBES2 structure, scrypt included.
So we build the EncryptedPrivateKeyInfo ourselves, encoded with asn1crypto: PBES2 with the
memory-hard scrypt (N = 2^14, r = 8, p = 2, 16-byte salt) and AES-256-CBC. OpenSSL reads the
result as well (``openssl pkey``: 16 MiB, under its default 32 MiB limit for scrypt).

Key files written before stop 20 use PBKDF2-HMAC-SHA256 at 600,000 iterations; they are read
as before, and so are key files of either kind brought back online, within bounds that keep
a hostile file from holding the CPU or the memory.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from asn1crypto import algos, core
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from sekisho.errors import KeyBackendError, WrongPassphrase

SCRYPT_OID = "1.3.6.1.4.1.11591.4.11"  # id-scrypt, RFC 7914 section 7
# What new key files use: 16 MiB (128 * r * N) and about 0.1 s here per derivation.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 2
# What a key file read may use. Below: weaker than security target 39 accepts (N >= 2^14,
# r = 8). Above: a file asking for more would hold the memory or the CPU before anything
# could fail (1 GiB, or a minute of CPU, for a file planted or damaged).
MIN_SCRYPT_N, MIN_SCRYPT_R = 2**14, 8
MAX_SCRYPT_MEMORY = 256 * 2**20  # 128 * r * N bytes
MAX_SCRYPT_WORK = 2**22  # N * r * p: 16 times what new files ask
# PBKDF2 (key files written before scrypt, or re-encrypted elsewhere): HMAC-SHA-2 only.
MIN_ITERATIONS = 600_000
MAX_ITERATIONS = 10_000_000
STRONG_KDFS = frozenset({"pbkdf2-sha256", "pbkdf2-sha384", "pbkdf2-sha512", "scrypt"})
STRONG_CIPHERS = frozenset({"aes256_cbc"})
KEY_LENGTH = 32  # AES-256


# (asn1crypto carries no type information: its classes are Any to mypy, hence the ignores.)
class ScryptParams(core.Sequence):  # type: ignore[misc]
    """RFC 7914 section 7.1 scrypt-params."""

    _fields = [
        ("salt", core.OctetString),
        ("cost_parameter", core.Integer),
        ("block_size", core.Integer),
        ("parallelization_parameter", core.Integer),
        ("key_length", core.Integer, {"optional": True}),
    ]


class _KdfAlgorithmId(core.ObjectIdentifier):  # type: ignore[misc]
    _map = {"1.2.840.113549.1.5.12": "pbkdf2", SCRYPT_OID: "scrypt"}


class _KdfAlgorithm(core.Sequence):  # type: ignore[misc]
    _fields = [("algorithm", _KdfAlgorithmId), ("parameters", core.Any, {"optional": True})]
    _oid_pair = ("algorithm", "parameters")
    _oid_specs = {"pbkdf2": algos.Pbkdf2Params, "scrypt": ScryptParams}


class _Pbes2Params(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("key_derivation_func", _KdfAlgorithm),
        ("encryption_scheme", algos.EncryptionAlgorithm),
    ]


class _EncryptionScheme(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("algorithm", algos.EncryptionAlgorithmId),
        ("parameters", core.Any, {"optional": True}),
    ]
    _oid_pair = ("algorithm", "parameters")
    _oid_specs = {"pbes2": _Pbes2Params}


class EncryptedPrivateKeyInfo(core.Sequence):  # type: ignore[misc]
    """RFC 5958 EncryptedPrivateKeyInfo, whose PBES2 parameters may name scrypt (asn1crypto's
    own class knows PBKDF2 only)."""

    _fields = [
        ("encryption_algorithm", _EncryptionScheme),
        ("encrypted_data", core.OctetString),
    ]


class KeyEncryption(NamedTuple):
    """How a key file is encrypted (``describe``)."""

    scheme: str  # "pbes2", or the other scheme the file names
    kdf: str  # "scrypt", "pbkdf2-sha256", ...; "" when the scheme is not PBES2
    cost: int  # scrypt's N, or PBKDF2's iterations
    cipher: str
    block_size: int = 0  # scrypt's r
    parallelization: int = 0  # scrypt's p


def encrypt_private_key(key: PrivateKeyTypes, passphrase: bytes) -> bytes:
    """DER EncryptedPrivateKeyInfo of ``key`` under ``passphrase`` (PBES2: scrypt, AES-256)."""
    if not passphrase:
        raise ValueError("empty passphrase")
    salt, iv = os.urandom(16), os.urandom(16)
    kek = Scrypt(salt, KEY_LENGTH, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(passphrase)
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(kek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    kdf = _KdfAlgorithm(
        {
            "algorithm": "scrypt",
            "parameters": ScryptParams(
                {
                    "salt": salt,
                    "cost_parameter": SCRYPT_N,
                    "block_size": SCRYPT_R,
                    "parallelization_parameter": SCRYPT_P,
                    "key_length": KEY_LENGTH,
                }
            ),
        }
    )
    cipher = algos.EncryptionAlgorithm({"algorithm": "aes256_cbc", "parameters": iv})
    info = EncryptedPrivateKeyInfo(
        {
            "encryption_algorithm": _EncryptionScheme(
                {
                    "algorithm": "pbes2",
                    "parameters": _Pbes2Params(
                        {"key_derivation_func": kdf, "encryption_scheme": cipher}
                    ),
                }
            ),
            "encrypted_data": ciphertext,
        }
    )
    return bytes(info.dump())


# What encrypt_private_key writes: a file described otherwise is re-encrypted by `key rewrap`.
CURRENT = KeyEncryption("pbes2", "scrypt", SCRYPT_N, "aes256_cbc", SCRYPT_R, SCRYPT_P)


def describe(der: bytes) -> KeyEncryption:
    """How an EncryptedPrivateKeyInfo is encrypted, for audits/tests. A structure that is not
    one is a KeyBackendError: asn1crypto parses lazily, and a damaged one fails where it is
    read, with whichever exception its parts raise (an AttributeError where a field holds
    another type)."""
    try:
        return _describe(der)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise KeyBackendError(f"key file is not a valid EncryptedPrivateKeyInfo: {exc}") from None


def _describe(der: bytes) -> KeyEncryption:
    info = EncryptedPrivateKeyInfo.load(der)
    alg = info["encryption_algorithm"]
    if alg["algorithm"].native != "pbes2":
        return KeyEncryption(alg["algorithm"].native, "", 0, "")
    params = alg["parameters"]
    kdf = params["key_derivation_func"]
    kdf_params = kdf["parameters"]
    cipher = params["encryption_scheme"]["algorithm"].native
    name = kdf["algorithm"].native
    if name == "scrypt":
        length = kdf_params["key_length"].native
        return KeyEncryption(
            "pbes2",
            "scrypt" if length in (None, KEY_LENGTH) else f"scrypt-{length}-byte-key",
            int(kdf_params["cost_parameter"].native),
            cipher,
            int(kdf_params["block_size"].native),
            int(kdf_params["parallelization_parameter"].native),
        )
    if name != "pbkdf2":
        return KeyEncryption("pbes2", str(name), 0, cipher)
    prf = kdf_params["prf"]["algorithm"].native
    return KeyEncryption(
        "pbes2", f"pbkdf2-{prf}", int(kdf_params["iteration_count"].native or 0), cipher
    )


def _refusal(how: KeyEncryption) -> str | None:
    """Why a key file encrypted ``how`` is not read (None: it is)."""
    weak = (
        f"key file uses weak encryption ({how.scheme}, {how.kdf or 'no KDF'}, "
        f"{how.cipher or 'no cipher'}, cost {how.cost}); re-encrypt it with PBES2, scrypt "
        f"(N >= {MIN_SCRYPT_N}, r >= {MIN_SCRYPT_R}) or PBKDF2-HMAC-SHA256 (at least "
        f"{MIN_ITERATIONS} iterations), and AES-256-CBC"
    )
    if how.scheme != "pbes2" or how.kdf not in STRONG_KDFS or how.cipher not in STRONG_CIPHERS:
        return weak
    if how.kdf != "scrypt":
        if how.cost < MIN_ITERATIONS:
            return weak
        if how.cost > MAX_ITERATIONS:
            return f"key file asks for {how.cost} PBKDF2 iterations, more than {MAX_ITERATIONS}"
        return None
    n, r, p = how.cost, how.block_size, how.parallelization
    if n < MIN_SCRYPT_N or n & (n - 1) or r < MIN_SCRYPT_R or p < 1:
        return weak
    if 128 * r * n > MAX_SCRYPT_MEMORY or n * r * p > MAX_SCRYPT_WORK:
        return (
            f"key file asks scrypt for {128 * r * n // 2**20} MiB and N * r * p = {n * r * p}, "
            f"more than {MAX_SCRYPT_MEMORY // 2**20} MiB or {MAX_SCRYPT_WORK}"
        )
    return None


def decrypt_private_key(der: bytes, passphrase: bytes) -> PrivateKeyTypes:
    """Load an EncryptedPrivateKeyInfo, refusing weak parameters (e.g. the 2048 default) and
    costs a hostile file could ask for."""
    refusal = _refusal(describe(der))
    if refusal is not None:
        raise KeyBackendError(refusal)
    try:
        return serialization.load_der_private_key(der, passphrase)
    except ValueError:
        raise WrongPassphrase(
            "cannot decrypt the key: wrong passphrase or corrupt key file"
        ) from None
    except UnsupportedAlgorithm as exc:  # decrypted, but of a key type cryptography lacks
        raise KeyBackendError(f"unsupported key type in the key file: {exc}") from None
