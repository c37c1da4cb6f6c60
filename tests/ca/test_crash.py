"""Crash consistency: the store fails after the signature (a real fault injected in the
database), so the certificate must not be handed out, and the reserved serial must stay
revocable and reach the CRL. A signing failure marks the reserved row failed."""

from __future__ import annotations

import pytest
from cryptography import x509
from sqlalchemy import select, text

from ca.models import Certificate, CertStatus, CrlKind
from ca.registry import ca_row
from ca.revocation import Reason
from ca.tbs import serial_hex
from sekisho.errors import KeyBackendError, SekishoError, StoreError
from sekisho.services import Services
from tests.ca.helpers import ca_cert, ca_key_ref, der, issue, request_for
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support import checkers

SQLITE_FAULT = """
CREATE TRIGGER fail_issue BEFORE UPDATE OF status ON certificates
WHEN NEW.status = 'issued'
BEGIN SELECT RAISE(ABORT, 'injected store fault'); END
"""
PG_FAULT = [
    """
    CREATE FUNCTION fail_issue() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'injected store fault'; END $$
    """,
    """
    CREATE TRIGGER fail_issue BEFORE UPDATE OF status ON certificates
    FOR EACH ROW WHEN (NEW.status = 'issued') EXECUTE FUNCTION fail_issue()
    """,
]


def _inject(services: Services) -> None:
    statements = [SQLITE_FAULT] if services.db.engine.dialect.name == "sqlite" else PG_FAULT
    with services.db.engine.begin() as conn:
        for stmt in statements:
            conn.execute(text(stmt))


def _heal(services: Services) -> None:
    with services.db.engine.begin() as conn:
        conn.execute(
            text("DROP TRIGGER fail_issue" + ("" if _is_sqlite(services) else " ON certificates"))
        )
        if not _is_sqlite(services):
            conn.execute(text("DROP FUNCTION fail_issue()"))


def _is_sqlite(services: Services) -> bool:
    return services.db.engine.dialect.name == "sqlite"


def _rows(services: Services, status: CertStatus) -> list[Certificate]:
    with services.db.scope() as session:
        return list(session.scalars(select(Certificate).where(Certificate.status == status)))


def test_store_fails_after_signing(services: Services, recording_backend: RecordingBackend) -> None:
    issued_before = len(_rows(services, CertStatus.ISSUED))
    _inject(services)
    ca_key = ca_key_ref(services, "admin")
    signed_before = [data for ref, data in recording_backend.calls if ref == ca_key]
    with pytest.raises(StoreError) as info:
        issue(services, "admin-client")
    assert "Traceback" not in info.value.message
    # The certificate was signed by the CA (the fault is after the signature) ...
    signed = [data for ref, data in recording_backend.calls if ref == ca_key]
    assert len(signed) == len(signed_before) + 1
    tbs_signed = signed[-1]
    # ... but only the intent row exists: reserved, with the hash of exactly what was signed.
    reserved = _rows(services, CertStatus.RESERVED)
    assert len(reserved) == 1
    row = reserved[0]
    assert row.der is None and row.fingerprint_sha256 is None
    import hashlib

    assert row.tbs_sha256 == hashlib.sha256(tbs_signed).hexdigest()
    assert len(_rows(services, CertStatus.ISSUED)) == issued_before

    # The store recovers; the reserved serial is revocable and lands on the CRL.
    _heal(services)
    serial = int(row.serial, 16)
    services.revoker.revoke("admin", serial, Reason.KEY_COMPROMISE, TEST_ACTOR)
    crl_row = services.crls.generate("admin", services.clock())
    assert crl_row.kind is CrlKind.FULL
    crl = x509.load_der_x509_crl(crl_row.der)
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    checkers.pkilint_crl(crl_row.der)
    checkers.openssl_crl_verify(crl_row.der, der(ca_cert(services, "admin")))

    # And issuance works again without a restart.
    cert = issue(services, "admin-client")
    assert serial_hex(cert.serial_number) in {r.serial for r in _rows(services, CertStatus.ISSUED)}


