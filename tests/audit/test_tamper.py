"""``audit verify`` finds every kind of tampering done with raw SQL on the store and names the
first bad sequence number, through the Python API and the command line (exit code 2)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import insert as sa_insert
from sqlalchemy import select
from sqlalchemy import update as sa_update
from sqlalchemy.exc import DBAPIError

from audit.chain import (
    FIELDS,
    GENESIS,
    CheckpointBody,
    chain_hash,
    checkpoint_body,
    parse_checkpoint_body,
)
from audit.journal import checkpoint_document
from audit.models import Checkpoint, JournalHead, JournalRecord
from audit.query import Filter, search
from audit.verify import claims_from_documents, verify
from sekisho.errors import AuditChainBroken
from sekisho.services import Services
from sekisho.workers import AuditCheckpointer
from tests.audit.conftest import (
    append,
    audit_keys,
    rows,
    run_cli,
    run_cli_process,
    sql,
    template_seq,
)
from tests.conftest import FakeClock
from tests.support.journal_guard import guard_lifted

# The scenario: the template's records (``init``, which signs its first and its last, INIT)
# topped up to 107 records, with a checkpoint signed at 51; then, every 50 records, at 101.
INIT = 17
LAST = 107


@pytest.fixture
def journal(journal_services: Services, clock: FakeClock) -> Services:
    assert template_seq(journal_services) == INIT
    append(journal_services, clock, 51 - INIT)
    with journal_services.db.scope() as session:
        assert journal_services.journal.checkpoint(session, clock()) is not None
    append(journal_services, clock, LAST - 51)
    with journal_services.db.scope() as session:
        assert [c.seq for c in session.scalars(select(Checkpoint))] == [1, INIT, 51, 101]
        origin = journal_services.settings.journal_origin
        assert verify(session, origin, trusted_keys=audit_keys(journal_services)).records == LAST
    return journal_services


def flip(value: str) -> str:
    """``value`` with one character changed (one bit of one byte)."""
    i = len(value) // 2
    return value[:i] + chr(ord(value[i]) ^ 1) + value[i + 1 :]


def flip_column(column: str, seq: int) -> Callable[[Services], None]:
    assert column in (*FIELDS, "hash")  # a fixed column name, never input
    select_sql = f"SELECT {column} FROM audit_records WHERE seq = :s"  # noqa: S608
    update_sql = f"UPDATE audit_records SET {column} = :v WHERE seq = :s"  # noqa: S608

    def tamper(services: Services) -> None:
        (value,) = rows(services, select_sql, {"s": seq})[0]
        sql(services, update_sql, {"v": flip(value), "s": seq})

    return tamper


def shift_time(seq: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        if services.db.engine.dialect.name == "sqlite":
            (value,) = rows(services, "SELECT time FROM audit_records WHERE seq = :s", {"s": seq})[
                0
            ]
            assert isinstance(value, str) and value.endswith("0")
            sql(
                services,
                "UPDATE audit_records SET time = :v WHERE seq = :s",
                {"v": value[:-1] + "1", "s": seq},
            )
        else:
            sql(
                services,
                "UPDATE audit_records SET time = time + interval '1 microsecond' WHERE seq = :s",
                {"s": seq},
            )

    return tamper


def delete(seq: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        sql(services, "DELETE FROM audit_records WHERE seq = :s", {"s": seq})

    return tamper


def record_fields(services: Services, seq: int) -> dict[str, object]:
    with services.db.scope() as session:
        row = session.get(JournalRecord, seq)
        assert row is not None
        return {name: getattr(row, name) for name in FIELDS} | {"hash": row.hash}


def insert(seq: int) -> Callable[[Services], None]:
    """Shift records ``seq``.. up by one and slip in a forged record at ``seq`` whose hash
    chains correctly onto ``seq - 1``: the first record that breaks is the displaced one."""

    def tamper(services: Services) -> None:
        before = record_fields(services, seq - 1)
        forged = record_fields(services, seq) | {"seq": seq, "action": "ca.forged"}
        forged["hash"] = chain_hash(str(before["hash"]), forged)
        sql(services, "UPDATE audit_records SET seq = -seq WHERE seq >= :s", {"s": seq})
        sql(services, "UPDATE audit_records SET seq = 1 - seq WHERE seq < 0")
        # Through the column types, so every value is stored as the journal writes it.
        with services.db.engine.begin() as conn:
            conn.execute(sa_insert(JournalRecord), forged)

    return tamper


def swap(a: int, b: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        sql(services, "UPDATE audit_records SET seq = -1 WHERE seq = :a", {"a": a})
        sql(services, "UPDATE audit_records SET seq = :a WHERE seq = :b", {"a": a, "b": b})
        sql(services, "UPDATE audit_records SET seq = :b WHERE seq = -1", {"b": b})

    return tamper


def rechain(services: Services, start: int) -> None:
    """Recompute every hash from ``start`` on, and the head, as an attacker with the
    algorithm (but not the checkpoint key) would."""
    previous = str(record_fields(services, start - 1)["hash"])
    with services.db.scope() as session:
        records = list(
            session.scalars(
                select(JournalRecord).where(JournalRecord.seq >= start).order_by(JournalRecord.seq)
            )
        )
    for row in records:
        previous = chain_hash(previous, {name: getattr(row, name) for name in FIELDS})
        sql(
            services,
            "UPDATE audit_records SET hash = :h WHERE seq = :s",
            {"h": previous, "s": row.seq},
        )
    last = records[-1].seq if records else start - 1
    sql(
        services,
        "UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1",
        {"s": last, "h": previous},
    )


def modify_and_rechain(seq: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        sql(
            services,
            "UPDATE audit_records SET actor_account = 'nobody' WHERE seq = :s",
            {"s": seq},
        )
        rechain(services, seq)

    return tamper


def truncate(after: int, *, drop_checkpoints: bool = False) -> Callable[[Services], None]:
    """Delete every record after ``after`` and make the head agree (with
    ``drop_checkpoints``, the checkpoints after it too, and the head names the last left)."""

    def tamper(services: Services) -> None:
        sql(services, "DELETE FROM audit_records WHERE seq > :s", {"s": after})
        if drop_checkpoints:
            drop_checkpoints_after(services, after)
        rechain(services, after + 1)

    return tamper


def drop_checkpoints_after(services: Services, seq: int) -> None:
    """Delete the checkpoints after ``seq`` and point the head at the newest one left."""
    sql(services, "DELETE FROM audit_checkpoints WHERE seq > :s", {"s": seq})
    set_head_checkpoint(int(rows(services, "SELECT MAX(seq) FROM audit_checkpoints")[0][0]))(
        services
    )


def forge_signature(seq: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        (sig,) = rows(
            services, "SELECT signature FROM audit_checkpoints WHERE seq = :s", {"s": seq}
        )[0]
        bad = bytes(sig[:10]) + bytes([sig[10] ^ 0x01]) + bytes(sig[11:])
        sql(
            services,
            "UPDATE audit_checkpoints SET signature = :g WHERE seq = :s",
            {"g": bad, "s": seq},
        )

    return tamper


def resign_with_own_key(start: int, seq: int) -> Callable[[Services], None]:
    """Modify ``start``, recompute the chain, and re-sign the checkpoint at ``seq`` with a
    key of the attacker's own, stored beside it: only a pinned audit key catches this."""

    def tamper(services: Services) -> None:
        modify_and_rechain(start)(services)
        key = ec.generate_private_key(ec.SECP256R1())
        (new_hash,) = rows(services, "SELECT hash FROM audit_records WHERE seq = :s", {"s": seq})[0]
        (old_body,) = rows(
            services, "SELECT body FROM audit_checkpoints WHERE seq = :s", {"s": seq}
        )[0]
        old = parse_checkpoint_body(old_body)
        assert old.time is not None and old.previous is not None
        body = checkpoint_body(old.origin, seq, new_hash, old.time, old.previous)
        sql(
            services,
            "UPDATE audit_checkpoints SET head_hash = :h, body = :b, signature = :g, "
            "public_key_der = :k WHERE seq = :s",
            {
                "h": new_hash,
                "b": body,
                "g": key.sign(body.encode(), ec.ECDSA(hashes.SHA256())),
                "k": key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
                "s": seq,
            },
        )

    return tamper


