"""The lint gate (security target 1, BR 4.3.1.2): pkilint checks the exact TBS certificate the
CA key is about to sign; a finding of NOTICE or above refuses the issuance before anything is
reserved or signed, and the refusal is journalled with the rule ``pkilint``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator

import pytest
from asn1crypto import crl as asn1_crl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from sqlalchemy import func, select

from audit.models import JournalRecord
from ca import crl as crl_module
from ca import tbs as tbs_module
from ca.hierarchy import create_root
from ca.lint import CRL_LINT_ENTRIES, LINT_RULE, Linter
from ca.models import Certificate, CertificateAuthority, Crl
from ca.revocation import Reason
from hsm.base import KeyType
from sekisho.errors import PolicyViolation
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import PROFILE_REQUESTS, request_for
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support.checkers import pkilint_cert, pkilint_crl


def _count(services: Services, model: type[object]) -> int:
    with services.db.scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _rejections(services: Services, action: str = "ca.issue") -> list[dict[str, object]]:
    with services.db.scope() as session:
        rows = session.scalars(
            select(JournalRecord.detail)
            .where(JournalRecord.action == action, JournalRecord.outcome == "failure")
            .order_by(JournalRecord.seq)
        )
        return [json.loads(detail) for detail in rows]


@pytest.fixture
def without_aki(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extensions lose the AKI (our rules do not read them): a fault in our encoding that
    only an independent linter can see (pkilint: ERROR)."""
    real = tbs_module.build_extensions

    def build_extensions(tbs: tbs_module.Tbs) -> list[x509.Extension[x509.ExtensionType]]:
        return [e for e in real(tbs) if e.oid != ExtensionOID.AUTHORITY_KEY_IDENTIFIER]

    monkeypatch.setattr(tbs_module, "build_extensions", build_extensions)


def test_a_tbs_pkilint_finds_wrong_is_refused_before_anything_is_reserved_or_signed(
    services: Services, recording_backend: RecordingBackend, without_aki: None
) -> None:
    rows, rejected = _count(services, Certificate), len(_rejections(services))
    signatures = len(recording_backend.signatures_but_checkpoints())
    with pytest.raises(PolicyViolation) as info:
        services.ca.issue(request_for("admin-client"), TEST_ACTOR)
    assert info.value.rule == LINT_RULE and info.value.exit_code == 65
    assert "pkix.authority_key_identifier_extension_absent (ERROR)" in info.value.message
    assert _count(services, Certificate) == rows, "a refused TBS left a row (reserved or not)"
    assert recording_backend.signatures_but_checkpoints()[signatures:] == []
    journalled = _rejections(services)
    assert len(journalled) == rejected + 1
    assert journalled[-1]["rule"] == LINT_RULE and journalled[-1]["code"] == "policy-violation"
    assert "authority_key_identifier_extension_absent" in str(journalled[-1]["reason"])


def test_with_the_gate_off_the_same_fault_is_issued(settings: Settings, without_aki: None) -> None:
    """The control: what refused the certificate above is the gate, not another rule."""
    off = build_services(dataclasses.replace(settings, lint_before_signing=False))
    try:
        assert off.ca.linter is None
        cert = off.ca.issue(request_for("admin-client"), TEST_ACTOR)
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    finally:
        off.close()


@pytest.fixture
def linted(services: Services) -> Iterator[list[bytes]]:
    """The TBS certificates the gate checked, in order (it still checks them)."""
    seen: list[bytes] = []
    linter = services.ca.linter
    assert isinstance(linter, Linter)
    real = linter.check_tbs

    def check_tbs(tbs: bytes, key_type: KeyType) -> None:
        seen.append(tbs)
        real(tbs, key_type)

    linter.check_tbs = check_tbs  # type: ignore[method-assign]
    yield seen


