"""Compromised keys (BR 6.1.1.3, 4.9.1.1): a key whose certificate is revoked for
keyCompromise, or that is reported with ``Revoker.block_key``, is never certified again, and
every certificate that carries it, under any CA, is revoked for keyCompromise at once."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, insert, select, update

from audit.models import JournalRecord
from ca.issuance import BLOCKED_KEY, IssueRequest
from ca.models import BlockedKey, Certificate, CertStatus
from ca.revocation import Reason
from ca.tbs import serial_hex, spki_sha256
from sekisho.errors import Conflict, PolicyViolation
from sekisho.services import Services
from sekisho.workers import CrlRefresher
from tests.audit.test_tamper import verify_api
from tests.ca.helpers import ca_cert, der, request_for
from tests.ca.test_bad_input import _assert_refused
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support import checkers


def _with_key(request: IssueRequest, key: ec.EllipticCurvePrivateKey) -> IssueRequest:
    return dataclasses.replace(request, public_key=key.public_key())


def _row(services: Services, cert: x509.Certificate) -> Certificate:
    with services.db.scope() as session:
        row = session.scalar(
            select(Certificate).where(Certificate.serial == serial_hex(cert.serial_number))
        )
        assert row is not None
        session.expunge(row)
        return row


def _journal(services: Services, action: str) -> list[dict[str, object]]:
    with services.db.scope() as session:
        rows = session.scalars(
            select(JournalRecord).where(JournalRecord.action == action).order_by(JournalRecord.seq)
        ).all()
        return [{"serial": r.object_serial, **json.loads(r.detail)} for r in rows]


def test_revoking_for_key_compromise_blocks_the_key_and_revokes_its_other_certificates(
    services: Services,
) -> None:
    """One key certified twice by the admin CA and once by the device CA (a device and its
    admin share nothing in practice; a key reused by mistake does). Revoking one certificate
    for keyCompromise revokes the other two in the same transaction, with reason
    keyCompromise and their own journal entries; the CRLs of both CAs list them (openssl and
    gnutls see them revoked); a fourth issuance for that key is refused before any signature
    with the rule's name and a rejection entry. Other keys issue as before."""
    key = ec.generate_private_key(ec.SECP256R1())
    first = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    second = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    device = services.ca.issue(_with_key(request_for("device"), key), TEST_ACTOR)
    held = services.ca.issue(_with_key(request_for("device"), key), TEST_ACTOR)
    services.revoker.revoke("device", held.serial_number, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
    bystander = services.ca.issue(request_for("admin-client"), TEST_ACTOR)
    assert _row(services, first).spki_sha256 == spki_sha256(key.public_key())

    services.revoker.revoke("admin", first.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)

    for cert in (first, second, device, held):
        row = _row(services, cert)
        assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "key_compromise")
    assert _row(services, bystander).status is CertStatus.ISSUED
    revocations = {r["serial"]: r for r in _journal(services, "ca.revoke")}
    for cert in (second, device, held):
        entry = revocations[serial_hex(cert.serial_number)]
        assert entry["reason"] == "key_compromise"
        assert (
            entry["cause"]
            == f"the same key as admin {serial_hex(first.serial_number)}, compromised"
        )
    assert revocations[serial_hex(held.serial_number)]["previous_reason"] == "certificate_hold"
    (blocked,) = _journal(services, "ca.key.block")
    assert blocked["spki_sha256"] == spki_sha256(key.public_key())
    assert blocked["serial"] == serial_hex(first.serial_number)
    assert verify_api(services) > 0  # the chain holds: no AuditChainBroken

    now = services.clock()
    chain = {
        ca: [der(ca_cert(services, "root")), der(ca_cert(services, ca))]
        for ca in ("admin", "device")
    }
    crls = {ca: services.crls.generate(ca, now).der for ca in ("admin", "device")}
    for ca, cert in (("admin", second), ("device", device)):
        crl = x509.load_der_x509_crl(crls[ca])
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
            x509.ReasonFlags.key_compromise
        )
        checkers.pkilint_crl(crls[ca])
        root_crl = services.crls.generate("root", now).der
        checkers.openssl_verify_revoked(der(cert), chain[ca], [root_crl, crls[ca]])
        assert checkers.gnutls_verify(der(cert), chain[ca], crl_ders=[crls[ca]]) == "revoked"

    backend = services.backend
    assert isinstance(backend, RecordingBackend)
    signatures = len(backend.signatures_but_checkpoints())
    exc = _assert_refused(
        services,
        lambda: services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR),
        PolicyViolation,
        BLOCKED_KEY,
    )
    assert "compromised" in exc.message
    assert len(backend.signatures_but_checkpoints()) == signatures, "the CA key signed"
    services.ca.issue(request_for("admin-client"), TEST_ACTOR)  # other keys: as before


def test_a_reported_key_is_blocked_and_its_certificates_revoked(services: Services) -> None:
    """``block_key`` (``sekisho key block``): a key reported compromised, no certificate of
    ours revoked first. Its certificates are revoked for keyCompromise, each journalled, the
    block is journalled with the comment; blocking it again adds nothing; a CSR with the key
    is refused."""
    from tests.ca.helpers import make_csr, name

    key = ec.generate_private_key(ec.SECP256R1())
    cert = services.ca.issue(_with_key(request_for("device"), key), TEST_ACTOR)
    blocked, revoked = services.revoker.block_key(key.public_key(), TEST_ACTOR, "ticket 42")
    assert blocked and revoked == [("device", serial_hex(cert.serial_number))]
    assert _row(services, cert).revocation_reason == "key_compromise"
    (entry,) = _journal(services, "ca.key.block")
    assert entry["comment"] == "ticket 42" and entry["serial"] is None
    assert services.revoker.block_key(key.public_key(), TEST_ACTOR) == (False, [])
    assert len(_journal(services, "ca.key.block")) == 1
    with services.db.scope() as session:
        assert session.scalar(select(func.count()).select_from(BlockedKey)) == 1
    csr = make_csr(
        name(O="Tenant One", UID="eve", CN="Eve"), [x509.RFC822Name("e@tenant1.example.com")], key
    )
    _assert_refused(
        services,
        lambda: services.ca.issue_from_csr(
            csr, ca="admin", profile="admin-client", actor=TEST_ACTOR
        ),
        PolicyViolation,
        BLOCKED_KEY,
    )


