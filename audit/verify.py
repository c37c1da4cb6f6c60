"""Verifying the journal: the chain, the head, and the signed checkpoints.

What is detected, and where it is located (the first bad sequence number):
- a changed byte in a record: that record's hash no longer matches;
- a deleted record: the gap in the sequence;
- an inserted or reordered record: the first record whose chained hash breaks;
- hashes recomputed after a change: the chain is consistent again, but a signed checkpoint
  no longer matches; located as the first record after the last matching checkpoint;
- truncation: records missing behind the head row or behind a checkpoint (stored, or exported
  off the box and passed in with ``external``).

Checkpoint signatures are checked with trusted keys only (the deployment's audit key, or keys
the auditor supplies), never with the public key stored beside a checkpoint: whoever rewrites
records, chain and checkpoints can store their own key there too. Every check runs; when
several fail, the lowest sequence number is reported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from typing import Any, NoReturn

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import GENESIS, chain_hash, parse_checkpoint_body
from audit.journal import verify_signature
from audit.models import Checkpoint, JournalHead, JournalRecord
from sekisho.errors import AuditChainBroken

BATCH = 5000


@dataclasses.dataclass(frozen=True)
class CheckpointClaim:
    seq: int
    head_hash: str
    body: str
    signature: bytes
    public_key_der: bytes
    source: str  # "store" or the export file


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    records: int
    head_seq: int
    head_hash: str
    checkpoints: int
    first_time: dt.datetime | None
    last_time: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _record_fields(row: JournalRecord) -> Mapping[str, Any]:
    return {
        "seq": row.seq,
        "time": row.time,
        "category": row.category,
        "action": row.action,
        "outcome": row.outcome,
        "actor_account": row.actor_account,
        "actor_serial": row.actor_serial,
        "client_ip": row.client_ip,
        "object_dn": row.object_dn,
        "object_serial": row.object_serial,
        "device_id": row.device_id,
        "device_mac": row.device_mac,
        "request_id": row.request_id,
        "detail": row.detail,
    }


def _claim_problem(
    claim: CheckpointClaim, origin: str, trusted_keys: Collection[bytes]
) -> str | None:
    try:
        claimed_origin, seq, head_hash = parse_checkpoint_body(claim.body)
    except ValueError as exc:
        return f"checkpoint from {claim.source}: {exc}"
    if claimed_origin != origin or seq != claim.seq or head_hash != claim.head_hash:
        return f"checkpoint from {claim.source} does not match its own body"
    if claim.public_key_der not in trusted_keys:
        return f"checkpoint from {claim.source} is signed by an unknown key"
    if not verify_signature(claim.public_key_der, claim.signature, claim.body.encode("utf-8")):
        return f"checkpoint from {claim.source}: bad signature"
    return None


@dataclasses.dataclass
class _Walk:
    """How far the chain was followed, and the first problem on the way (which ends it)."""

    last_seq: int = 0
    last_hash: str = GENESIS
    first_time: dt.datetime | None = None
    last_time: dt.datetime | None = None
    failure: tuple[int, str] | None = None


def _walk(session: Session, claims: Mapping[int, list[CheckpointClaim]]) -> _Walk:
    """Follow the chain from seq 1, in batches, until the first problem."""
    walk = _Walk()
    last_good_checkpoint = 0
    while True:
        rows = list(
            session.scalars(
                select(JournalRecord)
                .where(JournalRecord.seq > walk.last_seq)
                .order_by(JournalRecord.seq)
                .limit(BATCH)
            )
        )
        if not rows:
            return walk
        for row in rows:
            seq = walk.last_seq + 1
            if row.seq != seq:
                walk.failure = (seq, f"record {seq} is missing (next is {row.seq})")
                return walk
            digest = chain_hash(walk.last_hash, _record_fields(row))
            if digest != row.hash:
                walk.failure = (seq, "record content does not match its chain hash")
                return walk
            for claim in claims.get(seq, ()):
                if claim.head_hash != digest:
                    walk.failure = (
                        last_good_checkpoint + 1,
                        f"records after {last_good_checkpoint} differ from the signed "
                        f"checkpoint at {seq} ({claim.source})",
                    )
                    return walk
            if seq in claims:
                last_good_checkpoint = seq
            walk.first_time = walk.first_time or row.time
            walk.last_time = row.time
            walk.last_seq, walk.last_hash = seq, digest
        session.expunge_all()


def verify(
    session: Session,
    origin: str,
    *,
    trusted_keys: Collection[bytes],
    external: Iterable[CheckpointClaim] = (),
) -> VerifyResult:
    """Walk the whole journal; raise ``AuditChainBroken`` at the first bad sequence number.

    ``trusted_keys``: the public keys (DER SubjectPublicKeyInfo) checkpoints may be signed
    with; a checkpoint signed by any other key is tampering (with none given, every one is).
    """
    trusted = frozenset(trusted_keys)
    failures: list[tuple[int, str]] = []  # (seq, problem); the lowest seq is reported
    stored = [
        CheckpointClaim(
            seq=c.seq,
            head_hash=c.head_hash,
            body=c.body,
            signature=c.signature,
            public_key_der=c.public_key_der,
            source="store",
        )
        for c in session.scalars(select(Checkpoint).order_by(Checkpoint.seq))
    ]
    claims: dict[int, list[CheckpointClaim]] = {}
    for claim in [*stored, *external]:
        problem = _claim_problem(claim, origin, trusted)
        if problem is None:
            claims.setdefault(claim.seq, []).append(claim)
        else:
            failures.append((claim.seq, problem))

    head = session.get(JournalHead, 1)
    if head is None:
        failures.append((1, "the journal head row is missing"))
        _raise_first(failures)

    walk = _walk(session, claims)
    last_seq = walk.last_seq
    if walk.failure is not None:
        failures.append(walk.failure)
    else:
        beyond = [seq for seq in claims if seq > last_seq]
        if beyond:
            failures.append(
                (
                    last_seq + 1,
                    f"journal truncated: a signed checkpoint covers seq {max(beyond)}, "
                    f"the last record is {last_seq}",
                )
            )
        if head.seq > last_seq:
            failures.append(
                (
                    last_seq + 1,
                    f"journal truncated: the head is at {head.seq}, last record {last_seq}",
                )
            )
        elif head.seq < last_seq or head.hash != walk.last_hash:
            failures.append(
                (
                    head.seq + 1 if head.seq < last_seq else last_seq,
                    f"the head (seq {head.seq}) does not match the records (last {last_seq})",
                )
            )
    if failures:
        _raise_first(failures)
    return VerifyResult(
        records=last_seq,
        head_seq=head.seq,
        head_hash=head.hash,
        checkpoints=len(claims),
        first_time=walk.first_time,
        last_time=walk.last_time,
    )


def _raise_first(failures: list[tuple[int, str]]) -> NoReturn:
    """Raise for the lowest sequence number among the (seq, problem) pairs found."""
    seq, problem = min(failures, key=lambda failure: failure[0])
    raise AuditChainBroken(seq, problem)


def claims_from_documents(docs: Iterable[Mapping[str, Any]], source: str) -> list[CheckpointClaim]:
    """Parse exported checkpoint documents (``checkpoint_document``); ValueError if malformed."""
    import base64

    out = []
    for n, doc in enumerate(docs, 1):
        try:
            out.append(
                CheckpointClaim(
                    seq=int(doc["seq"]),
                    head_hash=str(doc["head_hash"]),
                    body=str(doc["body"]),
                    signature=base64.b64decode(doc["signature"], validate=True),
                    public_key_der=base64.b64decode(doc["public_key"], validate=True),
                    source=f"{source}:{n}",
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} line {n}: not a checkpoint document ({exc})") from None
    return out