@pytest.mark.parametrize("profile", sorted(PROFILE_REQUESTS))
def test_every_profile_passes_and_the_linted_tbs_is_the_signed_one(
    services: Services, linted: list[bytes], profile: str
) -> None:
    """Target 2 (deterministic TBS): the bytes pkilint saw are those the CA signed, byte for
    byte; the certificate passes pkilint from outside too."""
    cert = services.ca.issue(request_for(profile), TEST_ACTOR)
    assert linted == [cert.tbs_certificate_bytes]
    pkilint_cert(cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture
def software_services(settings: Settings) -> Iterator[Services]:
    """Services on the software backend itself (which removes a refused CA's new key)."""
    services = build_services(settings)
    yield services
    services.close()


def test_a_root_the_gate_refuses_leaves_no_ca_and_no_key(software_services: Services) -> None:
    """A root is self-signed outside issuance, and linted all the same (once signed: pkilint
    knows self-signed by the signature): accepted, what was linted is the root; refused, no
    CA row and no key file are left behind."""
    services = software_services
    linter = services.ca.linter
    assert isinstance(linter, Linter)
    seen: list[bytes] = []
    real = linter.check_certificate

    def check_certificate(der: bytes) -> None:
        seen.append(der)
        real(der)

    linter.check_certificate = check_certificate  # type: ignore[method-assign]
    root = create_root(services.ca, "root2", "Example Corp", KeyType.EC_P256, TEST_ACTOR)
    assert seen == [root.certificate_der]
    keys = set(services.settings.keys_dir.iterdir())
    cas = _count(services, CertificateAuthority)

    def refuse(der: bytes) -> None:
        raise PolicyViolation(LINT_RULE, "pkilint found something: not signed")

    linter.check_certificate = refuse  # type: ignore[method-assign]
    with pytest.raises(PolicyViolation):
        create_root(services.ca, "root3", "Example Corp", KeyType.EC_P256, TEST_ACTOR)
    assert _count(services, CertificateAuthority) == cas
    assert set(services.settings.keys_dir.iterdir()) == keys


def test_a_structure_the_linter_cannot_read_is_refused() -> None:
    """A gate that cannot look does not open."""
    with pytest.raises(PolicyViolation, match="could not be linted"):
        Linter().check_tbs(b"\x30\x03\x02\x01\x00", KeyType.EC_P256)


def _tbs_with_san(san: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), False
        )
        .sign(issuer, hashes.SHA256())
    )
    return cert.tbs_certificate_bytes


def test_only_a_wildcard_our_rules_issue_passes_pkilints_dns_syntax_finding() -> None:
    """pkilint's RFC 5280 linter calls every wildcard bad dNSName syntax (the CA/B profiles
    define them); the gate lets that one finding through for "*" over a good name only."""
    linter = Linter()
    linter.check_tbs(_tbs_with_san(x509.DNSName("*.tenant1.example.com")), KeyType.EC_P256)
    linter.check_tbs(_tbs_with_san(x509.DNSName("radius-1.tenant1.example.com")), KeyType.EC_P256)
    # "host.b2" pkilint refuses (its last label must end in a letter; our rules refuse it too
    # since stop 21): under a wildcard as well, the exemption being for the "*" alone.
    for bad in ("*.-bad.example.com", "x*.example.com", "-bad.example.com", "host.b2", "*.host.b2"):
        with pytest.raises(PolicyViolation, match=r"pkix\.invalid_domain_name_syntax"):
            linter.check_tbs(_tbs_with_san(x509.DNSName(bad)), KeyType.EC_P256)


@pytest.mark.parametrize("base_url", ["http://sekisho:8080", "http://localhost:8080"])
def test_a_base_url_of_one_label_does_not_shut_the_gate_on_everything(
    settings: Settings, base_url: str
) -> None:
    """From the review: pkilint calls a URI whose host is one label bad syntax (RFC 3986
    allows it), so with such a base_url (a container's name, localhost) every certificate's
    CRL and AIA URLs were refused, init included. Our own URLs pass that finding, and only
    they."""
    services = build_services(dataclasses.replace(settings, base_url=base_url).validate())
    try:
        cert = services.ca.issue(request_for("admin-client"), TEST_ACTOR)
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert str(points[0].full_name[0].value).startswith(base_url + "/crl/")  # type: ignore[index]
        # Only our own URLs: another URI of that form (which our rules refuse in a SAN) is
        # still pkilint's finding.
        linter = services.ca.linter
        assert linter is not None
        with pytest.raises(PolicyViolation, match=r"pkix\.invalid_uri_syntax"):
            linter.check_tbs(
                _tbs_with_san(x509.UniformResourceIdentifier("https://intranet/id")),
                KeyType.EC_P256,
            )
        linter.check_tbs(
            _tbs_with_san(x509.UniformResourceIdentifier(f"{base_url}/id")), KeyType.EC_P256
        )
    finally:
        services.close()


