"""RSA keys with known weaknesses, built from their primes: a Miller-Rabin test, and a key of
the structure Infineon's RSALib gave its primes (ROCA, CVE-2017-15361).

Nothing here comes from ``ca/rules.py``: the weak keys are built from the published structure,
so a test using them checks the rules, not the rules against themselves.
"""

from __future__ import annotations

import math
import random
import subprocess

from cryptography.hazmat.primitives.asymmetric import rsa

_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_WITNESSES = (*_SMALL_PRIMES, 41)


def is_probable_prime(n: int) -> bool:
    """Trial division by small primes, then Miller-Rabin with 13 fixed bases (enough for
    test keys: a composite passing all of them is astronomically unlikely)."""
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def openssl_prime(bits: int) -> int:
    """A random prime of ``bits`` bits from ``openssl prime -generate`` (this module's
    Miller-Rabin takes some 15 s to find one of 2048 bits)."""
    res = subprocess.run(
        ["openssl", "prime", "-generate", "-bits", str(bits)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(res.stdout)


def next_prime(n: int) -> int:
    """The first probable prime >= ``n`` (odd ``n`` rounded up), within 100,000 candidates."""
    n |= 1
    for _ in range(100_000):
        if is_probable_prime(n):
            return n
        n += 2
    raise AssertionError("no prime found")


E = 65537
# The primes of the published ROCA fingerprint: the odd primes up to 167. RSALib's own M is
# the product of more primes (a multiple of this one), which leaves the residues mod these
# primes, and so the fingerprint, the same.
FINGERPRINT_PRIMES = tuple(r for r in range(3, 168, 2) if all(r % d for d in range(3, r, 2)))
_M = math.prod(FINGERPRINT_PRIMES)


def _rsalib_prime(rng: random.Random, bits: int) -> int:
    """A ``bits``-bit prime p = k*M + (65537**a mod M), top two bits set (so two of them make
    a modulus of exactly 2*bits bits), with gcd(p - 1, 65537) = 1."""
    low = -(-(3 << (bits - 2)) // _M)  # ceil: k*M >= 3 * 2**(bits-2)
    high = ((1 << bits) - _M) // _M  # k*M + (< M) < 2**bits
    for _ in range(20_000):
        p = rng.randrange(low, high) * _M + pow(E, rng.randrange(1, 1 << 62), _M)
        if p % E != 1 and is_probable_prime(p):
            return p
    raise AssertionError("no RSALib-form prime found")


def roca_private_key(bits: int = 2048, seed: int = 15361) -> rsa.RSAPrivateKey:
    """An RSA key whose primes have RSALib's structure: its modulus carries the ROCA
    fingerprint. Deterministic for a seed; about a second for 2048 bits."""
    rng = random.Random(seed)
    p = _rsalib_prime(rng, bits // 2)
    q = _rsalib_prime(rng, bits // 2)
    for _ in range(100):
        if q != p:
            break
        q = _rsalib_prime(rng, bits // 2)
    d = pow(E, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(E, p * q)
    private = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=public,
    )
    key = private.private_key()
    assert key.key_size == bits
    return key
