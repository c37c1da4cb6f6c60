"""Keys for which anyone can sign, whose CSR therefore passes the proof of possession without
any private key: an Ed25519 key of small order (the identity verifies R = identity, S = 0 for
every message) and an RSA key whose modulus is prime (phi(n) = n - 1, so the private exponent
follows from the public key). Both are refused as ``weak-key``, by CSR and by request. Also
from the same review: a CSR with two extensionRequest attributes, malformed."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from asn1crypto import csr as acsr
from asn1crypto import keys as akeys
from asn1crypto import x509 as ax
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ca.rules import ed25519_key_problem
from sekisho.errors import PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import request_for
from tests.ca.test_bad_input import _assert_refused, _from_csr
from tests.conftest import TEST_ACTOR
from tests.support.rsa_keys import openssl_prime

P25519 = 2**255 - 19
# The identity, (0, -1) of order 2, (0, 0)'s encoding (order 4), the two of order 8 (x sign
# either way), and the identity with the sign bit set.
SMALL_ORDER = [
    bytes([1]) + bytes(31),
    (P25519 - 1).to_bytes(32, "little"),
    bytes(32),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    bytes([1]) + bytes(30) + b"\x80",
]


def _csr(spki: akeys.PublicKeyInfo, sign: object, algorithm: str) -> bytes:
    info = acsr.CertificationRequestInfo(
        {"version": 0, "subject": _subject(), "subject_pk_info": spki, "attributes": []}
    )
    assert callable(sign)
    request = acsr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": sign(info.dump()),
        }
    )
    return bytes(request.dump())


def _subject() -> ax.Name:
    return ax.Name.build({"common_name": "Alice Admin", "organization_name": "Tenant One"})


@pytest.mark.parametrize("encoded", SMALL_ORDER, ids=lambda b: b.hex()[:8] + b.hex()[-2:])
def test_small_order_ed25519_keys_are_found(encoded: bytes) -> None:
    assert ed25519_key_problem(encoded)


def test_non_canonical_ed25519_encoding_is_found() -> None:
    assert "canonical" in (ed25519_key_problem(P25519.to_bytes(32, "little")) or "")


def test_generated_ed25519_keys_pass() -> None:
    for _ in range(50):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        assert ed25519_key_problem(key.public_bytes_raw()) is None


def test_csr_of_the_ed25519_identity_is_refused(services: Services) -> None:
    """The CSR carries no private key's signature: R = the identity, S = 0 verifies."""
    identity = bytes([1]) + bytes(31)
    spki = akeys.PublicKeyInfo({"algorithm": {"algorithm": "ed25519"}, "public_key": identity})
    data = _csr(spki, lambda tbs: identity + bytes(32), "ed25519")
    exc = _assert_refused(services, _from_csr(services, data), PolicyViolation, "weak-key")
    assert "small order" in exc.message


def _prime(bits: int) -> int:
    while True:
        n = openssl_prime(bits)
        if (n - 1) % 65537:
            return n


def test_csr_of_a_prime_rsa_modulus_is_refused(services: Services) -> None:
    """Signed with d = e^-1 mod (n - 1), which anyone holding the public key computes."""
    n, e = _prime(2048), 65537
    d = pow(e, -1, n - 1)
    spki = akeys.PublicKeyInfo(
        {
            "algorithm": {"algorithm": "rsa"},
            "public_key": akeys.RSAPublicKey({"modulus": n, "public_exponent": e}),
        }
    )

    def sign(tbs: bytes) -> bytes:
        digest_info = bytes.fromhex("3031300d060960864801650304020105000420")
        digest_info += hashlib.sha256(tbs).digest()
        em = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
        return pow(int.from_bytes(em, "big"), d, n).to_bytes(256, "big")

    data = _csr(spki, sign, "sha256_rsa")
    exc = _assert_refused(services, _from_csr(services, data), PolicyViolation, "weak-key")
    assert "prime" in exc.message
    request = dataclasses.replace(
        request_for("admin-client"), public_key=rsa.RSAPublicNumbers(e, n).public_key()
    )
    _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "weak-key"
    )


def test_a_csr_with_two_extension_requests_is_malformed(services: Services) -> None:
    """From the review: PKCS#9 gives a request one extensionRequest; with two, the first was
    used (as OpenSSL shows it), another reader may take the second. Refused as malformed."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sekisho.errors import MalformedInput

    key = ec.generate_private_key(ec.SECP256R1())
    spki = akeys.PublicKeyInfo.load(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    def san(mailbox: str) -> list[dict[str, object]]:
        return [{"extn_id": "subject_alt_name", "critical": False,
                 "extn_value": [ax.GeneralName("rfc822_name", mailbox)]}]  # fmt: skip

    info = acsr.CertificationRequestInfo(
        {
            "version": 0,
            "subject": _subject(),
            "subject_pk_info": spki,
            "attributes": [
                {"type": "extension_request", "values": [san("alice@tenant1.example.com")]},
                {"type": "extension_request", "values": [san("mallory@evil.example")]},
            ],
        }
    )
    request = acsr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": key.sign(info.dump(), ec.ECDSA(hashes.SHA256())),
        }
    )
    exc = _assert_refused(services, _from_csr(services, bytes(request.dump())), MalformedInput)
    assert "2 extensionRequest attributes" in exc.message
