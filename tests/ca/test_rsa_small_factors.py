"""An RSA modulus with a prime factor below 752 (CA/B BR 6.1.6) is refused as ``weak-key``,
by CSR (signed by that key: proof of possession passes) and by an authorised request; a
factor just above the bound is left to the other checks; an ordinary key is issued."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hsm.base import KeyType
from sekisho.errors import PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import ca_cert, der, issue, request_for
from tests.ca.test_bad_input import _assert_refused, _csr_with_key, _from_csr
from tests.conftest import TEST_ACTOR
from tests.support import checkers
from tests.support.rsa_keys import openssl_prime

E = 65537


@functools.cache
def _modulus_with_factor(small: int) -> tuple[int, int]:
    """``(n, q)``: a 2048-bit ``n = small * q``, ``q`` a random prime from OpenSSL (the
    Miller-Rabin of tests/support takes some 15 s for a prime of this size)."""
    bits = 2048 - small.bit_length()
    while True:
        q = openssl_prime(bits)
        n = small * q
        if n.bit_length() == 2048 and (q - 1) % E and (small - 1) % E:
            return n, q


def _private_key(small: int) -> rsa.RSAPrivateKey:
    n, q = _modulus_with_factor(small)
    p = small
    d = pow(E, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=q,
        q=p,
        d=d,
        dmp1=d % (q - 1),
        dmq1=d % (p - 1),
        iqmp=pow(p, -1, q),
        public_numbers=rsa.RSAPublicNumbers(E, n),
    )
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def test_csr_for_a_modulus_divisible_by_3_is_refused(services: Services) -> None:
    exc = _assert_refused(
        services, _from_csr(services, _csr_with_key(_private_key(3))), PolicyViolation, "weak-key"
    )
    assert "divisible by 3" in exc.message and "752" in exc.message


@pytest.mark.parametrize("small", [5, 101, 743, 751])
def test_modulus_with_a_factor_below_752_is_refused(services: Services, small: int) -> None:
    n, _ = _modulus_with_factor(small)
    request = dataclasses.replace(
        request_for("admin-client"), public_key=rsa.RSAPublicNumbers(E, n).public_key()
    )
    exc = _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "weak-key"
    )
    assert f"divisible by {small} " in exc.message


def test_a_factor_of_757_is_past_the_bound(services: Services) -> None:
    """757, the first prime above 752, is not BR 6.1.6's to refuse: the rules pass the key."""
    n, _ = _modulus_with_factor(757)
    request = dataclasses.replace(
        request_for("admin-client"), public_key=rsa.RSAPublicNumbers(E, n).public_key()
    )
    key = services.ca.prepare(request).public_key
    assert isinstance(key, rsa.RSAPublicKey) and key.public_numbers().n == n


@pytest.mark.parametrize("key_type", [KeyType.RSA_2048, KeyType.RSA_3072])
def test_ordinary_rsa_keys_are_issued_and_verify(services: Services, key_type: KeyType) -> None:
    cert = issue(services, "device", key_type)
    chain = [der(ca_cert(services, "root")), der(ca_cert(services, "device"))]
    checkers.pkilint_cert(der(cert))
    checkers.pkilint_chain(chain[1], der(cert))
    checkers.openssl_verify(der(cert), chain)
