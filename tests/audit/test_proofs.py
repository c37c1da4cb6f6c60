"""Security target 32, "Proofs": checkpoints sign the Merkle root of the records up to them,
each checkpoint is provably consistent with the one before (a fork fails), every record's
inclusion proof verifies; and (target 36) an independent verifier, tools/verify_journal.py,
recomputes chain and roots from the exports alone."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import audit.journal
from audit.chain import FIELDS, canonical, parse_checkpoint_body
from audit.merkle import Frontier, leaf_hash, tree_hash
from audit.models import Checkpoint, JournalRecord
from audit.verify import claims_from_documents, verify
from ca.revocation import Reason
from sekisho.context import Actor
from sekisho.errors import AuditChainBroken
from sekisho.services import Services
from tests.audit.conftest import append, audit_keys, rows, run_cli, sql, template_seq
from tests.ca.helpers import request_for
from tests.conftest import FakeClock

TOOL = Path(__file__).resolve().parents[2] / "tools" / "verify_journal.py"
INIT = 17
LAST = 107


@pytest.fixture
def journal(journal_services: Services, clock: FakeClock) -> Services:
    """Records 1..107, checkpoints at 1 and 17 (init), 51 (`audit checkpoint`, the ORM path)
    and 101 (the 50th append after it, the prepared-statement path)."""
    assert template_seq(journal_services) == INIT
    append(journal_services, clock, 51 - INIT)
    with journal_services.db.scope() as session:
        assert journal_services.journal.checkpoint(session, clock()) is not None
    append(journal_services, clock, LAST - 51)
    assert [c.seq for c in checkpoints(journal_services)] == [1, INIT, 51, 101]
    return journal_services


def checkpoints(services: Services) -> list[Checkpoint]:
    with services.db.scope() as session:
        return list(session.scalars(select(Checkpoint).order_by(Checkpoint.seq)))


def record_leaves(services: Services) -> list[bytes]:
    with services.db.scope() as session:
        records = session.scalars(select(JournalRecord).order_by(JournalRecord.seq))
        return [
            hashlib.sha256(b"\x00" + canonical({n: getattr(r, n) for n in FIELDS})).digest()
            for r in records
        ]


def check(services: Services, external: list[dict[str, Any]] | None = None) -> None:
    with services.db.scope() as session:
        verify(
            session,
            services.settings.journal_origin,
            trusted_keys=audit_keys(services),
            external=claims_from_documents(external or [], "offsite.jsonl"),
        )


def broken_at(services: Services, external: list[dict[str, Any]] | None = None) -> AuditChainBroken:
    with pytest.raises(AuditChainBroken) as caught:
        check(services, external)
    return caught.value


def resign(services: Services, seq: int, body: str) -> None:
    """Store ``body`` at ``seq`` signed with the deployment's own audit key: what a signer
    that went wrong (or whoever holds the key) signs."""
    signer = services.journal.signer
    assert signer is not None
    sql(
        services,
        "UPDATE audit_checkpoints SET body = :b, signature = :g WHERE seq = :s",
        {"b": body, "g": signer.sign(body.encode()), "s": seq},
    )


def with_root(body: str, root: bytes | None) -> str:
    """``body`` with its root line replaced (None: removed)."""
    lines = [line for line in body.splitlines() if not line.startswith("root ")]
    seq = lines[1]
    if root is not None:
        lines.append(f"root {seq} {base64.b64encode(root).decode()}")
    return "\n".join(lines) + "\n"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- checkpoints sign the root ----------------------------------------------------------------
def test_every_checkpoint_signs_the_root_of_the_records_up_to_it(journal: Services) -> None:
    leaves = record_leaves(journal)
    for cp in checkpoints(journal):
        body = parse_checkpoint_body(cp.body)
        assert body.root == tree_hash(leaves[: cp.seq]).hex(), cp.seq
        assert f"\nroot {cp.seq} {b64(bytes.fromhex(body.root))}\n" in cp.body
        assert cp.merkle_frontier is not None
        frontier = Frontier.from_bytes(cp.seq, cp.merkle_frontier)
        assert frontier.root().hex() == body.root
    check(journal)


def test_a_checkpoint_extends_the_previous_frontier_without_rereading(
    journal: Services, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next checkpoint reads only the records after the previous one."""
    reads: list[tuple[int, int]] = []
    original = audit.journal._reader_tx

    def spying(tx: Any) -> Any:
        read = original(tx)

        def spy(after: int, upto: int) -> Any:
            reads.append((after, upto))
            return read(after, upto)

        return spy

    monkeypatch.setattr(audit.journal, "_reader_tx", spying)
    append(journal, clock, 151 - LAST)  # the 50th append after 101 signs at 151
    assert checkpoints(journal)[-1].seq == 151
    assert reads == [(101, 151)]
    check(journal)


