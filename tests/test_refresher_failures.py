"""What the refresher keeps failing to do, and how it goes on meanwhile: failures kept with
their start time (for /healthz) until the thing works again or is no longer tried, the
heartbeat written even when its body cannot be, a CA whose CRL failed not read and refused
again every tick, and a delta CRL whose base is not the newest full CRL made again."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import select

from audit.models import JournalRecord
from ca import crl as crl_module
from ca.crl import latest_by_name
from ca.models import CrlKind
from ca.revocation import Reason
from sekisho import workers
from sekisho.errors import Conflict, KeyBackendError, StoreError
from sekisho.files import private_temps
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import issue
from tests.conftest import TEST_ACTOR, FakeClock


@pytest.fixture
def clocked(settings: Settings) -> Iterator[tuple[Services, FakeClock]]:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, clock=clock)
    yield services, clock
    services.close()


def _tick(refresher: workers.CrlRefresher) -> None:
    refresher._run_step("crl refresh", refresher.run_once)


def _revoke_one(services: Services) -> None:
    cert = issue(services, "admin-client")
    services.revoker.revoke("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)


def _refused_after_a_revocation(
    services: Services, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> tuple[workers.CrlRefresher, list[str]]:
    """A refresher (debounce 0) that has tried the admin CA's CRL once after a revocation,
    the lint gate refusing it; the CAs whose CRLs it tried to publish, in order."""
    refresher = workers.CrlRefresher(services, debounce=0.0)
    attempts: list[str] = []
    real = services.crls.publish

    def counted(name: str, now: dt.datetime, **kwargs: Any) -> Any:
        attempts.append(name)
        return real(name, now, **kwargs)

    monkeypatch.setattr(services.crls, "publish", counted)
    monkeypatch.setattr(crl_module, "OID_AKI", "2.5.29.99")
    _revoke_one(services)
    for _ in range(2):  # the change seen, then the CRL tried
        _tick(refresher)
        clock.advance(seconds=1)
    return refresher, attempts


def _fault_gone_delta_made(
    services: Services,
    clock: FakeClock,
    refresher: workers.CrlRefresher,
    monkeypatch: pytest.MonkeyPatch,
    full_number: int,
) -> None:
    """The fault undone and the retry wait over: the next tick makes the admin CA's delta on
    the full CRL ``full_number``, and the failure is over."""
    monkeypatch.undo()
    clock.advance(seconds=workers.CRL_RETRY.total_seconds() + 1)
    _tick(refresher)
    assert "admin" not in refresher._ca_failing
    with services.db.scope() as session:
        delta = latest_by_name(session, "admin", CrlKind.DELTA)
        assert delta is not None and delta.base_number == full_number
        der = delta.der
    assert x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.DeltaCRLIndicator)


def test_a_failure_keeps_its_start_through_rounds_and_changes() -> None:
    failures = workers.Failures()
    assert failures.record("ocsp refresh", StoreError("database error: A"))
    first = failures.report()["ocsp refresh"]
    assert first["code"] == StoreError("x").code
    assert not failures.record("ocsp refresh", StoreError("database error: A"))  # same: no log
    assert failures.record("ocsp refresh", KeyBackendError("token away"))  # changed: logged
    later = failures.report()["ocsp refresh"]
    assert later == {"code": KeyBackendError("x").code, "since": first["since"]}
    assert failures.record("crl prune", RuntimeError("boom"))
    assert failures.report()["crl prune"]["code"] == "internal"
    failures.keep({"crl prune"})
    assert "ocsp refresh" not in failures and set(failures.report()) == {"crl prune"}
    assert failures.clear("crl prune") and not failures.clear("crl prune")
    assert failures.report() == {}


def test_a_failing_ca_is_not_read_again_every_tick_but_at_once_after_a_change(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRL the lint gate refuses is refused again until the code changes: each try read
    every entry and took the CA row lock, every tick. It is tried again CRL_RETRY later, or at
    once when a revocation moves the CA's state; the failure stays reported meanwhile."""
    services, clock = clocked
    refresher, attempts = _refused_after_a_revocation(services, clock, monkeypatch)
    assert attempts == ["admin"] and "admin" in refresher._ca_failing
    for _ in range(5):
        _tick(refresher)
        clock.advance(seconds=1)
    assert attempts == ["admin"], "refused again every tick"
    assert "admin" in refresher._ca_failing
    _revoke_one(services)  # the state moved: tried at once
    _tick(refresher)
    assert attempts == ["admin", "admin"]
    clock.advance(seconds=workers.CRL_RETRY.total_seconds() + 1)
    _tick(refresher)
    assert attempts == ["admin", "admin", "admin"]
    monkeypatch.undo()
    clock.advance(seconds=workers.CRL_RETRY.total_seconds() + 1)
    _tick(refresher)
    assert "admin" not in refresher._ca_failing and refresher.failures()["crls"] == {}


