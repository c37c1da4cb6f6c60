"""PKCS#8 encryption with strong parameters (RFC 8018 6.2 PBES2).

``cryptography``'s ``BestAvailableEncryption`` uses PBKDF2 with only 2048 iterations for
PKCS#8 and offers no way to raise it, but it *reads* any PBES2 structure. So we build the
EncryptedPrivateKeyInfo ourselves: PBKDF2-HMAC-SHA256 (600,000 iterations, 16-byte salt) and
AES-256-CBC, encoded with asn1crypto. OpenSSL reads the result as well.
"""

from __future__ import annotations

import os

from asn1crypto import algos, keys
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from sekisho.errors import KeyBackendError, WrongPassphrase

PBKDF2_ITERATIONS = 600_000
MIN_ITERATIONS = 600_000
# A key file asking for more would hold the CPU for minutes before failing or working: refused.
MAX_ITERATIONS = 10_000_000
# What a key file brought back online may use: PBKDF2 with HMAC-SHA-2, and AES-256.
STRONG_KDFS = frozenset({"pbkdf2-sha256", "pbkdf2-sha384", "pbkdf2-sha512"})
STRONG_CIPHERS = frozenset({"aes256_cbc"})


def encrypt_private_key(
    key: PrivateKeyTypes, passphrase: bytes, iterations: int = PBKDF2_ITERATIONS
) -> bytes:
    """DER EncryptedPrivateKeyInfo of ``key`` under ``passphrase``."""
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"refusing PBKDF2 with fewer than {MIN_ITERATIONS} iterations")
    if not passphrase:
        raise ValueError("empty passphrase")
    salt, iv = os.urandom(16), os.urandom(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(kek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    scheme = algos.EncryptionAlgorithm(
        {
            "algorithm": "pbes2",
            "parameters": algos.Pbes2Params(
                {
                    "key_derivation_func": algos.KdfAlgorithm(
                        {
                            "algorithm": "pbkdf2",
                            "parameters": algos.Pbkdf2Params(
                                {
                                    "salt": algos.Pbkdf2Salt(name="specified", value=salt),
                                    "iteration_count": iterations,
                                    "key_length": 32,
                                    "prf": algos.HmacAlgorithm(
                                        {"algorithm": "sha256", "parameters": None}
                                    ),
                                }
                            ),
                        }
                    ),
                    "encryption_scheme": algos.EncryptionAlgorithm(
                        {
                            "algorithm": "aes256_cbc",
                            "parameters": iv,
                        }
                    ),
                }
            ),
        }
    )
    info = keys.EncryptedPrivateKeyInfo(
        {"encryption_algorithm": scheme, "encrypted_data": ciphertext}
    )
    return bytes(info.dump())


def describe(der: bytes) -> tuple[str, str, int, str]:
    """(scheme, kdf, iterations, cipher) of an EncryptedPrivateKeyInfo, for audits/tests.
    A structure that is not one is a KeyBackendError: asn1crypto parses lazily, and a damaged
    one fails where it is read, with whichever exception its parts raise (an AttributeError
    where a field holds another type)."""
    try:
        return _describe(der)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise KeyBackendError(f"key file is not a valid EncryptedPrivateKeyInfo: {exc}") from None


def _describe(der: bytes) -> tuple[str, str, int, str]:
    info = keys.EncryptedPrivateKeyInfo.load(der)
    alg = info["encryption_algorithm"]
    if alg["algorithm"].native != "pbes2":
        return (alg["algorithm"].native, "", 0, "")
    params = alg["parameters"]
    kdf = params["key_derivation_func"]
    kdf_params = kdf["parameters"]
    prf = kdf_params["prf"]["algorithm"].native if kdf.native["algorithm"] == "pbkdf2" else ""
    return (
        "pbes2",
        f"{kdf['algorithm'].native}-{prf}",
        int(kdf_params["iteration_count"].native or 0),
        params["encryption_scheme"]["algorithm"].native,
    )


def decrypt_private_key(der: bytes, passphrase: bytes) -> PrivateKeyTypes:
    """Load an EncryptedPrivateKeyInfo, refusing weak parameters (e.g. the 2048 default)."""
    scheme, kdf, iterations, cipher = describe(der)
    if (
        scheme != "pbes2"
        or kdf not in STRONG_KDFS
        or cipher not in STRONG_CIPHERS
        or iterations < MIN_ITERATIONS
    ):
        raise KeyBackendError(
            f"key file uses weak encryption ({scheme}, {kdf or 'no KDF'}, {cipher or 'no cipher'}, "
            f"{iterations} iterations); re-encrypt it with PBKDF2-HMAC-SHA256, AES-256-CBC and "
            f"at least {MIN_ITERATIONS} iterations"
        )
    if iterations > MAX_ITERATIONS:
        raise KeyBackendError(
            f"key file asks for {iterations} PBKDF2 iterations, more than {MAX_ITERATIONS}"
        )
    try:
        return serialization.load_der_private_key(der, passphrase)
    except ValueError:
        raise WrongPassphrase(
            "cannot decrypt the key: wrong passphrase or corrupt key file"
        ) from None
