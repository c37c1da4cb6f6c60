"""Inclusion and consistency proofs against signed checkpoints, as documents a third party
checks with the audit public key alone (``tools/verify_journal.py proof``).

An inclusion document carries the checkpoint (body and signature, as exported), the record
(as ``audit export`` writes it), its leaf index (seq - 1) and audit path; a consistency
document carries both checkpoints and the proof between their tree sizes. Hashes are base64,
as in checkpoint bodies. The proof is built from the stored records and checked against the
root the checkpoint signs before it is handed out: records that no longer give that root are
a broken journal (``AuditChainBroken``), never a proof that fails elsewhere.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import parse_checkpoint_body
from audit.journal import checkpoint_document, consecutive_leaves, leaf_reader
from audit.merkle import (
    Node,
    asked_ranges,
    consistency_proof,
    inclusion_proof,
    range_hashes,
    verify_consistency,
    verify_inclusion,
)
from audit.models import Checkpoint, JournalRecord
from audit.query import as_document
from sekisho.errors import AuditChainBroken, NotFound

INCLUSION_FORMAT = "sekisho-inclusion-proof/1"
CONSISTENCY_FORMAT = "sekisho-consistency-proof/1"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def checkpoint_at(session: Session, seq: int | None) -> Checkpoint:
    """The checkpoint at ``seq`` (None: the newest); NotFound when there is none."""
    stmt = select(Checkpoint)
    if seq is None:
        stmt = stmt.order_by(Checkpoint.seq.desc()).limit(1)
    else:
        stmt = stmt.where(Checkpoint.seq == seq)
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound("no checkpoint is stored" if seq is None else f"no checkpoint at seq {seq}")
    return row


def signed_root(row: Checkpoint) -> bytes:
    """The Merkle root the checkpoint's body signs; NotFound when it signs none."""
    try:
        root = parse_checkpoint_body(row.body).root
    except ValueError as exc:
        raise AuditChainBroken(row.seq, f"the checkpoint at {row.seq}: {exc}") from None
    if root is None:
        raise NotFound(
            f"the checkpoint at {row.seq} signs no Merkle root (written before checkpoints "
            "signed one): prove against a later checkpoint"
        )
    return bytes.fromhex(root)


def _hashes(
    session: Session, row: Checkpoint, ranges: set[tuple[int, int]]
) -> tuple[dict[tuple[int, int], bytes], bytes]:
    """The hashes of leaf ``ranges`` of the tree the checkpoint signs, in one pass over records
    1..seq (a purged record's leaf from its tombstone) that holds no more than a frontier per
    range (not every leaf: about 115 MiB at 10^6 records); and the root it signs, which the records
    must give (AuditChainBroken when one is missing or they do not)."""
    root, size = signed_root(row), row.seq
    count, hashes = range_hashes(
        {(0, size), *ranges}, consecutive_leaves(leaf_reader(session), 0, size)
    )
    if count < size:
        seq = count + 1
        raise AuditChainBroken(seq, f"record {seq} is missing: run `sekisho audit verify`")
    check_root(hashes[(0, size)], row)
    return hashes, root


def check_root(computed: bytes, row: Checkpoint) -> None:
    if computed != signed_root(row):
        raise AuditChainBroken(
            row.seq,
            f"the records do not give the Merkle root the checkpoint at {row.seq} signs: "
            "run `sekisho audit verify`",
        )


def inclusion(
    session: Session, origin: str, seqs: Sequence[int], checkpoint_seq: int | None
) -> dict[str, Any]:
    """The inclusion document for records ``seqs`` in the tree the checkpoint signs."""
    row = checkpoint_at(session, checkpoint_seq)
    size = row.seq
    beyond = [seq for seq in seqs if seq > size]
    if beyond:
        raise NotFound(
            f"record {beyond[0]} is after the checkpoint at {size}: no signed tree holds it "
            "yet (`sekisho audit checkpoint` signs one)"
            if checkpoint_seq is None
            else f"record {beyond[0]} is after the checkpoint at {size}"
        )
    records = {seq: session.get(JournalRecord, seq) for seq in seqs}
    purged = [seq for seq, record in records.items() if record is None]
    if purged:
        # Only its leaf hash is left (a tombstone: ``audit purge``), which proves nothing
        # about a content nobody holds any more.
        raise NotFound(f"record {purged[0]} was purged once its retention ended: no content")
    needed = {(seq - 1, seq) for seq in seqs}  # the leaves themselves

    def paths(node: Node) -> None:
        for seq in seqs:
            inclusion_proof(seq - 1, size, node)

    needed |= asked_ranges(paths)
    hashes, root = _hashes(session, row, needed)
    entries = []
    for seq in seqs:
        record = records[seq]
        assert record is not None  # (checked above)
        leaf = hashes[(seq - 1, seq)]
        path = inclusion_proof(seq - 1, size, lambda start, end: hashes[(start, end)])
        if not verify_inclusion(seq - 1, size, leaf, path, root):
            raise AuditChainBroken(seq, "its inclusion proof does not verify")
        entries.append(
            {
                "seq": seq,
                "leaf_index": seq - 1,
                "leaf_hash": _b64(leaf),
                "audit_path": [_b64(p) for p in path],
                "record": as_document(record),
            }
        )
    return {
        "format": INCLUSION_FORMAT,
        "origin": origin,
        "tree_size": size,
        "root": _b64(root),
        "checkpoint": checkpoint_document(row),
        "entries": entries,
    }


def consistency(session: Session, origin: str, first: int, second: int) -> dict[str, Any]:
    """The consistency document between the checkpoints at ``first`` and ``second``."""
    older, newer = checkpoint_at(session, first), checkpoint_at(session, second)
    older_root = signed_root(older)
    shape = asked_ranges(lambda node: consistency_proof(first, second, node))
    hashes, newer_root = _hashes(session, newer, {(0, first), *shape})
    check_root(hashes[(0, first)], older)
    proof = consistency_proof(first, second, lambda start, end: hashes[(start, end)])
    if not verify_consistency(first, second, older_root, newer_root, proof):
        raise AuditChainBroken(second, f"the tree at {second} is not consistent with {first}")
    return {
        "format": CONSISTENCY_FORMAT,
        "origin": origin,
        "first_size": first,
        "second_size": second,
        "first_root": _b64(older_root),
        "second_root": _b64(newer_root),
        "proof": [_b64(p) for p in proof],
        "first_checkpoint": checkpoint_document(older),
        "second_checkpoint": checkpoint_document(newer),
    }


def serial_seqs(session: Session, serial: str) -> list[int]:
    """The records whose object is the certificate ``serial`` (stored form), in seq order."""
    stmt = (
        select(JournalRecord.seq)
        .where(JournalRecord.object_serial == serial)
        .order_by(JournalRecord.seq)
    )
    return list(session.scalars(stmt))
