"""Fixtures for the audit journal tests: services on a hand-moved clock, journal helpers,
raw-SQL tampering (with the append-only guard lifted) and the ``sekisho`` command line run
in-process or as a subprocess."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audit.events import Category, Event, Outcome
from audit.models import JournalHead
from sekisho.cli import main as cli_main
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.conftest import BASE_URL, FakeClock, RecordingBackend
from tests.support.journal_guard import guard_lifted

CLI_TIMEOUT = 120.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(dt.datetime.now(dt.UTC))


@pytest.fixture
def journal_services(
    settings: Settings, recording_backend: RecordingBackend, clock: FakeClock
) -> Iterator[Services]:
    """Services whose clock the test moves. The clock starts one second after the template's
    last checkpoint, so no time-based checkpoint fires unless the test advances it."""
    svc = build_services(settings, backend=recording_backend, clock=clock)
    with svc.db.scope() as session:
        head = session.get(JournalHead, 1)
        assert head is not None and head.checkpoint_time is not None
        clock.now = head.checkpoint_time.replace(microsecond=0) + dt.timedelta(seconds=1)
    yield svc
    svc.close()


def template_seq(services: Services) -> int:
    """The sequence number of the last record ``init`` left in the template (its provisioning
    entries: CAs, OCSP signers; ``init`` signs it); the tests count from there."""
    with services.db.scope() as session:
        head = session.get(JournalHead, 1)
        assert head is not None and head.checkpoint_seq == head.seq
        assert head.seq < 30, "the scenarios assume a short template"
        return head.seq


def audit_keys(services: Services) -> set[bytes]:
    """The deployment's audit public key, the one ``verify`` pins checkpoint signatures to."""
    signer = services.journal.signer
    assert signer is not None
    return {signer.public_key_der}


def event(n: int, **overrides: Any) -> Event:
    """A varied but deterministic event number ``n``."""
    values: dict[str, Any] = {
        "category": (Category.CA, Category.SYSTEM, Category.AUTH)[n % 3],
        "action": ("ca.issue", "system.backup", "auth.login")[n % 3],
        "outcome": (Outcome.SUCCESS, Outcome.FAILURE, Outcome.DENIED)[n % 3],
        "actor_account": f"user{n % 4}@tenant.example",
        "actor_serial": f"{n:040x}" if n % 2 else None,
        "client_ip": f"10.0.{n % 7}.{n % 251}",
        "object_dn": f"CN=device-{n},O=Tenant One",
        "object_serial": f"{0xABC000 + n:040x}",
        "device_id": f"dev-{n}",
        "device_mac": f"02:00:00:00:{n // 256 % 256:02x}:{n % 256:02x}",
        "request_id": f"req-{n}",
        "detail": {"n": n, "note": f"event {n}"},
    }
    values.update(overrides)
    return Event(**values)


def append(services: Services, clock: FakeClock, count: int, *, start: int = 0) -> list[int]:
    """Append ``count`` events through the real journal, one transaction each, one second
    apart on the fake clock. Returns their sequence numbers."""
    seqs = []
    for n in range(start, start + count):
        clock.advance(seconds=1)
        with services.db.scope() as session:
            seqs.append(services.journal.append(session, event(n), clock()).seq)
    return seqs


def append_event(services: Services, clock: FakeClock, ev: Event) -> int:
    with services.db.scope() as session:
        return services.journal.append(session, ev, clock()).seq


def sql(services: Services, statement: str, params: Mapping[str, Any] | None = None) -> None:
    """Raw SQL on the store, in its own committed transaction (the attacker's view: whoever
    owns the tables or the SQLite file, who lifts the journal's append-only guard for it)."""
    with services.db.engine.begin() as conn, guard_lifted(conn):
        conn.execute(text(statement), dict(params or {}))


def rows(services: Services, statement: str, params: Mapping[str, Any] | None = None) -> list[Any]:
    with services.db.engine.connect() as conn:
        return list(conn.execute(text(statement), dict(params or {})))


@pytest.fixture
def cli_data_dir(data_dir: Path) -> Path:
    """The deployment's data directory with the settings the fixtures use written into its
    ``sekisho.toml`` (the journal origin derives from ``base_url``), for the CLI."""
    path = data_dir / "sekisho.toml"
    existing = path.read_text() if path.exists() else "[sekisho]\n"
    assert existing.startswith("[sekisho]\n")
    path.write_text(existing + f'base_url = "{BASE_URL}"\naudit_checkpoint_every = 50\n')
    return data_dir


def run_cli(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    """``sekisho --data-dir DATA ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_main(["--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_process(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``sekisho`` entry point as a child process (bounded by a timeout)."""
    exe = Path(sys.executable).with_name("sekisho")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKISHO_")}
    return subprocess.run(
        [str(exe), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
        check=False,
    )
