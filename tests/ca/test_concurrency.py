"""Concurrency on one store, on SQLite and on PostgreSQL.

Issuance: 1000 certificates from 8 threads sharing one ``Services``, and 1000 from 4 processes
each building its own ``Services`` from the same settings (what several web/worker processes do
in production). Afterwards: 1000 distinct serials, exactly 1000 new ``issued`` rows each holding
the very certificate handed out, nothing left ``reserved`` or ``failed``, every certificate
verifies against its issuing CA, and the audit journal verifies with exactly one ``ca.issue``
entry per certificate.

Mixed load: issuing, revoking and CRL generation at once must not deadlock, lose a revocation,
reuse a CRL number or give a higher CRL number older revocation state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from audit.models import JournalHead, JournalRecord
from audit.verify import verify
from ca.models import Certificate, CertificateAuthority, CertStatus, Crl, CrlKind
from ca.revocation import Reason
from ca.tbs import serial_hex
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.audit.conftest import audit_keys
from tests.ca.helpers import ca_cert, der, issue
from tests.conftest import TEST_ACTOR, Deployment, make_settings

pytestmark = pytest.mark.slow

TOTAL = 1000
THREADS = 8
PROCESSES = 4
PROFILES = ("admin-client", "device")  # alternate: both issuing CAs take load at once
DEADLINE = 120.0  # seconds for all workers; the test is meant to take well under that


def _issue_many(services: Services, count: int, offset: int) -> list[x509.Certificate]:
    return [issue(services, PROFILES[(offset + i) % 2]) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Baseline:
    issued: int
    head_seq: int
    checkpoints: int


def _baseline(services: Services) -> Baseline:
    with services.db.scope() as session:
        issued = session.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(Certificate.status == CertStatus.ISSUED)
        )
        head = session.scalars(select(JournalHead)).one()
        result = verify(
            session, services.settings.journal_origin, trusted_keys=audit_keys(services)
        )
    return Baseline(int(issued or 0), head.seq, result.checkpoints)


def _check_outcome(services: Services, certs: list[x509.Certificate], before: Baseline) -> None:
    assert len(certs) == TOTAL
    serials = [serial_hex(c.serial_number) for c in certs]
    assert len(set(serials)) == TOTAL, "a serial number was handed out twice"

    issuers = {name: ca_cert(services, name) for name in ("admin", "device")}
    with services.db.scope() as session:
        ca_names = {
            ca_id: ca_name
            for ca_id, ca_name in session.execute(
                select(CertificateAuthority.id, CertificateAuthority.name)
            )
        }
        rows = {
            row.serial: row
            for row in session.scalars(
                select(Certificate).where(Certificate.status == CertStatus.ISSUED)
            )
        }
        leftovers = session.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(Certificate.status.in_([CertStatus.RESERVED, CertStatus.FAILED]))
        )
        journal = verify(
            session, services.settings.journal_origin, trusted_keys=audit_keys(services)
        )
        entries = list(
            session.scalars(
                select(JournalRecord)
                .where(JournalRecord.seq > before.head_seq)
                .order_by(JournalRecord.seq)
            )
        )
    assert len(rows) - before.issued == TOTAL
    assert leftovers == 0, "an issuance left a reserved or failed row behind"
    for cert, serial in zip(certs, serials, strict=True):
        row = rows.get(serial)
        assert row is not None, f"certificate {serial} has no issued row"
        data = der(cert)
        assert row.der == data, f"row {serial} holds another certificate"
        assert row.fingerprint_sha256 == hashlib.sha256(data).hexdigest()
        assert x509.load_der_x509_certificate(row.der).serial_number == cert.serial_number
        issuer = issuers[ca_names[row.issuer_id]]
        cert.verify_directly_issued_by(issuer)  # raises on a bad signature or issuer name

    # The journal verifies end to end (chain + signed checkpoints) and has one success entry
    # per certificate, nothing else, in one gapless sequence.
    assert journal.head_seq == before.head_seq + TOTAL
    assert [e.seq for e in entries] == list(range(before.head_seq + 1, journal.head_seq + 1))
    assert {(e.action, e.outcome) for e in entries} == {("ca.issue", "success")}
    assert sorted(e.object_serial or "" for e in entries) == sorted(serials)
    # audit_checkpoint_every=50 in the test settings: the head was signed along the way.
    assert journal.checkpoints >= before.checkpoints + TOTAL // 50


def test_concurrent_threads(services: Services) -> None:
    before = _baseline(services)
    per_thread = TOTAL // THREADS
    results: list[list[x509.Certificate]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS, timeout=30)

    def work(index: int) -> None:
        try:
            start.wait()
            results[index] = _issue_many(services, per_thread, index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(THREADS)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, DEADLINE - (time.monotonic() - began)))
    assert not any(t.is_alive() for t in threads), "issuing threads did not finish in time"
    assert not errors, f"issuance failed under concurrency: {errors[:3]!r}"
    _check_outcome(services, [c for part in results for c in part], before)


def _process_worker(data_dir: str, database_url: str, count: int, offset: int, out: str) -> None:
    """Runs in a worker process: its own settings, engine, key backend and journal. Without
    the lint gate: what processes share is the store, and the gate holds nothing across
    processes (the thread test runs it shared by eight threads); it would add some 10 s of
    pkilint to what this test measures, the store's serials and rows."""
    overrides = {"database_url": database_url} if database_url else {}
    settings = make_settings(Path(data_dir), lint_before_signing=False, **overrides)
    services = build_services(settings)
    try:
        certs = _issue_many(services, count, offset)
    finally:
        services.close()
    Path(out).write_bytes(b"".join(der(c) for c in certs))


