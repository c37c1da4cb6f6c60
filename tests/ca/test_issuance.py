"""Issuance of every profile, checked by other people's code (pkilint, openssl, gnutls)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from sqlalchemy import select, update

from ca.hierarchy import NameConstraintSpec, create_issuing, create_root
from ca.issuance import IssueRequest
from ca.models import Certificate, CertificateAuthority, CertStatus
from ca.tbs import SERIAL_BITS, SanEntry, new_serial, serial_hex
from hsm.base import KeyType
from ocsp.models import OcspResponse
from ocsp.signers import active_responders
from sekisho.errors import ConfigError, Conflict, StoreError
from sekisho.services import Services, audit_key_ref
from tests.ca.helpers import PROFILE_REQUESTS, ca_cert, der, issue, make_csr, name
from tests.conftest import BASE_URL, TEST_ACTOR, RecordingBackend
from tests.support import checkers

# The foundation tests also run with every key on a SoftHSM2 token (tests/conftest.py).
KEY_BACKENDS = ("software", "pkcs11")

PROFILES = sorted(PROFILE_REQUESTS)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_passes_independent_checkers(services: Services, profile: str) -> None:
    cert = issue(services, profile)
    ca = PROFILE_REQUESTS[profile][0]
    issuer, root = ca_cert(services, ca), ca_cert(services, "root")
    checkers.pkilint_cert(der(cert))
    checkers.pkilint_chain(der(issuer), der(cert))
    checkers.openssl_verify(der(cert), [der(root), der(issuer)])
    assert checkers.gnutls_verify(der(cert), [der(root), der(issuer)]) == "ok"


def test_ca_certificates_pass_independent_checkers(services: Services) -> None:
    root = ca_cert(services, "root")
    checkers.pkilint_cert(der(root))
    for name_ in ("admin", "device"):
        issuing = ca_cert(services, name_)
        checkers.pkilint_cert(der(issuing))
        checkers.pkilint_chain(der(root), der(issuing))
        checkers.openssl_verify(der(issuing), [der(root)])


def test_admin_client_profile_contents(services: Services) -> None:
    cert = issue(services, "admin-client")
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@tenant1.example.com"]
    cdp = ext.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier(f"{BASE_URL}/crl/admin.crl")]
    aia = ext.get_extension_for_class(x509.AuthorityInformationAccess).value
    urls = {d.access_method.dotted_string: d.access_location.value for d in aia}
    assert urls == {
        "1.3.6.1.5.5.7.48.1": f"{BASE_URL}/ocsp",
        "1.3.6.1.5.5.7.48.2": f"{BASE_URL}/ca/admin.crt",
    }
    issuer = ca_cert(services, "admin")
    # The issuing CA's own certificate points at the root's certificate only: the root's
    # status answers are its CRL (the responder serves the issuing CAs, not the root).
    issuer_aia = issuer.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert {d.access_method.dotted_string for d in issuer_aia.value} == {"1.3.6.1.5.5.7.48.2"}
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == (
        "Tenant One"
    )


def test_ocsp_signer_profile(services: Services) -> None:
    cert = issue(services, "ocsp-signer")
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    ext.get_extension_for_oid(ExtensionOID.OCSP_NO_CHECK)
    with pytest.raises(x509.ExtensionNotFound):
        ext.get_extension_for_class(x509.CRLDistributionPoints)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, hours=2)


def test_device_profile_has_both_ekus(services: Services) -> None:
    cert = issue(services, "device")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


def test_serial_numbers_are_large_positive_and_recorded(services: Services) -> None:
    certs = [issue(services, "device") for _ in range(20)]
    serials = {c.serial_number for c in certs}
    assert len(serials) == 20
    for s in serials:
        assert 2**127 <= s < 2**159  # >= 128 random bits, positive, at most 20 octets in DER
    with services.db.scope() as session:
        rows = session.scalars(select(Certificate).where(Certificate.profile == "device")).all()
        by_serial = {r.serial: r for r in rows}
        for c in certs:
            row = by_serial[serial_hex(c.serial_number)]
            assert row.status is CertStatus.ISSUED
            assert row.der == der(c)


def test_serial_collision_draws_a_new_serial(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The (issuer, serial) constraint refuses a serial already used by that CA; issuance
    draws another and goes on. Nothing of the refused attempt stays, and the journal has one
    ca.issue entry, for the certificate handed out."""
    import ca.issuance
    from ca.tbs import new_serial

    taken = issue(services, "admin-client").serial_number
    drawn: list[int] = []

    def colliding() -> int:
        value = taken if len(drawn) < 2 else new_serial()
        drawn.append(value)
        return value

    monkeypatch.setattr(ca.issuance, "new_serial", colliding)
    before = _issue_entries(services)
    rows_before = _admin_serials(services)
    cert = issue(services, "admin-client")
    assert drawn[:2] == [taken, taken] and len(drawn) == 3
    assert cert.serial_number == drawn[2] != taken
    assert _admin_serials(services) - rows_before == {serial_hex(cert.serial_number)}
    assert _issue_entries(services) == before + 1

    # A generator that only ever repeats itself: a clear store error, nothing issued.
    monkeypatch.setattr(ca.issuance, "new_serial", lambda: taken)
    with pytest.raises(StoreError, match="free serial"):
        issue(services, "admin-client")
    assert _issue_entries(services) == before + 1