def copy_record(seq: int, to: int) -> Callable[[Services], None]:
    """A copy of record ``seq`` stored at ``to``, outside the chain's 1..head."""
    columns = ", ".join(c for c in (*FIELDS, "hash") if c != "seq")  # fixed names, never input
    statement = (
        f"INSERT INTO audit_records (seq, {columns}) "  # noqa: S608
        f"SELECT :to, {columns} FROM audit_records WHERE seq = :s"
    )

    def tamper(services: Services) -> None:
        sql(services, statement, {"to": to, "s": seq})

    return tamper


def tombstone_of(seq: int, at: int) -> Callable[[Services], None]:
    """A tombstone, of record ``seq``'s action and certificate serial, stored at ``at``, outside
    the chain's 1..head: `cert check` takes one for a purged ca.issue / ca.revoke record."""
    statement = (
        "INSERT INTO audit_purged (seq, time, action, object_serial, leaf_hash, hash, purge_seq) "
        "SELECT :at, time, 'ca.revoke', object_serial, hash, hash, :purge FROM audit_records "
        "WHERE seq = :s"
    )

    def tamper(services: Services) -> None:
        sql(services, statement, {"at": at, "purge": at + 1, "s": seq})

    return tamper


def both(*tampers: Callable[[Services], None]) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        for one in tampers:
            one(services)

    return tamper


def set_signature(seq: int, signature: bytes) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        sql(
            services,
            "UPDATE audit_checkpoints SET signature = :g WHERE seq = :s",
            {"g": signature, "s": seq},
        )

    return tamper


def delete_checkpoint(seq: int) -> Callable[[Services], None]:
    def tamper(services: Services) -> None:
        sql(services, "DELETE FROM audit_checkpoints WHERE seq = :s", {"s": seq})

    return tamper


def shift_checkpoint_time(seq: int) -> Callable[[Services], None]:
    """Move the stored time of the checkpoint at ``seq`` by a second (through the column type,
    so it is stored in the form the journal writes)."""

    def tamper(services: Services) -> None:
        with services.db.engine.begin() as conn, guard_lifted(conn):
            when = conn.execute(select(Checkpoint.time).where(Checkpoint.seq == seq)).scalar_one()
            conn.execute(
                sa_update(Checkpoint)
                .where(Checkpoint.seq == seq)
                .values(time=when + dt.timedelta(seconds=1))
            )

    return tamper