def test_signing_failure_marks_row_failed(
    services: Services, recording_backend: RecordingBackend
) -> None:
    from hsm.observed import observed

    real_signing_key = recording_backend.signing_key

    def failing_signing_key(ref: str):  # type: ignore[no-untyped-def]
        key = real_signing_key(ref)

        def boom(_data: bytes) -> None:
            raise OSError("device removed")

        # The outer observer runs after the issuance hook (which wraps it): intent is
        # committed, then the "device" fails before a signature exists.
        return observed(key, boom)

    base = services.crls.generate("admin", services.clock())
    with services.db.scope() as session:
        epoch_before = ca_row(session, "admin").revocation_epoch
    recording_backend.signing_key = failing_signing_key  # type: ignore[method-assign]
    try:
        with pytest.raises(SekishoError) as info:
            issue(services, "admin-client")
        assert isinstance(info.value, KeyBackendError)
        assert "OSError" in info.value.message or "signing failed" in info.value.message
    finally:
        del recording_backend.signing_key  # type: ignore[method-assign]
    failed = _rows(services, CertStatus.FAILED)
    assert len(failed) == 1 and failed[0].der is None and failed[0].failure
    assert _rows(services, CertStatus.RESERVED) == []
    # A status change like a revocation: the CA's epoch one up, the row's set to it (an OCSP
    # answer stored for the reserved row is then behind; ocsp serve finds the change).
    with services.db.scope() as session:
        ca_epoch = ca_row(session, "admin").revocation_epoch
    assert failed[0].status_epoch == ca_epoch > epoch_before
    # ... but a serial never signed is on no CRL: the delta against a base CRL from before
    # the failure lists nothing (it used to list the serial as removeFromCRL).
    delta = services.crls.generate("admin", services.clock(), delta=True)
    assert list(x509.load_der_x509_crl(delta.der)) == []
    assert delta.base_number == base.number
    # A failed serial was never signed: nothing to revoke.
    from sekisho.errors import Conflict

    with pytest.raises(Conflict):
        services.revoker.revoke(
            "admin", int(failed[0].serial, 16), Reason.KEY_COMPROMISE, TEST_ACTOR
        )
    # Recovery without restart.
    cert = services.ca.issue(request_for("admin-client"), TEST_ACTOR)
    assert cert.serial_number > 0


def test_revoked_while_signing_is_not_handed_out(services: Services) -> None:
    """If the reserved row is revoked between intent and store, the issued row is never
    written and the caller gets an error rather than a revoked certificate."""
    from sekisho.errors import Conflict

    request = request_for("admin-client")
    original = services.ca._store_issued

    def revoke_first(row_id: int, tbs, cert, actor, extras=()):  # type: ignore[no-untyped-def]
        services.revoker.revoke("admin", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        return original(row_id, tbs, cert, actor, extras)

    services.ca._store_issued = revoke_first  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        services.ca.issue(request, TEST_ACTOR)
    revoked = _rows(services, CertStatus.REVOKED)
    assert len(revoked) == 1 and revoked[0].der is None


SQLITE_ENDS_TRANSACTION = """
CREATE TRIGGER drop_tx BEFORE INSERT ON ocsp_responses
BEGIN SELECT RAISE(ROLLBACK, 'injected: the database ends the transaction'); END
"""


def test_side_work_that_ends_the_transaction_fails_the_issuance(services: Services) -> None:
    """The pre-signed OCSP answer is written in the certificate's transaction. When the
    database ends the whole transaction there (SQLite does on SQLITE_FULL or an I/O error;
    RAISE(ROLLBACK) here), the issued row and its journal entry are gone too: the certificate
    must not be handed out, and the serial stays reserved. (A plain statement failure, on
    both stores: tests/ocsp/test_store.py.)"""
    if not _is_sqlite(services):
        pytest.skip("RAISE(ROLLBACK) is SQLite's; PostgreSQL: tests/ocsp/test_store.py")
    issued_before = len(_rows(services, CertStatus.ISSUED))
    with services.db.engine.begin() as conn:
        conn.execute(text(SQLITE_ENDS_TRANSACTION))
    with pytest.raises(StoreError) as info:
        issue(services, "admin-client")
    assert "Traceback" not in info.value.message
    reserved = _rows(services, CertStatus.RESERVED)
    assert len(reserved) == 1 and reserved[0].der is None
    assert len(_rows(services, CertStatus.ISSUED)) == issued_before
    with services.db.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER drop_tx"))
    cert = issue(services, "admin-client")  # and issuance works again
    assert serial_hex(cert.serial_number) in {r.serial for r in _rows(services, CertStatus.ISSUED)}