def test_the_sweep_revokes_what_an_issuance_racing_the_block_left(services: Services) -> None:
    """An issuance that wrote its intent after a concurrent block had looked for the key's
    certificates (PostgreSQL runs the two side by side) leaves an unrevoked certificate of a
    blocked key. Made here by writing the block row alone; the refresher's sweep revokes it
    (keyCompromise, journalled by the sweep's actor), and a second sweep finds nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    other = services.ca.issue(request_for("admin-client"), TEST_ACTOR)
    with services.db.scope() as session:
        session.execute(
            insert(BlockedKey).values(
                spki_sha256=spki_sha256(key.public_key()), blocked_at=services.clock()
            )
        )
    refresher = CrlRefresher(services, tick=0.05)  # what `serve` runs: the sweep is a step
    refresher.start()
    try:
        deadline = time.monotonic() + 10
        while _row(services, cert).status is not CertStatus.REVOKED:
            assert time.monotonic() < deadline, "the refresher did not sweep within 10 s"
            time.sleep(0.05)
    finally:
        refresher.stop()
    row = _row(services, cert)
    assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "key_compromise")
    assert _row(services, other).status is CertStatus.ISSUED
    (entry,) = [e for e in _journal(services, "ca.revoke") if e["serial"] == row.serial]
    assert entry["cause"] == "its key is blocked"
    assert services.revoker.revoke_blocked(services.clock()) == 0


def test_a_reserved_row_of_a_compromised_key_is_revoked_too(services: Services) -> None:
    """A reserved row (intent committed, the signature may exist) carries its key's hash from
    the intent on: it is revoked with the others, never left "good"."""
    key = ec.generate_private_key(ec.SECP256R1())
    first = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    second = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    with services.db.scope() as session:  # as a crash between signing and storing leaves it
        session.execute(
            update(Certificate)
            .where(Certificate.serial == serial_hex(second.serial_number))
            .values(status=CertStatus.RESERVED, der=None, fingerprint_sha256=None)
        )
    services.revoker.revoke("admin", first.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    row = _row(services, second)
    assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "key_compromise")


@pytest.mark.parametrize("reason", [Reason.SUPERSEDED, Reason.CERTIFICATE_HOLD])
def test_other_reasons_block_nothing(services: Services, reason: Reason) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    second = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    services.revoker.revoke("admin", first.serial_number, reason, TEST_ACTOR)
    assert _row(services, second).status is CertStatus.ISSUED
    services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
    assert _journal(services, "ca.key.block") == []


def test_concurrent_revocations_of_one_compromised_key_never_deadlock(
    services: Services,
) -> None:
    """Two certificates of one key under two CAs, each revoked at once from its own thread,
    once both for keyCompromise and once one of them for superseded. A keyCompromise
    revocation locks every certificate of the key, then the CAs, then the journal: the order
    every writer follows. Before: it held its CA and the journal head while locking the
    other certificate, so on PostgreSQL the two deadlocked (AuditError, DeadlockDetected)
    and one of them, maybe the keyCompromise one, was lost. Now one succeeds and the other
    succeeds or is a Conflict (already revoked), and both end revoked for keyCompromise."""
    # Run against the code before the fix, the PostgreSQL rounds failed with DeadlockDetected.
    for round_, other_reason in enumerate([Reason.KEY_COMPROMISE, Reason.SUPERSEDED] * 3):
        key = ec.generate_private_key(ec.SECP256R1())
        admin = services.ca.issue(_with_key(request_for("admin-client"), key), TEST_ACTOR)
        device = services.ca.issue(_with_key(request_for("device"), key), TEST_ACTOR)
        start = threading.Barrier(2)
        outcomes: dict[str, object] = {}
        threads = [
            threading.Thread(
                target=_revoke_at_once,
                args=(services, start, outcomes, "admin", admin, Reason.KEY_COMPROMISE),
            ),
            threading.Thread(
                target=_revoke_at_once,
                args=(services, start, outcomes, "device", device, other_reason),
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), f"round {round_}: stalled"
        if other_reason is Reason.KEY_COMPROMISE:  # the first revokes both; the second: 75
            assert sorted(map(str, outcomes.values())) == ["conflict", "ok"], (round_, outcomes)
        else:  # superseded first, then keyCompromise over it; or keyCompromise, then 75
            assert outcomes["admin"] == "ok", (round_, outcomes)
            assert outcomes["device"] in ("ok", "conflict"), (round_, outcomes)
        for cert in (admin, device):
            row = _row(services, cert)
            assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "key_compromise")
    assert verify_api(services) > 0


def _revoke_at_once(
    services: Services,
    start: threading.Barrier,
    outcomes: dict[str, object],
    ca: str,
    cert: x509.Certificate,
    reason: Reason,
) -> None:
    start.wait(timeout=10)
    try:
        services.revoker.revoke(ca, cert.serial_number, reason, TEST_ACTOR)
        outcomes[ca] = "ok"
    except Conflict:
        outcomes[ca] = "conflict"
    except Exception as exc:  # the failure under test: kept for the assertion
        outcomes[ca] = exc
