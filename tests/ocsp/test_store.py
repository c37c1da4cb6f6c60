"""The pre-signed OCSP store and the responder service, on SQLite and PostgreSQL: responses
signed at issuance, re-signed before revoke()/release() return, refreshed when due, served
byte for byte, nonce requests signed fresh, and served from memory while the database is down.
Every response is checked by pkilint and by ``openssl ocsp``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from audit.models import JournalRecord
from ca import der as w
from ca.models import Certificate, CertStatus
from ca.registry import ca_row
from ca.revocation import Reason
from ocsp import core, store
from sekisho.db import make_engine
from sekisho.errors import KeyBackendError, StoreError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import ca_cert, issue
from tests.conftest import TEST_ACTOR, FakeClock, RecordingBackend
from tests.support.checkers import pkilint_ocsp_response


# -- helpers (also used by test_http) ---------------------------------------------------------
def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def issuer_for(services: Services, ca: str = "admin") -> tuple[int, core.Issuer]:
    with services.db.scope() as session:
        ca_id = ca_row(session, ca).id
    return ca_id, services.ocsp.issuers()[ca_id]


def request_der(
    issuer: core.Issuer,
    serials: list[int],
    *,
    nonce: bytes | None = None,
    hash_algorithm: str = "sha1",
) -> bytes:
    singles = [w.sequence(issuer.cert_id(s, hash_algorithm).der) for s in serials]
    parts = [w.sequence(*singles)]
    if nonce is not None:
        ext = w.extension(core.OID_NONCE, w.octet_string(nonce))
        parts.append(w.explicit(2, w.sequence(ext)))
    return w.sequence(w.sequence(*parts))


def _count(services: Services, *where: object) -> int:
    from sqlalchemy import func

    with services.db.scope() as session:
        return int(session.scalar(select(func.count()).select_from(Certificate).where(*where)))  # type: ignore[arg-type]


def stored(services: Services, ca_id: int, serial: int) -> store.StoredResponse:
    found = store.stored_response(services.db, ca_id, serial)
    assert found is not None, f"no stored response for {serial:x}"
    return found


def openssl_status(
    tmp: Path, services: Services, resp: bytes, leaf: x509.Certificate, ca: str = "admin"
) -> str:
    """``openssl ocsp -respin`` with the chain: verifies the signature and the responder and
    prints the status of ``leaf``. Returns openssl's output."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "resp.der").write_bytes(resp)
    (tmp / "root.pem").write_bytes(ca_cert(services, "root").public_bytes(Encoding.PEM))
    (tmp / "ca.pem").write_bytes(ca_cert(services, ca).public_bytes(Encoding.PEM))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    res = subprocess.run(
        [
            "openssl", "ocsp", "-respin", str(tmp / "resp.der"), "-issuer", str(tmp / "ca.pem"),
            "-CAfile", str(tmp / "root.pem"), "-verify_other", str(tmp / "ca.pem"),
            "-cert", str(tmp / "leaf.pem"), "-no_nonce",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Response verify OK" in out, out
    return out


def single(resp: bytes) -> x509_ocsp.OCSPResponse:
    parsed = x509_ocsp.load_der_ocsp_response(resp)
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    return parsed


# -- tests ------------------------------------------------------------------------------------
def test_issuance_presigns_a_good_response(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    row = stored(services, ca_id, leaf.serial_number)
    assert row.next_update - row.this_update == dt.timedelta(hours=72)
    pkilint_ocsp_response(row.der)
    out = openssl_status(tmp_path, services, row.der, leaf)
    assert ": good" in out
    assert issuer.delegated
    # no nonce, one SHA-1 CertID: the stored bytes, exactly
    assert services.ocsp.answer(request_der(issuer, [leaf.serial_number]), services.clock()) == (
        row.der
    )


def test_revocation_visible_when_revoke_returns(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    before = stored(services, ca_id, leaf.serial_number)
    services.revoker.revoke("admin", leaf.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    after = stored(services, ca_id, leaf.serial_number)
    assert after.der != before.der
    resp = services.ocsp.answer(request_der(issuer, [leaf.serial_number]), services.clock())
    assert resp == after.der
    pkilint_ocsp_response(resp)
    out = openssl_status(tmp_path, services, resp, leaf)
    assert ": revoked" in out and "Reason: keyCompromise" in out
    parsed = single(resp)
    assert parsed.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_reason is x509.ReasonFlags.key_compromise


def test_hold_and_release(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    _, issuer = issuer_for(services)
    req = request_der(issuer, [leaf.serial_number])
    services.revoker.revoke("admin", leaf.serial_number, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
    out = openssl_status(tmp_path, services, services.ocsp.answer(req, services.clock()), leaf)
    assert ": revoked" in out and "Reason: certificateHold" in out
    services.revoker.release("admin", leaf.serial_number, TEST_ACTOR)
    resp = services.ocsp.answer(req, services.clock())
    pkilint_ocsp_response(resp)
    assert ": good" in openssl_status(tmp_path, services, resp, leaf)


def test_unknown_serial_and_live_paths(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    now = services.clock()
    never = secrets.randbits(150) | 1
    resp = services.ocsp.answer(request_der(issuer, [never]), now)
    assert single(resp).certificate_status is x509_ocsp.OCSPCertStatus.UNKNOWN
    pkilint_ocsp_response(resp)
    # SHA-256 CertID: signed live, still good
    resp = services.ocsp.answer(
        request_der(issuer, [leaf.serial_number], hash_algorithm="sha256"), now
    )
    assert single(resp).certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert resp != stored(services, ca_id, leaf.serial_number).der
    # several CertIDs: answered in order
    resp = services.ocsp.answer(request_der(issuer, [leaf.serial_number, never]), now)
    statuses = [r.certificate_status for r in single(resp).responses]
    assert statuses == [x509_ocsp.OCSPCertStatus.GOOD, x509_ocsp.OCSPCertStatus.UNKNOWN]
    # another CA's serial under this issuer: unknown, never good
    other = issue(services, "device")
    resp = services.ocsp.answer(request_der(issuer, [other.serial_number]), now)
    assert single(resp).certificate_status is x509_ocsp.OCSPCertStatus.UNKNOWN
    assert services.ocsp.answer(b"\x30\x00", now) == core.MALFORMED_REQUEST


def test_nonce_signed_fresh_and_echoed(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    nonce = secrets.token_bytes(32)
    resp = services.ocsp.answer(
        request_der(issuer, [leaf.serial_number], nonce=nonce), services.clock()
    )
    assert resp != stored(services, ca_id, leaf.serial_number).der
    parsed = single(resp)
    ext = parsed.extensions.get_extension_for_class(x509.OCSPNonce).value
    assert ext.nonce == nonce
    pkilint_ocsp_response(resp)
    assert ": good" in openssl_status(tmp_path, services, resp, leaf)


def test_refresh_when_due(settings: Settings, recording_backend: RecordingBackend) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        leaf = issue(services, "admin-client")
        ca_id, _ = issuer_for(services)
        first = stored(services, ca_id, leaf.serial_number)
        clock.advance(hours=35)
        store.refresh_due(services, clock(), 1000)
        assert stored(services, ca_id, leaf.serial_number).der == first.der  # not yet due
        clock.advance(hours=2)  # past half of 72 h
        assert store.refresh_due(services, clock(), 1000) >= 1
        second = stored(services, ca_id, leaf.serial_number)
        assert second.this_update == clock().replace(microsecond=0)
        assert second.updated_at > first.updated_at
        pkilint_ocsp_response(second.der)
        # changes_since sees it (and, with the overlap, what was written just before)
        _, base = store.snapshot(services.db)
        since = dataclasses.replace(base, updated_at=first.updated_at + dt.timedelta(hours=1))
        changed, cursor = store.changes_since(services.db, since)
        assert any(r.serial == leaf.serial_number for r in changed)
        assert cursor.updated_at >= second.updated_at
        later = dataclasses.replace(cursor, updated_at=cursor.updated_at + dt.timedelta(seconds=10))
        assert store.changes_since(services.db, later)[0] == []
    finally:
        services.close()


def test_a_revocation_re_signs_what_it_changed_and_nothing_older(services: Services) -> None:
    """The listener looks at the certificates of the revocation's own epoch or later (an
    index range), not at every revoked certificate of the CA: a status an earlier change left
    unsigned (its listener did not run) stays for the refresher's repair, and a release or a
    later revocation is re-signed at once."""
    older, held, later = (issue(services, "admin-client") for _ in range(3))
    ca_id, _ = issuer_for(services)
    listeners = list(services.revoker.listeners)
    services.revoker.listeners.clear()  # a process whose listener did not run
    services.revoker.revoke("admin", older.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.revoker.listeners.extend(listeners)

    def status(cert: x509.Certificate) -> x509_ocsp.OCSPCertStatus:
        response = single(stored(services, ca_id, cert.serial_number).der)
        return response.certificate_status

    services.revoker.revoke("admin", held.serial_number, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
    services.revoker.revoke("admin", later.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    assert status(held) is x509_ocsp.OCSPCertStatus.REVOKED
    assert status(later) is x509_ocsp.OCSPCertStatus.REVOKED
    assert status(older) is x509_ocsp.OCSPCertStatus.GOOD  # not this change's
    services.revoker.release("admin", held.serial_number, TEST_ACTOR)
    assert status(held) is x509_ocsp.OCSPCertStatus.GOOD
    assert store.refresh_due(services, services.clock(), 100) >= 1
    assert status(older) is x509_ocsp.OCSPCertStatus.REVOKED


def test_repair_looks_at_changed_statuses_each_tick_and_at_everything_now_and_then(
    services: Services,
) -> None:
    """Once every certificate has been looked at, the repair looks only at the statuses
    changed since (by revocation epoch, CA by CA): a revocation whose listener did not run is
    re-signed at the next tick. A certificate with no stored answer (its issuance hook
    failed) is answered live meanwhile, and stored at the next look at everything,
    FULL_REPAIR_EVERY later."""
    from ocsp.models import OcspResponse

    now = services.clock()
    revoked, unsigned = issue(services, "admin-client"), issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    store.refresh_due(services, now, 100)  # the first look: every certificate
    with services.db.scope() as session:
        session.execute(
            delete(OcspResponse).where(
                OcspResponse.issuer_id == ca_id,
                OcspResponse.serial == f"{unsigned.serial_number:040x}",
            )
        )
    listeners = list(services.revoker.listeners)
    services.revoker.listeners.clear()  # a process whose listener did not run
    services.revoker.revoke("admin", revoked.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.revoker.listeners.extend(listeners)

    def stored_serials() -> set[int]:
        return {r.serial for r in store.snapshot(services.db)[0] if r.issuer_id == ca_id}

    assert store.refresh_due(services, now + dt.timedelta(seconds=1), 100) == 1
    assert single(stored(services, ca_id, revoked.serial_number).der).certificate_status is (
        x509_ocsp.OCSPCertStatus.REVOKED
    )
    assert unsigned.serial_number not in stored_serials()
    live = services.ocsp.answer(request_der(issuer, [unsigned.serial_number]), now)
    assert single(live).certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    pkilint_ocsp_response(live)
    later = now + store.FULL_REPAIR_EVERY
    assert store.refresh_due(services, later - dt.timedelta(seconds=1), 100) == 0
    assert store.refresh_due(services, later, 100) == 1
    assert single(stored(services, ca_id, unsigned.serial_number).der).certificate_status is (
        x509_ocsp.OCSPCertStatus.GOOD
    )
    # A clock stepped back before the last whole look does not put the next one off.
    with services.db.scope() as session:
        session.execute(delete(OcspResponse).where(OcspResponse.issuer_id == ca_id))
    assert store.refresh_due(services, later + dt.timedelta(seconds=1), 100) == 0
    assert store.refresh_due(services, later - dt.timedelta(hours=1), 100) >= 2
    assert {revoked.serial_number, unsigned.serial_number} <= stored_serials()


def test_repair_goes_a_batch_at_a_time_and_looks_at_a_new_ca_whole(services: Services) -> None:
    """More changed statuses than a batch: the mark stays until all are signed, a batch per
    tick. A CA served for the first time since the last whole look gets a whole look at
    once (the next tick), missing answers included."""
    from dataclasses import replace

    from ca.hierarchy import create_issuing
    from hsm.base import KeyType
    from ocsp.models import OcspResponse
    from ocsp.signers import ensure_responders
    from tests.ca.helpers import request_for

    now = services.clock()
    certs = [issue(services, "admin-client") for _ in range(3)]
    ca_id, _ = issuer_for(services)
    store.refresh_due(services, now, 100)  # the first look: every certificate
    listeners = list(services.revoker.listeners)
    services.revoker.listeners.clear()  # a process whose listener did not run
    for cert in certs:
        services.revoker.revoke("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.revoker.listeners.extend(listeners)
    tick = [now + dt.timedelta(seconds=s) for s in range(1, 7)]
    assert store.refresh_due(services, tick[0], 2) == 2
    assert store.refresh_due(services, tick[1], 2) == 1
    assert store.refresh_due(services, tick[2], 2) == 0
    for cert in certs:
        assert single(stored(services, ca_id, cert.serial_number).der).certificate_status is (
            x509_ocsp.OCSPCertStatus.REVOKED
        )
    create_issuing(services.ca, "ops", "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR)
    services.registry.invalidate()
    ensure_responders(services, now)
    services.ocsp.invalidate_issuers()
    leaf = services.ca.issue(replace(request_for("device"), ca="ops"), TEST_ACTOR)
    ops_id, _ = issuer_for(services, "ops")
    with services.db.scope() as session:  # as if its pre-signing at issuance had failed
        session.execute(
            delete(OcspResponse).where(
                OcspResponse.issuer_id == ops_id,
                OcspResponse.serial == f"{leaf.serial_number:040x}",
            )
        )
    assert store.refresh_due(services, tick[3], 100) == 0  # meets the new CA: no mark for it
    assert store.refresh_due(services, tick[4], 100) == 1  # the whole look
    assert single(stored(services, ops_id, leaf.serial_number).der).certificate_status is (
        x509_ocsp.OCSPCertStatus.GOOD
    )
    assert store.refresh_due(services, tick[5], 100) == 0


def test_refresh_repairs_missing_and_stale_rows(services: Services) -> None:
    leaf = issue(services, "admin-client")
    ca_id, _ = issuer_for(services)
    # a revocation made by a process whose listener did not run
    services.revoker.listeners.clear()
    services.revoker.revoke("admin", leaf.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    assert single(stored(services, ca_id, leaf.serial_number).der).certificate_status is (
        x509_ocsp.OCSPCertStatus.GOOD
    )
    assert store.refresh_due(services, services.clock(), 100) >= 1
    resp = single(stored(services, ca_id, leaf.serial_number).der)
    assert resp.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.superseded


def test_resign_all_journalled(services: Services) -> None:
    issue(services, "admin-client")
    revoked = issue(services, "device")
    services.revoker.revoke("device", revoked.serial_number, Reason.UNSPECIFIED, TEST_ACTOR)
    done = store.resign_all(services, services.clock())
    counts = done.counts
    assert counts == {"good": 3, "revoked": 1, "unknown": 0}  # admin leaf + two responders
    assert done.not_resigned == {}
    rows, _ = store.snapshot(services.db)
    assert len(rows) == sum(counts.values())
    with services.db.scope() as session:
        entry = session.scalars(
            select(JournalRecord).where(JournalRecord.action == "ocsp.resign")
        ).one()
    assert entry.category == "ca" and '"revoked":1' in entry.detail
    assert entry.outcome == "success" and "not_resigned" not in entry.detail
    for row in rows:
        pkilint_ocsp_response(row.der)
        break


def _break_database(services: Services, tmp_path: Path) -> None:
    services.db.dispose()
    services.db.engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'gone.db'}")
    services.db._sessions = sessionmaker(services.db.engine, expire_on_commit=False)


def test_a_revocation_here_replaces_what_is_held_for_an_outage(
    services: Services, tmp_path: Path
) -> None:
    """An answer held (served once), then the certificate revoked in this process: what is
    held for serving through an outage is the re-signed "revoked", for stored bytes and nonce
    answers alike. Before: the old "good" stayed held until its nextUpdate, served as soon as
    the database went down."""
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    plain = request_der(issuer, [leaf.serial_number])
    with_nonce = request_der(issuer, [leaf.serial_number], nonce=b"n" * 16)
    now = services.clock()
    assert single(services.ocsp.answer(plain, now)).certificate_status is (
        x509_ocsp.OCSPCertStatus.GOOD
    )  # now held
    services.revoker.revoke("admin", leaf.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    revoked = stored(services, ca_id, leaf.serial_number)
    assert single(revoked.der).certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
    _break_database(services, tmp_path)
    later = now + dt.timedelta(minutes=5)
    assert services.ocsp.answer(plain, later) == revoked.der
    answer = single(services.ocsp.answer(with_nonce, later))
    assert answer.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED


def test_database_down_serves_held_until_next_update(services: Services, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    unseen = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    now = services.clock()
    req = request_der(issuer, [leaf.serial_number])
    held = services.ocsp.answer(req, now)
    row = stored(services, ca_id, leaf.serial_number)
    assert held == row.der
    _break_database(services, tmp_path)
    assert services.ocsp.answer(req, now + dt.timedelta(hours=1)) == held
    # a nonce request is signed fresh from the held status, vouched for no longer than the
    # stored response it came from
    resp = services.ocsp.answer(
        request_der(issuer, [leaf.serial_number], nonce=b"n" * 16), now + dt.timedelta(hours=1)
    )
    assert single(resp).certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert single(resp).next_update_utc is not None
    assert single(resp).next_update_utc <= row.next_update
    # so is a live-signed answer (SHA-256 CertID) whose lookup fell back on the held status
    sha256_req = request_der(issuer, [leaf.serial_number], hash_algorithm="sha256")
    answer = single(services.ocsp.answer(sha256_req, now + dt.timedelta(hours=2)))
    assert answer.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert answer.next_update_utc is not None and answer.next_update_utc <= row.next_update
    # and once less than the minimum validity (8 h) of the held status is left, a fresh
    # signature is refused (tryLater); the stored bytes are still served as they are
    near_end = row.next_update - dt.timedelta(hours=7)
    assert services.ocsp.answer(sha256_req, near_end) == core.TRY_LATER
    assert services.ocsp.answer(req, near_end) == held
    # nothing held for this one; and past nextUpdate the held one is gone too
    assert services.ocsp.answer(request_der(issuer, [unseen.serial_number]), now) == core.TRY_LATER
    late = row.next_update + dt.timedelta(seconds=1)
    assert services.ocsp.answer(req, late) == core.TRY_LATER


@pytest.mark.parametrize("ca", ["admin", "device"])
def test_every_issuing_ca_has_presigned_responder_rows(services: Services, ca: str) -> None:
    ca_id, issuer = issuer_for(services, ca)
    rows, _ = store.snapshot(services.db)
    assert any(r.issuer_id == ca_id for r in rows)  # the responder certificate itself
    assert issuer.responder_certificate.serial_number in {r.serial for r in rows}


_FAIL_SQLITE = """
CREATE TRIGGER fail_ocsp BEFORE INSERT ON ocsp_responses
BEGIN SELECT RAISE(ABORT, 'injected ocsp store fault'); END
"""
_FAIL_PG = [
    """CREATE FUNCTION fail_ocsp() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'injected ocsp store fault'; END $$""",
    """CREATE TRIGGER fail_ocsp BEFORE INSERT ON ocsp_responses
       FOR EACH ROW EXECUTE FUNCTION fail_ocsp()""",
]


class _SignerAway:
    """A responder key whose token is gone: every signature fails."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def public_key(self) -> object:
        return self._inner.public_key()  # type: ignore[attr-defined]

    def sign(self, *_args: object) -> bytes:
        raise KeyBackendError("the token is not reachable")


def test_first_response_commits_with_the_certificate(services: Services) -> None:
    """The response signed at issuance is written in the certificate's own transaction (an
    issued certificate has it at once). If the database refuses it, nothing is issued (the
    serial stays reserved, revocable); if the responder cannot sign, the issuance goes on and
    the refresher's repair signs the response later."""
    from sqlalchemy import text

    ca_id, issuer = issuer_for(services)
    leaf = issue(services, "admin-client")
    assert stored(services, ca_id, leaf.serial_number).serial == leaf.serial_number

    sqlite = services.db.engine.dialect.name == "sqlite"
    with services.db.engine.begin() as conn:
        for statement in [_FAIL_SQLITE] if sqlite else _FAIL_PG:
            conn.execute(text(statement))
    issued_before = _count(services, Certificate.status == CertStatus.ISSUED)
    with pytest.raises(StoreError):
        issue(services, "admin-client")
    assert _count(services, Certificate.status == CertStatus.ISSUED) == issued_before
    assert _count(services, Certificate.status == CertStatus.RESERVED) == 1
    with services.db.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER fail_ocsp" + ("" if sqlite else " ON ocsp_responses")))
        if not sqlite:
            conn.execute(text("DROP FUNCTION fail_ocsp()"))
    assert stored(services, ca_id, issue(services, "admin-client").serial_number)

    # The responder's key is away: issued all the same, without a response; repaired later.
    away = core.Issuer.create(
        issuer.certificate,
        _SignerAway(issuer.key),
        issuer.responder_certificate,  # type: ignore[arg-type]
    )
    sound = services.ocsp.issuers
    services.ocsp.issuers = lambda: {**sound(), ca_id: away}  # type: ignore[method-assign]
    unlucky = issue(services, "admin-client")
    services.ocsp.issuers = sound  # type: ignore[method-assign]
    rows, _ = store.snapshot(services.db)
    assert unlucky.serial_number not in {r.serial for r in rows if r.issuer_id == ca_id}
    assert services.ocsp.refresh_due(services.clock()) >= 1
    repaired = stored(services, ca_id, unlucky.serial_number)
    assert single(repaired.der).certificate_status is x509_ocsp.OCSPCertStatus.GOOD
