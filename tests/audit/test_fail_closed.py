"""If the journal cannot be written, the operation it records fails: nothing is issued or
revoked unrecorded. The fault is real: a trigger in the store refuses the journal's insert."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from audit.models import Checkpoint, JournalHead, JournalRecord
from audit.verify import verify
from ca.models import Certificate, CertificateAuthority, CertStatus
from ca.revocation import Reason
from sekisho.errors import AuditError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.audit.conftest import append, audit_keys, rows, run_cli, sql, template_seq
from tests.ca.helpers import issue, request_for
from tests.conftest import TEST_ACTOR, FakeClock


def refuse_inserts(services: Services, table: str) -> None:
    if services.db.engine.dialect.name == "sqlite":
        sql(
            services,
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'journal storage refused'); END",
        )
    else:
        sql(
            services,
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'journal storage refused'; END $$",
        )
        sql(
            services,
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION refuse_{table}()",
        )


def allow_inserts(services: Services, table: str) -> None:
    if services.db.engine.dialect.name == "sqlite":
        sql(services, f"DROP TRIGGER refuse_{table}")
    else:
        sql(services, f"DROP TRIGGER refuse_{table} ON {table}")


def journal_head(services: Services) -> tuple[int, str]:
    with services.db.scope() as session:
        head = session.get(JournalHead, 1)
        assert head is not None
        return head.seq, head.hash


def certificates(services: Services) -> list[Certificate]:
    with services.db.scope() as session:
        return list(session.scalars(select(Certificate).order_by(Certificate.id)))


def revocation_epochs(services: Services) -> dict[str, int]:
    with services.db.scope() as session:
        return {
            ca.name: ca.revocation_epoch for ca in session.scalars(select(CertificateAuthority))
        }


def test_issuance_fails_and_hands_out_nothing_when_the_journal_is_down(
    journal_services: Services,
) -> None:
    before = certificates(journal_services)
    head_before = journal_head(journal_services)
    refuse_inserts(journal_services, "audit_records")

    with pytest.raises(AuditError) as caught:
        journal_services.ca.issue(request_for("device"), TEST_ACTOR)
    assert caught.value.code == "audit-unavailable" and caught.value.exit_code == 74
    assert "could not be written" in caught.value.message

    after = certificates(journal_services)
    known = {c.id for c in before}
    new = [c for c in after if c.id not in known]
    # The signed certificate was never stored as issued: no DER, not ISSUED.
    assert all(c.status is not CertStatus.ISSUED and c.der is None for c in new)
    issued = [c for c in after if c.status is CertStatus.ISSUED]
    assert len(issued) == len([c for c in before if c.status is CertStatus.ISSUED])
    assert journal_head(journal_services) == head_before

    allow_inserts(journal_services, "audit_records")
    cert = issue(journal_services, "device")
    with journal_services.db.scope() as session:
        last = session.scalars(select(JournalRecord).order_by(JournalRecord.seq.desc())).first()
        assert last is not None and last.seq == head_before[0] + 1
        assert last.object_serial == f"{cert.serial_number:040x}"
        verify(
            session,
            journal_services.settings.journal_origin,
            trusted_keys=audit_keys(journal_services),
        )


def test_revocation_fails_and_changes_nothing_when_the_journal_is_down(
    journal_services: Services,
) -> None:
    cert = issue(journal_services, "device")
    serial = f"{cert.serial_number:040x}"
    epochs = revocation_epochs(journal_services)
    head_before = journal_head(journal_services)
    refuse_inserts(journal_services, "audit_records")

    with pytest.raises(AuditError):
        journal_services.revoker.revoke(
            "device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
        )
    (status, revoked_at, reason) = rows(
        journal_services,
        "SELECT status, revoked_at, revocation_reason FROM certificates WHERE serial = :s",
        {"s": serial},
    )[0]
    assert (status, revoked_at, reason) == ("issued", None, None)
    assert revocation_epochs(journal_services) == epochs
    assert journal_head(journal_services) == head_before

    allow_inserts(journal_services, "audit_records")
    journal_services.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    assert (
        rows(journal_services, "SELECT status FROM certificates WHERE serial = :s", {"s": serial})[
            0
        ][0]
        == "revoked"
    )


def test_revocation_through_the_cli_fails_cleanly_when_the_journal_is_down(
    journal_services: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = issue(journal_services, "device")
    refuse_inserts(journal_services, "audit_records")
    code, _out, err = run_cli(
        capsys, cli_data_dir, "revoke", "--ca", "device", f"{cert.serial_number:x}"
    )
    assert code == 74
    assert "error: audit-unavailable: the audit journal could not be written" in err
    assert "Traceback" not in err
    (status,) = rows(
        journal_services,
        "SELECT status FROM certificates WHERE serial = :s",
        {"s": f"{cert.serial_number:040x}"},
    )[0]
    assert status == "issued"


def test_operation_fails_when_the_due_checkpoint_cannot_be_stored(
    journal_services: Services, clock: FakeClock
) -> None:
    start = template_seq(journal_services)
    append(journal_services, clock, 49)  # the next record, start+50, is due one
    head_before = journal_head(journal_services)
    refuse_inserts(journal_services, "audit_checkpoints")
    with pytest.raises(AuditError):
        journal_services.ca.issue(request_for("device"), TEST_ACTOR)
    assert journal_head(journal_services) == head_before
    device = [c for c in certificates(journal_services) if c.profile == "device"]
    assert all(c.status is not CertStatus.ISSUED and c.der is None for c in device)
    with journal_services.db.scope() as session:
        assert [c.seq for c in session.scalars(select(Checkpoint))] == [1, start]


def test_a_responder_rotation_the_journal_refuses_leaves_no_key_file(settings: Settings) -> None:
    """From the review: each responder rotation refused for want of the journal left its new
    key file behind (no certificate, no responder row): one per CA per hourly try. (The
    software backend itself, not the recording wrapper: only its key files are removed.)"""
    from ocsp.signers import ensure_responders

    services = build_services(settings)
    try:
        keys = settings.data_dir / "keys"
        before = sorted(p.name for p in keys.iterdir())
        refuse_inserts(services, "audit_records")
        with pytest.raises(AuditError):
            ensure_responders(services, services.clock(), TEST_ACTOR, rotate=True)
        assert sorted(p.name for p in keys.iterdir()) == before
        allow_inserts(services, "audit_records")
        changes = ensure_responders(services, services.clock(), TEST_ACTOR, rotate=True)
        assert changes and len(list(keys.iterdir())) == len(before) + len(changes)
    finally:
        services.close()
