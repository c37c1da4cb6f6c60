"""Retention and ``audit purge`` (security target 36, BR 5.4.3): under a moved clock, records
leave only once their retention has ended, each leaving a tombstone that keeps the journal
verifiable; a tombstone nobody's purge names is found; the guard lets a record go only with
its tombstone."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Table, insert, select, text

from audit import retention
from audit.chain import FIELDS, PURGE_ACTION, canonical, format_time, seqs_digest
from audit.events import Category, Event, Outcome
from audit.merkle import leaf_hash
from audit.models import JournalHead, JournalRecord, PurgedRecord
from audit.verify import verify
from ca.revocation import Reason
from ca.tbs import serial_hex
from sekisho.check import StoreCheck
from sekisho.errors import AuditChainBroken, AuditError, StoreError
from sekisho.services import Services
from tests.audit.conftest import audit_keys, run_cli, sql
from tests.audit.test_proofs import tool
from tests.ca.helpers import request_for
from tests.conftest import TEST_ACTOR, FakeClock
from tests.support.journal_guard import guard_lifted

DAY = dt.timedelta(days=1)
RECORDS = cast(Table, JournalRecord.__table__)
R = 730  # the default retention, two years


def _verify(services: Services) -> int:
    with services.db.read_scope(snapshot=True) as session:
        result = verify(
            session, services.journal.origin, trusted_keys=audit_keys(services), initialised=True
        )
    return result.records


def _note(services: Services, clock: FakeClock, n: int) -> int:
    """A system event naming no certificate; its seq."""
    with services.db.scope() as session:
        return services.journal.append(
            session,
            Event(Category.SYSTEM, "system.note", Outcome.SUCCESS, detail={"n": n}),
            clock(),
        ).seq


def _issue(services: Services, days: int) -> str:
    request = dataclasses.replace(request_for("device"), validity=dt.timedelta(days=days))
    return serial_hex(services.ca.issue(request, TEST_ACTOR).serial_number)


def _seqs(services: Services, model: type[JournalRecord] | type[PurgedRecord]) -> set[int]:
    with services.db.scope() as session:
        return set(session.scalars(select(model.seq)))


def _issue_seq(services: Services, serial: str) -> int:
    with services.db.scope() as session:
        seq = session.scalar(
            select(JournalRecord.seq).where(
                JournalRecord.action == "ca.issue", JournalRecord.object_serial == serial
            )
        )
    assert seq is not None
    return seq


def _checkpoint(services: Services, clock: FakeClock) -> None:
    with services.db.scope() as session:
        services.journal.checkpoint(session, clock())


def _purge(services: Services, clock: FakeClock, **kw: object) -> retention.PurgeResult:
    return retention.purge(
        services.db,
        services.journal,
        clock(),
        R,
        TEST_ACTOR,
        **kw,  # type: ignore[arg-type]
    )


def test_records_leave_only_when_their_retention_has_ended(
    journal_services: Services, clock: FakeClock
) -> None:
    services = journal_services
    start = clock()
    short = _issue(services, 1)  # expires tomorrow
    long = _issue(services, 365)  # expires in a year
    notes = [_note(services, clock, n) for n in range(3)]
    with services.db.scope() as session:
        lifecycle, unknown_ca, every_ca = (
            services.journal.append(
                session, Event(Category.CA, action, Outcome.SUCCESS, detail=detail), clock()
            ).seq
            for action, detail in (
                ("ca.key.online", {"ca": "admin"}),
                ("ca.key.online", {"ca": "gone"}),
                ("ca.backup", {"file": "b.tar"}),  # every CA's keys
            )
        )
    short_seq, long_seq = _issue_seq(services, short), _issue_seq(services, long)
    _checkpoint(services, clock)
    unsigned = _note(services, clock, 99)  # after the newest checkpoint: never purged
    before = _seqs(services, JournalRecord)

    # A year on: everything is younger than two years.
    clock.now = start + 365 * DAY
    result = _purge(services, clock)
    assert result.purged == 0 and result.examined == 0
    assert _seqs(services, JournalRecord) == before

    # Two years and two days on: the notes and the short certificate's record may leave;
    # the long certificate's stays (it expired less than two years ago), as does every CA
    # key lifecycle record (the CAs' certificates are valid for years), and the unsigned one.
    clock.now = start + (R + 2) * DAY
    dry = _purge(services, clock, dry_run=True)
    assert _seqs(services, JournalRecord) == before and not _seqs(services, PurgedRecord)
    result = _purge(services, clock)
    assert (dry.purged, dry.kept) == (result.purged, result.kept)
    gone = before - _seqs(services, JournalRecord)
    assert set(notes) | {short_seq} <= gone
    assert long_seq not in gone and unsigned not in gone
    assert result.reasons["certificate kept"] >= 1
    assert result.reasons["CA key lifecycle"] == 3  # admin's, the unknown CA's, every CA's
    assert not {lifecycle, unknown_ca, every_ca} & gone
    assert _seqs(services, PurgedRecord) == gone
    assert result.checkpoint is not None and result.checkpoint >= max(result.purge_records)

    # The purge record names what left; the journal verifies with the tombstones in place.
    with services.db.scope() as session:
        purge_record = session.get(JournalRecord, result.purge_records[0])
        assert purge_record is not None and purge_record.action == "audit.purge"
        detail = json.loads(purge_record.detail)
        stones = session.scalars(select(PurgedRecord).order_by(PurgedRecord.seq)).all()
    assert detail["count"] == len(gone) and detail["retention_days"] == R
    assert detail["seqs_sha256"] == seqs_digest(gone)
    assert {s.purge_seq for s in stones} == {purge_record.seq}
    _verify(services)

    # A year after the long certificate expired plus two: its record leaves too; the purge
    # records stay for good.
    clock.now = start + (365 + R + 1) * DAY
    result = _purge(services, clock)
    assert long_seq in _seqs(services, PurgedRecord)
    assert PURGE_ACTION in _actions(services)
    _verify(services)


def _actions(services: Services) -> set[str]:
    with services.db.scope() as session:
        return set(session.scalars(select(JournalRecord.action)))


def test_a_record_never_leaves_without_its_tombstone(
    journal_services: Services, clock: FakeClock
) -> None:
    """The guard of migration 0008: DELETE of a record without a tombstone, a tombstone for
    no stored record, a changed or deleted tombstone, and a purged seq written again (0010 on
    PostgreSQL) are refused."""
    services = journal_services
    seq = _note(services, clock, 1)
    _checkpoint(services, clock)
    attempts = [
        "DELETE FROM audit_records WHERE seq = :seq",
        "INSERT INTO audit_purged (seq, time, action, leaf_hash, hash, purge_seq) "
        "VALUES (999999, '2020-01-01 00:00:00', 'x', 'x', 'y', 1)",
    ]
    for statement in attempts:
        with pytest.raises(StoreError), services.db.scope() as session:
            session.execute(text(statement), {"seq": seq})
    clock.now += (R + 1) * DAY
    result = _purge(services, clock)
    assert seq in _seqs(services, PurgedRecord)
    for statement, target in (
        ("UPDATE audit_purged SET hash = 'x' WHERE seq = :seq", seq),
        ("DELETE FROM audit_purged WHERE seq = :seq", seq),
        ("UPDATE audit_records SET detail = '{}' WHERE seq = :seq", result.purge_records[0]),
    ):
        with pytest.raises(StoreError), services.db.scope() as session:
            session.execute(text(statement), {"seq": target})
    with pytest.raises(StoreError) as refused, services.db.scope() as session:
        session.execute(
            text(
                "INSERT INTO audit_records (seq, time, category, action, outcome, detail, "
                "hash) VALUES (:seq, '2020-01-01 00:00:00', 'system', 'x', 'success', "
                "'{}', 'h')"
            ),
            {"seq": seq},
        )
    # Refused by the guard, not by a constraint of the row (the store error hides the cause).
    assert "append-only" in str(refused.value.__cause__), refused.value.__cause__
    _verify(services)


def test_a_deletion_dressed_as_a_purge_is_found(
    journal_services: Services, clock: FakeClock
) -> None:
    """Whoever may write the tables can store a tombstone and then delete its record (the
    guard lets that through): ``audit verify`` finds a tombstone no purge names, or one a
    purge's digest does not cover, at its seq."""
    services = journal_services
    seqs = [_note(services, clock, n) for n in range(4)]
    _checkpoint(services, clock)
    clock.now += (R + 1) * DAY
    first = _purge(services, clock)
    assert set(seqs) <= _seqs(services, PurgedRecord)
    victim = _note(services, clock, 10)
    _note(services, clock, 11)
    _checkpoint(services, clock)
    _verify(services)

    with services.db.engine.connect() as conn:
        saved = dict(conn.execute(select(RECORDS).where(RECORDS.c.seq == victim)).mappings().one())
    for purge_seq, why in ((first.purge_records[0], "not among"), (victim + 1, "not a purge")):
        with services.db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit_purged (seq, time, action, object_serial, leaf_hash, "
                    "hash, purge_seq) SELECT seq, time, action, object_serial, :leaf, hash, "
                    ":purge FROM audit_records WHERE seq = :seq"
                ),
                {"leaf": "00" * 32, "purge": purge_seq, "seq": victim},
            )
            conn.execute(text("DELETE FROM audit_records WHERE seq = :seq"), {"seq": victim})
        with pytest.raises(AuditChainBroken) as caught:
            _verify(services)
        assert caught.value.seq == victim, str(caught.value)
        assert why in str(caught.value)
        # The record put back for the next attempt (what the attacker could not do).
        with services.db.engine.begin() as conn, guard_lifted(conn):
            conn.execute(text("DELETE FROM audit_purged WHERE seq = :seq"), {"seq": victim})
            conn.execute(insert(RECORDS), saved)
        _verify(services)


