"""Bad input to issuance: a clear error naming what is wrong, no certificate, no issued row,
and a rejection entry in the journal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import func, select

from audit.models import JournalRecord
from ca import rules
from ca.hierarchy import create_issuing
from ca.models import Certificate
from ca.tbs import SanEntry
from hsm.base import KeyType
from sekisho.cli import main
from sekisho.errors import (
    BadSignature,
    InputError,
    MalformedInput,
    NotFound,
    PolicyViolation,
    SekishoError,
    TooLarge,
)
from sekisho.services import Services
from tests.ca.helpers import ca_key_ref, make_csr, name, request_for
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support.rsa_keys import next_prime, roca_private_key

ADMIN = name(O="Tenant One", UID="bob", CN="Bob Admin")
ADMIN_SANS = (SanEntry("email", "bob@tenant1.example.com"),)


def _cert_rows(services: Services) -> int:
    with services.db.scope() as session:
        return int(session.scalar(select(func.count()).select_from(Certificate)) or 0)


def _rejections(services: Services) -> list[JournalRecord]:
    with services.db.scope() as session:
        return list(
            session.scalars(
                select(JournalRecord)
                .where(JournalRecord.action == "ca.issue", JournalRecord.outcome == "failure")
                .order_by(JournalRecord.seq)
            )
        )


def _assert_refused(
    services: Services, call: object, error: type[SekishoError], rule: str | None = None
) -> SekishoError:
    """``call`` must raise ``error`` (with ``rule``), leave no row, journal one rejection."""
    rows_before, rejections_before = _cert_rows(services), len(_rejections(services))
    assert callable(call)
    with pytest.raises(error) as info:
        call()
    exc = info.value
    assert exc.message and "Traceback" not in exc.message
    if rule is not None:
        assert isinstance(exc, PolicyViolation) and exc.rule == rule, exc.message
    assert _cert_rows(services) == rows_before, "a refused request left a certificate row"
    rejections = _rejections(services)
    assert len(rejections) == rejections_before + 1
    detail = json.loads(rejections[-1].detail)
    assert detail["code"] == exc.code
    assert detail["reason"]
    if rule is not None:
        assert detail["rule"] == rule
    assert rejections[-1].actor_account == TEST_ACTOR.account
    assert rejections[-1].client_ip == TEST_ACTOR.client_ip
    return exc


def _from_csr(services: Services, data: bytes, **kwargs: object):  # type: ignore[no-untyped-def]
    return lambda: services.ca.issue_from_csr(
        data,
        ca="admin",
        profile="admin-client",
        actor=TEST_ACTOR,
        subject=ADMIN,
        sans=ADMIN_SANS,
        **kwargs,  # type: ignore[arg-type]
    )


def _good_csr_der() -> bytes:
    pem = make_csr(ADMIN, [x509.RFC822Name("bob@tenant1.example.com")])
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def test_good_csr_is_accepted_pem_and_der(services: Services) -> None:
    """The control: the same request shape the failure cases start from does issue."""
    der = _good_csr_der()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    for data in (der, pem):
        cert = _from_csr(services, data)()
        assert cert.subject == ADMIN


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: b"   \n", id="blank"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated-der"),
        pytest.param(lambda d: d[:-1], id="one-byte-short"),
        pytest.param(lambda d: d + b"\x00\x00", id="trailing-garbage"),
        pytest.param(lambda d: b"\x30\x82\xff\xff" + d[4:], id="bad-length"),
        pytest.param(lambda d: bytes(random.Random(7).randbytes(len(d))), id="random-bytes"),
        pytest.param(
            lambda d: (
                b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n"
                b"-----END CERTIFICATE REQUEST-----\n"
            ),
            id="bad-pem",
        ),
        pytest.param(lambda d: b"\x30" * 4000, id="nested-sequences"),
        # x509.InvalidVersion is no ValueError: it ended as "internal error" (exit 70).
        pytest.param(lambda d: d.replace(b"\x02\x01\x00", b"\x02\x01\x07", 1), id="version-7"),
    ],
)
def test_malformed_csr(services: Services, mangle) -> None:  # type: ignore[no-untyped-def]
    exc = _assert_refused(services, _from_csr(services, mangle(_good_csr_der())), MalformedInput)
    assert exc.code == "malformed"


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


_KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        pytest.param(lambda d: _pem(d) + _pem(d), "the input holds 2 CSRs; give one", id="two"),
        pytest.param(
            lambda d: _pem(d) + b"\n" + _pem(_good_csr_der()) + _pem(d),
            "the input holds 3 CSRs; give one",
            id="three",
        ),
        pytest.param(
            lambda d: _pem(d) + _KEY_PEM,
            "2 PEM blocks ('CERTIFICATE REQUEST', 'PRIVATE KEY'); give the CSR alone",
            id="csr-and-key",
        ),
        pytest.param(lambda d: _pem(d) + b"trailing", "data after its END line", id="pem-text"),
        pytest.param(lambda d: _pem(d)[:-30], "no END line", id="pem-cut"),
        pytest.param(
            lambda d: _pem(d).replace(
                b"-----\n", b"-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n", 1
            ),
            "CSR PEM block holds header lines",
            id="pem-headers",
        ),
        pytest.param(lambda d: d + b"\n", "1 octets after its DER encoding", id="der-newline"),
        pytest.param(lambda d: d + d, "octets after its DER encoding", id="der-twice"),
    ],
)
def test_one_csr_and_nothing_after_it(  # type: ignore[no-untyped-def]
    services: Services, mangle, message: str
) -> None:
    """Several CSRs, or data after the CSR, are refused by name: never the first one taken."""
    exc = _assert_refused(services, _from_csr(services, mangle(_good_csr_der())), MalformedInput)
    assert message in exc.message, exc.message


def test_pem_csr_with_explanatory_text_before_it_is_accepted(services: Services) -> None:
    """RFC 7468 2: text before the BEGIN line (``openssl req -text`` output) is allowed, and
    so is whitespace after the END line."""
    text = b"Certificate Request:\n    Data:\n        Version: 1 (0x0)\n"
    cert = _from_csr(services, text + _pem(_good_csr_der()) + b"\r\n\n")()
    assert cert.subject == ADMIN
    # Text that starts with "0", the octet a DER SEQUENCE starts with: still PEM (it was
    # read as DER "followed by 40 octets").
    cert = _from_csr(services, b"0 comment, then the request\n" + _pem(_good_csr_der()))()
    assert cert.subject == ADMIN
    cert = _from_csr(services, b"\xef\xbb\xbf" + _pem(_good_csr_der()))()  # a byte order mark
    assert cert.subject == ADMIN


def test_a_der_csr_followed_by_a_pem_csr_is_refused_not_the_second_issued(
    services: Services,
) -> None:
    """A DER CSR, then another CSR in PEM: openssl reads the file as the first; a reading
    that took the bytes before the BEGIN line for explanatory text issued the second. Only
    text may come before a BEGIN line: this is a DER CSR followed by data, refused."""
    other = make_csr(name(CN="mallory.example.com"), [x509.RFC822Name("m@tenant1.example.com")])
    for between in (b"", b"\n"):
        exc = _assert_refused(
            services, _from_csr(services, _good_csr_der() + between + other), MalformedInput
        )
        assert "after its DER encoding" in exc.message


def test_csr_with_bad_signature(services: Services) -> None:
    der = bytearray(_good_csr_der())
    # The signature BIT STRING is the last element: flip a bit inside it.
    der[-5] ^= 0x01
    exc = _assert_refused(services, _from_csr(services, bytes(der)), BadSignature)
    assert "proof of possession" in exc.message


def test_csr_signed_by_another_key(services: Services) -> None:
    """A CSR carrying one public key and signed with another fails proof of possession."""
    good = x509.load_der_x509_csr(_good_csr_der())
    other = x509.load_pem_x509_csr(make_csr(ADMIN))
    # Splice: the first CSR's certificationRequestInfo with the second's signature.
    from asn1crypto import csr as asn1_csr

    spliced = asn1_csr.CertificationRequest.load(good.public_bytes(serialization.Encoding.DER))
    donor = asn1_csr.CertificationRequest.load(other.public_bytes(serialization.Encoding.DER))
    forged = asn1_csr.CertificationRequest(
        {
            "certification_request_info": spliced["certification_request_info"],
            "signature_algorithm": donor["signature_algorithm"],
            "signature": donor["signature"],
        }
    ).dump()
    _assert_refused(services, _from_csr(services, forged), BadSignature)


def _signed_csr(tbs_der: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CertificationRequest around ``tbs_der``, really signed by ``key``."""
    from asn1crypto import csr as asn1_csr

    info = asn1_csr.CertificationRequestInfo.load(tbs_der)
    return asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": key.sign(tbs_der, ec.ECDSA(hashes.SHA256())),
        }
    ).dump()