def copy_checkpoint(seq: int, to: int) -> Callable[[Services], None]:
    """A copy of the checkpoint at ``seq`` stored at ``to`` (its body still names ``seq``)."""

    def tamper(services: Services) -> None:
        sql(
            services,
            "INSERT INTO audit_checkpoints (seq, time, head_hash, body, signature, key_ref, "
            "public_key_der) SELECT :to, time, head_hash, body, signature, key_ref, "
            "public_key_der FROM audit_checkpoints WHERE seq = :s",
            {"to": to, "s": seq},
        )

    return tamper


def set_head_checkpoint(seq: int) -> Callable[[Services], None]:
    """The head made to name the checkpoint at ``seq``, with its time when it is stored."""

    def tamper(services: Services) -> None:
        sql(
            services,
            "UPDATE audit_head SET checkpoint_seq = :s, checkpoint_time = COALESCE("
            "(SELECT time FROM audit_checkpoints WHERE seq = :s), checkpoint_time) WHERE id = 1",
            {"s": seq},
        )

    return tamper


def shift_head_checkpoint_time(delta: dt.timedelta) -> Callable[[Services], None]:
    """The head's checkpoint time moved by ``delta`` (through the column type)."""

    def tamper(services: Services) -> None:
        with services.db.engine.begin() as conn:
            when = conn.execute(select(JournalHead.checkpoint_time)).scalar_one()
            conn.execute(sa_update(JournalHead).values(checkpoint_time=when + delta))

    return tamper