def test_purge_needs_the_audit_key(journal_services: Services, clock: FakeClock) -> None:
    services = journal_services
    _note(services, clock, 1)
    _checkpoint(services, clock)
    clock.now += (R + 1) * DAY
    signer, services.journal.signer = services.journal.signer, None
    try:
        with pytest.raises(AuditError, match="nothing is purged unsigned"):
            _purge(services, clock)
        assert _purge(services, clock, dry_run=True).purged >= 1
    finally:
        services.journal.signer = signer
    assert not _seqs(services, PurgedRecord)


def test_the_command_line_purges_what_is_due_and_nothing_from_a_broken_journal(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`audit purge` on the real clock: records written three years back (the clock moved
    back for them) leave, the rest stay; `--dry-run` removes nothing; a journal that does not
    verify is not purged (exit 2)."""
    services = journal_services
    clock.now -= 3 * 365 * DAY
    old = [_note(services, clock, n) for n in range(3)]
    _checkpoint(services, clock)
    clock.now += 3 * 365 * DAY
    recent = _note(services, clock, 9)
    _checkpoint(services, clock)

    code, out, err = run_cli(capsys, cli_data_dir, "--json", "audit", "purge", "--dry-run")
    assert code == 0, err
    dry = json.loads(out)
    assert dry["dry_run"] is True and dry["purged"] == 3 and not _seqs(services, PurgedRecord)

    code, out, err = run_cli(capsys, cli_data_dir, "audit", "purge")
    assert code == 0, err
    assert out.startswith("purged 3 of 3 records older than"), out
    assert _seqs(services, PurgedRecord) == set(old)
    assert recent in _seqs(services, JournalRecord)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 0 and "journal intact" in out, out + err

    # A changed byte in the recent record: verify fails, and so does purge, removing nothing.
    sql(
        services,
        "UPDATE audit_records SET client_ip = '10.9.9.9' WHERE seq = :seq",
        {"seq": recent},
    )
    before = _seqs(services, PurgedRecord)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "purge")
    assert code == 2 and f"journal broken at seq {recent}" in err, out + err
    assert _seqs(services, PurgedRecord) == before


def test_after_a_purge_exports_proofs_and_the_independent_verifier_still_hold(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Records three years old are purged; the checkpoints signed before the purge (Merkle
    roots over the records as they were) still verify: through `audit verify`, through
    `tools/verify_journal.py` on an export with tombstones (not without: the records are
    missing), and through an inclusion proof of a later record and a consistency proof across
    the purge. A purged record has no inclusion proof (exit 66). A tombstone line left out of
    the export, or one naming another purge, fails the verifier at its seq."""
    services = journal_services
    clock.now -= 3 * 365 * DAY
    old = [_note(services, clock, n) for n in range(5)]
    _checkpoint(services, clock)
    clock.now += 3 * 365 * DAY
    _checkpoint_before = _head_checkpoint(services)
    later = _note(services, clock, 9)
    _checkpoint(services, clock)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "purge")
    assert code == 0 and out.startswith("purged 5 of 5"), out + err
    after = _head_checkpoint(services)

    def cli(*args: str) -> str:
        code, out, err = run_cli(capsys, cli_data_dir, *args)
        assert code == 0, err
        return out

    key, records, bare, cps = (tmp_path / n for n in ("k.pem", "r.jsonl", "b.jsonl", "c.jsonl"))
    cli("audit", "public-key", "-o", str(key))
    cli("audit", "export", "--tombstones", "-o", str(records))
    cli("audit", "export", "-o", str(bare))
    cli("audit", "checkpoints", "export", "-o", str(cps))
    assert "journal intact" in cli("audit", "verify", "--checkpoints", str(cps))
    docs = [json.loads(line) for line in records.read_text().splitlines()]
    assert [d["seq"] for d in docs] == list(range(1, len(docs) + 1))
    assert [d["seq"] for d in docs if d.get("purged")] == old

    done = tool("journal", records, cps, "--public-key", key)
    assert done.returncode == 0 and "journal intact" in done.stdout, done.stdout + done.stderr
    done = tool("journal", bare, cps, "--public-key", key)
    assert done.returncode == 1 and f"first bad seq {old[0]}" in done.stderr, done.stderr

    def broken(lines: list[dict[str, object]], seq: int) -> None:
        path = tmp_path / "tampered.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in lines))
        done = tool("journal", path, cps, "--public-key", key)
        assert done.returncode == 1 and f"first bad seq {seq}" in done.stderr, done.stderr

    broken([d for d in docs if d["seq"] != old[2]], old[2])
    renamed = [dict(d, purge_seq=later) if d["seq"] == old[1] else d for d in docs]
    broken(renamed, old[1])
    # The same bytes in upper case: refused, as `audit verify` refuses such a stored hash.
    upper = [dict(d, hash=d["hash"].upper()) if d["seq"] == old[3] else d for d in docs]
    broken(upper, old[3])

    proof = tmp_path / "proof.json"
    proof.write_text(cli("audit", "prove", "inclusion", "--seq", str(later)))
    done = tool("proof", proof, "--public-key", key)
    assert done.returncode == 0, done.stdout + done.stderr
    proof.write_text(
        cli("audit", "prove", "consistency", "--from", str(_checkpoint_before), "--to", str(after))
    )
    done = tool("proof", proof, "--public-key", key)
    assert done.returncode == 0, done.stdout + done.stderr
    code, out, err = run_cli(
        capsys, cli_data_dir, "audit", "prove", "inclusion", "--seq", str(old[0])
    )
    assert code == 66 and "was purged" in err, out + err