@pytest.mark.parametrize(
    "san_der",
    [
        pytest.param(bytes.fromhex("3004a3023000"), id="x400Address"),
        pytest.param(bytes.fromhex("3006a504a1020c00"), id="ediPartyName"),
    ],
)
def test_csr_with_a_san_form_the_library_cannot_read(services: Services, san_der: bytes) -> None:
    """A properly signed CSR whose SAN holds a name form no profile certifies: an input
    error and a rejection entry, not an internal error (even when the caller names the
    SANs itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ext = x509.UnrecognizedExtension(x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san_der)
    data = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ADMIN)
        .add_extension(ext, critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    exc = _assert_refused(services, _from_csr(services, data), MalformedInput)
    assert "subjectAltName" in exc.message


def test_csr_subject_that_does_not_decode(services: Services) -> None:
    """A UTF8String CN holding invalid UTF-8, under a valid proof of possession."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name(CN="QQQQ"))
        .sign(key, hashes.SHA256())
    )
    tbs = csr.tbs_certrequest_bytes
    assert tbs.count(b"QQQQ") == 1
    data = _signed_csr(tbs.replace(b"QQQQ", b"\xff\xfe\xfd\xfc"), key)
    exc = _assert_refused(
        services,
        lambda: services.ca.issue_from_csr(
            data, ca="admin", profile="admin-client", actor=TEST_ACTOR
        ),
        MalformedInput,
    )
    assert "subject" in exc.message


