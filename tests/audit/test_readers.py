"""``audit search``, ``export`` and ``verify`` only read: they hold no write lock (on SQLite a
deferred ``BEGIN``, not ``BEGIN IMMEDIATE``), so issuance and revocation carry on while a slow
export or verification runs; and verify reads one snapshot, so what is appended meanwhile is
not taken for tampering."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import audit.cli
import audit.verify
from audit.models import Checkpoint, JournalHead, JournalRecord
from audit.query import search
from audit.verify import CheckpointClaim
from sekisho.services import Services
from tests.audit.conftest import append, append_event, event, run_cli
from tests.conftest import FakeClock

WAIT = 5.0  # seconds; a writer queued behind a write lock would wait 60


def write_meanwhile(services: Services, clock: FakeClock) -> None:
    """Append to the journal from another thread, late enough for the append to sign a
    checkpoint too, while the caller holds its transaction open; fail if it has to wait."""
    done = threading.Event()

    def writer() -> None:
        clock.advance(minutes=10)
        append_event(services, clock, event(900, action="ca.meanwhile"))
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    assert done.wait(WAIT), "a journal append waited for a read-only audit command"


def head_and_checkpoint(services: Services) -> tuple[int, int]:
    with services.db.read_scope() as session:
        head = session.get(JournalHead, 1)
        assert head is not None
        return head.seq, session.scalar(select(func.max(Checkpoint.seq))) or 0


@pytest.mark.parametrize("command", ["search", "export", "verify"])
def test_read_only_commands_do_not_hold_up_writers(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    append(journal_services, clock, 5)
    walk = audit.verify._walk

    def slow_search(*args: Any, **kwargs: Any) -> Iterator[JournalRecord]:
        rows = search(*args, **kwargs)
        yield next(rows)  # the read transaction is open now
        write_meanwhile(journal_services, clock)
        yield from rows

    def slow_walk(
        session: Any, head_seq: int, claims: Mapping[int, list[CheckpointClaim]], *rest: Any
    ) -> audit.verify._Walk:
        # The head, the checkpoints and the records around it are read: append a record and
        # a checkpoint before the walk and the checks after it.
        write_meanwhile(journal_services, clock)
        return walk(session, head_seq, claims, *rest)

    monkeypatch.setattr(audit.cli, "search", slow_search)
    monkeypatch.setattr(audit.verify, "_walk", slow_walk)
    before, _checkpoint = head_and_checkpoint(journal_services)

    # search --oldest pages through the journal like export (the newest N are one query).
    extra = ["--oldest"] if command == "search" else []
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", command, *extra)
    assert code == 0, err
    after, checkpoint = head_and_checkpoint(journal_services)
    assert after == checkpoint == before + 1
    with journal_services.db.read_scope() as session:
        last = session.get(JournalRecord, after)
        assert last is not None and last.action == "ca.meanwhile"