def _crl_refusals(services: Services) -> int:
    with services.db.scope() as session:
        return len(
            session.scalars(
                select(JournalRecord.seq).where(
                    JournalRecord.action == "ca.crl", JournalRecord.outcome == "failure"
                )
            ).all()
        )


def test_a_run_of_lint_refusals_is_journalled_once(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first CRL the lint gate refuses is journalled (``ca.crl``, failure); the tries
    after it, every CRL_RETRY or at each revocation while the fault lasts, are not (2,880
    entries a day per CA). Once a CRL is published, the next refusal starts a new run."""
    services, clock = clocked
    refresher, attempts = _refused_after_a_revocation(services, clock, monkeypatch)
    assert attempts == ["admin"] and _crl_refusals(services) == 1
    for _ in range(3):
        clock.advance(seconds=workers.CRL_RETRY.total_seconds() + 1)
        _tick(refresher)
    _revoke_one(services)
    _tick(refresher)
    assert len(attempts) == 5 and _crl_refusals(services) == 1
    monkeypatch.undo()
    clock.advance(seconds=workers.CRL_RETRY.total_seconds() + 1)
    _tick(refresher)
    assert "admin" not in refresher._ca_failing
    monkeypatch.setattr(crl_module, "OID_AKI", "2.5.29.99")
    _revoke_one(services)
    for _ in range(2):
        clock.advance(seconds=1)
        _tick(refresher)
    assert "admin" in refresher._ca_failing and _crl_refusals(services) == 2


def test_a_delta_that_failed_after_its_full_crl_is_made_again(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full CRL was published and its delta refused: the delta served named the previous
    full CRL as its base, which RFC 5280 5.2.4 clients discard, until it came due by age,
    and the failure was cleared at the next tick as if published."""
    services, clock = clocked
    refresher = workers.CrlRefresher(services, debounce=0.0)
    real = services.crls.generate

    def no_delta(name: str, now: dt.datetime, *, delta: bool = False, **kwargs: Any) -> Any:
        if delta:
            raise KeyBackendError("the token went away")
        return real(name, now, delta=delta, **kwargs)

    monkeypatch.setattr(services.crls, "generate", no_delta)
    _revoke_one(services)
    for _ in range(2):
        _tick(refresher)
        clock.advance(seconds=1)
    assert "admin" in refresher._ca_failing
    with services.db.scope() as session:
        full = latest_by_name(session, "admin", CrlKind.FULL)
        delta = latest_by_name(session, "admin", CrlKind.DELTA)
        assert full is not None and delta is not None
        full_number = full.number
        assert delta.base_number != full_number
    _tick(refresher)
    assert "admin" in refresher._ca_failing, "cleared with nothing published"
    _fault_gone_delta_made(services, clock, refresher, monkeypatch, full_number)


def test_a_ca_that_no_longer_publishes_is_no_longer_failing(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    services, clock = clocked
    refresher = workers.CrlRefresher(services, debounce=0.0)
    monkeypatch.setattr(crl_module, "OID_AKI", "2.5.29.99")
    _revoke_one(services)
    for _ in range(2):
        _tick(refresher)
        clock.advance(seconds=1)
    assert "admin" in refresher._ca_failing

    def ended(name: str, _not_after: dt.datetime, _now: dt.datetime) -> None:
        if name == "admin":
            raise Conflict("the certificate of CA admin ends within the hour")

    monkeypatch.setattr(workers, "check_can_publish", ended)
    _tick(refresher)
    assert "admin" not in refresher._ca_failing and refresher.failures()["crls"] == {}


def test_a_prune_failure_lasts_until_a_prune_works(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prune runs once an hour; it failed once and the next (skipped) round cleared the
    failure, so /healthz could never name it."""
    refresher = workers.CrlRefresher(services)

    def down(*_args: object) -> int:
        raise StoreError("database error: OperationalError")

    monkeypatch.setattr(services.crls, "prune", down)
    for _ in range(3):
        refresher._run_step("crl prune", refresher.prune_once)
        assert "crl prune" in refresher._failing
    monkeypatch.undo()
    refresher._pruned_at = None  # the hour has passed
    refresher._run_step("crl prune", refresher.prune_once)
    refresher._run_step("crl prune", refresher.prune_once)
    assert "crl prune" not in refresher._failing


def test_the_heartbeat_is_touched_when_its_body_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the new body cannot be written. The file's time still moves (else the
    arbiter kills a refresher that works, every refresher_stuck_seconds), no half-written
    file is left, and the next round writes the body."""
    beat = tmp_path / "refresher-1.alive"
    beat.write_bytes(b"")
    os.utime(beat, (1000, 1000))
    writer = workers.HeartbeatWriter(beat)
    failing = {"steps": {"audit checkpoint": {"code": "store", "since": 5.0}}, "crls": {}}
    real_fsync = os.fsync

    def full(_fd: int) -> None:  # (the data reaches the disk at the sync: ENOSPC there)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        writer(failing)
    assert beat.stat().st_mtime > 1000 and beat.read_bytes() == b""
    assert private_temps(beat) == [] and sorted(tmp_path.iterdir()) == [beat]
    monkeypatch.setattr(os, "fsync", real_fsync)
    writer(failing)
    assert json.loads(beat.read_bytes()) == failing


def test_the_arbiter_starts_from_an_empty_heartbeat(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an unclean stop, the file of an arbiter with the same PID (PID 1 in a
    container) still held its refresher's last failures, read by /healthz as lasting until the
    new refresher's first round."""
    from web import server as web_server

    beat = workers.heartbeat_file(settings, os.getpid())
    beat.parent.mkdir(mode=0o700, exist_ok=True)
    beat.write_text(json.dumps({"steps": {"ocsp refresh": {"code": "store", "since": 1.0}}}))
    leftover = beat.with_name(f".{beat.name}.0123456789abcdef.tmp")  # a body half written
    leftover.write_text("{")
    assert private_temps(beat) == [leftover]
    os.utime(beat, (1000, 1000))
    started: list[list[str]] = []

    class Started:  # the refresher process is not what this test is about
        def __init__(self, args: list[str], **_kwargs: object) -> None:
            started.append(args)
            self.stdin = open(os.devnull, "wb")

    monkeypatch.setattr(web_server.subprocess, "Popen", Started)
    supervisor = web_server._RefresherSupervisor(settings)
    supervisor._start()
    assert started and beat.read_bytes() == b"" and beat.stat().st_mtime > 1000
    assert not leftover.exists()
    assert workers.heartbeat_failures(settings, os.getpid()) == {}


def test_a_delta_behind_a_full_crl_resigned_by_age_is_made_again(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full CRL re-signed at half its validity (no revocation: the epoch unchanged), its
    delta refused meanwhile: the delta served names the previous full CRL as its base, which
    RFC 5280 5.2.4 clients discard, and it was not due by age before hours later (here one
    made off the refresher's rhythm, by `crl generate --delta`)."""
    services, clock = clocked
    refresher = workers.CrlRefresher(services, debounce=0.0)
    for _ in range(13):  # to 78 h, every 6 h: the deltas (24 h) re-signed on time
        _tick(refresher)
        clock.advance(hours=6)
    services.crls.generate("admin", clock(), delta=True)  # an operator's, off the rhythm
    real = services.crls.generate

    def no_delta(name: str, now: dt.datetime, *, delta: bool = False, **kwargs: Any) -> Any:
        if delta:
            raise KeyBackendError("the token went away")
        return real(name, now, delta=delta, **kwargs)

    clock.advance(hours=6, seconds=1)  # 84 h: the full CRLs (7 days) are half way
    monkeypatch.setattr(services.crls, "generate", no_delta)
    _tick(refresher)
    assert "admin" in refresher._ca_failing
    with services.db.scope() as session:
        full = latest_by_name(session, "admin", CrlKind.FULL)
        delta = latest_by_name(session, "admin", CrlKind.DELTA)
        assert full is not None and delta is not None and delta.base_number != full.number
        full_number = full.number
    _fault_gone_delta_made(services, clock, refresher, monkeypatch, full_number)


def test_a_clock_stepped_back_does_not_stretch_the_retry(
    clocked: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    services, clock = clocked
    refresher, attempts = _refused_after_a_revocation(services, clock, monkeypatch)
    assert attempts == ["admin"]
    clock.advance(hours=-1)  # NTP steps the clock back
    _tick(refresher)
    # (The other CAs' CRLs now start ahead of the clock: re-signed too, as `due` says.)
    assert attempts.count("admin") == 2, "waited out the step back too"