def test_oversized_csr(services: Services) -> None:
    # A syntactically valid PEM CSR padded past the 16 KiB limit with PEM-legal preamble text.
    pem = make_csr(ADMIN)
    data = b"# padding\n" * 1700 + pem
    assert len(data) > 16 * 1024
    exc = _assert_refused(services, _from_csr(services, data), TooLarge)
    assert "16384" in exc.message


def _csr_with_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ADMIN)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def test_rsa_1024_refused(services: Services) -> None:
    key = rsa.generate_private_key(65537, 1024)  # noqa: S505  (the point of the test)
    _assert_refused(services, _from_csr(services, _csr_with_key(key)), PolicyViolation, "key-size")


def test_rsa_exponent_3_refused(services: Services) -> None:
    key = rsa.generate_private_key(3, 2048)
    exc = _assert_refused(
        services, _from_csr(services, _csr_with_key(key)), PolicyViolation, "weak-key"
    )
    assert "65537" in exc.message


def test_rsa_close_primes_refused(services: Services) -> None:
    """A 2048-bit modulus whose primes are neighbours: Fermat's method factors it at once."""
    p = next_prime((1 << 1023) + (1 << 1022) + 12345)
    q = next_prime(p + 2)
    n = p * q
    assert n.bit_length() == 2048
    public = rsa.RSAPublicNumbers(65537, n).public_key()
    request = dataclasses.replace(request_for("admin-client"), public_key=public)
    exc = _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "weak-key"
    )
    assert "Fermat" in exc.message


@pytest.fixture(scope="session")
def roca_key() -> rsa.RSAPrivateKey:
    """A 2048-bit key with Infineon RSALib's prime structure (about a second to build)."""
    return roca_private_key(2048)


def _assert_roca_message(message: str) -> None:
    assert "ROCA" in message and "CVE-2017-15361" in message, message
    assert "\n" not in message


