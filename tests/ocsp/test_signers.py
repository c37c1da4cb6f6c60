"""Delegated OCSP responders: provisioned at init, rotated with a third of their validity
left, journalled, linted and chained; the CA key signs when ``ocsp_sign_with_ca`` is set."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select, update

from audit.models import JournalRecord
from ca.models import Certificate, CertStatus
from ca.registry import ca_row
from ca.revocation import Reason
from ca.tbs import serial_hex
from hsm.base import KeyType
from ocsp import core, store
from ocsp.models import OcspResponder, OcspResponse
from ocsp.signers import _Ca, ensure_responders
from sekisho.errors import DuplicateKey, KeyBackendError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import ca_cert, issue
from tests.conftest import TEST_ACTOR, FakeClock, RecordingBackend
from tests.ocsp.test_store import request_der
from tests.support.checkers import openssl_verify, pkilint_cert, pkilint_chain


def responders(services: Services) -> list[OcspResponder]:
    with services.db.scope() as session:
        return list(session.scalars(select(OcspResponder).order_by(OcspResponder.id)))


def cert_status(services: Services, issuer_id: int, serial: str) -> CertStatus | None:
    with services.db.scope() as session:
        return session.scalar(
            select(Certificate.status).where(
                Certificate.issuer_id == issuer_id, Certificate.serial == serial
            )
        )


def journal(services: Services, action: str) -> list[JournalRecord]:
    with services.db.scope() as session:
        return list(session.scalars(select(JournalRecord).where(JournalRecord.action == action)))


def test_init_provisions_one_responder_per_issuing_ca(services: Services) -> None:
    rows = responders(services)
    assert sorted(r.issuer_id for r in rows) == sorted({r.issuer_id for r in rows})
    assert len(rows) == 2 and all(r.active for r in rows)
    root = ca_cert(services, "root")
    for row, ca in zip(rows, ("admin", "device"), strict=True):
        assert services.backend.has_key(row.key_ref)
        cert = x509.load_der_x509_certificate(row.certificate_der)
        issuer = ca_cert(services, ca)
        assert cert.issuer == issuer.subject
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.OCSP_SIGNING in eku
        cert.extensions.get_extension_for_oid(x509.oid.ExtensionOID.OCSP_NO_CHECK)
        pkilint_cert(row.certificate_der)
        pkilint_chain(issuer.public_bytes(_DER), row.certificate_der)
        openssl_verify(row.certificate_der, [_der(root), _der(issuer)])
    provisioned = journal(services, "ocsp.signer.provision")
    assert len(provisioned) == 2 and all(r.category == "ca" for r in provisioned)
    # load_issuers answers with the delegated responders
    issuers = store.load_issuers(services)
    assert set(issuers) == {r.issuer_id for r in rows}
    assert all(i.delegated for i in issuers.values())


def test_ensure_is_idempotent_then_rotates(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        before = responders(services)
        assert ensure_responders(services, clock()) == []
        clock.advance(days=15)  # half the 30 days: still fine
        assert ensure_responders(services, clock()) == []
        clock.advance(days=6)  # 9 days left < 10: rotate
        changes = ensure_responders(services, clock())
        assert sorted(c.ca for c in changes) == ["admin", "device"]
        assert {c.action for c in changes} == {"rotate"}
        after = responders(services)
        assert len(after) == 4
        old = {r.id: r for r in after if r.id in {b.id for b in before}}
        assert all(not r.active and r.deactivated_at == clock() for r in old.values())
        new = [r for r in after if r.active]
        assert len(new) == 2
        assert {r.key_ref for r in new}.isdisjoint({r.key_ref for r in before})
        rotated = journal(services, "ocsp.signer.rotate")
        assert len(rotated) == 2
        assert {r.object_serial for r in rotated} == {r.serial for r in new}
        issuers = store.load_issuers(services)
        serials = {i.responder_certificate.serial_number for i in issuers.values()}
        assert serials == {int(r.serial, 16) for r in new}
    finally:
        services.close()


def test_a_responder_is_rotated_before_answers_would_outlive_it(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Answers valid 240 h (the most allowed): a third of the responder's 30 days is exactly
    that, so an answer signed just before that rotation would end with its signer. The
    responder is rotated once less than the answers' validity and two hours remain; not every
    hour once it is cut to the CA's own end (its successor would be cut the same)."""
    long = dataclasses.replace(settings, ocsp_validity_hours=240.0)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(long, backend=recording_backend, clock=clock)
    try:
        (first, *_) = [r for r in responders(services) if r.active]
        clock.now = first.not_after - dt.timedelta(hours=243)
        assert ensure_responders(services, clock()) == []
        clock.advance(hours=1.5)  # 241.5 h left < 240 h + 2 h (a third: 240 h, not yet)
        changes = ensure_responders(services, clock())
        assert sorted((c.ca, c.action) for c in changes) == [
            ("admin", "rotate"),
            ("device", "rotate"),
        ]
        with services.db.scope() as session:
            ends = {name: ca_row(session, name).not_after for name in ("admin", "device")}
        clock.now = min(ends.values()) - dt.timedelta(days=9)  # responders end with the CAs
        cut = ensure_responders(services, clock())
        assert {c.ca: c.not_after for c in cut} == ends
        clock.advance(hours=1)  # 215 h left < 242 h, but a successor would end no later
        assert ensure_responders(services, clock()) == []
        clock.advance(days=6)  # less than a third of its 9 days left: rotated all the same
        assert len(ensure_responders(services, clock())) == 2
    finally:
        services.close()


