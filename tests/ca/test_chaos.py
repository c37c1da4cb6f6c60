"""kill -9 chaos (security target 10), on SQLite and on PostgreSQL.

Each round starts worker processes that issue certificates from several threads at once,
revoke every fourth one they receive (all reasons, hold included) and publish CRLs, and kills
them all with SIGKILL: at a random moment, or (every other round) while intent rows are
committed and their certificates not yet stored (frozen with SIGSTOP at such a moment first).
A worker writes down what a client saw (a certificate handed out, a revocation confirmed)
only once the call has returned. Then the deployment is opened again (the restart) and
reconciled, and:

* every certificate a client saw has its row, holding that very certificate; every revocation
  a client saw is stored;
* the rows written in the round are ``issued``, ``revoked`` or ``reserved`` (possibly signed:
  the kill came between the intent and the certificate's row), never half-written: a row with
  DER holds a certificate its CA signed, and a revoked row was issued;
* every row of the round answers ``good`` or ``revoked`` over OCSP, never ``unknown``: a
  reserved row is answered good until it is revoked;
* the journal verifies and has one ``ca.issue`` per certificate stored and one ``ca.revoke``
  per revocation, CRL numbers were never reused, and SQLite's file passes its integrity check;
* issuing works again at once (no writer lock left behind), and once the operator revokes the
  reserved rows (what ``cert check`` asks for), republishes the CRLs and re-signs the OCSP
  answers, ``cert check`` finds nothing, the reserved serials are on the CRL and answered
  revoked.

The suite runs a few short rounds; ``make chaos`` runs the nightly size (20 rounds of 200
concurrent issuances: ``CHAOS_ROUNDS``, ``CHAOS_PROCESSES``,
``CHAOS_THREADS``). A round's random choices come from ``CHAOS_SEED`` (printed
on failure) and the round number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp
from sqlalchemy import select, text

from audit.models import JournalRecord
from audit.verify import verify
from ca.models import Certificate, CertificateAuthority, CertStatus, Crl, CrlKind
from ca.revocation import Reason
from ca.tbs import serial_hex
from ocsp.store import resign_all
from sekisho.check import StoreCheck
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.audit.conftest import audit_keys
from tests.ca.helpers import ca_cert, der, issue
from tests.conftest import TEST_ACTOR, Deployment, make_settings
from tests.support.checkers import openssl_crl_verify, pkilint_crl

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "2"))
PROCESSES = int(os.environ.get("CHAOS_PROCESSES", "2"))
THREADS = int(os.environ.get("CHAOS_THREADS", "4"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(1 << 32))))
PROFILES = (("admin-client", "admin"), ("device", "device"))
REASONS = (
    Reason.SUPERSEDED,
    Reason.KEY_COMPROMISE,
    Reason.CERTIFICATE_HOLD,
    Reason.CESSATION_OF_OPERATION,
)
WORKER_SECONDS = 120.0  # a worker stops by itself after this (it is killed long before)
SEEN_SECONDS = 90.0  # for the workers to hand out the round's number of certificates
INTENT_SECONDS = 5.0  # for an intent row without its certificate to show up
REPO = Path(__file__).resolve().parents[2]


def _chaos_worker(data_dir: str, database_url: str, threads: int, out: str) -> None:
    """Runs in a worker process: issues, revokes and publishes until killed. Each line of
    ``out`` is written once the call it reports has returned, in one ``write``: ``C <DER hex>``
    a certificate handed out, ``V <ca> <serial hex>`` a revocation confirmed, ``L <ca> <CRL
    number> <SHA-256>`` a full CRL published, ``E <text>`` an error (none is expected before
    the kill)."""
    overrides = {"database_url": database_url} if database_url else {}
    services = build_services(make_settings(Path(data_dir), **overrides))
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    stop = time.monotonic() + WORKER_SECONDS

    def report(line: str) -> None:
        os.write(fd, line.encode("ascii", "backslashreplace") + b"\n")

    def issuer(index: int) -> None:
        n = 0
        try:
            while time.monotonic() < stop:
                profile, ca = PROFILES[(index + n) % 2]
                cert = issue(services, profile)
                report("C " + der(cert).hex())
                if n % 4 == 3:
                    reason = REASONS[(index + n // 4) % len(REASONS)]
                    services.revoker.revoke(ca, cert.serial_number, reason, TEST_ACTOR)
                    report(f"V {ca} {serial_hex(cert.serial_number)}")
                n += 1
        except BaseException as exc:  # reported, for the test to fail on
            report(f"E {exc!r}")

    def publisher() -> None:
        try:
            while time.monotonic() < stop:
                for _, ca in PROFILES:
                    full, _delta = services.crls.publish(ca, services.clock())
                    report(f"L {ca} {full.number} {hashlib.sha256(full.der).hexdigest()}")
                time.sleep(0.05)
        except BaseException as exc:
            report(f"E {exc!r}")

    workers = [threading.Thread(target=issuer, args=(i,), daemon=True) for i in range(threads)]
    workers.append(threading.Thread(target=publisher, daemon=True))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WORKER_SECONDS + 10)


WORKER = (
    "import sys; from tests.ca.test_chaos import _chaos_worker as w; "
    "w(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])"
)


@dataclasses.dataclass
class Seen:
    """What the clients of a round saw."""

    certificates: list[x509.Certificate]
    revoked: set[tuple[str, str]]  # (CA, serial hex)
    crls: set[tuple[str, int, str]]  # (CA, CRL number, SHA-256 of the DER)
    errors: list[str]


def _read(outs: list[Path]) -> Seen:
    seen = Seen([], set(), set(), [])
    for out in outs:
        if not out.exists():
            continue
        data = out.read_bytes()
        # A line the kill cut short (no newline yet) was never seen by anyone: ignored.
        for line in data[: data.rfind(b"\n") + 1].decode("ascii").splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "C":
                seen.certificates.append(x509.load_der_x509_certificate(bytes.fromhex(rest)))
            elif kind == "V":
                ca, _, serial = rest.partition(" ")
                seen.revoked.add((ca, serial))
            elif kind == "L":
                ca, number, digest = rest.split(" ")
                seen.crls.add((ca, int(number), digest))
            else:
                seen.errors.append(line)
    return seen


def _count_handed_out(outs: list[Path]) -> int:
    total = 0
    for out in outs:
        with contextlib.suppress(FileNotFoundError):
            data = out.read_bytes()
            total += data.count(b"\nC ") + data.startswith(b"C ")
    return total


def _intents_pending(services: Services) -> int:
    with services.db.read_scope() as session:
        return len(
            session.scalars(
                select(Certificate.id).where(Certificate.status == CertStatus.RESERVED).limit(2)
            ).all()
        )


def _stop_among_intents(procs: list[subprocess.Popen[bytes]], services: Services) -> None:
    """Freeze the workers (SIGSTOP) until a moment when at least two intents are committed
    without their certificates, bounded; the kill then lands on them. A commit already on its
    way is let finish (PostgreSQL completes one the client sent; SQLite recovers at most one
    writer's commit from the WAL), so at least one stays reserved."""
    deadline = time.monotonic() + INTENT_SECONDS
    while time.monotonic() < deadline:
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        if _intents_pending(services) >= 2:
            return
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)