def _head_checkpoint(services: Services) -> int:
    with services.db.scope() as session:
        head = session.get(JournalHead, 1)
        assert head is not None
        return head.checkpoint_seq


def test_cert_check_takes_a_purged_record_for_purged_not_missing(
    journal_services: Services, clock: FakeClock
) -> None:
    """A certificate revoked and expired more than the retention ago: its ca.issue and
    ca.revoke records are purged, and `cert check` reports no journal discrepancy for it; a
    certificate whose records an attacker deleted is still reported."""
    services = journal_services
    start = clock()
    purged, deleted = _issue(services, 1), _issue(services, 1)
    for serial in (purged, deleted):
        services.revoker.revoke("device", int(serial, 16), Reason.SUPERSEDED, TEST_ACTOR)
    _checkpoint(services, clock)
    with services.db.engine.begin() as conn, guard_lifted(conn):
        conn.execute(
            text("DELETE FROM audit_records WHERE object_serial = :serial"), {"serial": deleted}
        )
    clock.now = start + (R + 3) * DAY
    # (the journal no longer verifies after the attack: purged through the API)
    result = retention.purge(services.db, services.journal, clock(), R, TEST_ACTOR)
    with services.db.scope() as session:
        stones = session.execute(
            select(PurgedRecord.action).where(PurgedRecord.object_serial == purged)
        ).scalars()
        assert sorted(stones) == ["ca.issue", "ca.revoke"] and result.purged
    with services.db.read_scope(snapshot=True) as session:
        run = StoreCheck(session, clock(), ca_names=("device",))
        kinds = {(f.serial, f.kind) for f in run.findings() if f.kind.startswith("journal")}
    assert kinds == {(deleted, "journal"), (deleted, "journal-status")}