@pytest.mark.parametrize("frontier", [None, b"\x00" * 32 * (101).bit_count(), b"short"])
def test_a_missing_or_wrong_frontier_is_rebuilt_from_record_1(
    journal: Services, clock: FakeClock, frontier: bytes | None
) -> None:
    """A checkpoint of before (no frontier), or a frontier that does not fold to the root its
    checkpoint signs: the next checkpoint builds the tree from record 1 and signs the right
    root."""
    sql(
        journal,
        "UPDATE audit_checkpoints SET merkle_frontier = :f WHERE seq = 101",
        {"f": frontier},
    )
    append(journal, clock, 151 - LAST)
    newest = checkpoints(journal)[-1]
    assert newest.seq == 151
    assert parse_checkpoint_body(newest.body).root == tree_hash(record_leaves(journal)[:151]).hex()
    check(journal)


# -- verify recomputes the roots; a fork fails -----------------------------------------------
def test_a_checkpoint_signing_another_root_fails_at_its_seq(journal: Services) -> None:
    newest = checkpoints(journal)[-1]
    resign(journal, 101, with_root(newest.body, hashlib.sha256(b"another tree").digest()))
    failure = broken_at(journal)
    assert failure.seq == 101
    assert "Merkle root" in failure.message and "fork" in failure.message