WORKER = (
    "import sys; from tests.ca.test_concurrency import _process_worker as w; "
    "w(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])"
)
REPO = Path(__file__).resolve().parents[2]


def _read_ders(path: Path) -> list[x509.Certificate]:
    # Concatenated DER: each certificate is one SEQUENCE with a two-byte long-form length.
    data, certs, pos = path.read_bytes(), [], 0
    while pos < len(data):
        assert data[pos] == 0x30 and data[pos + 1] == 0x82, "unexpected DER framing"
        end = pos + 4 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        certs.append(x509.load_der_x509_certificate(data[pos:end]))
        pos = end
    return certs


def test_concurrent_processes(
    services: Services, settings: Settings, deployment: Deployment, tmp_path: Path
) -> None:
    before = _baseline(services)
    per_process = TOTAL // PROCESSES
    outs = [tmp_path / f"worker-{i}.der" for i in range(PROCESSES)]
    logs = [tmp_path / f"worker-{i}.log" for i in range(PROCESSES)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[bytes]] = []
    began = time.monotonic()
    try:
        for i in range(PROCESSES):
            args = [str(settings.data_dir), deployment.database_url, str(per_process), str(i)]
            with logs[i].open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, *args, str(outs[i])],
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, DEADLINE - (time.monotonic() - began)))
    finally:
        for proc in procs:  # stop any straggler by its PID
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    codes = [proc.returncode for proc in procs]
    output = "\n".join(log.read_text("utf-8", "replace")[-2000:] for log in logs)
    assert codes == [0] * PROCESSES, f"a worker process failed: {codes}\n{output}"
    certs = [c for out in outs for c in _read_ders(out)]
    _check_outcome(services, certs, before)


def test_issue_revoke_and_crls_at_once(services: Services) -> None:
    """Issuers revoke every other certificate they get while two threads publish CRLs: no
    deadlock, no lost revocation, CRL numbers unique and epochs never going backwards."""
    before = _baseline(services)
    issuers, per_issuer = 4, 40
    issued: list[x509.Certificate] = []
    revoked: list[x509.Certificate] = []
    numbers: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def issue_and_revoke(index: int) -> None:
        try:
            for i in range(per_issuer):
                cert = issue(services, "admin-client")
                with lock:
                    issued.append(cert)
                if (index + i) % 2:
                    services.revoker.revoke(
                        "admin", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
                    )
                    with lock:
                        revoked.append(cert)
        except BaseException as exc:
            errors.append(exc)

    def publish() -> None:
        try:
            for i in range(200):  # bounded; normally stops when the issuers are done
                if done.is_set():
                    return
                row = services.crls.generate("admin", services.clock(), delta=bool(i % 2))
                with lock:
                    numbers.append(row.number)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=issue_and_revoke, args=(i,)) for i in range(issuers)]
    publishers = [threading.Thread(target=publish) for _ in range(2)]
    began = time.monotonic()
    for t in [*workers, *publishers]:
        t.daemon = True
        t.start()
    for t in workers:
        t.join(max(0.0, DEADLINE - (time.monotonic() - began)))
    done.set()
    for t in publishers:
        t.join(max(0.0, DEADLINE - (time.monotonic() - began)))
    assert not any(t.is_alive() for t in [*workers, *publishers]), "deadlock or stall"
    assert not errors, f"concurrent issue/revoke/CRL failed: {errors[:3]!r}"
    assert len(issued) == issuers * per_issuer and len(revoked) == len(issued) // 2
    assert numbers and len(set(numbers)) == len(numbers)

    final = services.crls.generate("admin", services.clock())
    crl = x509.load_der_x509_crl(final.der)
    on_crl = {entry.serial_number for entry in crl}
    assert {c.serial_number for c in revoked} <= on_crl
    assert not on_crl & {c.serial_number for c in issued if c not in revoked}
    with services.db.scope() as session:
        ca_id = session.scalar(
            select(CertificateAuthority.id).where(CertificateAuthority.name == "admin")
        )
        crls = list(session.scalars(select(Crl).where(Crl.issuer_id == ca_id).order_by(Crl.number)))
        journal = verify(
            session, services.settings.journal_origin, trusted_keys=audit_keys(services)
        )
    # A higher CRL number never covers older revocation state than a lower one.
    epochs = [c.epoch for c in crls]
    assert epochs == sorted(epochs)
    assert [c.number for c in crls] == sorted({c.number for c in crls})
    issuer_key = ca_cert(services, "admin").public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    for row in crls:
        parsed = x509.load_der_x509_crl(row.der)
        assert parsed.is_signature_valid(issuer_key)
        number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert number == row.number
        if row.kind is CrlKind.DELTA:
            assert row.base_number is not None and row.base_number < row.number
    # issue + each CRL: one journal entry each; a revocation for keyCompromise two (the
    # revocation, the block of its key); one gapless verified chain.
    expected = len(issued) + 2 * len(revoked) + len(numbers) + 1
    assert journal.head_seq == before.head_seq + expected
