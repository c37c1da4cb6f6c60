"""PKCS#12 bundles for server-side keygen: OpenSSL reports PBES2 / AES-256-CBC / PBKDF2 with
HMAC-SHA256 at 600,000 iterations and a SHA-256 MAC; a wrong password fails; the key and chain
inside are the issued ones.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ca.issuance import IssueRequest
from ca.tbs import SanEntry
from enrollment.pkcs12 import KDF_ROUNDS, MIN_PASSWORD_BYTES, pkcs12_bundle
from hsm.base import KeyType
from sekisho.errors import InputError
from sekisho.services import Services
from tests.ca.helpers import ca_cert, der, name
from tests.conftest import TEST_ACTOR
from tests.support.checkers import openssl_verify, pkilint_cert

TIMEOUT = 30
PASSWORD = b"Tr0ub4dor&3-pkcs12"


def _issue(
    services: Services, key_type: KeyType = KeyType.EC_P256
) -> tuple[x509.Certificate, object]:
    request = IssueRequest(
        ca="admin",
        profile="admin-client",
        subject=name(O="Tenant One", UID="bob", CN="Bob Admin"),
        public_key=None,  # type: ignore[arg-type]
        sans=(SanEntry("email", "bob@tenant1.example.com"),),
    )
    return services.ca.issue_with_new_key(request, key_type, TEST_ACTOR)


def _openssl_info(p12: Path, pw: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"file:{pw}", "-noout",
         *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )  # fmt: skip


@pytest.fixture
def bundle(services: Services, tmp_path: Path) -> tuple[Path, Path, x509.Certificate, object]:
    cert, key = _issue(services)
    chain = [ca_cert(services, "admin"), ca_cert(services, "root")]
    p12 = tmp_path / "bob.p12"
    p12.write_bytes(pkcs12_bundle(key, cert, chain, PASSWORD))  # type: ignore[arg-type]
    pw = tmp_path / "pw"
    pw.write_bytes(PASSWORD + b"\n")
    return p12, pw, cert, key


def test_openssl_reports_modern_parameters(
    bundle: tuple[Path, Path, x509.Certificate, object],
) -> None:
    p12, pw, _cert, _key = bundle
    res = _openssl_info(p12, pw)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    # The MAC's key derivation runs as many rounds as the encryption's (cryptography writes
    # 2048 whatever is asked: a wrong password was rejected in a third of a millisecond).
    assert re.search(rf"MAC: sha256, Iteration {KDF_ROUNDS}\b", text), text
    assert "MAC length: 32, salt length: 16" in text, text
    # Both the certificate bag and the shrouded key bag use PBES2.
    lines = [ln for ln in text.splitlines() if "PBES2" in ln]
    assert len(lines) >= 2, text
    for line in lines:
        assert "PBKDF2" in line and "AES-256-CBC" in line, line
        assert "hmacWithSHA256" in line, line
        iterations = int(re.search(r"Iteration (\d+)", line).group(1))  # type: ignore[union-attr]
        assert iterations >= 600_000 and iterations == KDF_ROUNDS
    assert "3DES" not in text and "RC2" not in text and "sha1" not in text.lower()


def test_wrong_password_fails_in_openssl_and_cryptography(
    bundle: tuple[Path, Path, x509.Certificate, object], tmp_path: Path
) -> None:
    p12, _pw, _cert, _key = bundle
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    res = _openssl_info(p12, wrong)
    assert res.returncode != 0
    assert "mac verify" in (res.stdout + res.stderr).lower()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12.read_bytes(), b"not-the-password")


def test_the_mac_key_derivation_is_openssls(services: Services, tmp_path: Path) -> None:
    """OpenSSL's own bundle (``-iter 600000``) verifies under our derivation of its MAC
    key, for an ASCII and a non-ASCII password (a BMPString from UTF-8 both ways); and a
    bundle of ours with a non-ASCII password opens in OpenSSL."""
    import hashlib
    import hmac

    from asn1crypto import pkcs12 as asn1_pkcs12

    from enrollment.pkcs12 import mac_key

    cert, key = _issue(services)
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for password in (PASSWORD, "パスワード-pässwörd".encode()):
        pw = tmp_path / "pw"
        pw.write_bytes(password + b"\n")
        theirs = tmp_path / "theirs.p12"
        subprocess.run(
            ["openssl", "pkcs12", "-export", "-in", str(cert_file), "-inkey", str(key_file),
             "-out", str(theirs), "-passout", f"file:{pw}", "-iter", "2000", "-macalg",
             "sha256"],
            capture_output=True, text=True, timeout=TIMEOUT, check=True,
        )  # fmt: skip
        pfx = asn1_pkcs12.Pfx.load(theirs.read_bytes())
        mac_data = pfx["mac_data"]
        assert mac_data["iterations"].native == 2000
        expected = hmac.new(
            mac_key(password, mac_data["mac_salt"].native, 2000),
            pfx["auth_safe"]["content"].native,
            hashlib.sha256,
        ).digest()
        assert mac_data["mac"]["digest"].native == expected
        ours = tmp_path / "ours.p12"
        ours.write_bytes(pkcs12_bundle(key, cert, [], password))  # type: ignore[arg-type]
        assert _openssl_info(ours, pw).returncode == 0


def test_key_and_chain_inside_match_the_issued_certificate(
    services: Services, bundle: tuple[Path, Path, x509.Certificate, object], tmp_path: Path
) -> None:
    p12, pw, cert, key = bundle
    loaded = pkcs12.load_pkcs12(p12.read_bytes(), PASSWORD)
    assert loaded.cert is not None and loaded.key is not None
    assert loaded.cert.certificate == cert
    assert loaded.key.public_key() == cert.public_key()
    assert loaded.key.private_numbers() == key.private_numbers()  # type: ignore[attr-defined,union-attr]
    assert loaded.cert.friendly_name == cert.subject.rfc4514_string().encode()
    chain = [c.certificate for c in loaded.additional_certs]
    assert chain == [ca_cert(services, "admin"), ca_cert(services, "root")]
    # OpenSSL extracts the same leaf and key.
    out = subprocess.run(
        ["openssl", "pkcs12", "-in", str(p12), "-passin", f"file:{pw}", "-nodes", "-clcerts",
         "-nokeys"],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert x509.load_pem_x509_certificate(out.stdout) == cert
    pkilint_cert(der(cert))
    openssl_verify(der(cert), [der(c) for c in reversed(chain)], purpose="sslclient")


def test_a_long_non_ascii_subject_is_bundled(services: Services, tmp_path: Path) -> None:
    """A subject whose DN passes 64 octets inside a multi-byte character: the friendlyName is
    cut before that character (the library refused a name cut inside it, after issuance, and
    the new key was lost with it). OpenSSL reads the bundle."""
    request = IssueRequest(
        ca="admin",
        profile="admin-client",
        subject=name(O="株式会社サンプル東京テナント", UID="yamada", CN="山田 太郎"),
        public_key=None,  # type: ignore[arg-type]
        sans=(SanEntry("email", "yamada@tenant1.example.com"),),
    )
    cert, key = services.ca.issue_with_new_key(request, KeyType.EC_P256, TEST_ACTOR)
    dn = cert.subject.rfc4514_string().encode()
    assert len(dn) > 64
    with pytest.raises(UnicodeDecodeError):
        dn[:64].decode()  # the old cut would split a character
    p12 = tmp_path / "yamada.p12"
    p12.write_bytes(pkcs12_bundle(key, cert, [], PASSWORD))  # type: ignore[arg-type]
    loaded = pkcs12.load_pkcs12(p12.read_bytes(), PASSWORD)
    assert loaded.cert is not None and loaded.cert.certificate == cert
    friendly = loaded.cert.friendly_name
    assert friendly is not None and len(friendly) <= 64 and dn.startswith(friendly)
    assert len(friendly) > 60  # cut at the last whole character, not much earlier
    pw = tmp_path / "pw"
    pw.write_bytes(PASSWORD)
    info = _openssl_info(p12, pw)
    assert info.returncode == 0, info.stderr


@pytest.mark.parametrize("key_type", [KeyType.RSA_3072, KeyType.ED25519])
def test_other_key_types_bundle(services: Services, key_type: KeyType) -> None:
    cert, key = _issue(services, key_type)
    data = pkcs12_bundle(key, cert, [ca_cert(services, "admin")], PASSWORD)  # type: ignore[arg-type]
    loaded = pkcs12.load_pkcs12(data, PASSWORD)
    assert loaded.key is not None and loaded.key.public_key() == cert.public_key()


def test_legacy_bundle_uses_3des_and_sha1(services: Services, tmp_path: Path) -> None:
    cert, key = _issue(services)
    p12 = tmp_path / "legacy.p12"
    p12.write_bytes(
        pkcs12_bundle(key, cert, [ca_cert(services, "admin")], PASSWORD, legacy=True)  # type: ignore[arg-type]
    )
    pw = tmp_path / "pw"
    pw.write_bytes(PASSWORD)
    res = _openssl_info(p12, pw)
    if res.returncode != 0:  # some OpenSSL builds need the legacy provider for 3DES
        res = _openssl_info(p12, pw, "-legacy")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "MAC: sha1" in text
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in text, text
    loaded = pkcs12.load_pkcs12(p12.read_bytes(), PASSWORD)
    assert loaded.cert is not None and loaded.cert.certificate == cert


def test_short_password_is_refused(services: Services) -> None:
    cert, key = _issue(services)
    with pytest.raises(InputError, match=str(MIN_PASSWORD_BYTES)):
        pkcs12_bundle(key, cert, [], b"short")  # type: ignore[arg-type]


def test_private_key_is_not_readable_without_password(
    bundle: tuple[Path, Path, x509.Certificate, object],
) -> None:
    p12, _pw, _cert, key = bundle
    raw = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key's private scalar must not sit in clear in the file.
    assert raw[-32:] not in p12.read_bytes()