# -- CRLs -------------------------------------------------------------------------------------
@pytest.fixture
def crl_without_aki(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CRL encoder writes another extension where the AKI goes (RFC 5280 5.2.1: MUST be
    there): a fault in our encoding that only an independent linter sees."""
    monkeypatch.setattr(crl_module, "OID_AKI", "2.5.29.99")


def test_a_crl_pkilint_finds_wrong_is_refused_before_it_is_signed(
    services: Services, recording_backend: RecordingBackend, crl_without_aki: None
) -> None:
    """Refused, and journalled (``ca.crl``, failure, with the rule and the finding)."""
    crls = _count(services, Crl)
    signatures = len(recording_backend.signatures_but_checkpoints())
    assert _rejections(services, "ca.crl") == []
    numbers = []
    for delta in (False, True):
        with pytest.raises(PolicyViolation) as info:
            services.crls.generate("admin", services.clock(), delta=delta, actor=TEST_ACTOR)
        assert info.value.rule == LINT_RULE and info.value.exit_code == 65
        assert "pkix.authority_key_identifier_missing (ERROR)" in info.value.message
        assert "in the CRL: not signed" in info.value.message
        refusal = _rejections(services, "ca.crl")[-1]
        assert refusal["rule"] == LINT_RULE and refusal["code"] == "policy-violation"
        assert "authority_key_identifier_missing" in str(refusal["reason"])
        assert refusal["ca"] == "admin" and refusal["kind"] == ("delta" if delta else "full")
        numbers.append(refusal["number"])
    assert len(_rejections(services, "ca.crl")) == 2 and numbers[1] == numbers[0] + 1
    with services.db.scope() as session:
        actors = session.scalars(
            select(JournalRecord.actor_account).where(
                JournalRecord.action == "ca.crl", JournalRecord.outcome == "failure"
            )
        ).all()
    assert actors == [TEST_ACTOR.account] * 2 and TEST_ACTOR.account != "system"
    assert _count(services, Crl) == crls, "a refused CRL was stored"
    assert recording_backend.signatures_but_checkpoints()[signatures:] == []
    # Without the journal entry (the refresher's tries after its first): refused the same.
    with pytest.raises(PolicyViolation):
        services.crls.publish("admin", services.clock(), journal_refusal=False)
    assert len(_rejections(services, "ca.crl")) == 2


def test_with_the_gate_off_the_crl_fault_is_signed(
    settings: Settings, crl_without_aki: None
) -> None:
    """The control: what refused the CRL above is the gate."""
    off = build_services(dataclasses.replace(settings, lint_before_signing=False))
    try:
        assert off.crls.linter is None
        row = off.crls.generate("admin", off.clock())
        crl = x509.load_der_x509_crl(row.der)
        with pytest.raises(x509.ExtensionNotFound):
            crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    finally:
        off.close()


def test_every_crl_the_gate_passes_is_the_one_signed(services: Services) -> None:
    """Full and delta CRLs with entries of each shape (a reason, none, an invalidity date):
    pkilint saw the exact TBSCertList the CA signed, and they pass pkilint from outside."""
    linter = services.crls.linter
    assert isinstance(linter, Linter) and linter is services.ca.linter
    seen: list[bytes] = []
    real = linter.check_crl_tbs

    def check_crl_tbs(tbs: bytes, key_type: KeyType) -> None:
        seen.append(tbs)
        real(tbs, key_type)

    linter.check_crl_tbs = check_crl_tbs  # type: ignore[method-assign]
    now = services.clock()
    services.crls.publish("admin", now)  # the base the delta counts from
    serials = []
    for reason, invalid in (
        (Reason.KEY_COMPROMISE, now - dt.timedelta(days=2)),
        (Reason.UNSPECIFIED, None),
        (Reason.CERTIFICATE_HOLD, None),
    ):
        cert = services.ca.issue(request_for("admin-client"), TEST_ACTOR)
        services.revoker.revoke("admin", cert.serial_number, reason, TEST_ACTOR, invalid)
        serials.append(cert.serial_number)
    seen.clear()
    delta = services.crls.generate("admin", services.clock(), delta=True)  # on the base
    full = services.crls.generate("admin", services.clock())
    signed = [x509.load_der_x509_crl(row.der) for row in (delta, full)]
    assert seen == [crl.tbs_certlist_bytes for crl in signed]
    assert all(crl.get_revoked_certificate_by_serial_number(s) for crl in signed for s in serials)
    pkilint_crl(full.der)
    pkilint_crl(delta.der, delta=True)


def _params(key: ec.EllipticCurvePrivateKey) -> crl_module.CrlParams:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issuer = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Lint CA")])
    return crl_module.CrlParams(
        issuer_name_der=issuer.public_bytes(),
        issuer_ski=x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest,
        key_type=KeyType.EC_P256,
        number=7,
        this_update=now,
        next_update=now + dt.timedelta(days=7),
    )


def test_a_long_crl_is_linted_on_its_first_entries() -> None:
    """pkilint takes about 0.2 ms an entry: a CRL longer than CRL_LINT_ENTRIES is linted cut
    to its first CRL_LINT_ENTRIES entries, with its own header and extensions; a fault there
    refuses it, and a shorter CRL is linted whole."""
    key = ec.generate_private_key(ec.SECP256R1())
    params = _params(key)
    now = params.this_update
    seen: list[bytes] = []

    class Spy(Linter):
        def check_crl_tbs(self, tbs: bytes, key_type: KeyType) -> None:
            seen.append(tbs)
            super().check_crl_tbs(tbs, key_type)

    entries = [crl_module.Entry(1000 + i, now, 1 if i % 2 else None) for i in range(300)]
    for count in (CRL_LINT_ENTRIES, CRL_LINT_ENTRIES + 44):
        seen.clear()
        signed = x509.load_der_x509_crl(
            crl_module.build_crl(params, crl_module.encode_entries(entries[:count]), key, Spy())
        )
        assert signed.is_signature_valid(key.public_key())
        linted = asn1_crl.TbsCertList.load(seen[0])
        whole = asn1_crl.TbsCertList.load(signed.tbs_certlist_bytes)
        assert len(linted["revoked_certificates"]) == CRL_LINT_ENTRIES
        assert [e.dump() for e in linted["revoked_certificates"]] == [
            e.dump() for e in whole["revoked_certificates"]
        ][:CRL_LINT_ENTRIES]
        for field in ("version", "signature", "issuer", "this_update", "next_update"):
            assert linted[field].dump() == whole[field].dump()
        assert linted["crl_extensions"].dump() == whole["crl_extensions"].dump()
        assert (seen[0] == signed.tbs_certlist_bytes) == (count == CRL_LINT_ENTRIES)
    bad = [crl_module.Entry(0, now, None), *entries]  # serial 0: RFC 5280 4.1.2.2
    with pytest.raises(PolicyViolation) as info:
        crl_module.build_crl(params, crl_module.encode_entries(bad), key, Linter())
    assert "pkix.certificate_serial_number_out_of_range" in info.value.message
    truncated = crl_module.encode_entries(entries[:3])[:-2]  # our encoding, cut: unreadable
    with pytest.raises(PolicyViolation) as info:
        crl_module.build_crl(params, truncated, key, Linter())
    assert "the CRL could not be linted" in info.value.message
