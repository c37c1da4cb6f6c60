"""The journal's origin stays what its first checkpoint says when ``base_url`` changes, so a
deployment that moves to a new public URL keeps a verifiable journal."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from audit.chain import parse_checkpoint_body
from audit.models import Checkpoint
from audit.verify import verify
from sekisho.errors import ConfigError
from sekisho.services import build_services
from sekisho.settings import Settings
from tests.audit.conftest import append, audit_keys
from tests.conftest import BASE_URL, FakeClock, RecordingBackend, make_settings


def _origins(settings: Settings) -> set[str]:
    svc = build_services(settings)
    try:
        with svc.db.scope() as session:
            bodies = session.scalars(select(Checkpoint.body)).all()
        return {parse_checkpoint_body(b).origin for b in bodies}
    finally:
        svc.close()


def test_new_base_url_keeps_the_journal_origin(
    settings: Settings, recording_backend: RecordingBackend, clock: FakeClock
) -> None:
    (old,) = _origins(settings)
    assert "pki.example.com" in old and BASE_URL.endswith("pki.example.com")
    moved = make_settings(
        settings.data_dir,
        base_url="https://pki.new-name.example.net",
        database_url=settings.database_url,
    )
    assert moved.journal_origin != old  # what the origin would be if derived afresh
    svc = build_services(moved, backend=recording_backend, clock=clock)
    try:
        assert svc.journal.origin == old
        append(svc, clock, 120)  # crosses at least two count-based checkpoints
        with svc.db.scope() as session:
            result = verify(session, svc.journal.origin, trusted_keys=audit_keys(svc))
        assert result.checkpoints >= 3
    finally:
        svc.close()
    assert _origins(moved) == {old}


def test_explicit_audit_origin_other_than_the_journals_is_refused(settings: Settings) -> None:
    """It would make every checkpoint already signed fail to verify (tests/test_audit_origin.py:
    an explicit origin names a new journal)."""
    explicit = make_settings(
        settings.data_dir, audit_origin="example.org/audit-2", database_url=settings.database_url
    )
    with pytest.raises(ConfigError, match="differs from the origin"):
        build_services(explicit)