def test_sign_with_ca_uses_the_ca_key(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    services = build_services(
        dataclasses.replace(settings, ocsp_sign_with_ca=True), backend=recording_backend
    )
    try:
        issuers = store.load_issuers(services)
        assert issuers and not any(i.delegated for i in issuers.values())
        for issuer in issuers.values():
            assert issuer.responder_certificate == issuer.certificate
    finally:
        services.close()


_DER = Encoding.DER


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(_DER)


def test_refresher_step_provisions_and_refreshes(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    from sekisho.workers import OcspRefresher

    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        step = OcspRefresher(services, batch=1000)
        clock.advance(days=21)  # responders due for rotation, every response past its refresh
        step.run_once(clock())
        assert len(journal(services, "ocsp.signer.rotate")) == 2
        rows, _ = store.snapshot(services.db)
        assert rows and all(r.this_update == clock().replace(microsecond=0) for r in rows)
        # The run is journalled once it is over (a tick with nothing due), as one entry.
        assert journal(services, "ocsp.refresh") == []
        clock.advance(seconds=1)
        assert step.run_once(clock()) == 0
        (run,) = journal(services, "ocsp.refresh")
        assert run.category == "ca" and f'"signed":{step.signed}' in run.detail
        clock.advance(seconds=1)
        step.run_once(clock())
        assert len(journal(services, "ocsp.refresh")) == 1  # nothing signed: nothing more
    finally:
        services.close()


def test_forced_rotation_replaces_every_responder(services: Services) -> None:
    before = {r.issuer_id: r.serial for r in responders(services) if r.active}
    changes = ensure_responders(services, services.clock(), rotate=True)
    assert sorted(c.action for c in changes) == ["rotate", "rotate"]
    after = {r.issuer_id: r.serial for r in responders(services) if r.active}
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    assert len(journal(services, "ocsp.signer.rotate")) == 2
    issuers = store.load_issuers(services)
    assert {i.responder_certificate.serial_number for i in issuers.values()} == {
        int(s, 16) for s in after.values()
    }


def test_refused_signers_fail_closed(
    services: Services, settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Who must not sign: a responder whose certificate is revoked, or is not an issued
    certificate of the store (status unknown). A CA signing for itself is found under its
    parent, so ``ocsp_sign_with_ca`` refuses nobody."""
    issuers = store.load_issuers(services)
    assert store.refused_signers(services.db, issuers) == {}
    admin = ca_cert(services, "admin")
    admin_id = next(i for i, x in issuers.items() if x.certificate == admin)

    # A responder certificate the CA key signed outside the issuance path: no row, unknown.
    with services.db.scope() as session:
        ca_key = services.backend.signing_key(ca_row(session, "admin").key_ref)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    stray = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stray Responder")]))
        .issuer_name(admin.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    unknown = {admin_id: core.Issuer.create(admin, key, stray)}
    assert "unknown" in store.refused_signers(services.db, unknown)[admin_id]

    services.revoker.revoke(
        "admin",
        issuers[admin_id].responder_certificate.serial_number,
        Reason.KEY_COMPROMISE,
        TEST_ACTOR,
    )
    assert store.refused_signers(services.db, issuers) == {admin_id: "its certificate is revoked"}

    with_ca = build_services(
        dataclasses.replace(settings, ocsp_sign_with_ca=True), backend=recording_backend
    )
    try:
        ca_signed = store.load_issuers(with_ca)
        assert ca_signed and store.refused_signers(with_ca.db, ca_signed) == {}
        # The CA's own key signs: its certificate revoked by its parent is the CA revoked,
        # withheld by design, said as such (and logged at INFO, not as a warning).
        with_ca.revoker.revoke("root", admin.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        assert store.refused_signers(with_ca.db, ca_signed) == {admin_id: store.CA_REVOKED}
    finally:
        with_ca.close()


def _signed_by(der: bytes) -> bytes:
    """The responder key hash (responderID byKey) of a stored answer."""
    return x509_ocsp.load_der_ocsp_response(der).responder_key_hash


def _stored_by_signer(services: Services, ca_id: int) -> dict[int, tuple[bytes, bytes]]:
    """serial -> (signer key hash, DER) of the CA's stored answers."""
    return {r.serial: (_signed_by(r.der), r.der) for r in store.snapshot(services.db, [ca_id])[0]}


def test_a_revoked_responder_is_replaced_at_once_and_its_answers_resigned(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Revoking the active responder's certificate replaces it before revoke() returns: a
    new key and certificate, journalled; from then on only the new one signs (the revoked
    certificate's own answer included). The answers the revoked one signed are re-signed by the
    refresher's next tick, all of them however small its batches, and once more a minute
    later (another process may have signed with it until its next issuer reload)."""
    from sekisho.workers import OcspRefresher

    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        issuers = store.load_issuers(services)
        admin = ca_cert(services, "admin")
        admin_id = next(i for i, x in issuers.items() if x.certificate == admin)
        device_id = next(i for i in issuers if i != admin_id)
        revoked = issuers[admin_id]
        for _ in range(5):
            issue(services, "admin-client")
        before = _stored_by_signer(services, admin_id)
        by_revoked = {s for s, (signer, _) in before.items() if signer == revoked.responder_key_id}
        assert len(by_revoked) >= 5
        device_before = _stored_by_signer(services, device_id)

        services.revoker.revoke(
            "admin",
            revoked.responder_certificate.serial_number,
            Reason.KEY_COMPROMISE,
            TEST_ACTOR,
        )
        # Replaced before revoke() returned, and journalled as a rotation.
        (row,) = [r for r in responders(services) if r.active and r.issuer_id == admin_id]
        successor = x509.load_der_x509_certificate(row.certificate_der)
        assert successor != revoked.responder_certificate
        new_id = core.responder_key_hash(successor)
        (rotated,) = journal(services, "ocsp.signer.rotate")
        assert rotated.object_serial == row.serial and '"previous_revoked":true' in rotated.detail
        assert services.ocsp.issuers()[admin_id].responder_certificate == successor
        now_stored = _stored_by_signer(services, admin_id)
        revoked_serial = revoked.responder_certificate.serial_number
        assert now_stored[revoked_serial][0] == new_id  # its own (revoked) status
        own = x509_ocsp.load_der_ocsp_response(now_stored[revoked_serial][1])
        assert own.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
        assert now_stored[successor.serial_number][0] == new_id
        fresh = issue(services, "admin-client").serial_number
        assert _stored_by_signer(services, admin_id)[fresh][0] == new_id
        left = {s for s, (signer, _) in now_stored.items() if signer == revoked.responder_key_id}
        assert left == by_revoked - {revoked_serial}  # the refresher's work

        step = OcspRefresher(services, batch=2)
        clock.advance(seconds=1)
        step.run_once(clock())  # one tick, batches of two: every one of them
        after = _stored_by_signer(services, admin_id)
        assert {s for s, (signer, _) in after.items() if signer != new_id} == set()
        assert step.signed >= len(left) and not step.hurry
        assert _stored_by_signer(services, device_id) == device_before  # another CA: untouched

        # Another process signed one more with the revoked responder before its reload.
        late = sorted(left)[0]
        with services.db.scope() as session:
            session.execute(
                update(OcspResponse)
                .where(OcspResponse.issuer_id == admin_id, OcspResponse.serial == serial_hex(late))
                .values(der=before[late][1])
            )
        clock.advance(seconds=30)
        step.run_once(clock())
        assert _stored_by_signer(services, admin_id)[late][0] == revoked.responder_key_id
        clock.advance(seconds=31)  # a minute after the revocation: looked for once more
        step.run_once(clock())
        assert _stored_by_signer(services, admin_id)[late][0] == new_id
        clock.advance(seconds=1)
        assert step.run_once(clock()) == 0  # swept: nothing more to look for
    finally:
        services.close()


def test_another_process_stops_signing_with_a_revoked_responder_at_once(
    services: Services,
) -> None:
    """Another process (a web app worker) holds its signers from a reload just made; the
    admin CA's responder is revoked here, its replacement not made yet. Within
    ``REFUSED_EVERY`` the other process signs no live answer with it, long before its next
    reload (``ISSUERS_TTL``); once the successor exists, that process signs with it within
    ``REFUSED_EVERY`` too. Before: the revoked responder signed until that reload, then its
    successor only from the reload after the replacement (tryLater meanwhile)."""
    from ca.revocation import Revoker
    from ocsp.signers import replace_revoked_responders

    other = store.OcspService(services.db, services.backend, services.settings, services.clock)
    admin_id, revoked = next(
        (i, x) for i, x in other.issuers().items() if x.certificate == ca_cert(services, "admin")
    )
    leaf = issue(services, "admin-client")
    nonce = request_der(revoked, [leaf.serial_number], nonce=b"\x02" * 16)
    assert _signed_by(other.answer(nonce, services.clock())) == revoked.responder_key_id
    bare = Revoker(services.db, services.journal, services.clock)  # no listeners
    bare.revoke(
        "admin", revoked.responder_certificate.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
    )
    time.sleep(store.REFUSED_EVERY + 0.1)
    assert other.answer(nonce, services.clock()) == core.TRY_LATER
    assert admin_id not in other.issuers()  # nothing pre-signed with it either

    replace_revoked_responders(services, services.clock(), ca_id=admin_id)  # as on_revocation
    (row,) = [r for r in responders(services) if r.active and r.issuer_id == admin_id]
    successor = x509.load_der_x509_certificate(row.certificate_der)
    time.sleep(store.REFUSED_EVERY + 0.1)
    answer = other.answer(nonce, services.clock())
    assert _signed_by(answer) == core.responder_key_hash(successor)
    assert other.issuers()[admin_id].responder_certificate == successor


def test_a_withheld_ca_asks_for_each_successor_once(services: Services) -> None:
    """``Signers.successor_waiting``: while a CA is withheld, a responder in the store other
    than the one held asks for a reload, once per responder (a successor whose key does not
    load is not reloaded every poll); the held one, or no CA withheld, asks nothing."""
    admin_id, held = next(
        (i, x)
        for i, x in store.load_issuers(services).items()
        if x.certificate == ca_cert(services, "admin")
    )
    held_der = held.responder_certificate.public_bytes(Encoding.DER)
    in_store = {"der": held_der}
    asked: list[list[int]] = []

    def chosen(ids: list[int]) -> dict[int, bytes]:
        asked.append(list(ids))
        return {admin_id: in_store["der"]}

    def down() -> tuple[dict[int, core.Issuer], dict[int, core.SignerDown]]:
        return {}, {admin_id: core.SignerDown(held.certificate, "CA admin: key away")}

    signers = store.Signers(
        down,
        lambda served: {i: "its certificate is revoked" for i in served},
        3600.0,
        logging.getLogger("test"),
        {admin_id: held},
        chosen,
    )
    assert not signers.successor_waiting() and asked == []  # none withheld: no query
    signers.reload(time.time())
    assert signers.served == {admin_id: held} and signers.signing == frozenset()
    assert not signers.successor_waiting()  # the store still names the one held
    in_store["der"] = b"successor"
    assert signers.successor_waiting()
    assert not signers.successor_waiting()  # asked for that one already
    in_store["der"] = b"another"
    assert signers.successor_waiting()
    assert asked == [[admin_id]] * 4
    assert not store.Signers(down, None, 3600.0, logging.getLogger("test")).successor_waiting()


def test_pre_signing_never_uses_a_revoked_responder(services: Services) -> None:
    """A revocation made by a process whose listener did not run (no replacement): once its
    issuers are reloaded, this process signs nothing with the revoked responder, neither
    answers at issuance nor live ones; the refresher's next tick replaces it, and the
    answers it did not sign are signed by the successor."""
    from ca.revocation import Revoker
    from sekisho.workers import OcspRefresher

    admin_id, revoked = next(
        (i, x)
        for i, x in store.load_issuers(services).items()
        if x.certificate == ca_cert(services, "admin")
    )
    bare = Revoker(services.db, services.journal, services.clock)  # no listeners
    bare.revoke("admin", revoked.responder_certificate.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.ocsp.invalidate_issuers()  # as its next reload, ten seconds on at most
    assert admin_id not in services.ocsp.issuers()
    calls = len(services.backend.calls)  # type: ignore[attr-defined]
    leaf = issue(services, "admin-client")
    assert leaf.serial_number not in _stored_by_signer(services, admin_id)  # not pre-signed
    nonce = request_der(revoked, [leaf.serial_number], nonce=b"\x01" * 16)
    assert services.ocsp.answer(nonce, services.clock()) == core.TRY_LATER
    signed_with = {ref for ref, _ in services.backend.calls[calls:]}  # type: ignore[attr-defined]
    responder_refs = {r.key_ref for r in responders(services) if r.issuer_id == admin_id}
    assert not signed_with & responder_refs  # the CA key signed the leaf; no responder signed

    OcspRefresher(services).run_once(services.clock())
    (row,) = [r for r in responders(services) if r.active and r.issuer_id == admin_id]
    new_id = core.responder_key_hash(x509.load_der_x509_certificate(row.certificate_der))
    stored_now = _stored_by_signer(services, admin_id)
    assert stored_now[leaf.serial_number][0] == new_id
    assert {signer for signer, _ in stored_now.values()} == {new_id}
    answer = services.ocsp.answer(nonce, services.clock())
    assert _signed_by(answer) == new_id


def test_no_live_answer_for_a_ca_revoked_by_its_parent(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """The root revokes the device CA (its key compromised, say) while the CA's delegated
    responder is not revoked: that responder signs nothing more for it, in this process and
    in another one within ``REFUSED_EVERY``; its answers are withheld (live ones tryLater)
    as documented. Before, the responder went on signing "good" for the revoked CA's
    certificates, live and pre-signed, as long as its own certificate was good."""
    other = store.OcspService(services.db, services.backend, services.settings, services.clock)
    device = ca_cert(services, "device")
    device_id, signer = next((i, x) for i, x in other.issuers().items() if x.certificate == device)
    assert signer.delegated
    leaf = issue(services, "device")
    nonce = request_der(signer, [leaf.serial_number], nonce=b"\x03" * 16)
    assert _signed_by(other.answer(nonce, services.clock())) == signer.responder_key_id

    def own_row(status: CertStatus) -> None:  # the root's row for the device CA, by hand
        with services.db.scope() as session:
            session.execute(
                update(Certificate)
                .where(Certificate.serial == serial_hex(device.serial_number))
                .values(status=status)
            )

    own_row(CertStatus.RESERVED)  # status unknown: fail closed, as for the CA key signing
    assert "status unknown" in store.refused_signers(services.db, other.issuers())[device_id]
    own_row(CertStatus.ISSUED)
    assert store.refused_signers(services.db, other.issuers()) == {}
    caplog.clear()
    caplog.set_level(logging.INFO, logger="sekisho.ocsp")
    services.revoker.revoke("root", device.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    assert store.refused_signers(services.db, store.load_issuers(services)) == {
        device_id: "the CA's own certificate is revoked (by the CA above it)"
    }
    time.sleep(store.REFUSED_EVERY + 0.1)
    assert other.answer(nonce, services.clock()) == core.TRY_LATER
    assert device_id not in other.issuers()  # nothing pre-signed for it either
    services.ocsp.invalidate_issuers()
    assert services.ocsp.answer(nonce, services.clock()) == core.TRY_LATER
    assert "revoked" in services.ocsp.withheld()[device_id].why
    # Withheld by design: said, but not as a warning in every process (each `issue`).
    said = [r for r in caplog.records if r.getMessage() == "OCSP signer of a CA unavailable"]
    assert said and all(r.levelno == logging.INFO for r in said), said
    admin_leaf = issue(services, "admin-client")  # the other CA is not held up
    admin = next(x for x in services.ocsp.issuers().values() if x.certificate != device)
    good = services.ocsp.answer(request_der(admin, [admin_leaf.serial_number]), services.clock())
    assert _signed_by(good) == admin.responder_key_id


def test_a_revoked_ca_holds_up_no_other_cas_answers(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """An issuing CA revoked by the root, whose responder is then revoked too, can have no
    successor responder (it issues nothing). The refresher skips it: the other CA's answers
    are still re-signed when due, and no refused issuance is journalled tick after tick.
    Before, its Conflict ended the whole OCSP step, for every CA, at every tick."""
    from sekisho.workers import OcspRefresher

    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        device_leaf = issue(services, "device")
        admin = ca_cert(services, "admin")
        services.revoker.revoke("root", admin.serial_number, Reason.CA_COMPROMISE, TEST_ACTOR)
        with services.db.scope() as session:
            admin_id = ca_row(session, "admin").id
        (old,) = [r for r in responders(services) if r.active and r.issuer_id == admin_id]
        responder = x509.load_der_x509_certificate(old.certificate_der)
        services.revoker.revoke("admin", responder.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        refusals = len(journal(services, "ca.issue"))
        step = OcspRefresher(services, batch=1000)
        clock.advance(days=21)  # every answer past its refresh point, responders due too
        for _ in range(3):
            step.run_once(clock())
            clock.advance(seconds=1)
        device_id = ca_id(services, "device")
        (answer,) = [
            r
            for r in store.snapshot(services.db)[0]
            if r.issuer_id == device_id and r.serial == device_leaf.serial_number
        ]
        assert answer.this_update >= clock() - dt.timedelta(seconds=3)  # re-signed
        assert len(journal(services, "ca.issue")) - refusals == 1  # the device's new responder
        # No successor for the revoked CA: its revoked responder stays the one (refused).
        assert [r.id for r in responders(services) if r.issuer_id == admin_id] == [old.id]
    finally:
        services.close()


def ca_id(services: Services, name: str) -> int:
    with services.db.scope() as session:
        return ca_row(session, name).id


class _AdminKeysAway(RecordingBackend):
    """The key backend refuses new keys for the admin CA's responders (a token slot away)."""

    def generate(self, label: str, key_type: KeyType) -> str:
        if label.startswith("ocsp-admin-"):
            raise KeyBackendError("the token holding the admin CA's keys is away")
        return super().generate(label, key_type)


def test_one_cas_responder_failing_leaves_the_others_rotated_and_refreshed(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    from sekisho.workers import OcspRefresher

    clock = FakeClock(dt.datetime.now(dt.UTC))
    backend = _AdminKeysAway(recording_backend.inner)
    services = build_services(settings, backend=backend, clock=clock)
    try:
        device_leaf = issue(services, "device")
        with pytest.raises(KeyBackendError):
            ensure_responders(services, clock(), rotate=True)
        (rotated,) = journal(services, "ocsp.signer.rotate")
        assert '"ca":"device"' in rotated.detail
        clock.advance(days=21)
        OcspRefresher(services, batch=1000).run_once(clock())  # logs, does not raise
        device_id = ca_id(services, "device")
        (answer,) = [
            r
            for r in store.snapshot(services.db)[0]
            if r.issuer_id == device_id and r.serial == device_leaf.serial_number
        ]
        assert answer.this_update == clock()
    finally:
        services.close()


def test_two_processes_replacing_one_responder_leave_one_active(services: Services) -> None:
    """The revoking process's listener and the refresher both saw the responder revoked and
    both made a successor: the second to commit finds it replaced, keeps its certificate
    inactive and revokes it; one successor is active (there were two)."""
    from ocsp.signers import _provision

    info = _device_ca(services)
    (old,) = [r for r in responders(services) if r.active and r.issuer_id == info.id]
    now = services.clock()
    first = _provision(services, info, old, now, TEST_ACTOR, revoked=True)
    second = _provision(services, info, old, now, TEST_ACTOR, revoked=True)  # read `old` too
    assert (first.action, second.action) == ("rotate", "discard")
    active = [r.serial for r in responders(services) if r.active and r.issuer_id == info.id]
    assert active == [first.serial]
    assert cert_status(services, info.id, second.serial) is CertStatus.REVOKED
    assert len(journal(services, "ocsp.signer.discard")) == 1


def _device_ca(services: Services) -> _Ca:
    with services.db.scope() as session:
        ca = ca_row(session, "device")
        return _Ca(
            ca.id, ca.name, ca.key_type, x509.load_der_x509_certificate(ca.certificate_der).subject
        )


def test_two_processes_provisioning_a_first_responder_leave_one_active(
    services: Services,
) -> None:
    """Two processes found no active responder for a CA (a new issuing CA while ``serve``
    runs, say) and both made one: no old row to compare, so the store's one-active-per-CA
    index decides. The second keeps its certificate inactive and revokes it."""
    from ocsp.signers import _provision

    info = _device_ca(services)
    with services.db.scope() as session:
        session.execute(
            update(OcspResponder)
            .where(OcspResponder.issuer_id == info.id)
            .values(active=False, deactivated_at=services.clock())
        )
    now = services.clock()
    first = _provision(services, info, None, now, TEST_ACTOR)
    second = _provision(services, info, None, now, TEST_ACTOR)  # saw none active either
    assert (first.action, second.action) == ("provision", "discard")
    active = [r.serial for r in responders(services) if r.active and r.issuer_id == info.id]
    assert active == [first.serial]
    assert cert_status(services, info.id, second.serial) is CertStatus.REVOKED
    (discard,) = journal(services, "ocsp.signer.discard")
    assert discard.object_serial == second.serial
    assert [r.object_serial for r in journal(services, "ocsp.signer.provision")][-1] == (
        first.serial
    )


def test_the_store_refuses_a_second_active_responder(services: Services) -> None:
    info = _device_ca(services)
    (current,) = [r for r in responders(services) if r.active and r.issuer_id == info.id]
    copy = {
        c.key: getattr(current, c.key) for c in OcspResponder.__table__.columns if c.key != "id"
    }
    with pytest.raises(DuplicateKey):
        with services.db.scope() as session:
            session.add(OcspResponder(**copy))
    with services.db.scope() as session:  # an inactive one is no trouble
        session.add(OcspResponder(**{**copy, "active": False}))
    assert len([r for r in responders(services) if r.issuer_id == info.id]) == 2


def test_signer_ending_says_whether_the_certificate_has_ended(services: Services) -> None:
    issuer = next(iter(store.load_issuers(services).values()))
    cert = issuer.responder_certificate
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    when = cert.not_valid_after_utc.isoformat()
    assert store.signer_ending(issuer, start - 1, 10) == "its certificate is not valid yet"
    assert store.signer_ending(issuer, start, 10) is None
    # ends before the next reload (10 s) plus a minute: no longer used, not expired yet
    soon = end - 10 - store.EXPIRY_MARGIN
    assert store.signer_ending(issuer, soon, 10) == f"its certificate expires at {when}"
    assert store.signer_ending(issuer, soon - 1, 10) is None
    assert store.signer_ending(issuer, end, 10) == f"its certificate expired at {when}"


def test_a_revoked_ca_is_said_at_info_only_when_nothing_else_fails() -> None:
    """The CA revoked by its parent is withheld by design (INFO); with a signer that also did
    not load, the line names a key failure too: a warning."""
    assert store._trouble_level(f"responder: {store.CA_REVOKED}") == logging.INFO
    combined = f"the key is not on the token; the last good responder: {store.CA_REVOKED}"
    assert store._trouble_level(combined) == logging.WARNING
    assert store._trouble_level("responder: its certificate is revoked") == logging.WARNING