def test_a_ca_key_taken_offline_by_another_process_stops_issuance(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry caches CA contexts per process; another process (``sekisho ca offline``
    while ``serve`` runs) changes the row without this process's ORM events. Within the
    refresh window the change is seen, issuance from that CA is refused and journalled, and
    it resumes once the key is back."""
    from audit.models import JournalRecord
    from ca import registry

    issue(services, "admin-client")  # the admin CA's context is now cached
    assert services.ca.registry.cached("admin") is not None

    def set_online(online: bool) -> None:  # Core statement: no ORM event in this process
        with services.db.engine.begin() as conn:
            conn.execute(
                update(CertificateAuthority)
                .where(CertificateAuthority.name == "admin")
                .values(key_online=online)
            )

    set_online(False)
    monkeypatch.setattr(registry, "REFRESH_SECONDS", 0.0)  # the window has passed
    serials = _admin_serials(services)
    with pytest.raises(Conflict, match="offline") as info:
        issue(services, "admin-client")
    assert info.value.exit_code == 75
    assert _admin_serials(services) == serials  # not even a reserved row
    with services.db.read_scope() as session:
        last = session.scalars(
            select(JournalRecord).order_by(JournalRecord.seq.desc()).limit(1)
        ).one()
    assert (last.action, last.outcome) == ("ca.issue", "failure")
    assert "offline" in last.detail
    set_online(True)
    cert = issue(services, "admin-client")
    assert serial_hex(cert.serial_number) in _admin_serials(services)


def _admin_serials(services: Services) -> set[str]:
    with services.db.read_scope() as session:
        return set(
            session.scalars(
                select(Certificate.serial)
                .join(CertificateAuthority, CertificateAuthority.id == Certificate.issuer_id)
                .where(CertificateAuthority.name == "admin")
            )
        )


def _issue_entries(services: Services) -> int:
    from audit.models import JournalRecord

    with services.db.read_scope() as session:
        return len(
            session.scalars(
                select(JournalRecord.seq).where(
                    JournalRecord.action == "ca.issue", JournalRecord.outcome == "success"
                )
            ).all()
        )


@pytest.mark.parametrize("key_type", list(KeyType))
def test_subject_key_types(services: Services, key_type: KeyType) -> None:
    profile = "device" if key_type is not KeyType.RSA_2048 else "tls-server"
    cert = issue(services, profile, key_type)
    checkers.pkilint_cert(der(cert))
    checkers.openssl_verify(
        der(cert), [der(ca_cert(services, "root")), der(ca_cert(services, "device"))]
    )


@pytest.mark.parametrize(
    "key_type", [KeyType.EC_P384, KeyType.RSA_3072, KeyType.RSA_4096, KeyType.ED25519]
)
def test_ca_key_type_options(services: Services, key_type: KeyType, key_backend: str) -> None:
    tag = key_type.value.replace("-", "")
    if key_backend == "pkcs11" and key_type is KeyType.ED25519:
        # Not offered on tokens (PKCS#11 3.0 EdDSA is not widespread): a clear refusal.
        with pytest.raises(ConfigError, match="EC P-256/P-384 and RSA"):
            create_root(services.ca, f"root{tag}", "Example Corp", key_type, TEST_ACTOR)
        return
    root_row = create_root(services.ca, f"root{tag}", "Example Corp", key_type, TEST_ACTOR)
    create_issuing(services.ca, f"issuing{tag}", f"root{tag}", "Example Corp", key_type, TEST_ACTOR)
    services.registry.invalidate()
    cert = services.ca.issue(
        IssueRequest(
            ca=f"issuing{tag}",
            profile="device",
            subject=name(CN="dev.example.com"),
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            sans=(SanEntry("dns", "dev.example.com"),),
        ),
        TEST_ACTOR,
    )
    root = x509.load_der_x509_certificate(root_row.certificate_der)
    issuing = ca_cert(services, f"issuing{tag}")
    key = issuing.public_key()
    expected = {
        KeyType.EC_P384: ec.EllipticCurvePublicKey,
        KeyType.RSA_3072: rsa.RSAPublicKey,
        KeyType.RSA_4096: rsa.RSAPublicKey,
        KeyType.ED25519: ed25519.Ed25519PublicKey,
    }[key_type]
    assert isinstance(key, expected)
    for c in (root, issuing, cert):
        checkers.pkilint_cert(der(c))
    checkers.pkilint_chain(der(issuing), der(cert))
    checkers.openssl_verify(der(cert), [der(root), der(issuing)])
    crl = services.crls.generate(f"issuing{tag}", services.clock())
    checkers.pkilint_crl(crl.der)
    checkers.openssl_crl_verify(crl.der, der(issuing))


def test_name_constraints_on_issuing_ca(services: Services) -> None:
    spec = NameConstraintSpec(permitted_dns=("tenant1.example.com",))
    create_issuing(
        services.ca, "t1", "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR, constraints=spec
    )
    services.registry.invalidate()
    issuing = ca_cert(services, "t1")
    nc = issuing.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    checkers.pkilint_cert(der(issuing))
    inside = IssueRequest(
        ca="t1",
        profile="device",
        subject=name(CN="a.tenant1.example.com"),
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        sans=(SanEntry("dns", "a.tenant1.example.com"),),
    )
    cert = services.ca.issue(inside, TEST_ACTOR)
    checkers.openssl_verify(der(cert), [der(ca_cert(services, "root")), der(issuing)])
    from sekisho.errors import PolicyViolation

    outside = dataclasses.replace(inside, sans=(SanEntry("dns", "evil.example"),))
    with pytest.raises(PolicyViolation) as info:
        services.ca.issue(outside, TEST_ACTOR)
    assert info.value.rule == "name-constraints"


def test_csr_subject_and_sans_come_from_the_authorised_request(services: Services) -> None:
    csr = make_csr(
        name(CN="attacker-chosen.example"),
        [x509.DNSName("attacker-chosen.example"), x509.DNSName("www.bank.example")],
    )
    cert = services.ca.issue_from_csr(
        csr,
        ca="device",
        profile="device",
        actor=TEST_ACTOR,
        subject=name(CN="dev-7.tenant1.example.com"),
        sans=(SanEntry("dns", "dev-7.tenant1.example.com"),),
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-7.tenant1.example.com"]
    assert "attacker" not in cert.subject.rfc4514_string()


def test_every_signature_goes_through_the_backend(services: Services) -> None:
    backend = services.backend
    assert isinstance(backend, RecordingBackend)
    backend.calls.clear()
    cert = issue(services, "device")
    crl_row = services.crls.generate("device", services.clock())
    crl = x509.load_der_x509_crl(crl_row.der)
    signed = [data for _ref, data in backend.calls]
    assert cert.tbs_certificate_bytes in signed
    assert crl.tbs_certlist_bytes in signed
    with services.db.scope() as session:
        checkpoint = services.journal.checkpoint(session, services.clock())
        assert checkpoint is not None
        body = checkpoint.body.encode()
    assert body in [data for _ref, data in backend.calls]
    # The certificate's pre-signed OCSP response is signed by the CA's delegated responder,
    # whose key lives in the same backend.
    with services.db.scope() as session:
        stored = session.scalars(
            select(OcspResponse.der).where(OcspResponse.serial == serial_hex(cert.serial_number))
        ).one()
        device_ca = session.scalars(
            select(CertificateAuthority.id).where(CertificateAuthority.name == "device")
        ).one()
    response = ocsp.load_der_ocsp_response(stored)
    assert response.serial_number == cert.serial_number
    assert response.tbs_response_bytes in signed
    responder = active_responders(services)[device_ca]
    refs = {ref for ref, _ in backend.calls}
    with services.db.scope() as session:
        ca_key = session.scalars(
            select(CertificateAuthority.key_ref).where(CertificateAuthority.name == "device")
        ).one()
    assert refs == {ca_key, audit_key_ref(services.backend), responder.key_ref}


def test_serials_are_uniform_and_unordered_over_a_hundred_thousand() -> None:
    """The serial generator (security-targets 3, after BR 7.1): over 10^5 serials none repeats,
    each is positive with at most 20 DER octets and more than 128 significant bits, each of
    the 159 random bits is set with frequency 0.5 +- 0.01 (6 standard deviations), and the
    values do not follow issue order (|Spearman rho| < 0.05, 16 standard deviations)."""
    n = 100_000
    serials = [new_serial() for _ in range(n)]
    assert len(set(serials)) == n
    assert all(1 << 128 <= s < 1 << SERIAL_BITS for s in serials)
    assert all(len(serial_der_content(s)) <= 20 for s in serials[:1000])
    for bit in range(SERIAL_BITS):
        frequency = sum((s >> bit) & 1 for s in serials) / n
        assert abs(frequency - 0.5) < 0.01, (bit, frequency)
    ranks = {s: r for r, s in enumerate(sorted(serials))}
    d2 = sum((i - ranks[s]) ** 2 for i, s in enumerate(serials))
    rho = 1 - 6 * d2 / (n * (n * n - 1))
    assert abs(rho) < 0.05, rho


def serial_der_content(value: int) -> bytes:
    """The content octets of a positive DER INTEGER (a leading zero when the top bit is set)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")