@dataclasses.dataclass
class Row:
    ca: str
    serial: str
    status: CertStatus
    der: bytes | None
    fingerprint: str | None


def _rows(services: Services) -> dict[str, Row]:
    with services.db.read_scope() as session:
        names = {
            int(ca_id): str(name)
            for ca_id, name in session.execute(
                select(CertificateAuthority.id, CertificateAuthority.name)
            )
        }
        return {
            serial: Row(names[issuer_id], serial, CertStatus(status), der, fingerprint)
            for issuer_id, serial, status, der, fingerprint in session.execute(
                select(
                    Certificate.issuer_id,
                    Certificate.serial,
                    Certificate.status,
                    Certificate.der,
                    Certificate.fingerprint_sha256,
                )
            )
        }


def _ocsp_status(services: Services, issuer: x509.Certificate, serial: str) -> ocsp.OCSPCertStatus:
    """The answer of the responder's own code to a SHA-1 CertID request for ``serial``."""
    key = issuer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    name_hash = hashlib.sha1(issuer.subject.public_bytes()).digest()  # noqa: S324 (CertID)
    key_hash = _key_hash(key)
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, int(serial, 16), hashes.SHA1())  # noqa: S303
        .build()
        .public_bytes(Encoding.DER)
    )
    answer = ocsp.load_der_ocsp_response(services.ocsp.answer(request, services.clock()))
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL, answer.response_status
    return answer.certificate_status


