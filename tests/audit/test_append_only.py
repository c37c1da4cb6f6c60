"""The journal is append-only in the schema (security target 33): through the application's own
connection, its records and checkpoints cannot be updated, deleted or (PostgreSQL) truncated,
while issuance, revocation and checkpoints go on as before."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from audit.models import Checkpoint, JournalRecord
from audit.verify import verify
from ca.revocation import Reason
from sekisho.errors import StoreError
from sekisho.services import Services
from sekisho.workers import AuditCheckpointer
from tests.audit.conftest import append, audit_keys, template_seq
from tests.ca.helpers import issue
from tests.conftest import TEST_ACTOR, FakeClock

# name -> (statement, the refusal's "<table> is append-only: <what>", databases it runs on)
BOTH = ("sqlite", "postgresql")
STATEMENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "update-record": (
        "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2",
        "audit_records is append-only: UPDATE refused",
        BOTH,
    ),
    "update-every-record": (
        "UPDATE audit_records SET detail = '{}'",
        "audit_records is append-only: UPDATE refused",
        BOTH,
    ),
    "delete-record": (
        "DELETE FROM audit_records WHERE seq = 2",
        "audit_records is append-only: DELETE refused",
        BOTH,
    ),
    # SQLite empties a table without visiting its rows unless a trigger watches them.
    "delete-every-record": (
        "DELETE FROM audit_records",
        "audit_records is append-only: DELETE refused",
        BOTH,
    ),
    "update-checkpoint": (
        "UPDATE audit_checkpoints SET key_ref = 'file:elsewhere' WHERE seq = 1",
        "audit_checkpoints is append-only: UPDATE refused",
        BOTH,
    ),
    "delete-checkpoint": (
        "DELETE FROM audit_checkpoints WHERE seq = 1",
        "audit_checkpoints is append-only: DELETE refused",
        BOTH,
    ),
    "delete-every-checkpoint": (
        "DELETE FROM audit_checkpoints",
        "audit_checkpoints is append-only: DELETE refused",
        BOTH,
    ),
    "truncate-records": (
        "TRUNCATE audit_records",
        "audit_records is append-only: TRUNCATE refused",
        ("postgresql",),
    ),
    "truncate-checkpoints": (
        "TRUNCATE audit_checkpoints",
        "audit_checkpoints is append-only: TRUNCATE refused",
        ("postgresql",),
    ),
    "truncate-both": (
        "TRUNCATE audit_checkpoints, audit_records",
        "is append-only: TRUNCATE refused",
        ("postgresql",),
    ),
    # A stored row replaced by an insert: an upsert updates it (UPDATE triggers fire), SQLite's
    # REPLACE deletes it without firing DELETE triggers (hence the guard's insert trigger).
    "upsert-record": (
        "INSERT INTO audit_records SELECT * FROM audit_records WHERE seq = 2 "
        "ON CONFLICT (seq) DO UPDATE SET actor_account = 'mallory'",
        "audit_records is append-only: UPDATE refused",
        ("postgresql",),
    ),
    "replace-record": (
        "REPLACE INTO audit_records (seq, time, category, action, outcome, detail, hash) "
        "SELECT seq, time, category, 'ca.forged', outcome, detail, hash "
        "FROM audit_records WHERE seq = 2",
        "audit_records is append-only: seq already stored",
        ("sqlite",),
    ),
    "replace-checkpoint": (
        "INSERT OR REPLACE INTO audit_checkpoints "
        "SELECT seq, time, head_hash, body, signature, 'file:elsewhere', public_key_der, "
        "merkle_frontier FROM audit_checkpoints WHERE seq = 1",
        "audit_checkpoints is append-only: seq already stored",
        ("sqlite",),
    ),
}


def journal_rows(services: Services) -> list[tuple[Any, ...]]:
    """Every stored record and checkpoint, as stored."""
    with services.db.read_scope() as session:
        records = session.execute(select(JournalRecord.__table__).order_by("seq")).all()
        checkpoints = session.execute(select(Checkpoint.__table__).order_by("seq")).all()
    return [tuple(row) for row in (*records, *checkpoints)]


def assert_intact(services: Services) -> None:
    with services.db.read_scope() as session:
        verify(session, services.settings.journal_origin, trusted_keys=audit_keys(services))


def refusal(caught: pytest.ExceptionInfo[StoreError]) -> str:
    """The database's own refusal behind the StoreError: the guard's message, reported as an
    integrity rule (SQLite's RAISE(ABORT) in a trigger; PostgreSQL SQLSTATE 23001), not as a
    missing privilege."""
    cause = caught.value.__cause__
    assert isinstance(cause, DBAPIError), repr(cause)
    driver = cause.orig
    sqlstate = getattr(driver, "sqlstate", None)
    if sqlstate is not None:
        assert sqlstate == "23001", sqlstate
        return str(driver.diag.message_primary)  # type: ignore[union-attr]
    assert getattr(driver, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_TRIGGER"
    return str(driver)


@pytest.mark.parametrize("case", list(STATEMENTS))
def test_the_applications_connection_cannot_change_the_journal(
    journal_services: Services, clock: FakeClock, case: str
) -> None:
    statement, refused, databases = STATEMENTS[case]
    dialect = journal_services.db.engine.dialect.name
    if dialect not in databases:
        pytest.skip(f"{case} is {' and '.join(databases)} SQL")
    append(journal_services, clock, 3)
    before = journal_rows(journal_services)
    with pytest.raises(StoreError) as caught, journal_services.db.scope() as session:
        session.execute(text(statement))
    assert refused in refusal(caught)
    assert journal_rows(journal_services) == before
    assert_intact(journal_services)


def test_journal_objects_cannot_be_changed_or_deleted_through_the_orm(
    journal_services: Services,
) -> None:
    before = journal_rows(journal_services)
    with pytest.raises(StoreError) as caught, journal_services.db.scope() as session:
        record = session.get(JournalRecord, 2)
        assert record is not None
        record.actor_account = "mallory"
    assert "audit_records is append-only: UPDATE refused" in refusal(caught)
    with pytest.raises(StoreError) as caught, journal_services.db.scope() as session:
        checkpoint = session.get(Checkpoint, 1)
        assert checkpoint is not None
        session.delete(checkpoint)
    assert "audit_checkpoints is append-only: DELETE refused" in refusal(caught)
    assert journal_rows(journal_services) == before


def test_issuance_revocation_and_checkpoints_work_on_the_guarded_journal(
    journal_services: Services, clock: FakeClock
) -> None:
    """Appends (the hot path's and the ORM's), checkpoints signed every N records, on demand
    and by the refresher's timer: none of them changes a stored record or checkpoint."""
    start = template_seq(journal_services)
    certs = [issue(journal_services, profile) for profile in ("device", "admin-client", "device")]
    journal_services.revoker.revoke(
        "device", certs[0].serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
    )
    journal_services.crls.generate("device", clock())
    with journal_services.db.scope() as session:
        assert journal_services.journal.checkpoint(session, clock()) is not None
    append(journal_services, clock, 60)  # crosses a checkpoint every 50 records
    clock.advance(minutes=journal_services.settings.audit_checkpoint_minutes)
    assert AuditCheckpointer(journal_services).run_once(clock())
    with journal_services.db.read_scope() as session:
        head = session.scalar(select(JournalRecord.seq).order_by(JournalRecord.seq.desc()))
        checkpoints = list(session.scalars(select(Checkpoint.seq).order_by(Checkpoint.seq)))
        result = verify(
            session,
            journal_services.settings.journal_origin,
            trusted_keys=audit_keys(journal_services),
        )
    assert head is not None and head > start + 60
    assert len(checkpoints) >= 5 and checkpoints[-1] == head
    assert result.records == head and result.unsigned_records == 0