# name -> (tampering, first bad sequence number named)
CASES: dict[str, tuple[Callable[[Services], None], int]] = {
    "flip-detail": (flip_column("detail", 30), 30),
    "flip-object-dn": (flip_column("object_dn", 64), 64),
    "flip-actor": (flip_column("actor_account", 13), 13),
    "flip-action": (flip_column("action", LAST), LAST),
    "flip-hash": (flip_column("hash", 77), 77),
    "shift-time": (shift_time(42), 42),
    "delete": (delete(30), 30),
    "delete-first": (delete(1), 1),
    "delete-last": (delete(LAST), LAST),
    "insert": (insert(30), 31),
    "reorder": (swap(30, 31), 30),
    "rechain-after-modify": (modify_and_rechain(60), 52),
    "rechain-before-init-checkpoint": (modify_and_rechain(10), 2),
    "truncate-behind-checkpoint": (truncate(80), 81),
    "forged-signature": (forge_signature(51), 51),
    # Records outside 1..head, which a walk from seq 1 to the head never reaches.
    "copy-at-seq-0": (copy_record(24, 0), 0),
    "copy-at-negative-seq": (copy_record(24, -5), -5),
    "copy-beyond-head": (copy_record(24, LAST + 5), LAST + 5),
    # ... and tombstones there, which no purge of the chain left (`cert check` trusts them).
    "tombstone-beyond-head": (tombstone_of(24, 10**6), 10**6),
    "tombstone-at-negative-seq": (tombstone_of(24, -5), -5),
    # Several problems: the lowest sequence number is named, whatever was checked first.
    "flip-and-bad-later-signature": (both(flip_column("detail", 30), set_signature(51, b"\0")), 30),
    "delete-and-record-below-1": (both(delete(30), copy_record(24, 0)), 0),
    # The head names the newest checkpoint: deleting it (or editing the head) shows.
    "delete-checkpoint": (delete_checkpoint(101), 52),
    "head-names-unknown-checkpoint": (set_head_checkpoint(999), 102),
    # ... and its signed time, from which appends measure the checkpoint interval.
    "head-checkpoint-time-ahead": (shift_head_checkpoint_time(dt.timedelta(days=3650)), 102),
    "head-checkpoint-time-back": (shift_head_checkpoint_time(dt.timedelta(seconds=-1)), 102),
    # A checkpoint signs its time and the checkpoint before it.
    "checkpoint-time-changed": (shift_checkpoint_time(51), 51),
    "delete-intermediate-checkpoint": (delete_checkpoint(51), INIT + 1),
    "delete-first-checkpoint": (delete_checkpoint(1), 1),
    "checkpoint-slipped-in": (copy_checkpoint(51, 60), 52),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_api_names_first_bad_seq(journal: Services, case: str) -> None:
    tamper, expected = CASES[case]
    tamper(journal)
    with journal.db.scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, journal.settings.journal_origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == expected, caught.value.message
    assert f"seq {expected}:" in str(caught.value)


@pytest.mark.parametrize("case", list(CASES))
def test_verify_cli_exits_2_and_names_first_bad_seq(
    journal: Services, case: str, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 0, err  # intact through the CLI too
    tamper, expected = CASES[case]
    tamper(journal)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2
    assert f"journal broken at seq {expected}:" in err
    assert "intact" not in out


def test_verify_subprocess_reports_tampering(journal: Services, cli_data_dir: Path) -> None:
    intact = run_cli_process(cli_data_dir, "audit", "verify")
    assert intact.returncode == 0, intact.stderr
    assert f"journal intact: {LAST} records" in intact.stdout
    flip_column("detail", 33)(journal)
    broken = run_cli_process(cli_data_dir, "audit", "verify")
    assert broken.returncode == 2
    assert "journal broken at seq 33:" in broken.stderr


def export_checkpoints(journal: Services) -> list[dict[str, object]]:
    with journal.db.scope() as session:
        return [
            checkpoint_document(c)
            for c in session.scalars(select(Checkpoint).order_by(Checkpoint.seq))
        ]


def test_truncation_with_checkpoints_deleted_is_caught_by_exported_checkpoints_api(
    journal: Services,
) -> None:
    exported = claims_from_documents(export_checkpoints(journal), "offsite.jsonl")
    truncate(80, drop_checkpoints=True)(journal)
    origin = journal.settings.journal_origin
    with journal.db.scope() as session:
        # The store alone is consistent again: this is why checkpoints leave the box.
        assert verify(session, origin, trusted_keys=audit_keys(journal)).records == 80
    with journal.db.scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, origin, trusted_keys=audit_keys(journal), external=exported)
    assert caught.value.seq == 81
    assert "truncated" in caught.value.message and "offsite.jsonl" not in caught.value.message


def cli_export_checkpoints(capsys: pytest.CaptureFixture[str], data_dir: Path, path: Path) -> Path:
    """``audit checkpoints export -o PATH`` (must succeed); returns PATH."""
    code, _out, err = run_cli(capsys, data_dir, "audit", "checkpoints", "export", "-o", str(path))
    assert code == 0, err
    return path


def test_truncation_with_checkpoints_deleted_is_caught_by_exported_checkpoints_cli(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    offsite = cli_export_checkpoints(capsys, cli_data_dir, tmp_path / "offsite.jsonl")
    truncate(80, drop_checkpoints=True)(journal)
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 0, err
    proc = run_cli_process(cli_data_dir, "audit", "verify", "--checkpoints", str(offsite))
    assert proc.returncode == 2
    assert "journal broken at seq 81:" in proc.stderr


def test_rewrite_with_checkpoints_deleted_is_caught_by_exported_checkpoints(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    offsite = tmp_path / "offsite.jsonl"
    offsite.write_text("".join(json.dumps(d) + "\n" for d in export_checkpoints(journal)))
    modify_and_rechain(60)(journal)
    drop_checkpoints_after(journal, 1)
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 0, err
    code, _out, err = run_cli(
        capsys, cli_data_dir, "audit", "verify", "--checkpoints", str(offsite)
    )
    assert code == 2
    assert "journal broken at seq 52:" in err


def test_forged_exported_checkpoint_is_refused(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    docs = export_checkpoints(journal)
    assert docs[2]["seq"] == 51
    sig = bytearray(base64.b64decode(str(docs[2]["signature"])))
    sig[-1] ^= 0x01
    docs[2]["signature"] = base64.b64encode(bytes(sig)).decode()
    offsite = tmp_path / "offsite.jsonl"
    offsite.write_text("".join(json.dumps(d) + "\n" for d in docs))
    code, _out, err = run_cli(
        capsys, cli_data_dir, "audit", "verify", "--checkpoints", str(offsite)
    )
    assert code == 2
    assert "journal broken at seq 51:" in err and "bad signature" in err


def test_checkpoint_signed_by_another_key_is_refused_by_pinned_key(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resign_with_own_key(60, 101)(journal)
    origin = journal.settings.journal_origin
    with journal.db.scope() as session:
        # Self-consistent: signature valid for the key stored beside it, chain recomputed.
        claim = session.get(Checkpoint, 101)
        assert claim is not None
        assert parse_checkpoint_body(claim.body).seq == 101
    signer = journal.journal.signer
    assert signer is not None
    with journal.db.scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, origin, trusted_keys={signer.public_key_der})
    assert caught.value.seq == 101 and "unknown key" in caught.value.message
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2
    assert "journal broken at seq 101:" in err


def test_a_head_checkpoint_time_moved_ahead_is_named(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Moved ahead, the head's checkpoint time made every append think the last checkpoint
    recent, so none was signed on time; verify said "intact"."""
    shift_head_checkpoint_time(dt.timedelta(days=3650))(journal)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2 and out == ""
    assert "journal broken at seq 102: the head's checkpoint_time " in err
    assert "is not the time the checkpoint at 101 signs" in err
    assert "(later: checkpoints were held back)" in err


def test_every_checkpoint_deleted_then_a_new_one_signed_is_caught(
    journal: Services, clock: FakeClock, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every checkpoint deleted, the records rewritten and the head made to name none: the
    next checkpoint signed followed "none" and verify said "intact". The first checkpoint of
    a journal is at seq 1 (init signs it), following none."""
    modify_and_rechain(30)(journal)
    sql(journal, "DELETE FROM audit_checkpoints")
    sql(journal, "UPDATE audit_head SET checkpoint_seq = 0, checkpoint_time = NULL")
    origin = journal.settings.journal_origin
    with journal.db.read_scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, origin, trusted_keys=audit_keys(journal), initialised=True)
    assert caught.value.seq == 1
    assert "records 1 to 107 are signed by no checkpoint" in caught.value.message
    with journal.db.scope() as session:
        assert journal.journal.checkpoint(session, clock()) is not None  # at 107, after "0"
    with journal.db.read_scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == 1
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2 and out == ""
    assert "journal broken at seq 1: the journal's first checkpoint is at seq 107" in err


def test_an_emptied_or_headless_journal_of_an_initialised_deployment_is_caught(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store's root CA (or the audit key) says the deployment was made, so its journal
    cannot be empty. Before, a journal emptied to its first state verified as intact."""
    sql(journal, "DELETE FROM audit_records")
    sql(journal, "DELETE FROM audit_checkpoints")
    sql(
        journal,
        "UPDATE audit_head SET seq = 0, hash = :h, checkpoint_seq = 0, checkpoint_time = NULL",
        {"h": GENESIS},
    )
    with journal.db.read_scope() as session:  # a new store's journal is empty, rightly
        assert verify(session, journal.settings.journal_origin, trusted_keys=set()).records == 0
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2 and out == ""
    assert "journal broken at seq 1: the journal is empty, but this deployment was " in err
    (cli_data_dir / "keys" / "audit.key").unlink()  # the store's root CA says it alone
    pem = cli_data_dir.parent / "audit-key.pem"
    pem.write_bytes(
        serialization.load_der_public_key(next(iter(audit_keys(journal)))).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--public-key", str(pem))
    assert code == 2 and "the journal is empty" in err
    sql(journal, "DELETE FROM audit_head")
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--public-key", str(pem))
    assert code == 2 and "journal broken at seq 1: the journal head row is missing" in err


def test_tampering_is_not_hidden_by_later_appends(journal: Services, clock: FakeClock) -> None:
    flip_column("detail", 90)(journal)
    append(journal, clock, 3, start=500)
    with journal.db.scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, journal.settings.journal_origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == 90


# The same instant spelt otherwise than the column type writes it (on SQLite, text).
SPELLINGS: dict[str, Callable[[dt.datetime], str]] = {
    "basic-format": lambda t: t.strftime("%Y%m%dT%H%M%SZ"),
    "other-offset": lambda t: t.astimezone(dt.timezone(-dt.timedelta(hours=12))).isoformat(),
    "no-fraction": lambda t: t.strftime("%Y-%m-%d %H:%M:%S+00:00"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_time_spelt_otherwise_is_tampering_where_the_store_keeps_text(
    journal: Services, spelling: str, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seq = 42
    when = record_fields(journal, seq)["time"]
    assert isinstance(when, dt.datetime) and when.microsecond == 0
    sql(
        journal,
        "UPDATE audit_records SET time = :v WHERE seq = :s",
        {"v": SPELLINGS[spelling](when), "s": seq},
    )
    with journal.db.read_scope() as session:
        second = Filter(since=when, until=when + dt.timedelta(seconds=1))
        in_range = [row.seq for row in search(session, second)]
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    if journal.db.engine.dialect.name == "sqlite":
        # The hash covers the instant, but a time-range search compares the stored text.
        assert in_range == []
        assert code == 2
        assert f"journal broken at seq {seq}: the stored time is not in the form" in err
    else:
        # timestamptz keeps the instant, not a spelling: nothing was changed.
        assert in_range == [seq]
        assert code == 0, err


MALFORMED = {
    "time-five-digit-year": "time = '0' || time",
    "time-trailing-text": "time = time || ' lol'",
    "category-blob": "category = CAST(category AS {blob})",
    "detail-blob": "detail = CAST(detail AS {blob})",
    "dn-blob": "object_dn = CAST(object_dn AS {blob})",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_stored_value_is_reported_at_its_seq(
    journal: Services, case: str, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite = journal.db.engine.dialect.name == "sqlite"
    assignment = MALFORMED[case].format(blob="BLOB" if sqlite else "bytea")
    statement = f"UPDATE audit_records SET {assignment} WHERE seq = 30"  # noqa: S608
    if not sqlite and case.startswith("time"):
        # PostgreSQL refuses text for a timestamptz: nothing changed.
        with pytest.raises(DBAPIError):
            sql(journal, statement)
        assert run_cli(capsys, cli_data_dir, "audit", "verify")[0] == 0
        return
    # PostgreSQL stores the bytea as its text form (\x...): a changed value, caught as such.
    sql(journal, statement)
    with journal.db.read_scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, journal.settings.journal_origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == 30
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2
    problem = "the stored" if sqlite else "record content does not match"
    assert f"journal broken at seq 30: {problem}" in err


def test_malformed_stored_value_gives_no_traceback(journal: Services, cli_data_dir: Path) -> None:
    if journal.db.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL stores only values of the column type")
    sql(journal, "UPDATE audit_records SET detail = CAST(detail AS BLOB) WHERE seq = 64")
    proc = run_cli_process(cli_data_dir, "audit", "verify")
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "error: audit-chain-broken: journal broken at seq 64: the stored detail is not text\n"
    )


def test_verify_checks_signatures_with_a_trusted_key_only(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Records, chain and checkpoint rewritten, the checkpoint re-signed with the attacker's
    key stored beside it: with the audit key unavailable, nothing is reported as verified;
    the auditor's copy of the public key (``--public-key``) still catches it."""
    pem = tmp_path / "audit-key.pem"
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "public-key", "-o", str(pem))
    assert code == 0, err
    exported = serialization.load_pem_public_key(pem.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert {exported} == audit_keys(journal)

    key_file = cli_data_dir / "keys" / "audit.key"
    key_file.rename(tmp_path / "audit.key.away")
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--public-key", str(pem))
    assert code == 0, err
    assert f"journal intact: {LAST} records" in out

    resign_with_own_key(60, 101)(journal)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 69
    assert "checkpoint signatures cannot be checked" in err and "--public-key" in err
    assert out == ""
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--public-key", str(pem))
    assert code == 2
    assert "journal broken at seq 101: checkpoint from store is signed by an unknown key" in err

    # The API trusts only the keys it is given.
    with journal.db.read_scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, journal.settings.journal_origin, trusted_keys=set())
    assert caught.value.seq == 1 and "unknown key" in caught.value.message


def test_verify_refuses_a_public_key_file_that_is_not_one(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    code, out, err = run_cli(
        capsys, cli_data_dir, "audit", "verify", "--public-key", str(not_a_key)
    )
    assert code == 65
    assert f"{not_a_key}: not a PEM public key" in err and out == ""
    # Two keys in one file (a bundle, the old key and the new): only the first was read, and
    # with another key first the journal was reported broken at seq 1 (exit 2), a false alarm
    # of tampering. Refused instead: one key per --public-key, which repeats.
    code, out, _err = run_cli(capsys, cli_data_dir, "audit", "public-key")
    assert code == 0
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    other_pem = other.public_bytes(serialization.Encoding.PEM, spki).decode()
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(other_pem + out)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--public-key", str(bundle))
    assert code == 65 and "2 PEM blocks" in err and "--public-key" in err and out == "", err


def test_a_quiet_journals_tail_is_signed_by_the_refresher(
    journal: Services, clock: FakeClock
) -> None:
    """Records after the last checkpoint are signed once the checkpoint interval has passed,
    even if nothing is appended any more: a rewrite of that tail is then caught. Before the
    interval, and once signed, the refresher's step does nothing."""
    origin = journal.settings.journal_origin
    step = AuditCheckpointer(journal)
    assert not step.run_once(clock.now)  # 102..107 unsigned, but not for long enough yet
    tamper = modify_and_rechain(LAST)
    clock.advance(minutes=journal.settings.audit_checkpoint_minutes)
    assert step.run_once(clock.now)
    with journal.db.scope() as session:
        assert [c.seq for c in session.scalars(select(Checkpoint))] == [1, INIT, 51, 101, LAST]
        assert verify(session, origin, trusted_keys=audit_keys(journal)).records == LAST
    clock.advance(minutes=journal.settings.audit_checkpoint_minutes)
    assert not step.run_once(clock.now)  # nothing new to sign
    tamper(journal)
    with journal.db.scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == 102  # the first record after the last checkpoint that held


def test_listing_a_tampered_journal_is_an_error_not_a_traceback(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A record whose time is not a time (a tampered row) stops search and export with one
    line (exit 74) and leaves no export file; verify locates it. Exports never overwrite."""
    if journal.db.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL stores only values of the column type")
    sql(journal, "UPDATE audit_records SET time = 'garbage' WHERE seq = 60")
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "search", "--limit", "1000")
    assert code == 74 and "cannot be read" in err and "Traceback" not in err
    target = tmp_path / "out.jsonl"
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "export", "-o", str(target))
    assert code == 74 and not target.exists()
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2 and "seq 60" in err
    target.write_text("earlier export\n")
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "export", "-o", str(target))
    assert code == 65 and "exists" in err and target.read_text() == "earlier export\n"


def test_checkpoint_documents_with_wrong_types_are_bad_input(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    exported = cli_export_checkpoints(capsys, cli_data_dir, tmp_path / "cp.jsonl")
    doc = json.loads(exported.read_text().splitlines()[0])
    broken = tmp_path / "broken.jsonl"
    # A seq out of range was reported as tampering there ("journal broken at seq -5", exit
    # 2; a 400-digit seq printed whole): it is a file that is not a checkpoint export.
    for field, value in (("body", None), ("seq", -5), ("seq", 0), ("seq", 10**400)):
        broken.write_text(json.dumps({**doc, field: value}) + "\n")
        code, _out, err = run_cli(
            capsys, cli_data_dir, "audit", "verify", "--checkpoints", str(broken)
        )
        assert code == 65 and "not a checkpoint document" in err, (field, value, err)
        assert len(err) < 400, err


# -- the checkpoint body signs its time and the checkpoint before it ---------------------------


def stored_checkpoint(services: Services, seq: int) -> tuple[str, CheckpointBody]:
    (body,) = rows(services, "SELECT body FROM audit_checkpoints WHERE seq = :s", {"s": seq})[0]
    return body, parse_checkpoint_body(body)


def resign(services: Services, seq: int, body: str) -> None:
    """Store ``body`` at ``seq``, signed with the deployment's own audit key (what the journal
    of another Sekisho version wrote, not an attacker)."""
    signer = services.journal.signer
    assert signer is not None
    sql(
        services,
        "UPDATE audit_checkpoints SET body = :b, signature = :g WHERE seq = :s",
        {"b": body, "g": signer.sign(body.encode()), "s": seq},
    )


def three_lines(body: CheckpointBody) -> str:
    """The body as Sekisho wrote it before checkpoints signed their time and link."""
    b64 = base64.b64encode(bytes.fromhex(body.head_hash)).decode()
    return f"{body.origin}\n{body.seq}\n{b64}\n"


def verify_api(services: Services, **kwargs: Any) -> int:
    """``verify`` on the store; the number of records, or the seq of the AuditChainBroken."""
    origin = services.settings.journal_origin
    with services.db.read_scope() as session:
        try:
            return verify(session, origin, trusted_keys=audit_keys(services), **kwargs).records
        except AuditChainBroken as exc:
            return -exc.seq


def test_checkpoints_sign_their_time_and_the_checkpoint_before(journal: Services) -> None:
    previous = (0, GENESIS)
    for seq in (1, INIT, 51, 101):
        text, body = stored_checkpoint(journal, seq)
        with journal.db.read_scope() as session:
            row = session.get(Checkpoint, seq)
            assert row is not None
            assert body.time == row.time and body.previous == previous
        previous = (seq, hashlib.sha256(text.encode()).hexdigest())


def test_three_line_checkpoints_of_before_still_verify(
    journal: Services, clock: FakeClock, cli_data_dir: Path, tmp_path: Path
) -> None:
    """Checkpoints an older Sekisho signed (three lines) verify, without the guarantees of the
    new lines: their time is not signed, their deletion is seen only against an export. The
    first new checkpoint signs that it follows the last of them."""
    for seq in (1, INIT, 51, 101):
        resign(journal, seq, three_lines(stored_checkpoint(journal, seq)[1]))
    assert verify_api(journal) == LAST
    offsite = tmp_path / "offsite.jsonl"
    offsite.write_text("".join(json.dumps(d) + "\n" for d in export_checkpoints(journal)))
    shift_checkpoint_time(51)(journal)  # unsigned in this form: not seen
    assert run_cli_process(cli_data_dir, "audit", "verify").returncode == 0

    append(journal, clock, 151 - LAST, start=700)
    text_101, _ = stored_checkpoint(journal, 101)
    _, body_151 = stored_checkpoint(journal, 151)
    assert body_151.previous == (101, hashlib.sha256(text_101.encode()).hexdigest())
    assert verify_api(journal) == 151

    delete_checkpoint(51)(journal)  # nothing signed names it: seen only against the export
    assert verify_api(journal) == 151
    proc = run_cli_process(cli_data_dir, "audit", "verify", "--checkpoints", str(offsite))
    assert proc.returncode == 2
    assert (
        f"journal broken at seq {INIT + 1}: the checkpoint at 51 (offsite.jsonl:3) is missing"
        in proc.stderr
    )
    delete_checkpoint(101)(journal)  # the first new checkpoint names it
    proc = run_cli_process(cli_data_dir, "audit", "verify")
    assert proc.returncode == 2
    assert f"journal broken at seq {INIT + 1}: the checkpoint at 101 is missing" in proc.stderr


# name -> (new body of the newest checkpoint (101) from its body, the problem reported at 101,
# or None if it verifies). Signed with the audit key: another version's journal, not an attacker.
EXTENSIONS: dict[str, tuple[Callable[[str], str], str | None]] = {
    # C2SP extension lines are opaque: one this version does not know is signed, so ignored.
    "unknown-line-after-the-link": (lambda body: body + "example.org/later 42\n", None),
    "unknown-line-after-three-lines": (
        lambda body: three_lines(parse_checkpoint_body(body)) + "example.org/later 42\n",
        None,
    ),
    "empty-extension-line": (lambda body: body + "\n", "checkpoint body has an empty line"),
    "time-not-rfc3339": (
        lambda body: body.replace(body.split("\n")[3], "time 2026-11-26 10:00:00"),
        "checkpoint time is not RFC 3339 UTC with microseconds",
    ),
    "time-without-link": (
        lambda body: "\n".join(body.split("\n")[:4]) + "\n",
        "checkpoint body has a time line but no previous line",
    ),
    "link-without-hash": (
        lambda body: body.replace(body.split("\n")[4], "previous 51"),
        "checkpoint previous line must be a seq and a hash",
    ),
}


@pytest.mark.parametrize("case", list(EXTENSIONS))
def test_extension_lines(journal: Services, case: str, cli_data_dir: Path) -> None:
    change, problem = EXTENSIONS[case]
    text, _ = stored_checkpoint(journal, 101)
    resign(journal, 101, change(text))
    proc = run_cli_process(cli_data_dir, "audit", "verify")
    if problem is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2
        assert f"journal broken at seq 101: checkpoint from store: {problem}\n" in proc.stderr


def test_the_link_names_one_checkpoint_body(journal: Services) -> None:
    """A checkpoint replaced by another signed body at the same seq (here the journal of a
    later version would have written it) is not the one the next checkpoint follows."""
    text, _ = stored_checkpoint(journal, 51)
    resign(journal, 51, text + "example.org/later 42\n")
    with journal.db.read_scope() as session, pytest.raises(AuditChainBroken) as caught:
        verify(session, journal.settings.journal_origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == INIT + 1
    assert "the checkpoint at 51 was replaced: the checkpoint at 101" in caught.value.message


def test_a_deleted_checkpoint_stays_reported_after_the_next_one(
    journal: Services, clock: FakeClock
) -> None:
    """The head names the newest checkpoint; once the next one is signed, that one names the
    deleted checkpoint as the one it follows."""
    delete_checkpoint(101)(journal)
    assert verify_api(journal) == -52
    append(journal, clock, 151 - LAST, start=700)
    with journal.db.read_scope() as session:
        assert [c.seq for c in session.scalars(select(Checkpoint))] == [1, INIT, 51, 151]
        with pytest.raises(AuditChainBroken) as caught:
            verify(session, journal.settings.journal_origin, trusted_keys=audit_keys(journal))
    assert caught.value.seq == 52
    assert "the checkpoint at 101 is missing: the checkpoint at 151 (store)" in str(caught.value)


def test_newest_checkpoint_deleted_with_the_head_is_caught_by_the_export(
    journal: Services, clock: FakeClock
) -> None:
    """Deleted with the head edited to match, the newest checkpoint leaves no trace in the
    store (its records are still proven by the export); once a later checkpoint is stored,
    the export shows it missing."""
    exported = claims_from_documents(export_checkpoints(journal), "offsite.jsonl")
    both(delete_checkpoint(101), set_head_checkpoint(51))(journal)
    assert verify_api(journal, external=exported) == LAST
    append(journal, clock, 151 - LAST, start=700)
    assert verify_api(journal) == 151
    assert verify_api(journal, external=exported) == -52


def test_exported_checkpoint_time_must_be_the_signed_time(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Off the box (the audit key moved away, the auditor's copy of its public key given):
    an exported checkpoint whose time was changed is refused."""
    pem = tmp_path / "audit-key.pem"
    assert run_cli(capsys, cli_data_dir, "audit", "public-key", "-o", str(pem))[0] == 0
    (cli_data_dir / "keys" / "audit.key").rename(tmp_path / "audit.key.away")
    exported = cli_export_checkpoints(capsys, cli_data_dir, tmp_path / "cp.jsonl")
    docs = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [parse_checkpoint_body(d["body"]).time for d in docs] == [
        dt.datetime.fromisoformat(d["time"]) for d in docs
    ]
    args = ("audit", "verify", "--public-key", str(pem), "--checkpoints")
    assert run_cli(capsys, cli_data_dir, *args, str(exported))[0] == 0
    assert docs[2]["seq"] == 51
    docs[2]["time"] = "2020-01-01T00:00:00.000000Z"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(d) + "\n" for d in docs))
    code, _out, err = run_cli(capsys, cli_data_dir, *args, str(changed))
    assert code == 2
    assert "journal broken at seq 51: checkpoint from changed.jsonl:3: its time 2020-01-01" in err


# -- text that is not UTF-8 (only an edit of the SQLite file stores it) ---------------------


def write_not_utf8(services: Services, table: str, column: str, seq: int) -> None:
    """``column`` of row ``seq`` set to the bytes ff 41 as TEXT (PostgreSQL refuses them)."""
    assert (table, column) in {("audit_records", c) for c in FIELDS} | {
        ("audit_checkpoints", "body")
    }  # fixed names, never input
    assignment = f"UPDATE {table} SET {column} = {{}} WHERE seq = {seq}"  # noqa: S608
    if services.db.engine.dialect.name != "sqlite":
        with pytest.raises(DBAPIError):
            sql(services, assignment.format("convert_from('\\xff41'::bytea, 'UTF8')"))
        pytest.skip("PostgreSQL refuses text that is not UTF-8")
    sql(services, assignment.format("CAST(x'ff41' AS TEXT)"))


@pytest.mark.parametrize("column", ["action", "detail", "object_dn", "time"])
def test_text_not_utf8_is_tampering_at_its_seq(
    journal: Services, column: str, cli_data_dir: Path
) -> None:
    write_not_utf8(journal, "audit_records", column, 30)
    assert verify_api(journal) == -30
    proc = run_cli_process(cli_data_dir, "audit", "verify")
    assert proc.returncode == 2
    expected = f"journal broken at seq 30: the stored {column} is not UTF-8 text"
    assert proc.stderr == f"error: audit-chain-broken: {expected}\n"


def test_checkpoint_not_utf8_is_tampering_at_its_seq(journal: Services, cli_data_dir: Path) -> None:
    write_not_utf8(journal, "audit_checkpoints", "body", 51)
    proc = run_cli_process(cli_data_dir, "audit", "verify")
    assert proc.returncode == 2
    assert "journal broken at seq 51: checkpoint from store: a value is not" in proc.stderr
    proc = run_cli_process(cli_data_dir, "audit", "checkpoints", "export")
    assert proc.returncode == 74 and proc.stdout == ""
    assert proc.stderr == (
        "error: audit-unavailable: the journal holds a checkpoint that cannot be read "
        "(UnicodeDecodeError): run `sekisho audit verify`\n"
    )


def test_listing_text_not_utf8_is_an_error_not_a_store_failure(
    journal: Services, cli_data_dir: Path, tmp_path: Path
) -> None:
    """search and export stop at a record they cannot read, as for any tampered row: one
    line, exit 74, no export file left behind."""
    write_not_utf8(journal, "audit_records", "action", 30)
    unreadable = (
        "error: audit-unavailable: the journal holds a record that cannot be read "
        "(UnicodeDecodeError): run `sekisho audit verify`\n"
    )
    for args in (("search", "--limit", "1000"), ("search", "--oldest"), ("export",)):
        proc = run_cli_process(cli_data_dir, "audit", *args)
        assert proc.returncode == 74, args
        assert proc.stderr == unreadable, args
    target = tmp_path / "out.csv"
    proc = run_cli_process(cli_data_dir, "audit", "export", "--format", "csv", "-o", str(target))
    assert proc.returncode == 74 and proc.stderr == unreadable and not target.exists()
    # Records the filter does not reach are still listed.
    proc = run_cli_process(cli_data_dir, "audit", "search", "--limit", "5")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 5


def test_dn_filter_on_text_not_utf8_is_an_error_not_a_store_failure(
    journal: Services, cli_data_dir: Path
) -> None:
    """The DN filter folds case with a Python function on SQLite, whose arguments sqlite3
    decodes first: a DN that is not UTF-8 failed the statement as a store error (exit 74,
    "database error: OperationalError"). It is the tampered-row error now, as without the
    filter (every row goes through the filter, so every DN search meets it)."""
    write_not_utf8(journal, "audit_records", "object_dn", 30)
    unreadable = (
        "error: audit-unavailable: the journal holds a record that cannot be read "
        "(UnicodeDecodeError): run `sekisho audit verify`\n"
    )
    for args in (("search",), ("search", "--oldest"), ("export",)):
        proc = run_cli_process(cli_data_dir, "audit", *args, "--dn", "x")
        assert (proc.returncode, proc.stderr) == (74, unreadable), args