def _key_hash(spki_der: bytes) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING's contents (RFC 6960 4.1.1)."""
    from asn1crypto import keys

    info = keys.PublicKeyInfo.load(spki_der)
    return hashlib.sha1(info["public_key"].contents[1:]).digest()  # noqa: S324


def _start(
    settings: Settings, deployment: Deployment, outs: list[Path], logs: list[Path]
) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for out, log in zip(outs, logs, strict=True):
        args = [str(settings.data_dir), deployment.database_url, str(THREADS), str(out)]
        with log.open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, *args],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _round(
    settings: Settings, deployment: Deployment, services: Services, tmp: Path, number: int
) -> tuple[int, int]:
    """One round; (certificates handed out, reserved rows left)."""
    rng = random.Random(SEED * 1000 + number)
    target = rng.randint(1, 60)
    during_intent = number % 2 == 1
    before = set(_rows(services))
    outs = [tmp / f"round{number}-worker{i}.out" for i in range(PROCESSES)]
    logs = [tmp / f"round{number}-worker{i}.log" for i in range(PROCESSES)]
    procs = _start(settings, deployment, outs, logs)
    try:
        deadline = time.monotonic() + SEEN_SECONDS
        while time.monotonic() < deadline and _count_handed_out(outs) < target:
            if any(proc.poll() is not None for proc in procs):
                break  # a worker ended by itself: reported below
            time.sleep(0.02)
        if during_intent:
            _stop_among_intents(procs, services)
        else:
            time.sleep(rng.uniform(0.0, 0.2))
    finally:
        for proc in procs:  # by PID, every one
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(30)
    output = "\n".join(log.read_text("utf-8", "replace")[-2000:] for log in logs)
    where = f"seed {SEED}, round {number}:\n{output}"
    assert [proc.returncode for proc in procs] == [-signal.SIGKILL] * PROCESSES, where
    seen = _read(outs)
    assert not seen.errors, f"{where}\n{seen.errors[:5]}"
    assert len(seen.certificates) >= target, f"{where}\nonly {len(seen.certificates)} handed out"

    # The restart: the deployment opened again, as `serve` or a command would.
    again = build_services(settings)
    try:
        return len(seen.certificates), _check_after_kill(again, before, seen, where)
    finally:
        again.close()


