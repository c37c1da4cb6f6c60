"""``sekisho cert check``: a deployment that agrees with itself checks clean, and each kind of
disagreement made in the store by hand (a DER, fingerprint, status, reason or row changed, a
CRL signature broken, an OCSP answer swapped or gone, an issuance left reserved) is reported
for exactly the certificate it touches, and nothing else is (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from sqlalchemy import delete, select, text

from ca.issuance import IssueRequest
from ca.models import Certificate, CertStatus, Crl, CrlKind
from ca.revocation import Reason
from ca.tbs import SanEntry
from hsm.base import KeyType
from ocsp.models import OcspResponse
from sekisho.check import StoreCheck
from sekisho.cli import main
from sekisho.services import Services
from sekisho.settings import Settings
from tests.ca.helpers import ca_cert, issue
from tests.conftest import TEST_ACTOR, RecordingBackend

Check = Callable[..., tuple[int, dict[str, Any], str]]


@pytest.fixture
def check(capsys: pytest.CaptureFixture[str], data_dir: Path) -> Check:
    def run(*args: str) -> tuple[int, dict[str, Any], str]:
        capsys.readouterr()
        code = main(["--data-dir", str(data_dir), "--json", "cert", "check", *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, json.loads(out) if out else {}, err

    return run


def found(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["serial"], f["kind"]) for f in doc["discrepancies"]}


def hexs(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:040x}"


def edit_row(services: Services, cert: x509.Certificate, **values: Any) -> None:
    with services.db.scope() as session:
        row = session.scalars(select(Certificate).where(Certificate.serial == hexs(cert))).one()
        for key, value in values.items():
            setattr(row, key, value)


def with_der(der: bytes) -> dict[str, Any]:
    return {"der": der, "fingerprint_sha256": hashlib.sha256(der).hexdigest()}


def forged(cert: x509.Certificate) -> bytes:
    """The same serial, names, validity and key, signed by a key that is not the CA's."""
    rogue = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(rogue, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_every_disagreement_is_found_and_nothing_else(services: Services, check: Check) -> None:
    certs = [issue(services, "device") for _ in range(12)]
    revoker = services.revoker
    for i, reason in ((1, Reason.KEY_COMPROMISE), (2, Reason.CERTIFICATE_HOLD),
                      (3, Reason.SUPERSEDED), (4, Reason.UNSPECIFIED)):  # fmt: skip
        revoker.revoke("device", certs[i].serial_number, reason, TEST_ACTOR)
    services.crls.publish("device", services.clock())

    code, doc, err = check("--grace", "0")
    assert code == 0 and doc["ok"] and not doc["discrepancies"], doc
    assert doc["certificates"] >= 12 and doc["crl_entries"] == 4 and doc["cas"] == 3
    assert doc["ocsp_answers"] >= 12

    s = [hexs(c) for c in certs]
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    edit_row(services, certs[0], fingerprint_sha256="00" * 32)
    edit_row(services, certs[5], **with_der(ders[6]))  # another certificate's DER
    edit_row(services, certs[7], **with_der(forged(certs[7])))
    now = services.clock()
    edit_row(services, certs[8], status=CertStatus.REVOKED, revocation_reason="key_compromise",
             revoked_at=now)  # fmt: skip
    edit_row(services, certs[1], status=CertStatus.ISSUED, revocation_reason=None, revoked_at=None)
    edit_row(services, certs[3], revocation_reason="affiliation_changed")
    edit_row(services, certs[11], status=CertStatus.FAILED)
    with services.db.scope() as session:
        session.execute(delete(Certificate).where(Certificate.serial == s[4]))
        answers = {
            a.serial: a
            for a in session.scalars(select(OcspResponse).where(OcspResponse.serial.in_(s)))
        }
        answers[s[9]].der = answers[s[10]].der
        session.delete(answers[s[10]])
        delta = session.scalars(
            select(Crl).where(Crl.kind == CrlKind.DELTA).order_by(Crl.number.desc()).limit(1)
        ).one()
        delta.der = delta.der[:-1] + bytes([delta.der[-1] ^ 1])  # the signature's last octet

    code, doc, err = check("--grace", "0")
    assert code == 2 and not doc["ok"], doc
    assert "discrepancies" in err
    assert found(doc) == {
        (s[0], "der-fingerprint"), (s[0], "journal"),
        (s[5], "der-fields"), (s[5], "der-tbs"), (s[5], "journal"),
        (s[7], "der-signature"), (s[7], "journal"),  # the same TBS, signed by another key
        (s[8], "crl-missing"), (s[8], "ocsp-answer"), (s[8], "journal-status"),
        (s[1], "crl-extra"), (s[1], "ocsp-answer"), (s[1], "journal-status"),
        (s[3], "crl-entry"), (s[3], "ocsp-answer"), (s[3], "journal-status"),
        (s[11], "der-unexpected"), (s[11], "ocsp-answer"),
        (s[4], "crl-unknown-serial"), (s[4], "ocsp-orphan"),  # its answer stays
        (s[9], "ocsp-answer"),
        (s[10], "ocsp-missing"),
        ("", "crl-signature"),
    }, json.dumps(doc["discrepancies"], indent=1)  # fmt: skip
    by = {(f["serial"], f["kind"]): f for f in doc["discrepancies"]}
    assert all(f["ca"] == "device" for f in doc["discrepancies"])
    assert by[(s[5], "der-fields")]["detail"].startswith("not the row's: serial")
    assert "answers for another certificate" in by[(s[9], "ocsp-answer")]["detail"]
    assert "key_compromise" not in by[(s[3], "crl-entry")]["detail"]
    # --ca narrows the check; an unknown name is refused
    code, doc, _ = check("--grace", "0", "--ca", "admin")
    assert code == 0 and doc["cas"] == 1
    code, doc, err = check("--ca", "nope")
    assert code == 66 and not doc and "nope" in err


def test_a_stale_reservation_is_reported_until_revoked(services: Services, check: Check) -> None:
    """An issuance that stopped after its intent: reported once older than the grace period
    (a signature may exist that nobody received); revoking it settles it."""
    cert = issue(services, "device")
    services.crls.publish("device", services.clock())
    an_hour_ago = services.clock() - dt.timedelta(hours=1)
    with services.db.scope() as session:
        row = session.scalars(select(Certificate).where(Certificate.serial == hexs(cert))).one()
        row.status, row.der, row.fingerprint_sha256 = CertStatus.RESERVED, None, None
        row.created_at = an_hour_ago
        session.execute(delete(OcspResponse).where(OcspResponse.serial == hexs(cert)))
    code, doc, _ = check()
    assert code == 2
    assert found(doc) == {(hexs(cert), "reserved-stale"), (hexs(cert), "ocsp-missing")}
    code, doc, _ = check("--grace", "120")  # within the grace period: in flight, not reported
    assert code == 0, doc

    services.revoker.revoke("device", cert.serial_number, Reason.CESSATION_OF_OPERATION, TEST_ACTOR)
    code, doc, _ = check("--grace", "0")
    assert found(doc) == {(hexs(cert), "crl-behind")}  # until the next CRL
    code, doc, _ = check()
    assert code == 0, doc  # a revocation a moment ago is on its way
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    assert code == 0 and doc["crl_entries"] == 1, doc


def test_a_debian_weak_key_certified_before_is_reported_until_revoked_for_compromise(
    services: Services, check: Check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate of a Debian weak key that an earlier version issued (made here by
    passing the lookup, as for a key generated here): reported, also when revoked for
    another reason, until revoked for keyCompromise (BR 4.9.1.1). Without the lists, the
    RSA keys that could not be looked up are counted in a note, not a discrepancy."""
    from tests.ca.test_debian_weak_keys import _request, _weak_2048

    request = dataclasses.replace(_request(_weak_2048()), key_generated_here=True)
    cert = services.ca.issue(request, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    code, doc, _ = check()
    assert code == 2 and found(doc) == {(hexs(cert), "weak-key")}, doc
    services.revoker.revoke("device", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    code, doc, _ = check()
    assert found(doc) == {(hexs(cert), "weak-key")}, doc
    monkeypatch.setenv("SEKISHO_WEAK_KEY_LISTS", str(tmp_path / "none"))
    code, doc, err = check()
    assert code == 0 and doc["rsa_keys_unlisted"] == 1, doc
    assert "1 RSA keys were not looked up" in err
    monkeypatch.delenv("SEKISHO_WEAK_KEY_LISTS")
    services.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    code, doc, _ = check()
    assert code == 0, doc


def test_a_status_or_reason_no_code_knows_is_a_finding(
    services: Services, check: Check, capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    """Text written into the store by hand that is no status or reason: reported for its row,
    the rest of the check goes on (it used to end in exit 70)."""
    certs = [issue(services, "device") for _ in range(4)]
    for cert in certs[:2]:
        services.revoker.revoke("device", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    with services.db.engine.begin() as conn:
        conn.execute(
            text("UPDATE certificates SET status = 'bogus' WHERE serial = :s"),
            {"s": hexs(certs[0])},
        )
        conn.execute(
            text("UPDATE certificates SET revocation_reason = 'nonsense' WHERE serial = :s"),
            {"s": hexs(certs[1])},
        )
        conn.execute(  # and a row read in full: the two above do not stop the check
            text("UPDATE certificates SET fingerprint_sha256 = 'x' WHERE serial = :s"),
            {"s": hexs(certs[2])},
        )
        conn.execute(  # a serial that is none, with a line break and a terminal escape
            text("UPDATE certificates SET serial = :z WHERE serial = :s"),
            {"s": hexs(certs[3]), "z": "zz\n\x1b[2J" + hexs(certs[3])[8:]},
        )
    code, doc, _ = check("--grace", "0")
    assert code == 2
    assert found(doc) == {
        (hexs(certs[0]), "row-invalid"),
        (hexs(certs[1]), "row-invalid"),
        (hexs(certs[2]), "der-fingerprint"),
        (hexs(certs[2]), "journal"),
        ("", "row-invalid"),  # no serial to name: quoted, escaped, in the detail
        (hexs(certs[3]), "ocsp-orphan"),  # its answer is for the serial no row has now
    }, doc
    details = " ".join(f["detail"] for f in doc["discrepancies"])
    assert "'bogus'" in details and "'nonsense'" in details
    assert "serial 'zz\\n\\x1b[2J" in details, details
    capsys.readouterr()
    assert main(["--data-dir", str(data_dir), "cert", "check", "--grace", "0"]) == 2
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\nzz" not in out and "- - row-invalid" not in out
    assert "device - row-invalid: serial 'zz\\n\\x1b[2J" in out, out


def _answer_of(session: Any, serial: str) -> OcspResponse:
    return session.scalars(select(OcspResponse).where(OcspResponse.serial == serial)).one()


def test_answers_signed_by_a_revoked_or_no_responder_and_stale_stores(
    services: Services, check: Check
) -> None:
    """What a CRL or OCSP answer says only in its DER, or who signed it, is checked: an answer
    signed by a responder revoked (and not replaced: its listener did not run) or by a
    certificate that is no responder; an answer whose DER times are not the stored ones; a
    CRL past its nextUpdate; an invalidity date changed in the store."""
    from ca.revocation import Revoker
    from ocsp import store

    certs = [issue(services, "device") for _ in range(3)]
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    signer = services.ca.issue(
        IssueRequest(
            ca="device",
            profile="device",
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s.example.com")]),
            public_key=leaf_key.public_key(),
            sans=(SanEntry("dns", "s.example.com"),),
        ),
        TEST_ACTOR,
    )
    when = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    services.revoker.revoke(
        "device", certs[2].serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR, invalidity_date=when
    )
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    assert code == 0, doc

    device_ca = ca_cert(services, "device")
    with services.db.scope() as session:
        answer = _answer_of(session, hexs(certs[0]))
        this_update, next_update = answer.this_update, answer.next_update
        answer.der = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                certs[0],
                device_ca,
                hashes.SHA1(),  # noqa: S303  (the CertID hash RFC 5019 clients send)
                ocsp.OCSPCertStatus.GOOD,
                this_update,
                next_update,
                None,
                None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer)
            .certificates([signer])
            .sign(leaf_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        _answer_of(session, hexs(certs[1])).next_update = next_update + dt.timedelta(hours=1)
        full = session.scalars(
            select(Crl).where(Crl.kind == CrlKind.FULL).order_by(Crl.number.desc()).limit(1)
        ).one()
        full.next_update = services.clock() - dt.timedelta(seconds=1)
        row = session.scalars(select(Certificate).where(Certificate.serial == hexs(certs[2])))
        row.one().invalidity_date = when + dt.timedelta(days=1)
    code, doc, _ = check("--grace", "0")
    by = {(f["serial"], f["kind"]): f["detail"] for f in doc["discrepancies"]}
    assert set(by) == {
        (hexs(certs[0]), "ocsp-answer"),
        (hexs(certs[1]), "ocsp-answer"),
        ("", "crl-expired"),
        (hexs(certs[2]), "crl-entry"),
    }, doc
    assert "not one of this CA's OCSP responders" in by[(hexs(certs[0]), "ocsp-answer")]
    assert "nextUpdate is not the stored one" in by[(hexs(certs[1]), "ocsp-answer")]

    # The device responder revoked by a process whose listeners did not run: the answers it
    # signed stay until the refresher re-signs them; once past the grace, each is reported.
    (responder,) = [
        i.responder_certificate
        for i in store.load_issuers(services).values()
        if i.certificate == device_ca
    ]
    bare = Revoker(services.db, services.journal, services.clock)
    bare.revoke("device", responder.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    revoked_signer = {
        f["serial"] for f in doc["discrepancies"] if "signed by a responder revoked" in f["detail"]
    }
    assert hexs(certs[2]) in revoked_signer and hexs(signer) in revoked_signer, doc
    code, doc, _ = check()  # a moment ago: the refresher has a grace period to re-sign them
    assert not any("signed by a responder revoked" in f["detail"] for f in doc["discrepancies"])


def test_unreadable_der_is_reported_not_raised(services: Services, check: Check) -> None:
    """Values no code of ours writes, in DER the store holds: a CRL entry's reason code 7 and
    an OCSP answer's (both unassigned), a certificate on an unknown curve. Each used to end
    the check with exit 70."""
    certs = [issue(services, "device") for _ in range(3)]
    for cert in certs[:2]:
        services.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    key_compromise, unassigned = b"\x0a\x01\x01", b"\x0a\x01\x07"
    p256, unknown_curve = (
        bytes.fromhex("06082a8648ce3d030107"),
        bytes.fromhex("06082a8648ce3d030106"),
    )
    with services.db.scope() as session:
        full = session.scalars(
            select(Crl).where(Crl.kind == CrlKind.FULL).order_by(Crl.number.desc()).limit(1)
        ).one()
        assert key_compromise in full.der
        full.der = full.der.replace(key_compromise, unassigned)
        answer = _answer_of(session, hexs(certs[1]))
        assert key_compromise in answer.der
        answer.der = answer.der.replace(key_compromise, unassigned)
        row = session.scalars(select(Certificate).where(Certificate.serial == hexs(certs[2])))
        cert_row = row.one()
        assert p256 in cert_row.der
        cert_row.der = cert_row.der.replace(p256, unknown_curve)
    code, doc, err = check("--grace", "0")
    assert code == 2, err
    kinds = found(doc)
    assert ("", "crl-malformed") in kinds
    assert (hexs(certs[1]), "ocsp-answer") in kinds
    assert (hexs(certs[2]), "der-malformed") in kinds


def test_a_ca_whose_key_is_offline_gets_one_finding_for_its_answers(
    services: Services, check: Check
) -> None:
    """Nothing re-signs the answers of an issuing CA whose key was taken offline: when they
    expire that is reported once for the CA, not once per certificate."""
    from ca.models import CertificateAuthority

    for _ in range(3):
        issue(services, "device")
    services.crls.publish("device", services.clock())
    with services.db.scope() as session:
        ca = session.scalars(
            select(CertificateAuthority).where(CertificateAuthority.name == "device")
        ).one()
        ca.key_online = False
        for answer in session.scalars(select(OcspResponse).where(OcspResponse.issuer_id == ca.id)):
            answer.next_update = services.clock() - dt.timedelta(seconds=1)
    code, doc, _ = check("--grace", "0")
    assert code == 2 and found(doc) == {("", "ocsp-unmaintained")}, doc
    assert doc["discrepancies"][0]["detail"].startswith("4 OCSP answers")  # 3 + its responder


def test_a_multi_valued_rdn_checks_clean(services: Services, check: Check) -> None:
    """The row keeps the request's order of a multi-valued RDN's attributes; the signed DER
    sorts them (SET OF): the same subject, not a discrepancy."""
    subject = x509.Name.from_rfc4514_string("O=aa+CN=zz")  # DER: CN first (shorter OID)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = services.ca.issue(
        IssueRequest(
            ca="device",
            profile="device",
            subject=subject,
            public_key=key.public_key(),
            sans=(SanEntry("dns", "zz.example.com"),),
        ),
        TEST_ACTOR,
    )
    signed = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    assert signed.subject.rfc4514_string() != subject.rfc4514_string()  # the DER's order
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    assert code == 0, doc


def test_answers_gone_stale_are_listed_up_to_a_bound_then_counted(
    services: Services, check: Check
) -> None:
    """One cause (the refresher not running) would list every certificate of the CA: the
    first MAX_STALE_LISTED are listed, then one finding counts them all."""
    from sekisho.check import MAX_STALE_LISTED

    for _ in range(MAX_STALE_LISTED + 2):
        issue(services, "device")
    services.crls.publish("device", services.clock())
    with services.db.scope() as session:
        for answer in session.scalars(select(OcspResponse)):
            answer.next_update = services.clock() - dt.timedelta(seconds=1)
    code, doc, _ = check("--grace", "0")
    assert code == 2
    kinds = [f["kind"] for f in doc["discrepancies"] if f["ca"] == "device"]
    assert kinds.count("ocsp-behind") == MAX_STALE_LISTED
    (stale,) = [f for f in doc["discrepancies"] if f["kind"] == "ocsp-stale"]
    assert stale["detail"].startswith(f"{MAX_STALE_LISTED + 3} OCSP answers")  # + its responder


def test_values_no_column_type_reads_end_that_ca_not_the_check(
    services: Services, check: Check
) -> None:
    """Stored by hand (SQLite keeps any value in any column; PostgreSQL refuses them): a date
    that is none, text where a responder's DER belongs. Reported; the other CAs are checked."""
    if services.db.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL stores only values of the column type")
    device = issue(services, "device")
    admin = issue(services, "admin-client")
    services.revoker.revoke("device", device.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    for ca in ("admin", "device"):
        services.crls.publish(ca, services.clock())
    with services.db.engine.begin() as conn:
        conn.execute(
            text("UPDATE certificates SET revoked_at = 'garbage' WHERE serial = :s"),
            {"s": hexs(device)},
        )
        conn.execute(text("UPDATE ocsp_responders SET certificate_der = 'x'"))
        conn.execute(
            text("UPDATE certificates SET fingerprint_sha256 = 'x' WHERE serial = :s"),
            {"s": hexs(admin)},
        )
    code, doc, err = check("--grace", "0")
    assert code == 2, err
    kinds = {(f["ca"], f["kind"]) for f in doc["discrepancies"]}
    assert ("device", "check-error") in kinds
    assert ("admin", "responder-malformed") in kinds
    assert ("admin", "der-fingerprint") in kinds  # the admin CA was checked on
    with services.db.engine.begin() as conn:
        conn.execute(text("UPDATE ca_authorities SET kind = 'weird' WHERE name = 'admin'"))
    code, doc, err = check()
    assert code == 2 and not doc and "the CA rows could not be read" in err


def _without_foreign_keys(services: Services, statement: str, **values: Any) -> None:
    """Run ``statement`` with foreign keys off: as the ``sqlite3`` shell does by default, or a
    PostgreSQL superuser with ``session_replication_role = replica``."""
    if services.db.engine.dialect.name == "sqlite":
        import sqlite3
        from contextlib import closing

        path = services.db.engine.url.database
        assert path
        with closing(sqlite3.connect(path)) as conn:
            conn.execute(statement, values)
            conn.commit()
        return
    with services.db.engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text(statement), values)


def test_an_answer_without_a_certificate_or_a_ca_is_an_orphan(
    services: Services, check: Check
) -> None:
    """No code deletes a certificates row, and every answer is signed from one: an answer
    whose row was deleted by hand (the standalone responder still serves it), one stored for
    a serial never issued, one whose CA row is gone, are each reported once beyond the grace
    period; the other CAs' rows and answers are not."""
    certs = [issue(services, "device") for _ in range(4)]
    services.revoker.revoke("device", certs[1].serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    assert code == 0, doc

    s = [hexs(c) for c in certs]
    never = f"{0x7E57 << 100:040x}"
    an_hour_ago = services.clock() - dt.timedelta(hours=1)
    with services.db.scope() as session:
        session.execute(delete(Certificate).where(Certificate.serial.in_(s[:2])))
        for serial in s[:3]:
            _answer_of(session, serial).updated_at = an_hour_ago
        template = _answer_of(session, s[3])
        session.add(  # a serial never issued, stored a moment ago
            OcspResponse(
                issuer_id=template.issuer_id, serial=never, der=template.der,
                cert_status="good", status_epoch=0, this_update=template.this_update,
                next_update=template.next_update, updated_at=services.clock(),
            )
        )  # fmt: skip
    _without_foreign_keys(
        services, "UPDATE ocsp_responses SET issuer_id = 9999 WHERE serial = :s", s=s[2]
    )

    code, doc, _ = check("--grace", "0")
    assert code == 2
    assert {(f["ca"], f["serial"], f["kind"]) for f in doc["discrepancies"]} == {
        ("device", s[0], "ocsp-orphan"),
        ("device", s[1], "ocsp-orphan"),
        ("device", s[1], "crl-unknown-serial"),  # revoked, listed: reported as before
        ("device", never, "ocsp-orphan"),
        ("", s[2], "ocsp-orphan"),  # of no CA
        ("device", s[2], "ocsp-missing"),  # its certificate's answer is gone with it
    }, json.dumps(doc["discrepancies"], indent=1)
    by = {(f["serial"], f["kind"]): f["detail"] for f in doc["discrepancies"]}
    assert by[(s[1], "ocsp-orphan")].startswith("a stored revoked answer (written ")
    assert by[(never, "ocsp-orphan")].endswith("but no certificate has that serial")
    assert by[(s[2], "ocsp-orphan")].endswith("but no CA has its CA id 9999")
    assert doc["ocsp_answers"] >= 4

    # Within the grace period: the answer stored a moment ago is not reported (nor the missing
    # one); --ca looks at that CA's answers only.
    code, doc, _ = check()
    assert found(doc) == {
        (s[0], "ocsp-orphan"), (s[1], "ocsp-orphan"), (s[1], "crl-unknown-serial"),
        (s[2], "ocsp-orphan"),
    }, doc  # fmt: skip
    code, doc, _ = check("--grace", "0", "--ca", "device")
    assert (s[2], "ocsp-orphan") not in found(doc) and (never, "ocsp-orphan") in found(doc)
    code, doc, _ = check("--grace", "0", "--ca", "admin")
    assert code == 0, doc


def test_an_answer_that_outlives_its_signer_is_reported(
    services: Services, check: Check, settings: Settings, recording_backend: RecordingBackend
) -> None:
    """An answer still valid when the responder certificate that signed it has ended is
    rejected by relying parties from then on: reported. Not so the answers of a CA in its last
    days, valid beyond its end (and its responder's, clamped to it) as the refresher signs
    them: every certificate they answer for has ended by then."""
    from ocsp import core
    from ocsp.models import OcspResponder
    from ocsp.signers import ensure_responders
    from ocsp.store import resign_all
    from sekisho.services import build_services
    from tests.conftest import FakeClock

    certs = [issue(services, "device") for _ in range(2)]
    services.crls.publish("device", services.clock())
    code, doc, _ = check("--grace", "0")
    assert code == 0, doc

    # A responder of the device CA whose certificate ends in a day, issued as ocsp.signers
    # issues them (not active: the refresher does not sign with it).
    now = services.clock().replace(microsecond=0)
    device_ca = ca_cert(services, "device")
    ref = services.backend.generate("ocsp-device-short", KeyType.EC_P256)
    short = services.ca.issue(
        IssueRequest(
            ca="device",
            profile="ocsp-signer",
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Short Responder")]),
            public_key=services.backend.public_key(ref),
            validity=dt.timedelta(days=1),
            owner_kind="ocsp",
            owner_id="device",
        ),
        TEST_ACTOR,
    )
    issuer = core.Issuer.create(device_ca, services.backend.signing_key(ref), short)
    short_der = short.public_bytes(serialization.Encoding.DER)
    with services.db.scope() as session:
        row = session.scalars(select(Certificate).where(Certificate.serial == hexs(short))).one()
        session.add(
            OcspResponder(
                issuer_id=row.issuer_id, certificate_id=row.id, serial=hexs(short), key_ref=ref,
                key_type=KeyType.EC_P256.value, certificate_der=short_der,
                not_before=short.not_valid_before_utc, not_after=short.not_valid_after_utc,
                active=False, created_at=now,
            )
        )  # fmt: skip
        for cert, days in ((certs[0], 3), (certs[1], 0.5)):  # beyond its end, and within
            answer = _answer_of(session, hexs(cert))
            answer.this_update, answer.next_update = now, now + dt.timedelta(days=days, hours=8)
            answer.der = core.precompute(
                issuer, cert.serial_number, core.GOOD, answer.this_update, answer.next_update
            )
    code, doc, _ = check("--grace", "0")
    assert code == 2
    assert found(doc) == {(hexs(certs[0]), "ocsp-answer")}, doc
    (detail,) = [f["detail"] for f in doc["discrepancies"]]
    assert f"after its signer's certificate ends ({short.not_valid_after_utc.isoformat()})" in (
        detail
    )

    # Two days before the device CA ends: its new responder ends with it, its certificates
    # too; the answers the refresher signs (72 h) outlive both, and are not reported.
    end = device_ca.not_valid_after_utc
    clock = FakeClock(end - dt.timedelta(days=2))
    late = build_services(settings, backend=recording_backend, clock=clock)
    try:
        ensure_responders(late, clock(), rotate=True)
        last = issue(late, "device")
        assert last.not_valid_after_utc == end
        resign_all(late, clock())
        late.crls.publish("device", clock())
        with late.db.read_scope(snapshot=True) as session:
            answer = _answer_of(session, hexs(last))
            assert answer.next_update > end  # as the refresher signs them
            run = StoreCheck(session, clock(), ca_names=("device",), grace=dt.timedelta(0))
            assert list(run.findings()) == []
            assert run.totals.ocsp_answers >= 2
    finally:
        late.close()
