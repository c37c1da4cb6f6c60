"""The journal records every field, chains every record, and signs checkpoints through the
key backend every N records or T minutes; checkpoints verify off the box."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select, update

from audit.chain import FIELDS, GENESIS, canonical
from audit.models import Checkpoint, JournalHead, JournalRecord
from audit.verify import verify
from ca.revocation import Reason
from sekisho.context import Actor
from sekisho.services import Services, audit_key_ref, build_services
from sekisho.settings import Settings
from sekisho.workers import AuditCheckpointer, CrlRefresher
from tests.audit.conftest import append, audit_keys, run_cli, template_seq
from tests.audit.test_merkle import naive_mth
from tests.ca.helpers import request_for
from tests.conftest import FakeClock, RecordingBackend

# The foundation tests also run with every key on a SoftHSM2 token (tests/conftest.py).
KEY_BACKENDS = ("software", "pkcs11")


def stored_records(services: Services) -> list[JournalRecord]:
    with services.db.scope() as session:
        return list(session.scalars(select(JournalRecord).order_by(JournalRecord.seq)))


def stored_checkpoints(services: Services) -> list[Checkpoint]:
    with services.db.scope() as session:
        return list(session.scalars(select(Checkpoint).order_by(Checkpoint.seq)))


def head(services: Services) -> JournalHead:
    with services.db.scope() as session:
        row = session.get(JournalHead, 1)
        assert row is not None
        return row


def as_fields(row: JournalRecord) -> dict[str, object]:
    return {name: getattr(row, name) for name in FIELDS}


def audit_public_key(services: Services) -> ec.EllipticCurvePublicKey:
    key = services.backend.public_key(audit_key_ref(services.backend))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_issue_and_revoke_are_recorded_with_every_field(
    journal_services: Services, clock: FakeClock
) -> None:
    actor = Actor(account="ops@tenant1", serial="0a" * 20, client_ip="192.0.2.10")
    cert = journal_services.ca.issue(request_for("device"), actor)
    clock.advance(seconds=30)
    revoker = Actor(account="sec@tenant1", client_ip="2001:db8::5")
    journal_services.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, revoker)

    issued, revoked, blocked = stored_records(journal_services)[-3:]
    assert revoked.seq == issued.seq + 1 and blocked.seq == revoked.seq + 1
    assert issued.category == "ca" and issued.action == "ca.issue"
    assert issued.outcome == "success"
    assert issued.actor_account == "ops@tenant1" and issued.actor_serial == "0a" * 20
    assert issued.client_ip == "192.0.2.10"
    assert issued.request_id == actor.request_id
    assert issued.object_serial == f"{cert.serial_number:040x}"
    assert issued.object_dn == cert.subject.rfc4514_string()
    assert issued.time.utcoffset() == dt.timedelta(0)
    assert issued.time == clock.now - dt.timedelta(seconds=30)
    detail = json.loads(issued.detail)
    assert detail["profile"] == "device" and detail["ca"] == "device"

    assert revoked.action == "ca.revoke" and revoked.category == "ca"
    assert revoked.actor_account == "sec@tenant1" and revoked.actor_serial is None
    assert revoked.client_ip == "2001:db8::5"
    assert revoked.request_id == revoker.request_id
    assert revoked.object_serial == issued.object_serial
    assert revoked.time == clock.now
    assert json.loads(revoked.detail)["reason"] == "key_compromise"
    # keyCompromise blocks the key, in the same transaction, by the same actor.
    assert (blocked.action, blocked.category) == ("ca.key.block", "ca")
    assert (blocked.actor_account, blocked.request_id) == ("sec@tenant1", revoker.request_id)
    assert blocked.object_serial == issued.object_serial and blocked.time == clock.now


def test_device_and_auth_fields_are_recorded(journal_services: Services, clock: FakeClock) -> None:
    seq = append(journal_services, clock, 1, start=2)[0]  # n=2: auth.login, denied
    row = stored_records(journal_services)[-1]
    assert row.seq == seq
    assert (row.category, row.action, row.outcome) == ("auth", "auth.login", "denied")
    assert row.device_id == "dev-2"
    assert row.device_mac == "02:00:00:00:00:02"
    assert row.object_dn == "CN=device-2,O=Tenant One"


def test_hash_chain_recomputed_independently_matches_the_store(
    journal_services: Services, clock: FakeClock
) -> None:
    append(journal_services, clock, 20)
    records = stored_records(journal_services)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))

    # The canonical encoding: JSON, sorted keys, no whitespace, every field present.
    encoded = canonical(as_fields(records[-1]))
    doc = json.loads(encoded)
    assert list(doc) == sorted(FIELDS)
    assert encoded == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["time"].endswith("Z") and doc["seq"] == records[-1].seq

    previous = bytes(32)
    assert previous.hex() == GENESIS
    for row in records:
        digest = hashlib.sha256(previous + canonical(as_fields(row))).digest()
        assert digest.hex() == row.hash, f"record {row.seq}"
        previous = digest
    top = head(journal_services)
    assert top.seq == records[-1].seq and top.hash == previous.hex()


def test_checkpoint_every_n_records_is_signed_through_the_backend(
    journal_services: Services, clock: FakeClock, recording_backend: RecordingBackend
) -> None:
    start = template_seq(journal_services)
    recording_backend.calls.clear()
    append(journal_services, clock, 106)  # seqs start+1..start+106

    checkpoints = stored_checkpoints(journal_services)
    assert [c.seq for c in checkpoints] == [1, start, start + 50, start + 100]  # init signs two
    audit_calls = [
        data
        for ref, data in recording_backend.calls
        if ref == audit_key_ref(journal_services.backend)
    ]
    assert audit_calls == [checkpoints[2].body.encode(), checkpoints[3].body.encode()]
    assert len(recording_backend.calls) == 2  # nothing else signed

    records = {r.seq: r for r in stored_records(journal_services)}
    key = audit_public_key(journal_services)
    origin = journal_services.settings.journal_origin
    previous = (0, bytes(32))  # the first checkpoint follows none
    for cp in checkpoints:
        b64 = base64.b64encode(bytes.fromhex(records[cp.seq].hash)).decode()
        when = cp.time.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        link = f"{previous[0]} {base64.b64encode(previous[1]).decode()}"
        # The RFC 6962 tree head of records 1..seq, computed here as the RFC defines it.
        leaves = [
            hashlib.sha256(b"\x00" + canonical(as_fields(records[s]))).digest()
            for s in range(1, cp.seq + 1)
        ]
        root = base64.b64encode(naive_mth(leaves)).decode()
        assert cp.body == (
            f"{origin}\n{cp.seq}\n{b64}\ntime {when}\nprevious {link}\nroot {cp.seq} {root}\n"
        )
        assert cp.merkle_frontier is not None and len(cp.merkle_frontier) == 32 * cp.seq.bit_count()
        previous = (cp.seq, hashlib.sha256(cp.body.encode()).digest())
        assert cp.head_hash == records[cp.seq].hash
        key.verify(cp.signature, cp.body.encode(), ec.ECDSA(hashes.SHA256()))
        assert cp.key_ref == audit_key_ref(journal_services.backend)
        assert cp.public_key_der == key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    with pytest.raises(InvalidSignature):
        key.verify(
            checkpoints[1].signature, checkpoints[2].body.encode(), ec.ECDSA(hashes.SHA256())
        )
    assert head(journal_services).checkpoint_seq == start + 100


def test_checkpoint_after_the_interval_even_without_n_records(
    journal_services: Services, clock: FakeClock, recording_backend: RecordingBackend
) -> None:
    recording_backend.calls.clear()
    start = template_seq(journal_services)
    clock.advance(minutes=4, seconds=57)
    append(journal_services, clock, 1)  # 4:59 after the last checkpoint
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start]
    append(journal_services, clock, 1)  # 5:00
    checkpoints = stored_checkpoints(journal_services)
    assert [c.seq for c in checkpoints] == [1, start, start + 2]
    assert checkpoints[-1].time == clock.now
    assert recording_backend.calls == [
        (audit_key_ref(journal_services.backend), checkpoints[-1].body.encode())
    ]


def test_checkpoint_interval_comes_from_settings(
    settings: Settings, recording_backend: RecordingBackend, clock: FakeClock
) -> None:
    tuned = dataclasses.replace(settings, audit_checkpoint_minutes=1.0, audit_checkpoint_every=40)
    svc = build_services(tuned, backend=recording_backend, clock=clock)
    try:
        with svc.db.scope() as session:
            row = session.get(JournalHead, 1)
            assert row is not None and row.checkpoint_time is not None
            clock.now = row.checkpoint_time.replace(microsecond=0)
        s = template_seq(svc)
        append(svc, clock, 3)  # s+1..s+3 at +1s..+3s: fewer than N=40 since s
        assert [c.seq for c in stored_checkpoints(svc)] == [1, s]
        clock.advance(seconds=57)
        append(svc, clock, 1)  # s+4 at +61s: the interval
        append(svc, clock, 39)  # s+5..s+43: fewer than N since s+4, and 39 s < 1 minute
        assert [c.seq for c in stored_checkpoints(svc)] == [1, s, s + 4]
        append(svc, clock, 1)  # s+44: N records after s+4
        assert [c.seq for c in stored_checkpoints(svc)] == [1, s, s + 4, s + 44]
    finally:
        svc.close()


def test_init_signs_its_own_records(journal_services: Services) -> None:
    """``init`` signs its first record and, before it returns, its last (``system.init``):
    records 2 to 17 waited unsigned until the next append or ``serve``'s refresher."""
    with journal_services.db.scope() as session:
        top = session.get(JournalHead, 1)
        assert top is not None
        last = session.get(JournalRecord, top.seq)
        assert last is not None and last.action == "system.init"
    checkpoints = stored_checkpoints(journal_services)
    assert [c.seq for c in checkpoints] == [1, top.seq] and top.checkpoint_seq == top.seq
    assert checkpoints[-1].head_hash == last.hash == top.hash
    audit_public_key(journal_services).verify(
        checkpoints[-1].signature, checkpoints[-1].body.encode(), ec.ECDSA(hashes.SHA256())
    )