def test_rsa_roca_key_refused(
    services: Services, recording_backend: RecordingBackend, roca_key: rsa.RSAPrivateKey
) -> None:
    """CVE-2017-15361: a CSR for a key with the ROCA fingerprint (signed by that key, so it
    passes proof of possession) is refused before the CA key signs anything. The same request
    with an ordinary RSA-2048 key is issued, and signed by the CA key."""
    ca_key = ca_key_ref(services, "admin")
    signed_before = [data for ref, data in recording_backend.calls if ref == ca_key]
    exc = _assert_refused(
        services, _from_csr(services, _csr_with_key(roca_key)), PolicyViolation, "weak-key"
    )
    _assert_roca_message(exc.message)
    assert [data for ref, data in recording_backend.calls if ref == ca_key] == signed_before
    cert = _from_csr(services, _csr_with_key(rsa.generate_private_key(65537, 2048)))()
    assert cert.subject == ADMIN
    assert len([ref for ref, _ in recording_backend.calls if ref == ca_key]) > len(signed_before)


def test_rsa_roca_key_refused_by_the_cli(
    services: Services,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    roca_key: rsa.RSAPrivateKey,
) -> None:
    """``sekisho issue --csr``: one line naming the rule and ROCA, exit 65, a rejection in the
    journal and no certificate row."""
    csr = tmp_path / "roca.csr"
    csr.write_bytes(_csr_with_key(roca_key))
    rows_before, rejections_before = _cert_rows(services), len(_rejections(services))
    capsys.readouterr()
    args = ["issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(csr)]
    code = main(["--data-dir", str(data_dir), *args, "--san", "email:bob@tenant1.example.com"])
    out, err = capsys.readouterr()
    assert code == 65, (out, err)
    assert err.startswith("error: policy-violation: weak-key: ") and err.count("\n") == 1, err
    _assert_roca_message(err.rstrip("\n"))
    assert _cert_rows(services) == rows_before
    rejections = _rejections(services)
    assert len(rejections) == rejections_before + 1
    assert json.loads(rejections[-1].detail)["rule"] == "weak-key"


def test_ordinary_rsa_keys_have_no_roca_fingerprint(roca_key: rsa.RSAPrivateKey) -> None:
    """Keys from ``cryptography`` (OpenSSL) are not flagged; the RSALib-structured one is."""
    assert rules.has_roca_fingerprint(roca_key.public_key().public_numbers().n)
    for bits in (2048,) * 16 + (3072,) * 4:
        n = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
        assert not rules.has_roca_fingerprint(n), hex(n)


def test_disallowed_curve_refused(services: Services) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    _assert_refused(services, _from_csr(services, _csr_with_key(key)), PolicyViolation, "key-type")


def test_key_type_not_in_profile(services: Services) -> None:
    """connector does not allow RSA-2048 (its list starts at RSA-3072)."""
    request = request_for("connector", KeyType.RSA_2048)
    _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "key-type"
    )


def test_unknown_profile(services: Services) -> None:
    request = dataclasses.replace(request_for("admin-client"), profile="no-such-profile")
    exc = _assert_refused(services, lambda: services.ca.issue(request, TEST_ACTOR), NotFound)
    assert "no-such-profile" in exc.message and "admin-client" in exc.message


@pytest.mark.parametrize("profile", ["device", "admin-client", "tls-server", "ocsp-signer"])
def test_the_root_issues_no_end_entity_certificate(services: Services, profile: str) -> None:
    """CA/B BR 6.1.7: the root certifies CAs only (before, `issue --ca root --profile
    device` made one, which no OCSP answers for)."""
    request = dataclasses.replace(request_for(profile), ca="root")
    exc = _assert_refused(
        services,
        lambda: services.ca.issue(request, TEST_ACTOR),
        PolicyViolation,
        "root-issues-cas-only",
    )
    assert "root" in exc.message and profile in exc.message


def test_unknown_ca(services: Services) -> None:
    request = dataclasses.replace(request_for("admin-client"), ca="nope")
    _assert_refused(services, lambda: services.ca.issue(request, TEST_ACTOR), NotFound)