def _forge_purge(
    services: Services, clock: FakeClock, victims: list[int], limit: str, through: int
) -> int:
    """What whoever may write the tables can do without the audit key: append an
    ``audit.purge`` record naming ``victims`` to the unsigned tail (its chain hash is
    computable), store their tombstones and delete the records. No trigger stands in the way."""
    signer, services.journal.signer = services.journal.signer, None  # the attacker signs nothing
    try:
        with services.db.scope() as session:
            fake = services.journal.append(
                session,
                Event(
                    Category.SYSTEM,
                    PURGE_ACTION,
                    Outcome.SUCCESS,
                    detail={
                        "count": len(victims),
                        "first": min(victims),
                        "last": max(victims),
                        "seqs_sha256": seqs_digest(victims),
                        "retention_days": R,
                        "limit": limit,
                        "through": through,
                    },
                ),
                clock(),
            ).seq
    finally:
        services.journal.signer = signer
    with services.db.engine.begin() as conn:
        for victim in victims:
            row = conn.execute(select(RECORDS).where(RECORDS.c.seq == victim)).mappings().one()
            fields = {name: row[name] for name in FIELDS}
            conn.execute(
                insert(cast(Table, PurgedRecord.__table__)),
                {
                    "seq": victim,
                    "time": row["time"],
                    "action": row["action"],
                    "object_serial": row["object_serial"],
                    "leaf_hash": leaf_hash(canonical(fields)).hex(),
                    "hash": row["hash"],
                    "purge_seq": fake,
                },
            )
            conn.execute(text("DELETE FROM audit_records WHERE seq = :seq"), {"seq": victim})
    return fake