def _check_after_kill(services: Services, before: set[str], seen: Seen, where: str) -> int:
    rows = _rows(services)
    new = {serial: row for serial, row in rows.items() if serial not in before}
    issuers = {ca: ca_cert(services, ca) for _, ca in PROFILES}

    for cert in seen.certificates:
        row = rows.get(serial_hex(cert.serial_number))
        assert row is not None, f"{where}\nhanded out without a row: {cert.serial_number:x}"
        assert row.der == der(cert), f"{where}\nrow {row.serial} holds another certificate"
        assert row.fingerprint == hashlib.sha256(der(cert)).hexdigest(), where
    for ca, serial in seen.revoked:
        assert rows[serial].ca == ca and rows[serial].status is CertStatus.REVOKED, where

    reserved = []
    for row in new.values():
        assert row.status in (CertStatus.ISSUED, CertStatus.REVOKED, CertStatus.RESERVED), (
            f"{where}\n{row}"
        )
        if row.status is CertStatus.RESERVED:
            assert row.der is None and row.fingerprint is None, f"{where}\n{row}"
            reserved.append(row)
            continue
        assert row.der is not None, f"{where}\nno certificate in {row}"  # revoked: was issued
        cert = x509.load_der_x509_certificate(row.der)
        cert.verify_directly_issued_by(issuers[row.ca])
        assert serial_hex(cert.serial_number) == row.serial, where
        assert row.fingerprint == hashlib.sha256(row.der).hexdigest(), where

    # OCSP: authoritative for every row, a reserved one included (good until revoked).
    expected = {
        CertStatus.ISSUED: ocsp.OCSPCertStatus.GOOD,
        CertStatus.RESERVED: ocsp.OCSPCertStatus.GOOD,
        CertStatus.REVOKED: ocsp.OCSPCertStatus.REVOKED,
    }
    for row in new.values():
        status = _ocsp_status(services, issuers[row.ca], row.serial)
        assert status is expected[row.status], f"{where}\n{row.serial} {row.status}: {status}"

    with services.db.read_scope(snapshot=True) as session:
        verify(session, services.settings.journal_origin, trusted_keys=audit_keys(services))
        entries = session.execute(
            select(JournalRecord.action, JournalRecord.object_serial).where(
                JournalRecord.outcome == "success",
                JournalRecord.action.in_(("ca.issue", "ca.revoke")),
                JournalRecord.object_serial.in_(list(new)),
            )
        ).all()
        names = {ca_id: name for ca_id, name in session.execute(
            select(CertificateAuthority.id, CertificateAuthority.name)
        )}  # fmt: skip
        stored_crls = {
            (names[issuer_id], number): sha256
            for issuer_id, number, sha256 in session.execute(
                select(Crl.issuer_id, Crl.number, Crl.sha256)
            )
        }
        if services.db.engine.dialect.name == "sqlite":
            assert session.execute(text("PRAGMA integrity_check")).scalar_one() == "ok", where
    issued_entries = sorted(s for a, s in entries if a == "ca.issue")
    revoked_entries = sorted(s for a, s in entries if a == "ca.revoke")
    assert issued_entries == sorted(s for s, r in new.items() if r.der is not None), where
    assert revoked_entries == sorted(s for s, r in new.items() if r.status is CertStatus.REVOKED), (
        where
    )
    # Every CRL a publisher was told of is stored as it was published (CRLs can be pruned,
    # but not within the minutes of a round).
    for ca, number, digest in seen.crls:
        assert stored_crls.get((ca, number)) == digest, f"{where}\nCRL {ca} #{number}"

    # Issuing works at once after the kill.
    issue(services, "device")

    # The reconciliation `cert check` asks for: the possibly-signed rows revoked, CRLs and
    # OCSP answers brought up to date; then nothing is left to find.
    for row in reserved:
        services.revoker.revoke(
            row.ca, int(row.serial, 16), Reason.CESSATION_OF_OPERATION, TEST_ACTOR
        )
    now = services.clock()
    published = {ca: services.crls.publish(ca, now)[0] for _, ca in PROFILES}
    resign_all(services, now)
    with services.db.read_scope(snapshot=True) as session:
        findings = list(StoreCheck(session, services.clock(), grace=dt.timedelta(0)).findings())
    assert not findings, f"{where}\n{findings[:10]}"
    for row in reserved:
        crl = x509.load_der_x509_crl(published[row.ca].der)
        assert crl.get_revoked_certificate_by_serial_number(int(row.serial, 16)) is not None
        status = _ocsp_status(services, issuers[row.ca], row.serial)
        assert status is ocsp.OCSPCertStatus.REVOKED, f"{where}\n{row.serial}"
    for ca, crl_row in published.items():
        assert crl_row.kind is CrlKind.FULL
        # Numbered past everything signed before the kill (told of or not).
        assert crl_row.number > max(n for c, n in stored_crls if c == ca), where
        pkilint_crl(crl_row.der)
        openssl_crl_verify(crl_row.der, der(issuers[ca]))
    return len(reserved)


def test_kill_minus_nine_at_random_moments(
    services: Services, settings: Settings, deployment: Deployment, tmp_path: Path
) -> None:
    handed_out = reserved = 0
    for number in range(ROUNDS):
        seen, left = _round(settings, deployment, services, tmp_path, number)
        handed_out += seen
        reserved += left
    print(f"chaos: seed {SEED}, {ROUNDS} rounds, {handed_out} handed out, {reserved} reserved")
    # The rounds that kill while intents are committed leave at least one possibly-signed row
    # behind (two were pending, at most one commit can land after the freeze), or the
    # reconciliation above was never exercised.
    if ROUNDS >= 2:
        assert reserved >= 1, f"seed {SEED}: no kill landed between an intent and its row"