def test_validity_beyond_profile_maximum(services: Services) -> None:
    request = dataclasses.replace(request_for("admin-client"), validity=dt.timedelta(days=398))
    _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "max-validity"
    )


def test_validity_is_counted_inclusively(services: Services) -> None:
    """RFC 5280 4.1.2.5 (and BR 6.3.2): notBefore through notAfter, inclusive. The profile's
    maximum (397 days) asked for is issued as 397 days to the second, notAfter one second
    before notBefore + 397 days (it was one second more than the maximum); the default too;
    a validity one second over the maximum is refused."""
    second = dt.timedelta(seconds=1)
    for validity in (dt.timedelta(days=397), None):
        request = dataclasses.replace(request_for("admin-client"), validity=validity)
        cert = services.ca.issue(request, TEST_ACTOR)
        length = cert.not_valid_after_utc - cert.not_valid_before_utc + second
        assert length == (validity or dt.timedelta(days=365)), length
    tbs = services.ca.prepare(
        dataclasses.replace(request_for("admin-client"), validity=dt.timedelta(days=397))
    )
    over = dataclasses.replace(tbs, not_after=tbs.not_after + second)
    with pytest.raises(PolicyViolation, match="max-validity"):
        rules.validity_within_profile(over)


def test_validity_beyond_issuer(services: Services) -> None:
    """An issuing CA that ends in 30 days: asking for 60 days is refused by name; the default
    validity is clamped to the issuer's end instead."""
    create_issuing(
        services.ca,
        "short",
        "root",
        "Example Corp",
        KeyType.EC_P256,
        TEST_ACTOR,
        validity=dt.timedelta(days=30),
    )
    services.registry.invalidate()
    request = dataclasses.replace(
        request_for("admin-client"), ca="short", validity=dt.timedelta(days=60)
    )
    exc = _assert_refused(
        services,
        lambda: services.ca.issue(request, TEST_ACTOR),
        PolicyViolation,
        "validity-within-issuer",
    )
    assert "issuing CA" in exc.message
    clamped = services.ca.issue(dataclasses.replace(request, validity=None), TEST_ACTOR)
    with services.db.scope() as session:
        from ca.registry import ca_row

        issuer_end = ca_row(session, "short").not_after
    assert clamped.not_valid_after_utc == issuer_end


@pytest.mark.parametrize(
    ("sans", "rule"),
    [
        ((SanEntry("dns", "bob.example.com"),), "san-type"),
        ((SanEntry("email", "not-an-address"),), "san-email-syntax"),
        ((SanEntry("email", "bob@tenant1.example.com\n"),), "san-email-syntax"),
        ((), "san-required"),
        (ADMIN_SANS + ADMIN_SANS, "san-duplicate"),
        # The same mailbox: its domain differs in case only (RFC 5321 2.4).
        ((*ADMIN_SANS, SanEntry("email", "bob@Tenant1.EXAMPLE.com")), "san-duplicate"),
    ],
)
def test_san_rules(services: Services, sans: tuple[SanEntry, ...], rule: str) -> None:
    request = dataclasses.replace(request_for("admin-client"), subject=ADMIN, sans=sans)
    _assert_refused(services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, rule)


def test_a_name_with_a_trailing_newline_is_refused(services: Services) -> None:
    """The syntax rules matched with "$", which also matches before a final newline: a DNS
    name or an email address ending in one was issued into the certificate as it was."""
    request = dataclasses.replace(
        request_for("tls-server"), sans=(SanEntry("dns", "portal.example.com\n"),)
    )
    exc = _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "san-dns-syntax"
    )
    assert "'portal.example.com\\n'" in exc.message, exc.message


def test_subject_rules(services: Services) -> None:
    no_org = dataclasses.replace(request_for("admin-client"), subject=name(CN="Bob"))
    _assert_refused(
        services, lambda: services.ca.issue(no_org, TEST_ACTOR), PolicyViolation, "subject-required"
    )
    control = dataclasses.replace(
        request_for("admin-client"), subject=name(O="Tenant One", CN="Bob\x1b[31m")
    )
    _assert_refused(
        services, lambda: services.ca.issue(control, TEST_ACTOR), PolicyViolation, "subject-value"
    )