def test_a_checkpoint_signing_a_forked_tree_fails_as_a_fork(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The root of another history, where record 30 said something else, signed at 101:
    not consistent with the root signed at 51, which holds record 30 as it is."""
    leaves = record_leaves(journal)
    leaves[29] = leaf_hash(b"record 30 as another history has it")
    resign(journal, 101, with_root(checkpoints(journal)[-1].body, tree_hash(leaves[:101])))
    failure = broken_at(journal)
    assert failure.seq == 101
    assert "not consistent with the one signed at 51: a fork" in failure.message
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "verify")
    assert code == 2 and "journal broken at seq 101:" in err and "a fork" in err
    assert "intact" not in out


def test_the_first_root_signed_is_recomputed_too(journal: Services) -> None:
    """Checkpoints of before sign no root: the first one that does is compared with the root
    recomputed from the records."""
    for cp in checkpoints(journal):
        if cp.seq < 101:
            continue
        resign(journal, cp.seq, with_root(cp.body, tree_hash(record_leaves(journal)[:100])))
    failure = broken_at(journal)
    assert failure.seq == 101, failure.message


def test_an_exported_checkpoint_with_a_forked_root_fails(
    journal: Services, clock: FakeClock
) -> None:
    """A checkpoint that exists only off the box, over the unsigned tail: its root is
    checked against the records and the roots signed before it."""
    signer = journal.journal.signer
    assert signer is not None
    stored = checkpoints(journal)[-1]
    body = parse_checkpoint_body(stored.body)
    (head,) = rows(journal, "SELECT hash FROM audit_records WHERE seq = :s", {"s": LAST})[0]
    when = "2026-11-27T00:00:00.000000Z"
    link = f"previous 101 {b64(hashlib.sha256(stored.body.encode()).digest())}"
    leaves = record_leaves(journal)

    def offsite(root: bytes) -> dict[str, Any]:
        text = (
            f"{body.origin}\n{LAST}\n{b64(bytes.fromhex(head))}\ntime {when}\n{link}\n"
            f"root {LAST} {b64(root)}\n"
        )
        return {
            "seq": LAST,
            "time": when,
            "head_hash": head,
            "body": text,
            "signature": b64(signer.sign(text.encode())),
            "key_ref": "file:audit",
            "public_key": b64(signer.public_key_der),
        }

    check(journal, [offsite(tree_hash(leaves))])  # the right root: intact
    leaves[60] = leaf_hash(b"forked")
    failure = broken_at(journal, [offsite(tree_hash(leaves))])
    assert failure.seq == LAST and "fork" in failure.message


def test_a_malformed_root_line_is_reported_at_its_checkpoint(journal: Services) -> None:
    body = checkpoints(journal)[-1].body
    resign(journal, 101, body.replace("root 101 ", "root 100 "))
    failure = broken_at(journal)
    assert failure.seq == 101 and "root line" in failure.message
    resign(journal, 101, body.replace("root 101 ", "root 101 !"))
    failure = broken_at(journal)
    assert failure.seq == 101 and "root hash" in failure.message


def test_a_body_without_a_root_line_still_verifies(journal: Services) -> None:
    """Checkpoints written before roots were signed."""
    resign(journal, 101, with_root(checkpoints(journal)[-1].body, None))
    check(journal)


def test_a_rewritten_record_fails_verification(journal: Services) -> None:
    """The chain catches it first (at the record), as before; the roots agree."""
    sql(journal, "UPDATE audit_records SET action = 'ca.forged' WHERE seq = 30")
    assert broken_at(journal).seq == 30


# -- the CLI's proofs, checked by the independent verifier -----------------------------------
def tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """tools/verify_journal.py in an isolated interpreter (-I: no PYTHONPATH, no Sekisho)."""
    return subprocess.run(
        [sys.executable, "-I", str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def public_key(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Path:
    path = tmp_path / "audit-key.pem"
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "public-key", "-o", str(path))
    assert code == 0, err
    return path


def prove(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path, *args: str
) -> tuple[Path, dict[str, Any]]:
    code, out, err = run_cli(capsys, data_dir, "--json", "audit", "prove", *args)
    assert code == 0, err
    path = tmp_path / "proof.json"
    path.write_text(out)
    return path, json.loads(out)


def test_every_records_inclusion_proof_verifies(
    journal: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    public_key: Path,
) -> None:
    for seq in (1, 2, 17, 51, 64, 100, 101):
        path, doc = prove(capsys, cli_data_dir, tmp_path, "inclusion", "--seq", str(seq))
        assert doc["tree_size"] == 101 and doc["checkpoint"]["seq"] == 101
        (entry,) = doc["entries"]
        assert entry["leaf_index"] == seq - 1 and entry["record"]["seq"] == seq
        done = tool("proof", path, "--public-key", public_key)
        assert done.returncode == 0, done.stderr
        assert "inclusion proven" in done.stdout
    path, doc = prove(
        capsys, cli_data_dir, tmp_path, "inclusion", "--seq", "30", "--checkpoint", "51"
    )
    assert doc["tree_size"] == 51 and len(doc["entries"][0]["audit_path"]) == 6
    assert tool("proof", path, "--public-key", public_key).returncode == 0


def test_every_record_of_a_serial_is_proven(
    journal: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    public_key: Path,
) -> None:
    cert = journal.ca.issue(request_for("device"), Actor(account="ops@tenant1"))
    journal.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, Actor("sec"))
    with journal.db.scope() as session:
        assert journal.journal.checkpoint(session, clock()) is not None
        wanted = list(
            session.scalars(
                select(JournalRecord.seq)
                .where(JournalRecord.object_serial == f"{cert.serial_number:040x}")
                .order_by(JournalRecord.seq)
            )
        )
    assert len(wanted) >= 2
    serial = f"{cert.serial_number:X}"  # any case, no padding
    path, doc = prove(capsys, cli_data_dir, tmp_path, "inclusion", "--serial", serial)
    assert [e["seq"] for e in doc["entries"]] == wanted
    done = tool("proof", path, "--public-key", public_key)
    assert done.returncode == 0, done.stderr


def test_tampered_inclusion_proofs_fail_in_the_verifier(
    journal: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    public_key: Path,
) -> None:
    path, doc = prove(capsys, cli_data_dir, tmp_path, "inclusion", "--seq", "40")
    entry = doc["entries"][0]

    def fails(changed: dict[str, Any]) -> str:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(changed))
        done = tool("proof", bad, "--public-key", public_key)
        assert done.returncode == 1, (done.stdout, done.stderr)
        return done.stderr

    def variant(**entry_changes: Any) -> dict[str, Any]:
        return {**doc, "entries": [{**entry, **entry_changes}]}

    other_record = {**entry["record"], "action": "ca.forged"}
    assert "first bad seq 40" in fails(variant(record=other_record))  # wrong leaf
    moved = {**entry["record"], "seq": 41}
    assert "first bad seq 41" in fails(variant(record=moved, seq=41, leaf_index=40))
    path_ = entry["audit_path"]
    fails(variant(audit_path=path_[:-1]))  # a node missing
    fails(variant(audit_path=[*path_, path_[0]]))  # one too many
    fails(variant(audit_path=[path_[1], path_[0], *path_[2:]]))
    fails({**doc, "tree_size": 100})  # not the size the checkpoint signs
    cp = doc["checkpoint"]
    fails({**doc, "checkpoint": {**cp, "body": cp["body"].replace("root 101", "root 100")}})
    assert tool("proof", path, "--public-key", public_key).returncode == 0


def test_consistency_proofs_verify_and_tampered_ones_fail(
    journal: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    public_key: Path,
) -> None:
    seqs = [1, INIT, 51, 101]
    for i, first in enumerate(seqs):
        for second in seqs[i:]:
            path, doc = prove(
                capsys,
                cli_data_dir,
                tmp_path,
                "consistency",
                "--from",
                str(first),
                "--to",
                str(second),
            )
            assert (doc["first_size"], doc["second_size"]) == (first, second)
            done = tool("proof", path, "--public-key", public_key)
            assert done.returncode == 0, done.stderr
    _path, doc = prove(capsys, cli_data_dir, tmp_path, "consistency", "--from", "17", "--to", "101")
    bad = tmp_path / "bad.json"
    flipped = base64.b64decode(doc["proof"][0])
    changes: list[dict[str, Any]] = [
        {"proof": [b64(bytes([flipped[0] ^ 1]) + flipped[1:]), *doc["proof"][1:]]},
        {"proof": doc["proof"][:-1]},
        {"proof": [*doc["proof"], doc["proof"][0]]},
        {
            "first_checkpoint": doc["second_checkpoint"],
            "second_checkpoint": doc["first_checkpoint"],
        },
        {"first_size": 16},
    ]
    for change in changes:
        bad.write_text(json.dumps({**doc, **change}))
        done = tool("proof", bad, "--public-key", public_key)
        assert done.returncode == 1, (change, done.stdout)


def test_a_fork_fails_the_consistency_proof(
    journal: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    public_key: Path,
) -> None:
    """The newer checkpoint signs a forked tree: `prove consistency` refuses to hand out a
    proof (exit 2), and a proof built for the honest tree does not verify against it."""
    _path, doc = prove(capsys, cli_data_dir, tmp_path, "consistency", "--from", "51", "--to", "101")
    leaves = record_leaves(journal)
    leaves[29] = leaf_hash(b"forked")
    forked = with_root(checkpoints(journal)[-1].body, tree_hash(leaves[:101]))
    resign(journal, 101, forked)
    code, _out, err = run_cli(
        capsys, cli_data_dir, "audit", "prove", "consistency", "--from", "51", "--to", "101"
    )
    assert code == 2 and "journal broken at seq 101" in err, err
    signer = journal.journal.signer
    assert signer is not None
    second = {
        **doc["second_checkpoint"],
        "body": forked,
        "signature": b64(signer.sign(forked.encode())),
    }
    bad = tmp_path / "fork.json"
    bad.write_text(json.dumps({**doc, "second_checkpoint": second}))
    done = tool("proof", bad, "--public-key", public_key)
    assert done.returncode == 1 and "first bad seq 101" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("inclusion",), 64, "exactly one of --seq and --serial"),
        (("inclusion", "--seq", "3", "--serial", "ab"), 64, "exactly one"),
        (("inclusion", "--serial", "xyz"), 64, "not a certificate serial"),
        (("inclusion", "--serial", "00"), 64, "a positive number"),
        (("inclusion", "--seq", "0"), 64, ""),
        (("inclusion", "--seq", "5000"), 66, "no record at seq 5000"),
        (("inclusion", "--seq", "105"), 66, "after the checkpoint at 101"),
        (("inclusion", "--seq", "3", "--checkpoint", "50"), 66, "no checkpoint at seq 50"),
        (("inclusion", "--serial", "ab" * 20), 66, "no record names"),
        (("consistency", "--from", "101", "--to", "51"), 64, "--from must not be after --to"),
        (("consistency", "--from", "1", "--to", "99"), 66, "no checkpoint at seq 99"),
    ],
)
def test_prove_errors(
    journal: Services,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    got, out, err = run_cli(capsys, cli_data_dir, "audit", "prove", *args)
    assert got == code, (out, err)
    assert message in err and "Traceback" not in err
    assert out == ""


def test_a_checkpoint_without_a_root_cannot_be_proven_against(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resign(journal, 51, with_root(checkpoints(journal)[2].body, None))
    code, _out, err = run_cli(
        capsys, cli_data_dir, "audit", "prove", "inclusion", "--seq", "3", "--checkpoint", "51"
    )
    assert code == 66 and "signs no Merkle root" in err


# -- the independent verifier on real exports ------------------------------------------------
@pytest.fixture
def exports(
    journal: Services, cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> tuple[Path, Path]:
    records, cps = tmp_path / "journal.jsonl", tmp_path / "checkpoints.jsonl"
    for args in (("export", "-o", str(records)), ("checkpoints", "export", "-o", str(cps))):
        code, _out, err = run_cli(capsys, cli_data_dir, "audit", *args)
        assert code == 0, err
    return records, cps


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def test_the_verifier_accepts_an_intact_pair(exports: tuple[Path, Path], public_key: Path) -> None:
    records, cps = exports
    done = tool("journal", records, cps, "--public-key", public_key)
    assert done.returncode == 0, done.stderr
    assert (
        f"journal intact: {LAST} records, 4 checkpoints verified (4 with a Merkle root)"
        in done.stdout
    )


def rechain(docs: list[dict[str, Any]], start: int) -> None:
    """Recompute the chain hashes from record ``start`` (what a rewrite of the export does)."""
    head = bytes.fromhex(docs[start - 2]["hash"]) if start > 1 else bytes(32)
    for doc in docs[start - 1 :]:
        fields = {k: v for k, v in doc.items() if k != "hash"}
        fields["detail"] = json.dumps(fields["detail"], sort_keys=True, separators=(",", ":"))
        head = hashlib.sha256(
            head
            + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).digest()
        doc["hash"] = head.hex()


def test_the_verifier_names_the_first_bad_seq_of_a_tampered_export(
    exports: tuple[Path, Path], public_key: Path, tmp_path: Path
) -> None:
    records, cps = exports
    docs, signed = lines(records), lines(cps)

    def fails(recs: list[dict[str, Any]], checkpoint_docs: list[dict[str, Any]], seq: int) -> None:
        done = tool(
            "journal",
            write(tmp_path / "r.jsonl", recs),
            write(tmp_path / "c.jsonl", checkpoint_docs),
            "--public-key",
            public_key,
        )
        assert done.returncode == 1, done.stdout
        assert f"first bad seq {seq}:" in done.stderr, done.stderr

    changed = [dict(d) for d in docs]
    changed[29]["client_ip"] = "192.0.2.66"
    fails(changed, signed, 30)  # a record changed
    rechain(changed, 30)
    fails(changed, signed, INIT + 1)  # rechained: the checkpoint at 51 no longer matches
    fails(docs[:50], signed, 51)  # truncated behind a checkpoint
    fails(docs[:29] + docs[30:], signed, 30)  # a record deleted
    body = signed[2]["body"]
    forged = {**signed[2], "body": with_root(body, hashlib.sha256(b"x").digest())}
    fails(docs, [*signed[:2], forged, signed[3]], 51)  # a root not signed by the key
    fails(docs, [signed[0], signed[1], signed[3]], 18)  # a checkpoint left out


def test_the_verifier_rejects_another_key_and_unreadable_input(
    exports: tuple[Path, Path], tmp_path: Path, public_key: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    records, cps = exports
    done = tool("journal", records, cps, "--public-key", other)
    assert done.returncode == 1 and "first bad seq 1:" in done.stderr
    done = tool("journal", records, cps, "--public-key", records)
    assert done.returncode == 2 and "not a PEM public key" in done.stderr
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    done = tool("journal", tmp_path / "garbage.jsonl", cps, "--public-key", public_key)
    assert done.returncode == 2 and "Traceback" not in done.stderr