def test_a_purge_forged_in_the_unsigned_tail_cannot_remove_signed_records(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A purge record the attacker appends to the unsigned tail, naming a signed record of
    yesterday (or one that a checkpoint signed only after the purge's limit): once the
    deployment's next checkpoint signs the tail, it is a signed purge like any other, and
    `audit verify` took the record for purged. The checkpoint that signs a purge shows when it
    was made, and the purge names the checkpoint (signed before its limit) whose records it
    may remove: a purge that removes more is a deletion, at the first record it removes."""
    services = journal_services
    victim = _note(services, clock, 1)
    _checkpoint(services, clock)
    signed = _head_checkpoint(services)
    clock.now += DAY
    _verify(services)
    with services.db.engine.connect() as conn:
        saved = dict(conn.execute(select(RECORDS).where(RECORDS.c.seq == victim)).mappings().one())
    recent, old = format_time(clock() - DAY), "2000-01-01T00:00:00.000000Z"
    # A limit of a day ago (the checkpoint was signed before it), and one years back that the
    # checkpoint was signed after.
    for limit in (recent, old):
        _forge_purge(services, clock, [victim], limit, signed)
        _checkpoint(services, clock)  # the deployment signs its tail, as serve does
        with pytest.raises(AuditChainBroken) as caught:
            _verify(services)
        assert caught.value.seq == victim and "purge" in str(caught.value), str(caught.value)
        # The independent verifier, on the exports, says the same.
        key, records, cps = (tmp_path / f"{limit[:4]}{n}" for n in ("k.pem", "r.jsonl", "c.jsonl"))
        for args in (
            ("audit", "public-key", "-o", str(key)),
            ("audit", "export", "--tombstones", "-o", str(records)),
            ("audit", "checkpoints", "export", "-o", str(cps)),
        ):
            code, out, err = run_cli(capsys, cli_data_dir, *args)
            assert code == 0, out + err
        done = tool("journal", records, cps, "--public-key", key)
        assert done.returncode == 1 and f"first bad seq {victim}" in done.stderr, done.stderr
        # Put back for the next attempt: the forged purge stays, now naming nothing.
        with services.db.engine.begin() as conn, guard_lifted(conn):
            conn.execute(text("DELETE FROM audit_purged WHERE seq = :seq"), {"seq": victim})
            conn.execute(insert(RECORDS), saved)
        _verify(services)


def test_two_purges_at_once_remove_each_record_once(
    journal_services: Services, clock: FakeClock
) -> None:
    """Two purges started together (two operators, a cron job beside a manual run): each due
    record leaves once, neither fails, and the journal verifies."""
    services = journal_services
    seqs = [_note(services, clock, n) for n in range(40)]
    _checkpoint(services, clock)
    clock.now += (R + 1) * DAY
    results: list[retention.PurgeResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait(timeout=30)
        try:
            results.append(
                retention.purge(services.db, services.journal, clock(), R, TEST_ACTOR, batch=7)
            )
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert set(seqs) <= _seqs(services, PurgedRecord)
    assert sum(r.purged for r in results) == len(_seqs(services, PurgedRecord))
    _verify(services)