def test_csr_subject_is_not_taken_blindly(services: Services) -> None:
    """Without an authorised subject, the CSR's own subject must still pass the profile: a CSR
    asking for extra attributes is refused, not signed."""
    csr = make_csr(
        x509.Name(
            [
                x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Tenant One"),
                x509.NameAttribute(x509.NameOID.COMMON_NAME, "mallory"),
                x509.NameAttribute(x509.NameOID.DOMAIN_COMPONENT, "evil"),
            ]
        ),
        [x509.RFC822Name("mallory@tenant1.example.com")],
    )
    _assert_refused(
        services,
        lambda: services.ca.issue_from_csr(
            csr, ca="admin", profile="admin-client", actor=TEST_ACTOR
        ),
        PolicyViolation,
        "subject-allowed",
    )


def test_every_error_is_an_input_error_with_exit_code(services: Services) -> None:
    """Callers map these to HTTP 4xx / CLI exit 65 (NotFound: 404 / 66)."""
    for cls in (MalformedInput, BadSignature, TooLarge, PolicyViolation):
        assert issubclass(cls, InputError)
    assert InputError.exit_code == 65 and NotFound.exit_code == 66


@pytest.mark.parametrize("digest", ["sha1", "md5", "sha224"])
def test_csr_signed_with_a_weak_hash_is_refused(
    services: Services, tmp_path: Path, digest: str
) -> None:
    """A CSR self-signed with SHA-1 (made by openssl: cryptography will not sign one) was
    refused as "signature does not verify", which sent its sender looking for a wrong key;
    it is now named: rule weak-signature, journalled, nothing issued."""
    key_file, csr_file = tmp_path / "k.pem", tmp_path / "r.csr"
    key = rsa.generate_private_key(65537, 2048)  # ECDSA has no MD5 signature
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    made = subprocess.run(
        ["openssl", "req", "-new", f"-{digest}", "-key", str(key_file), "-subj", "/CN=weak",
         "-out", str(csr_file)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"this openssl does not sign with {digest}: {made.stderr.strip()[:200]}")
    exc = _assert_refused(
        services, _from_csr(services, csr_file.read_bytes()), PolicyViolation, "weak-signature"
    )
    assert digest.upper() in exc.message


def _openssl_csr(tmp_path: Path, *addext: str) -> bytes:
    key_file, csr_file = tmp_path / "k.pem", tmp_path / "r.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = [a for ext in addext for a in ("-addext", ext)]
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key_file), "-subj", "/CN=Bob Admin",
         *args, "-out", str(csr_file)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return csr_file.read_bytes()


@pytest.mark.parametrize(
    "extension, oid",
    [
        ("1.3.6.1.4.1.55555.1=critical,DER:05:00", "1.3.6.1.4.1.55555.1"),
        ("tlsfeature=critical,status_request", "1.3.6.1.5.5.7.1.24"),  # must-staple
    ],
)
def test_csr_requesting_an_unknown_critical_extension_is_refused(
    services: Services, tmp_path: Path, extension: str, oid: str
) -> None:
    """A critical extension request the CA does not honour is refused by name (rule
    csr-extension), not silently dropped; nothing is issued and the refusal is journalled."""
    data = _openssl_csr(tmp_path, extension)
    exc = _assert_refused(services, _from_csr(services, data), PolicyViolation, "csr-extension")
    assert oid in exc.message


def test_csr_extension_requests_the_profile_decides_may_be_critical(
    services: Services, tmp_path: Path
) -> None:
    """keyUsage, extendedKeyUsage and basicConstraints requests (critical or not) and an
    unknown non-critical request are no reason to refuse: the profile decides the
    certificate's extensions, and the CSR's are not copied."""
    data = _openssl_csr(
        tmp_path,
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign",
        "extendedKeyUsage=critical,serverAuth",
        "1.3.6.1.4.1.55555.1=DER:05:00",
        "subjectAltName=critical,email:bob@tenant1.example.com",
    )
    cert = _from_csr(services, data)()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    oids = {ext.oid.dotted_string for ext in cert.extensions}
    assert "1.3.6.1.4.1.55555.1" not in oids