def test_verify_reports_the_unsigned_tail_and_fails_once_it_waited_too_long(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``audit verify`` says how many records follow the newest checkpoint and since when;
    once they have waited longer than the checkpoint interval plus an hour it exits 2. A
    copy is judged as of when it was taken (``--as-of``)."""
    code, out, err = run_cli(capsys, cli_data_dir, "--json", "audit", "verify")
    assert code == 0, err  # init signed everything it journalled
    doc = json.loads(out)
    assert (doc["unsigned_records"], doc["unsigned_since"]) == (0, None)
    assert "every record signed" in run_cli(capsys, cli_data_dir, "audit", "verify")[1]

    start = template_seq(journal_services)
    append(journal_services, clock, 3)  # start+1..start+3, signed by nothing yet
    since = stored_records(journal_services)[start].time
    assert stored_records(journal_services)[start].seq == start + 1
    limit = since + dt.timedelta(minutes=5, hours=1)
    code, out, err = run_cli(
        capsys, cli_data_dir, "--json", "audit", "verify", "--as-of", limit.isoformat()
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unsigned_records"] == 3
    assert dt.datetime.fromisoformat(doc["unsigned_since"]) == since
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--as-of", str(limit))
    assert code == 0, err
    when = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert f"3 records after the newest checkpoint unsigned since {when}" in out

    late = (limit + dt.timedelta(seconds=1)).isoformat()
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--as-of", late)
    assert code == 2 and out == ""
    assert err.startswith(
        f"error: audit-unsigned-tail: journal unsigned from seq {start + 1}: 3 records after "
        f"the checkpoint at {start} have waited unsigned since {when}, longer than the "
        "checkpoint interval (5 min) and 60 min more allow"
    )


def test_verify_prints_the_fingerprint_of_the_key_that_verified(
    journal_services: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A cron job compares it with the SHA-256 of the public key kept off the box, as
    ``openssl pkey -pubin -outform DER | sha256sum`` gives it."""
    pem = tmp_path / "audit-key.pem"
    assert run_cli(capsys, cli_data_dir, "audit", "public-key", "-o", str(pem))[0] == 0
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(pem), "-outform", "DER"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    expected = hashlib.sha256(der).hexdigest()
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 0, err
    assert out.splitlines()[-1] == f"checkpoint key SHA-256 {expected}"
    code, out, err = run_cli(
        capsys, cli_data_dir, "--json", "audit", "verify", "--public-key", str(pem)
    )
    assert code == 0, err
    assert json.loads(out)["checkpoint_key_sha256"] == expected


def test_a_journal_that_stopped_signing_fails_verification(
    journal_services: Services,
    settings: Settings,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The audit key gone, appends go on (a missing checkpoint key is not an unwritable
    journal) but sign nothing: verify, which said "intact" for good, fails once the oldest
    unsigned record is older than the interval plus an hour."""
    if settings.key_backend != "software":
        pytest.skip("the audit key is taken away as a file")
    pem = tmp_path / "audit-key.pem"
    assert run_cli(capsys, cli_data_dir, "audit", "public-key", "-o", str(pem))[0] == 0
    (cli_data_dir / "keys" / "audit.key").rename(tmp_path / "audit.key.away")
    keyless = build_services(settings, clock=clock)
    try:
        assert keyless.journal.signer is None
        start = template_seq(keyless)
        for _ in range(15):  # one record every 5 minutes, for 75 minutes
            clock.advance(minutes=5)
            append(keyless, clock, 1)
    finally:
        keyless.close()
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start]
    args = ("audit", "verify", "--public-key", str(pem))
    monkeypatch.setattr("sekisho.services.utcnow", clock)  # the commands' clock: now
    code, _out, err = run_cli(capsys, cli_data_dir, *args)
    assert code == 2
    assert f"journal unsigned from seq {start + 1}: 15 records after the checkpoint" in err
    assert "is the audit key missing?" in err
    # A copy verified later is judged as of when it was taken.
    monkeypatch.setattr("sekisho.services.utcnow", lambda: clock.now + dt.timedelta(days=30))
    code, _out, err = run_cli(capsys, cli_data_dir, *args, "--as-of", str(clock.now))
    assert code == 2 and "audit-unsigned-tail" in err
    taken = clock.now - dt.timedelta(minutes=15)  # the oldest unsigned record 55 min old
    assert run_cli(capsys, cli_data_dir, *args, "--as-of", str(taken))[0] == 0


def test_a_clock_stepped_back_makes_a_checkpoint_due(
    journal_services: Services, clock: FakeClock
) -> None:
    """Before, a last checkpoint in the future meant "not due yet": a clock set back an hour
    left every record unsigned for that hour (short of N records)."""
    start = template_seq(journal_services)
    clock.advance(hours=-1)
    append(journal_services, clock, 1)
    checkpoints = stored_checkpoints(journal_services)
    assert [c.seq for c in checkpoints] == [1, start, start + 1]
    assert checkpoints[-1].time == clock.now
    assert head(journal_services).checkpoint_time == clock.now


def test_an_appender_behind_a_checkpoint_signed_a_moment_later_signs_none(
    journal_services: Services, clock: FakeClock
) -> None:
    """Appenders read their clock before they wait for the head: one that waited behind a
    checkpoint signed a second later is not "a clock stepped back" (it signed another
    checkpoint, with an earlier time); one more than five minutes behind is."""
    start = template_seq(journal_services)
    clock.advance(seconds=-4)
    append(journal_services, clock, 1)  # 3 s behind the last checkpoint: not due
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start]
    clock.advance(minutes=-6)
    append(journal_services, clock, 1)
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start, start + 2]


def test_every_command_that_writes_and_the_refresher_stopping_sign_the_tail(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment run from the command line alone, or a serve stopped for a weekend, left
    its last records unsigned until the next append: `audit verify` failed on them an hour
    later (and they could be rewritten unnoticed meanwhile)."""
    start = template_seq(journal_services)
    append(journal_services, clock, 2)  # not due: unsigned
    monkeypatch.setattr("sekisho.services.utcnow", clock)
    code, _out, err = run_cli(capsys, cli_data_dir, "crl", "generate", "--ca", "device")
    assert code == 0, err
    assert head(journal_services).checkpoint_seq == head(journal_services).seq > start + 2
    late = (clock.now + dt.timedelta(days=3)).isoformat()
    assert run_cli(capsys, cli_data_dir, "audit", "verify", "--as-of", late)[0] == 0
    # A read-only command signs nothing.
    append(journal_services, clock, 1)
    before = head(journal_services)
    assert run_cli(capsys, cli_data_dir, "cert", "list")[0] == 0
    assert head(journal_services).checkpoint_seq == before.checkpoint_seq < before.seq
    # The refresher signs what waits when it stops, due or not.
    refresher = CrlRefresher(journal_services, tick=3600)
    refresher.start()
    refresher.stop()
    assert head(journal_services).checkpoint_seq == head(journal_services).seq


def test_a_head_time_moved_ahead_does_not_stop_checkpoints(
    journal_services: Services, clock: FakeClock
) -> None:
    """A head whose checkpoint time was edited years ahead stopped every time-based
    checkpoint, the refresher's included: both now sign."""
    start = template_seq(journal_services)
    append(journal_services, clock, 1)  # start+1, not due
    ahead = clock.now + dt.timedelta(days=3650)
    with journal_services.db.engine.begin() as conn:
        conn.execute(update(JournalHead).where(JournalHead.id == 1).values(checkpoint_time=ahead))
    assert AuditCheckpointer(journal_services).run_once(clock()) is True
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start, start + 1]

    with journal_services.db.engine.begin() as conn:
        conn.execute(update(JournalHead).where(JournalHead.id == 1).values(checkpoint_time=ahead))
    append(journal_services, clock, 1)  # start+2: due at once
    assert [c.seq for c in stored_checkpoints(journal_services)] == [
        1,
        start,
        start + 1,
        start + 2,
    ]
    assert head(journal_services).checkpoint_time == clock.now


def test_exported_checkpoints_verify_off_the_box(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    start = template_seq(journal_services)
    append(journal_services, clock, 55)  # past start+50, short of start+100
    out_file = tmp_path / "checkpoints.jsonl"
    code, _out, err = run_cli(
        capsys, cli_data_dir, "audit", "checkpoints", "export", "-o", str(out_file)
    )
    assert code == 0, err
    assert "exported 3 checkpoints" in err

    records = {r.seq: r for r in stored_records(journal_services)}
    origin = journal_services.settings.journal_origin
    docs = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [d["seq"] for d in docs] == [1, start, start + 50]
    for doc in docs:
        # Only the document itself and `cryptography`: no Sekisho code, no store.
        key = serialization.load_der_public_key(base64.b64decode(doc["public_key"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(
            base64.b64decode(doc["signature"]), doc["body"].encode(), ec.ECDSA(hashes.SHA256())
        )
        claimed_origin, seq, b64 = doc["body"].split("\n")[:3]
        assert claimed_origin == origin and int(seq) == doc["seq"]
        assert base64.b64decode(b64).hex() == records[doc["seq"]].hash == doc["head_hash"]
    assert key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == audit_public_key(journal_services).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    code, out, err = run_cli(capsys, cli_data_dir, "audit", "checkpoints", "export", "--after", "1")
    assert code == 0, err
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [start, start + 50]


def test_checkpoint_command_signs_the_current_head(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start = template_seq(journal_services)
    append(journal_services, clock, 3)  # head at start+3
    code, out, err = run_cli(capsys, cli_data_dir, "--json", "audit", "checkpoint")
    assert code == 0, err
    doc = json.loads(out)["checkpoint"]
    assert doc["seq"] == start + 3
    assert doc["head_hash"] == stored_records(journal_services)[-1].hash
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "checkpoint")
    assert code == 0 and "already checkpointed" in out
    assert [c.seq for c in stored_checkpoints(journal_services)] == [1, start, start + 3]


def test_intact_journal_verifies(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    total = template_seq(journal_services) + 60
    append(journal_services, clock, 60)
    with journal_services.db.scope() as session:
        result = verify(
            session,
            journal_services.settings.journal_origin,
            trusted_keys=audit_keys(journal_services),
        )
    assert result.records == result.head_seq == total
    assert result.checkpoints == 3  # init's two, and 50 records after the second
    code, out, err = run_cli(capsys, cli_data_dir, "--json", "audit", "verify")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["records"] == total
    assert doc["head_hash"] == stored_records(journal_services)[-1].hash
