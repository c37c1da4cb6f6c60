"""Revocation and CRLs: reasons, hold/release, full and delta CRLs, numbering, debounce."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.models import JournalRecord
from audit.verify import verify
from ca import crl as crl_module
from ca.crl import MIN_VALIDITY, latest_by_name
from ca.hierarchy import create_issuing
from ca.models import Certificate, Crl, CrlKind
from ca.registry import ca_row
from ca.revocation import Reason
from ca.tbs import serial_hex
from hsm.base import KeyBackend, KeyType
from hsm.observed import observed
from sekisho.errors import Conflict, InputError, KeyBackendError, NotFound, StoreError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from sekisho.workers import CrlRefresher
from tests.audit.conftest import audit_keys
from tests.ca.helpers import ca_cert, der, issue, request_for
from tests.conftest import TEST_ACTOR, FakeClock, RecordingBackend
from tests.support import checkers

# The foundation tests also run with every key on a SoftHSM2 token (tests/conftest.py).
KEY_BACKENDS = ("software", "pkcs11")


def _chain(services: Services, ca: str) -> list[bytes]:
    return [der(ca_cert(services, "root")), der(ca_cert(services, ca))]


def test_full_and_delta_crls_pass_checkers_and_revoke(services: Services) -> None:
    now = services.clock()
    good = issue(services, "admin-client")
    revoked = {reason: issue(services, "admin-client") for reason in Reason}
    base = services.crls.generate("admin", now)
    for reason, cert in revoked.items():
        services.revoker.revoke("admin", cert.serial_number, reason, TEST_ACTOR)
    late = issue(services, "admin-client")
    services.revoker.revoke(
        "admin",
        late.serial_number,
        Reason.KEY_COMPROMISE,
        TEST_ACTOR,
        invalidity_date=now - dt.timedelta(days=2),
    )
    delta_row = services.crls.generate("admin", now, delta=True)
    full_row = services.crls.generate("admin", now)
    issuer = der(ca_cert(services, "admin"))
    chain = _chain(services, "admin")

    for row in (full_row, delta_row):
        checkers.pkilint_crl(row.der, delta=row.kind is CrlKind.DELTA)
        checkers.openssl_crl_verify(row.der, issuer)

    full = x509.load_der_x509_crl(full_row.der)
    delta = x509.load_der_x509_crl(delta_row.der)
    assert full.is_signature_valid(ca_cert(services, "admin").public_key())  # type: ignore[arg-type]
    number = full.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert (
        number
        > x509.load_der_x509_crl(base.der)
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
    )
    assert full.extensions.get_extension_for_class(x509.FreshestCRL)
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical
    assert indicator.value.crl_number == base.number
    assert full.next_update_utc - full.last_update_utc == dt.timedelta(days=7)

    for reason, cert in revoked.items():
        entry = full.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        assert delta.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        reason_ext = [e for e in entry.extensions if isinstance(e.value, x509.CRLReason)]
        if reason is Reason.UNSPECIFIED:
            assert reason_ext == []  # RFC 5280 5.3.1: no reasonCode for unspecified
        else:
            assert reason_ext[0].value.reason == reason.flag
    entry = full.get_revoked_certificate_by_serial_number(late.serial_number)
    assert entry is not None
    inv = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert inv.invalidity_date_utc == now - dt.timedelta(days=2)
    assert full.get_revoked_certificate_by_serial_number(good.serial_number) is None

    # Real clients: openssl and gnutls see the revoked certificate as revoked, the good one ok.
    target = revoked[Reason.KEY_COMPROMISE]
    checkers.openssl_verify(der(good), chain, crl_ders=[full_row.der])
    checkers.openssl_verify_revoked(der(target), chain, crl_ders=[full_row.der])
    assert checkers.gnutls_verify(der(target), chain, crl_ders=[full_row.der]) == "revoked"
    assert checkers.gnutls_verify(der(good), chain, crl_ders=[full_row.der]) == "ok"


def test_hold_release_and_re_revocation_rules(services: Services) -> None:
    cert = issue(services, "device")
    serial = cert.serial_number
    base = services.crls.generate("device", services.clock())
    services.revoker.revoke("device", serial, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
    held = x509.load_der_x509_crl(services.crls.generate("device", services.clock()).der)
    assert held.get_revoked_certificate_by_serial_number(serial) is not None
    services.revoker.release("device", serial, TEST_ACTOR)
    delta_row = services.crls.generate("device", services.clock(), delta=True)
    delta = x509.load_der_x509_crl(delta_row.der)
    entry = delta.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None  # removeFromCRL tells delta users the hold is over
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.remove_from_crl
    )
    checkers.pkilint_crl(delta_row.der, delta=True)
    full = x509.load_der_x509_crl(services.crls.generate("device", services.clock()).der)
    assert full.get_revoked_certificate_by_serial_number(serial) is None
    assert base.number < delta_row.number

    # Revoked for a real reason: only keyCompromise may replace it; no release.
    services.revoker.revoke("device", serial, Reason.SUPERSEDED, TEST_ACTOR)
    with pytest.raises(Conflict):
        services.revoker.revoke("device", serial, Reason.CESSATION_OF_OPERATION, TEST_ACTOR)
    with pytest.raises(Conflict):
        services.revoker.release("device", serial, TEST_ACTOR)
    services.revoker.revoke("device", serial, Reason.KEY_COMPROMISE, TEST_ACTOR)
    full = x509.load_der_x509_crl(services.crls.generate("device", services.clock()).der)
    entry = full.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )


def _failures(services: Services, action: str) -> list[JournalRecord]:
    with services.db.scope() as session:
        return list(
            session.scalars(
                select(JournalRecord)
                .where(JournalRecord.action == action, JournalRecord.outcome == "failure")
                .order_by(JournalRecord.seq)
            )
        )


def test_refused_revocations_and_releases_are_journalled(services: Services) -> None:
    """Every refusal leaves a failure entry naming the CA, the serial and why, as a rejected
    issuance does; nothing about the certificate changes. Before: nothing was journalled."""
    cert = issue(services, "device")
    serial = cert.serial_number
    services.revoker.revoke("device", serial, Reason.SUPERSEDED, TEST_ACTOR)
    refusals: list[tuple[Callable[[], object], str, type[Exception]]] = [
        (lambda: services.revoker.revoke("device", serial, Reason.AFFILIATION_CHANGED, TEST_ACTOR),
         "ca.revoke", Conflict),
        (lambda: services.revoker.revoke("device", serial, Reason.CERTIFICATE_HOLD, TEST_ACTOR),
         "ca.revoke", Conflict),
        (lambda: services.revoker.release("device", serial, TEST_ACTOR), "ca.release", Conflict),
        (lambda: services.revoker.revoke("device", 12345, Reason.SUPERSEDED, TEST_ACTOR),
         "ca.revoke", NotFound),
        (lambda: services.revoker.release("nope", serial, TEST_ACTOR), "ca.release", NotFound),
    ]  # fmt: skip
    for call, action, error in refusals:
        before = len(_failures(services, action))
        with pytest.raises(error) as info:
            call()
        entries = _failures(services, action)
        assert len(entries) == before + 1, action
        entry = entries[-1]
        detail = json.loads(entry.detail)
        assert detail["code"] == info.value.code  # type: ignore[attr-defined]
        assert detail["reason"]
        assert entry.actor_account == TEST_ACTOR.account
    assert _failures(services, "ca.revoke")[0].object_serial == format(serial, "040x")
    with services.db.scope() as session:
        verify(session, services.journal.origin, trusted_keys=audit_keys(services))
        row = session.scalars(
            select(Certificate).where(Certificate.serial == format(serial, "040x"))
        ).one()
    assert row.revocation_reason == Reason.SUPERSEDED.value


def test_an_invalidity_date_after_the_kept_revocation_date_is_refused(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Re-revoked to keyCompromise, a certificate keeps its revocation date: an invalidity
    date after it is refused (it was invalid from then on); one before it is recorded."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        cert = issue(services, "device")
        serial = cert.serial_number
        services.revoker.revoke("device", serial, Reason.SUPERSEDED, TEST_ACTOR)
        revoked_at = clock()
        clock.advance(days=2)
        with pytest.raises(InputError, match="after this certificate's revocation date"):
            services.revoker.revoke(
                "device", serial, Reason.KEY_COMPROMISE, TEST_ACTOR,
                invalidity_date=revoked_at + dt.timedelta(days=1),
            )  # fmt: skip
        earlier = revoked_at - dt.timedelta(days=3)
        services.revoker.revoke(
            "device", serial, Reason.KEY_COMPROMISE, TEST_ACTOR, invalidity_date=earlier
        )
        row = services.crls.generate("device", clock())
        entry = x509.load_der_x509_crl(row.der).get_revoked_certificate_by_serial_number(serial)
        assert entry is not None
        assert entry.revocation_date_utc == revoked_at
        invalid = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
        assert invalid.invalidity_date_utc == earlier
        checkers.pkilint_crl(row.der)
    finally:
        services.close()


def test_a_re_revocation_never_moves_the_invalidity_date_later(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Superseded with an invalidity date, then keyCompromise with a later one: the earlier
    date stays (the key is distrusted from then on); a still earlier one replaces it."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        first, second = (issue(services, "device").serial_number for _ in range(2))
        day = dt.timedelta(days=1)
        for serial in (first, second):
            services.revoker.revoke(
                "device", serial, Reason.SUPERSEDED, TEST_ACTOR, invalidity_date=clock() - 2 * day
            )
        clock.advance(hours=1)
        services.revoker.revoke(
            "device", first, Reason.KEY_COMPROMISE, TEST_ACTOR, invalidity_date=clock() - day
        )
        services.revoker.revoke(
            "device", second, Reason.KEY_COMPROMISE, TEST_ACTOR, invalidity_date=clock() - 3 * day
        )
        row = services.crls.generate("device", clock())
        crl = x509.load_der_x509_crl(row.der)
        dates = {}
        for serial in (first, second):
            entry = crl.get_revoked_certificate_by_serial_number(serial)
            assert entry is not None
            assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
                x509.ReasonFlags.key_compromise
            )
            invalid = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
            dates[serial] = invalid.invalidity_date_utc
        start = clock() - dt.timedelta(hours=1)
        assert dates == {first: start - 2 * day, second: clock() - 3 * day}
        checkers.pkilint_crl(row.der)
    finally:
        services.close()


def test_a_hold_made_permanent_keeps_the_hold_date(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """On hold, then keyCompromise a day later: the CRL entry keeps the hold's date (the
    certificate has not been valid since), and an invalidity date after the hold is refused
    as it is for a re-revocation. Before: the revocation date moved to the second revocation,
    so a signature made during the hold looked valid at its time."""
    clock = FakeClock(dt.datetime.now(dt.UTC).replace(microsecond=0))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        serial = issue(services, "device").serial_number
        held_at = clock()
        services.revoker.revoke("device", serial, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
        clock.advance(hours=24)
        with pytest.raises(InputError, match="after this certificate's revocation date"):
            services.revoker.revoke(
                "device",
                serial,
                Reason.KEY_COMPROMISE,
                TEST_ACTOR,
                invalidity_date=held_at + dt.timedelta(hours=1),
            )
        services.revoker.revoke(
            "device",
            serial,
            Reason.KEY_COMPROMISE,
            TEST_ACTOR,
            invalidity_date=held_at - dt.timedelta(hours=1),
        )
        row = services.crls.generate("device", clock())
        entry = x509.load_der_x509_crl(row.der).get_revoked_certificate_by_serial_number(serial)
        assert entry is not None
        assert entry.revocation_date_utc == held_at
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
            x509.ReasonFlags.key_compromise
        )
        invalid = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
        assert invalid.invalidity_date_utc == held_at - dt.timedelta(hours=1)
        checkers.pkilint_crl(row.der)
        with services.db.scope() as session:
            stored = session.scalars(
                select(Certificate).where(Certificate.serial == serial_hex(serial))
            ).one()
            assert stored.revoked_at == held_at
    finally:
        services.close()


def test_revocation_input_errors(services: Services) -> None:
    with pytest.raises(NotFound):
        services.revoker.revoke("device", 12345, Reason.SUPERSEDED, TEST_ACTOR)
    with pytest.raises(NotFound):
        services.revoker.revoke("nope", 12345, Reason.SUPERSEDED, TEST_ACTOR)
    cert = issue(services, "device")
    with pytest.raises(InputError):
        services.revoker.revoke(
            "device",
            cert.serial_number,
            Reason.KEY_COMPROMISE,
            TEST_ACTOR,
            invalidity_date=services.clock() + dt.timedelta(days=1),
        )
    with pytest.raises(NotFound):  # a serial of another CA is not this CA's
        services.revoker.revoke("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)


def test_crl_numbers_increase_across_concurrent_generators_and_restarts(
    services: Services, settings: Settings
) -> None:
    numbers: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            for _ in range(5):
                row = services.crls.generate("device", services.clock())
                with lock:
                    numbers.append(row.number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(numbers) == 30 and len(set(numbers)) == 30
    services.close()
    again = build_services(settings, backend=services.backend)
    row = again.crls.generate("device", again.clock())
    assert row.number > max(numbers)
    with again.db.scope() as session:
        stored = session.scalars(select(Crl.number).where(Crl.issuer_id == row.issuer_id)).all()
    assert sorted(stored) == sorted(set(stored))
    # Each stored DER carries its own number; thisUpdate never goes back as numbers go up.
    with again.db.scope() as session:
        crls = session.scalars(
            select(Crl).where(Crl.issuer_id == row.issuer_id).order_by(Crl.number)
        ).all()
        for crl in crls:
            parsed = x509.load_der_x509_crl(crl.der)
            ext = parsed.extensions.get_extension_for_class(x509.CRLNumber)
            assert ext.value.crl_number == crl.number
    times = [crl.this_update for crl in crls]
    assert times == sorted(times)


def test_refresher_debounces_a_burst_into_one_crl(settings: Settings, services: Services) -> None:
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    refresher = CrlRefresher(svc, debounce=2.0)
    refresher.run_once(clock())  # brings every CA up to date
    with svc.db.scope() as session:
        before = latest_by_name(session, "admin", CrlKind.FULL)
        assert before is not None
        before_number = before.number
    certs = [issue(svc, "admin-client") for _ in range(10)]
    published_full = []
    for i, cert in enumerate(certs):  # a burst: one revocation every 0.5 s
        svc.revoker.revoke("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        if i % 2:
            clock.advance(seconds=1)
        refresher.run_once(clock())
        with svc.db.scope() as session:
            row = latest_by_name(session, "admin", CrlKind.FULL)
            assert row is not None
            published_full.append(row.number)
    assert set(published_full) == {before_number}  # nothing yet: still in the burst
    clock.advance(seconds=3)
    assert "admin" in refresher.run_once(clock())
    with svc.db.scope() as session:
        row = latest_by_name(session, "admin", CrlKind.FULL)
        assert row is not None
        crl = x509.load_der_x509_crl(row.der)
    assert all(crl.get_revoked_certificate_by_serial_number(c.serial_number) for c in certs)
    assert refresher.run_once(clock()) == []  # quiet: nothing more to do
    # Half of the validity passed: re-issued without any revocation.
    clock.advance(days=3, hours=13)
    assert "admin" in refresher.run_once(clock())


def test_crls_ended_long_ago_are_deleted_but_each_cas_newest_stay(
    settings: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(crl_module, "PRUNE_BATCH_ROWS", 2)  # a transaction per two CRLs
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    keep = dt.timedelta(days=90)
    start = clock()
    old_full = svc.crls.generate("admin", clock())
    old_delta = svc.crls.generate("admin", clock(), delta=True)
    clock.advance(days=1)
    full = svc.crls.generate("admin", clock())
    delta = svc.crls.generate("admin", clock(), delta=True)

    def admin_numbers() -> set[int]:
        with svc.db.read_scope() as session:
            ca_id = ca_row(session, "admin").id
            return set(session.scalars(select(Crl.number).where(Crl.issuer_id == ca_id)))

    def prune_entries() -> list[dict[str, object]]:
        with svc.db.read_scope() as session:
            rows = session.scalars(
                select(JournalRecord).where(JournalRecord.action == "ca.crl.prune")
            ).all()
            return [json.loads(r.detail) for r in rows]

    before = admin_numbers()
    assert svc.crls.prune(clock(), keep) == 0  # nothing ended 90 days ago
    assert prune_entries() == []
    # The first full CRL ended 7 days after it began: 90 days and an hour after that, it and
    # the delta beside it go; the newer full CRL (not ended that long ago) and the newest
    # delta CRL (ended, but the newest) stay.
    now = start + dt.timedelta(days=7 + 90, hours=1)
    assert old_full.next_update < now - keep < full.next_update
    assert old_delta.next_update < delta.next_update < now - keep
    deleted = svc.crls.prune(now, keep)
    assert {old_full.number, old_delta.number} <= before - admin_numbers()
    assert admin_numbers() == {n for n in before if n >= full.number}
    assert {full.number, delta.number} <= admin_numbers()
    entries = prune_entries()
    assert sum(int(str(e["deleted"])) for e in entries) == deleted
    admin_entries = [e for e in entries if e["ca"] == "admin"]
    assert len(admin_entries) >= 2 and all(e["deleted"] in (1, 2) for e in admin_entries)
    named: set[int] = set()
    for entry in admin_entries:
        numbers: set[int] = set()
        for run in str(entry["numbers"]).split(","):  # "1-4,7": runs of numbers
            first, _, last = run.partition("-")
            numbers.update(range(int(first), int(last or first) + 1))
        assert entry["deleted"] == len(numbers) and not numbers & named
        named |= numbers
    assert named == before - admin_numbers()
    with svc.db.read_scope() as session:
        served = latest_by_name(session, "admin", CrlKind.FULL)
        assert served is not None and served.der == full.der
    # Everything ended long ago: each CA's newest full and delta CRL stay all the same.
    later = now + dt.timedelta(days=365)
    assert svc.crls.prune(later, dt.timedelta(0)) == 0
    assert admin_numbers() == {full.number, delta.number}
    assert prune_entries() == entries  # nothing deleted, nothing journalled
    with svc.db.read_scope() as session:
        chain = verify(session, svc.settings.journal_origin, trusted_keys=audit_keys(svc))
    assert chain.records == chain.head_seq  # verified whole: no gap, nothing altered


def test_an_expired_certificate_leaves_the_crl_only_after_a_crl_issued_past_its_expiry(
    settings: Settings, services: Services
) -> None:
    """RFC 5280 3.3 / 5.1.2.6: an entry stays until it has appeared on one full CRL issued
    after the certificate expired, however long the gap between two full CRLs (an offline
    root publishing rarely, a refresher that was down): not merely one CRL validity (7 days)
    after expiry."""
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    request = dataclasses.replace(request_for("admin-client"), validity=dt.timedelta(days=1))
    short = svc.ca.issue(request, TEST_ACTOR)
    svc.revoker.revoke("admin", short.serial_number, Reason.SUPERSEDED, TEST_ACTOR)

    def listed(row: Crl) -> bool:
        crl = x509.load_der_x509_crl(row.der)
        return crl.get_revoked_certificate_by_serial_number(short.serial_number) is not None

    before = svc.crls.generate("admin", clock())
    assert listed(before)
    clock.advance(days=9)  # no full CRL for 9 days; the certificate expired 8 days ago
    assert short.not_valid_after_utc < clock() - settings.crl_next_update
    first_after = svc.crls.generate("admin", clock())
    assert listed(first_after)  # the first CRL issued after its expiry lists it
    clock.advance(hours=1)
    assert not listed(svc.crls.generate("admin", clock()))  # then it may go
    checkers.pkilint_crl(first_after.der)


def test_crls_are_pruned_in_batches_of_rows_and_entries() -> None:
    rows = [(1, 10), (2, 150_000), (3, 60_000), (4, 500_000), (5, 1), (6, 1)]
    assert list(crl_module._batches(rows)) == [[1, 2], [3], [4], [5, 6]]
    many = [(i, 0) for i in range(crl_module.PRUNE_BATCH_ROWS + 1)]
    assert [len(b) for b in crl_module._batches(many)] == [crl_module.PRUNE_BATCH_ROWS, 1]


def test_the_refresher_prunes_crls_once_an_hour(settings: Settings, services: Services) -> None:
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    refresher = CrlRefresher(svc)
    svc.crls.generate("admin", clock())
    clock.advance(days=7 + 91)
    assert refresher.prune_once(clock()) >= 1  # the first tick prunes (the init CRLs too)
    svc.crls.generate("admin", clock())  # a newer full CRL: the one before is now prunable
    clock.advance(minutes=59)
    assert refresher.prune_once(clock()) == 0  # within the hour: not looked at
    clock.advance(minutes=1)
    assert refresher.prune_once(clock()) == 1


def test_the_refresher_reads_no_crl_der(services: Services) -> None:
    """What the refresher looks at every tick (number, epoch, times) comes without the DER,
    50 MB for a CRL of 10^6 entries; reading it there raises instead of loading it."""
    from sqlalchemy.exc import InvalidRequestError

    from ca.crl import latest

    row = services.crls.generate("admin", services.clock())
    with services.db.read_scope() as session:
        ca_id = ca_row(session, "admin").id
        light = latest(session, ca_id, CrlKind.FULL, der=False)
        assert light is not None
        assert (light.number, light.epoch, light.next_update) == (
            row.number,
            row.epoch,
            row.next_update,
        )
        with pytest.raises(InvalidRequestError):
            _ = light.der
    with services.db.read_scope() as session:
        whole = latest(session, ca_id, CrlKind.FULL)
        assert whole is not None and whole.der == row.der


def test_a_burst_published_elsewhere_does_not_cut_the_next_debounce(
    settings: Settings, services: Services
) -> None:
    """Another process (the CLI, another worker) publishes the CRL while this refresher is
    debouncing: the next burst, an hour later, is debounced again, not published at once as
    "overdue" since the first burst."""
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    refresher = CrlRefresher(svc, debounce=2.0)
    refresher.run_once(clock())
    first, second = issue(svc, "admin-client"), issue(svc, "admin-client")
    svc.revoker.revoke("admin", first.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    assert refresher.run_once(clock()) == []  # debouncing
    svc.crls.generate("admin", clock())  # published by someone else
    clock.advance(seconds=1)
    refresher.run_once(clock())  # the full CRL is current (a delta against it may follow)
    clock.advance(hours=1)
    svc.revoker.revoke("admin", second.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    assert refresher.run_once(clock()) == []  # a new burst: debounced
    clock.advance(seconds=3)
    assert "admin" in refresher.run_once(clock())


def test_refresher_thread_publishes_within_seconds(settings: Settings, services: Services) -> None:
    import time

    svc = build_services(settings, backend=services.backend)
    refresher = CrlRefresher(svc, debounce=0.5, tick=0.2)
    refresher.run_once(svc.clock())
    cert = issue(svc, "device")
    refresher.start()
    try:
        svc.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        deadline = time.monotonic() + 10
        found = False
        while time.monotonic() < deadline and not found:
            with svc.db.scope() as session:
                row = latest_by_name(session, "device", CrlKind.FULL)
                assert row is not None
                crl = x509.load_der_x509_crl(row.der)
            found = crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
            time.sleep(0.1)
        assert found
    finally:
        refresher.stop()


def _journalled_crls(services: Services, ca: str) -> int:
    with services.db.scope() as session:
        return sum(
            json.loads(detail).get("ca") == ca
            for detail in session.scalars(
                select(JournalRecord.detail).where(JournalRecord.action == "ca.crl")
            )
        )


def test_an_expired_ca_signs_no_crl_and_the_refresher_skips_it(
    settings: Settings, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(services.clock())
    svc = build_services(settings, backend=services.backend, clock=clock)
    create_issuing(
        svc.ca, "short", "root", "T3", KeyType.EC_P256, TEST_ACTOR, validity=dt.timedelta(days=2)
    )
    not_after = ca_cert(svc, "short").not_valid_after_utc
    issuer = der(ca_cert(svc, "short"))
    # The last CRLs before expiry: nextUpdate capped at the CA's notAfter, never past it.
    full = svc.crls.generate("short", clock())
    delta = svc.crls.generate("short", clock(), delta=True)
    assert full.next_update == not_after
    assert delta.next_update == clock() + dt.timedelta(hours=24)
    last = svc.crls.generate("short", not_after - MIN_VALIDITY)  # the last one it signs
    assert last.this_update < last.next_update == not_after
    for row in (full, delta, last):
        checkers.pkilint_crl(row.der, delta=row.kind is CrlKind.DELTA)
        checkers.openssl_crl_verify(row.der, issuer)

    for when, message in ((not_after - MIN_VALIDITY / 2, "expires at"), (not_after, "expired")):
        for is_delta in (False, True):
            with pytest.raises(Conflict, match=message) as info:
                svc.crls.generate("short", when, delta=is_delta)
            assert info.value.exit_code == 75

    clock.advance(days=3)
    caplog.set_level(logging.WARNING, logger="sekisho.crl")
    journalled = _journalled_crls(svc, "short")
    refresher = CrlRefresher(svc, debounce=0)
    runs = [refresher.run_once(clock() + dt.timedelta(seconds=i)) for i in range(5)]
    assert all("short" not in published for published in runs)
    assert runs[1:] == [[]] * 4  # the other CAs were brought up to date once
    assert _journalled_crls(svc, "short") == journalled
    with svc.db.scope() as session:
        served = latest_by_name(session, "short", CrlKind.FULL)
        assert served is not None and served.number == last.number
    warnings = [r for r in caplog.records if getattr(r, "ca", None) == "short"]
    assert len(warnings) == 1 and "expired" in str(getattr(warnings[0], "detail", ""))


class _BeforeSignBackend(RecordingBackend):
    """Runs ``before_sign[ref]`` once, just before the next signature with the key ``ref``:
    another process changing revocations while the refresher signs."""

    def __init__(self, inner: KeyBackend) -> None:
        super().__init__(inner)
        self.before_sign: dict[str, Callable[[], object]] = {}

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        return observed(self.inner.signing_key(ref), lambda _data: self._fire(ref))

    def _fire(self, ref: str) -> None:
        action = self.before_sign.pop(ref, None)
        if action is not None:
            action()


def test_refresher_publishes_the_full_crl_then_a_delta_against_it(
    settings: Settings, services: Services
) -> None:
    """RFC 5280 5.2.4: the published delta names the published full CRL as its base and has a
    higher number, so OpenSSL combines them: a hold that lands while the full CRL is signed
    is in the delta, and only there."""
    clock = FakeClock(services.clock())
    backend = _BeforeSignBackend(services.backend)
    svc = build_services(settings, backend=backend, clock=clock)
    refresher = CrlRefresher(svc, debounce=0)
    compromised, held = issue(svc, "device"), issue(svc, "device")
    svc.revoker.revoke("device", compromised.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    refresher.run_once(clock())  # the change is seen; published once quiet (debounce 0)
    with svc.db.scope() as session:
        device_key = ca_row(session, "device").key_ref
    backend.before_sign[device_key] = lambda: svc.revoker.revoke(
        "device", held.serial_number, Reason.CERTIFICATE_HOLD, TEST_ACTOR
    )
    assert "device" in refresher.run_once(clock())
    assert not backend.before_sign, "the refresher signed no CRL of device"
    with svc.db.scope() as session:
        full_row = latest_by_name(session, "device", CrlKind.FULL)
        delta_row = latest_by_name(session, "device", CrlKind.DELTA)
    assert full_row is not None and delta_row is not None
    full, delta = x509.load_der_x509_crl(full_row.der), x509.load_der_x509_crl(delta_row.der)
    full_number = full.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    delta_number = delta.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    base = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
    assert base == full_number == full_row.number == delta_row.base_number
    assert delta_number == delta_row.number > full_number
    assert full.get_revoked_certificate_by_serial_number(held.serial_number) is None
    assert delta.get_revoked_certificate_by_serial_number(held.serial_number) is not None
    issuer = der(ca_cert(svc, "device"))
    for row in (full_row, delta_row):
        checkers.pkilint_crl(row.der, delta=row is delta_row)
        checkers.openssl_crl_verify(row.der, issuer)
    chain = _chain(svc, "device")
    pair = [full_row.der, delta_row.der]
    checkers.openssl_verify(der(held), chain, crl_ders=[full_row.der])
    checkers.openssl_verify_revoked(der(held), chain, crl_ders=pair, use_deltas=True)
    checkers.openssl_verify_revoked(der(compromised), chain, crl_ders=pair, use_deltas=True)


def test_what_docs_relying_parties_says_of_delta_crls(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """A certificate revoked in the full CRL only, and a delta re-signed later (the refresher
    does so at half its validity): OpenSSL with -use_deltas -extended_crl, and GnuTLS given
    the full CRL alone, say revoked; OpenSSL with -use_deltas alone, and GnuTLS given both
    CRLs in one file, say valid: the pitfalls docs/relying-parties.md warns of."""
    clock = FakeClock(dt.datetime.now(dt.UTC) - dt.timedelta(hours=14))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        revoked = issue(services, "device")
        services.revoker.revoke("device", revoked.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        full, _ = services.crls.publish("device", clock())
        clock.advance(hours=13)  # past half the delta's 24 h: the refresher re-signs it
        refresher = CrlRefresher(services, debounce=0)
        assert "device" in refresher.run_once(clock())
        with services.db.scope() as session:
            assert latest_by_name(session, "device", CrlKind.FULL).number == full.number  # type: ignore[union-attr]
            delta = latest_by_name(session, "device", CrlKind.DELTA)
        assert delta is not None and delta.this_update > full.this_update
        chain = _chain(services, "device")
        pair = [full.der, delta.der]
        checkers.openssl_verify_revoked(der(revoked), chain, crl_ders=pair, use_deltas=True)
        checkers.openssl_verify_revoked(der(revoked), chain, crl_ders=[full.der])
        misread = checkers._openssl_verify_run(der(revoked), chain, pair, None, True, False)
        assert ": OK" in misread.stdout, misread.stdout + misread.stderr
        assert checkers.gnutls_verify(der(revoked), chain, [full.der]) == "revoked"
        assert checkers.gnutls_verify(der(revoked), chain, pair) == "ok"
    finally:
        services.close()


def test_with_delta_crls_turned_off_only_full_crls_are_made_and_served(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Setting crl_deltas = false: full CRLs with no Freshest CRL pointer, no delta from
    publish, `--delta` a conflict, the refresher re-signing full CRLs only, and the delta
    URL a 404 (a delta made before is based on an older full CRL)."""
    from web import create_app

    clock = FakeClock(dt.datetime.now(dt.UTC) - dt.timedelta(hours=14))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        services.crls.publish("device", clock())  # made with its delta, pointing to it
    finally:
        services.close()
    services = build_services(
        dataclasses.replace(settings, crl_deltas=False), backend=recording_backend, clock=clock
    )
    try:
        # The first tick replaces a full CRL that points to a delta no longer served.
        assert "device" in CrlRefresher(services, debounce=0).run_once(clock())
        with services.db.scope() as session:
            replaced = latest_by_name(session, "device", CrlKind.FULL)
        assert replaced is not None
        with pytest.raises(x509.ExtensionNotFound):
            x509.load_der_x509_crl(replaced.der).extensions.get_extension_for_class(
                x509.FreshestCRL
            )
        full, delta = services.crls.publish("device", clock())
        assert delta is None
        crl = x509.load_der_x509_crl(full.der)
        with pytest.raises(x509.ExtensionNotFound):
            crl.extensions.get_extension_for_class(x509.FreshestCRL)
        checkers.pkilint_crl(full.der)
        revoked = issue(services, "device")
        services.revoker.revoke("device", revoked.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        with pytest.raises(Conflict, match="crl_deltas"):
            services.crls.generate("device", clock(), delta=True)
        with services.db.scope() as session:
            deltas_before = latest_by_name(session, "device", CrlKind.DELTA)
        refresher = CrlRefresher(services, debounce=0)
        refresher.run_once(clock())
        clock.advance(hours=13)  # a delta would be due again by now
        assert "device" in refresher.run_once(clock())
        with services.db.scope() as session:
            newest = latest_by_name(session, "device", CrlKind.FULL)
            deltas_after = latest_by_name(session, "device", CrlKind.DELTA)
        assert newest is not None and newest.number > full.number
        assert (deltas_after and deltas_after.number) == (deltas_before and deltas_before.number)
        checkers.openssl_verify_revoked(der(revoked), _chain(services, "device"), [newest.der])
        client = create_app(services).test_client()
        assert client.get("/crl/device.crl").status_code == 200
        assert client.get("/crl/device-delta.crl").status_code == 404
    finally:
        services.close()


def _revoke_in_thread(services: Services, cert: x509.Certificate) -> bool:
    """Revoke ``cert`` from another thread; whether that took less than 10 s (no lock held
    here kept it waiting)."""
    t = threading.Thread(
        target=services.revoker.revoke,
        args=("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR),
    )
    t.start()
    t.join(10)
    in_time = not t.is_alive()
    t.join(120)
    return in_time


def _current_epoch(services: Services, ca: str) -> int:
    with services.db.read_scope() as session:
        return int(ca_row(session, ca).revocation_epoch)


def test_reading_a_full_crl_holds_up_no_revocation(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full CRL's entries (seconds to read for 10^6) are read in a snapshot, without the CA
    row lock (nor, on SQLite, the database's write lock): a revocation made meanwhile
    completes at once. That CRL says what was true when its number was allocated; it is
    marked older than the CA's state, so the next one (due at once) has the revocation."""
    services.revoker.revoke(
        "admin", issue(services, "admin-client").serial_number, Reason.SUPERSEDED, TEST_ACTOR
    )
    victim = issue(services, "admin-client")
    before = services.crls.generate("admin", services.clock())
    real = crl_module.encode_revoked_rows
    in_time: list[bool] = []

    def encode(
        rows: Iterable[tuple[str, str | None, dt.datetime | None, dt.datetime | None]],
        default_time: dt.datetime,
        out: bytearray,
    ) -> int:
        if not in_time:
            in_time.append(_revoke_in_thread(services, victim))
        return real(rows, default_time, out)

    monkeypatch.setattr(crl_module, "encode_revoked_rows", encode)
    row = services.crls.generate("admin", services.clock())
    assert in_time == [True], "a revocation waited for the CRL being read"
    assert row.number == before.number + 1
    assert (
        x509.load_der_x509_crl(row.der).get_revoked_certificate_by_serial_number(
            victim.serial_number
        )
        is None
    )
    assert row.epoch < _current_epoch(services, "admin")
    assert crl_module.due(row, _current_epoch(services, "admin"), services.clock())
    monkeypatch.setattr(crl_module, "encode_revoked_rows", real)
    after = services.crls.generate("admin", services.clock())
    assert after.epoch == _current_epoch(services, "admin")
    assert (
        x509.load_der_x509_crl(after.der).get_revoked_certificate_by_serial_number(
            victim.serial_number
        )
        is not None
    )
    for crl in (row, after):
        checkers.pkilint_crl(crl.der)
        checkers.openssl_crl_verify(crl.der, der(ca_cert(services, "admin")))


def test_revocations_before_every_snapshot_end_in_a_read_under_the_lock(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A revocation that lands between the allocation of a number and the snapshot read
    would make that number publish newer state than a later number might: the number is left
    unused and the generator tries again. A CA revoking all the time cannot starve its CRL:
    after OPTIMISTIC_READS such tries, the generator reads while holding the CA row (a
    revocation made during that read waits for it)."""
    services.revoker.revoke(
        "admin", issue(services, "admin-client").serial_number, Reason.SUPERSEDED, TEST_ACTOR
    )
    victims = [issue(services, "admin-client") for _ in range(crl_module.OPTIMISTIC_READS)]
    late = issue(services, "admin-client")
    before = services.crls.generate("admin", services.clock())
    real = services.db.read_scope
    in_time: list[bool] = []
    real_encode = crl_module.encode_revoked_rows
    waiting: list[threading.Thread] = []

    def encode(
        rows: Iterable[tuple[str, str | None, dt.datetime | None, dt.datetime | None]],
        default_time: dt.datetime,
        out: bytearray,
    ) -> int:
        if not waiting:  # the read under the lock: a revocation now has to wait for it
            t = threading.Thread(
                target=services.revoker.revoke,
                args=("admin", late.serial_number, Reason.SUPERSEDED, TEST_ACTOR),
            )
            t.start()
            t.join(1.0)
            waiting.append(t)
        return real_encode(rows, default_time, out)

    def read_scope(*, snapshot: bool = False) -> AbstractContextManager[Session]:
        if snapshot and len(in_time) < len(victims):  # the CRL's snapshot is about to start
            in_time.append(_revoke_in_thread(services, victims[len(in_time)]))
        return real(snapshot=snapshot)

    monkeypatch.setattr(services.db, "read_scope", read_scope)
    monkeypatch.setattr(crl_module, "encode_revoked_rows", encode)
    with caplog.at_level(logging.INFO, logger="sekisho.crl"):
        row = services.crls.generate("admin", services.clock())
        held = [t.is_alive() for t in waiting]
        for t in waiting:
            t.join(120)
    assert in_time == [True] * crl_module.OPTIMISTIC_READS
    assert held == [True], "a revocation went through during the read under the lock"
    unused = [r for r in caplog.records if r.getMessage().startswith("CRL number left unused")]
    assert [getattr(r, "number", None) for r in unused] == [
        before.number + i for i in range(1, crl_module.OPTIMISTIC_READS + 1)
    ]
    assert row.number == before.number + crl_module.OPTIMISTIC_READS + 1
    assert row.epoch == _current_epoch(services, "admin") - 1  # the late one came after
    crl = x509.load_der_x509_crl(row.der)
    for victim in victims:
        assert crl.get_revoked_certificate_by_serial_number(victim.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(late.serial_number) is None
    checkers.pkilint_crl(row.der)
    checkers.openssl_crl_verify(row.der, der(ca_cert(services, "admin")))


def test_a_delta_crl_overtaken_before_its_snapshot_takes_a_new_number(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = services.crls.generate("admin", services.clock())
    victim = issue(services, "admin-client")
    real = services.db.read_scope
    in_time: list[bool] = []

    def read_scope(*, snapshot: bool = False) -> AbstractContextManager[Session]:
        if snapshot and not in_time:  # the delta's snapshot is about to start
            in_time.append(_revoke_in_thread(services, victim))
        return real(snapshot=snapshot)

    monkeypatch.setattr(services.db, "read_scope", read_scope)
    delta = services.crls.generate("admin", services.clock(), delta=True)
    assert in_time == [True]
    assert delta.number == base.number + 2 and delta.base_number == base.number
    assert delta.epoch == _current_epoch(services, "admin")
    crl = x509.load_der_x509_crl(delta.der)
    assert crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == (
        base.number
    )
    assert crl.get_revoked_certificate_by_serial_number(victim.serial_number) is not None
    checkers.pkilint_crl(delta.der, delta=True)
    checkers.openssl_crl_verify(delta.der, der(ca_cert(services, "admin")))


def test_a_higher_crl_number_never_carries_an_earlier_this_update(services: Services) -> None:
    """A generator reads its clock, then waits for the CA row while another one takes a
    number: it gets the next number, and a thisUpdate no earlier than the one before."""
    now = services.clock()
    first = services.crls.generate("device", now)
    waited = services.crls.generate("device", now - dt.timedelta(seconds=1))
    delta = services.crls.generate("device", now - dt.timedelta(seconds=2), delta=True)
    later = services.crls.generate("device", now + dt.timedelta(seconds=5))
    rows = (first, waited, delta, later)
    assert [r.number for r in rows] == sorted({r.number for r in rows})
    assert [r.this_update for r in rows] == [now, now, now, now + dt.timedelta(seconds=5)]
    issuer = der(ca_cert(services, "device"))
    for row in rows:
        crl = x509.load_der_x509_crl(row.der)
        assert crl.last_update_utc == row.this_update
        validity = dt.timedelta(hours=24) if row is delta else dt.timedelta(days=7)
        assert crl.next_update_utc == row.next_update == row.this_update + validity
        checkers.pkilint_crl(row.der, delta=row is delta)
        checkers.openssl_crl_verify(row.der, issuer)


def test_a_crl_made_by_a_clock_ahead_does_not_hold_later_ones_in_the_future(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator whose clock ran two days ahead: the CRLs made after it take the present
    time (they carried its thisUpdate forward, and relying parties found every one "not yet
    valid" for two days), and the refresher finds its full CRL due at once."""
    now = services.clock()
    good = issue(services, "device")
    chain = _chain(services, "device")
    ahead = services.crls.generate("device", now + dt.timedelta(days=2))
    assert crl_module.due(ahead, ahead.epoch, now)
    refused = checkers._openssl_verify_run(der(good), chain, [ahead.der], None, False)
    assert "not yet valid" in refused.stdout + refused.stderr  # what the fix is about
    with caplog.at_level(logging.ERROR, logger="sekisho.crl"):
        full, delta = services.crls.publish("device", now)
    assert "ahead of this clock" in caplog.text
    assert ahead.number < full.number < delta.number
    assert full.this_update == delta.this_update == now
    assert not crl_module.due(full, full.epoch, now)
    checkers.openssl_verify(der(good), chain, crl_ders=[full.der])
    checkers.pkilint_crl(full.der)
    # Within the tolerance a later thisUpdate is still carried forward (never going back).
    near = services.crls.generate("device", now + dt.timedelta(minutes=2))
    after = services.crls.generate("device", now)
    assert after.this_update == near.this_update == now + dt.timedelta(minutes=2)


def test_a_failing_refresher_step_is_logged_once_per_streak(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """A store or key away for an hour is one warning, not one per tick; a different failure
    is logged again, and the recovery once."""
    refresher = CrlRefresher(services)
    outcomes: list[Exception | None] = [
        StoreError("database error: OperationalError"),
        StoreError("database error: OperationalError"),
        StoreError("database error: OperationalError"),
        KeyBackendError("the token is not reachable"),
        None,
        None,
    ]

    def step(_now: dt.datetime) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    with caplog.at_level(logging.INFO, logger="sekisho.crl"):
        for _ in range(6):
            refresher._run_step("audit checkpoint", step)
    logged = [(r.levelname, r.getMessage(), getattr(r, "code", None)) for r in caplog.records]
    assert logged == [
        ("WARNING", "refresher step failed", StoreError.code),
        ("WARNING", "refresher step failed", KeyBackendError.code),
        ("INFO", "refresher step works again", None),
    ]


def test_one_ca_whose_crl_cannot_be_signed_stops_no_other(
    settings: Settings, services: Services, key_backend: str
) -> None:
    """The admin CA's key goes missing while its CRL is due: the device CA's CRL, due after a
    revocation, is still published, tick after tick; the admin CA's failure is logged once.
    Before: the first failing CA ended the whole pass, every tick."""
    if key_backend != "software":
        pytest.skip("the key file is removed: the software backend's")
    clock = FakeClock(services.clock())
    svc = build_services(settings, clock=clock)  # a fresh backend: no key cached
    try:
        refresher = CrlRefresher(svc, debounce=1.0)
        cert = issue(svc, "device")
        svc.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        (settings.keys_dir / "ca-admin.key").unlink()
        clock.advance(days=4)  # every CA's CRL past half its validity
        for _ in range(3):
            refresher._run_step("crl refresh", refresher.run_once)
            clock.advance(seconds=10)
        with svc.db.scope() as session:
            row = latest_by_name(session, "device", CrlKind.FULL)
            assert row is not None
            crl = x509.load_der_x509_crl(row.der)
        assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        assert crl.last_update_utc >= clock() - dt.timedelta(seconds=60)
        assert "admin" in refresher._ca_failing
    finally:
        svc.close()


def test_the_loop_does_not_spin_while_the_ocsp_step_fails(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked responder's answers are being re-signed (hurry: tick again at once), then the
    store goes away before the sweep: the loop waits its tick again instead of running every
    step back to back for the whole outage."""
    from sekisho import workers

    refresher = CrlRefresher(services, tick=1.0)
    ticks = 0
    real_blocked = services.revoker.revoke_blocked

    def counting(now: dt.datetime) -> int:
        nonlocal ticks
        ticks += 1
        return real_blocked(now)

    def sweep_going_on(*_args: object, **_kwargs: object) -> int:
        services.ocsp.resigning = True
        return 0

    calls = 0

    def outage(*_args: object, **_kwargs: object) -> list[object]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise StoreError("database error: OperationalError")
        return []

    monkeypatch.setattr(services.revoker, "revoke_blocked", counting)
    monkeypatch.setattr(services.ocsp, "resign_from_revoked", sweep_going_on)
    monkeypatch.setattr(workers, "replace_revoked_responders", outage)
    refresher.ocsp._responders_checked = services.clock()  # past the hourly full check
    refresher.start()
    try:
        time.sleep(2.0)
    finally:
        refresher.stop()
    assert "ocsp refresh" in refresher._failing
    assert ticks <= 4, f"{ticks} ticks in 2 s with a 1 s tick: the loop spins"


def test_entries_read_from_sqlite_text_encode_as_from_datetimes() -> None:
    """On SQLite a full CRL reads revocation and invalidity times as the text stored (no
    column-type processing): byte for byte the entries the datetimes the ORM reads give, for
    times with and without microseconds, both sides of the UTCTime years (1950-2049), with and
    without an invalidity date or a reason."""
    import random

    from sqlalchemy.dialects import sqlite

    from ca.crl import _REASON_CODE, Entry, encode_revoked_rows, entry_der

    dialect = sqlite.dialect()
    column = Certificate.__table__.c.revoked_at  # type: ignore[attr-defined]
    to_text = column.type.dialect_impl(dialect).bind_processor(dialect)  # what SQLite stores
    rng = random.Random(5280)
    starts = [dt.datetime(y, 1, 1, tzinfo=dt.UTC) for y in (1949, 1950, 2026, 2049, 2050, 2100)]
    reasons = [None, *(r.value for r in Reason)]
    rows_dt, rows_text, expected = [], [], b""
    for i in range(600):
        when = starts[i % len(starts)] + dt.timedelta(seconds=rng.randrange(-86_400, 86_400))
        if i % 3:
            when = when.replace(microsecond=rng.randrange(1, 1_000_000))
        invalidity = when - dt.timedelta(days=1, microseconds=i) if i % 4 == 0 else None
        reason = reasons[i % len(reasons)]
        serial = f"{rng.getrandbits(159) | 1 << 128:040x}"
        rows_dt.append((serial, reason, when, invalidity))
        rows_text.append((serial, reason, to_text(when), invalidity and to_text(invalidity)))
        code = _REASON_CODE.get(Reason(reason) if reason else Reason.UNSPECIFIED)
        expected += entry_der(Entry(int(serial, 16), when, code, invalidity))
    assert isinstance(rows_text[1][2], str) and "." in rows_text[1][2]  # microseconds stored
    # Text the common path must read right or leave to the general one: no fraction, an
    # offset, a leading-zero serial, a serial whose first octet has its high bit set.
    utc = dt.UTC
    for serial, stored, when in (
        ("7f" * 20, "2026-11-27 22:31:24", dt.datetime(2026, 11, 27, 22, 31, 24, tzinfo=utc)),
        ("00" * 19 + "01", "2026-11-28 07:31:24+09:00", dt.datetime(2026, 11, 27, 22, 31, 24,
                                                                    tzinfo=utc)),
        ("0080" + "00" * 18, "2049-12-31 23:59:59.999999", dt.datetime(2049, 12, 31, 23, 59, 59,
                                                                       999999, tzinfo=utc)),
        ("ff" * 20, "1950-01-01 00:00:00", dt.datetime(1950, 1, 1, tzinfo=utc)),
        # Offsets in text of the common path's lengths (26 and 19 characters): converted.
        ("0a" * 20, "2024-01-02 03:04:05.1+0900", dt.datetime(2024, 1, 1, 18, 4, 5, 100000,
                                                               tzinfo=utc)),
        ("0b" * 20, "2024-01-02 03:04:05.123+09", dt.datetime(2024, 1, 1, 18, 4, 5, 123000,
                                                               tzinfo=utc)),
        ("0c" * 20, "2024-01-02 03:04-09", dt.datetime(2024, 1, 2, 12, 4, tzinfo=utc)),
        ("0d" * 20, "2049-12-31 23:00:00.1-0500", dt.datetime(2050, 1, 1, 4, 0, 0, 100000,
                                                               tzinfo=utc)),
        ("0e" * 20, "2024-01-02T03:04:05.000000", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc)),
    ):  # fmt: skip
        rows_dt.append((serial, "key_compromise", when, None))
        rows_text.append((serial, "key_compromise", stored, None))
        expected += entry_der(Entry(int(serial, 16), when, _REASON_CODE[Reason.KEY_COMPROMISE]))
    default = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    rows_dt.append(("01", None, None, None))  # no revocation time stored: the default
    rows_text.append(("01", None, None, None))
    expected += entry_der(Entry(1, default, None))
    from_dt, from_text = bytearray(), bytearray()
    assert encode_revoked_rows(rows_dt, default, from_dt) == 610
    assert encode_revoked_rows(rows_text, default, from_text) == 610
    assert bytes(from_text) == bytes(from_dt) == expected
    for impossible in ("2024-02-30 00:00:00", "2024-01-02 24:00:00.000000"):
        with pytest.raises(ValueError):  # as the general path refuses it, never encoded
            encode_revoked_rows([("01", None, impossible, None)], default, bytearray())


def test_revocation_times_are_right_whatever_the_servers_time_zone(
    services: Services, db_backend: str
) -> None:
    """The full CRL reads the stored times without the column type's conversion; on a
    PostgreSQL whose time zone is Asia/Tokyo its entries still carry the UTC times the ORM
    reads (on SQLite the stored text has no zone)."""
    if db_backend == "postgres":
        with services.db.engine.connect() as conn:
            database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
            conn.exec_driver_sql(f"ALTER DATABASE \"{database}\" SET TimeZone = 'Asia/Tokyo'")
            conn.commit()
        services.db.engine.dispose()  # new connections take the database's setting
        with services.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar_one() == "Asia/Tokyo"
    now = services.clock()
    certs = [issue(services, "device") for _ in range(3)]
    services.revoker.revoke("device", certs[0].serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    services.revoker.revoke(
        "device",
        certs[1].serial_number,
        Reason.KEY_COMPROMISE,
        TEST_ACTOR,
        invalidity_date=now - dt.timedelta(hours=30, microseconds=7),
    )
    full = x509.load_der_x509_crl(services.crls.generate("device", now).der)
    with services.db.read_scope() as session:
        rows = {
            int(row.serial, 16): row
            for row in session.scalars(
                select(Certificate).where(
                    Certificate.serial.in_([serial_hex(c.serial_number) for c in certs[:2]])
                )
            )
        }
    for cert in certs[:2]:
        entry = full.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        row = rows[cert.serial_number]
        assert row.revoked_at is not None
        assert entry.revocation_date_utc == row.revoked_at.replace(microsecond=0)
    entry = full.get_revoked_certificate_by_serial_number(certs[1].serial_number)
    assert entry is not None
    invalidity = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert invalidity.invalidity_date_utc == (now - dt.timedelta(hours=30, microseconds=7)).replace(
        microsecond=0
    )
    assert full.get_revoked_certificate_by_serial_number(certs[2].serial_number) is None
