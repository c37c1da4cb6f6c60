"""Appending to the journal, inside the caller's transaction.

``Journal.append`` is called with the session (or, on hot paths, the Core connection) of the
operation it records: the entry and the operation commit together or not at all, so nothing is
issued or revoked unrecorded. Appenders lock the single head row (``FOR UPDATE``; SQLite's
``BEGIN IMMEDIATE`` already serialises writers), so the chain has one order even with many
processes on one PostgreSQL.

Every ``every`` records, or when ``interval`` has passed since the last checkpoint, the head is
signed through the key backend (a ``CheckpointSigner``) in the same transaction. The signed body
names the time and the checkpoint before it (the one the head names), so a changed checkpoint
time or a deleted checkpoint shows (``audit.chain``), and the Merkle root of the records up to
it (``audit.merkle``): the previous checkpoint's stored frontier extended with the records
after it, read back at checkpoint time (appends themselves do no tree work).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from audit.chain import (
    FIELDS,
    GENESIS,
    body_digest,
    canonical,
    canonical_json,
    chain_hash,
    checkpoint_body,
    format_time,
    parse_checkpoint_body,
)
from audit.events import Event, normalise_mac
from audit.merkle import Frontier, leaf_hash
from audit.models import Checkpoint, JournalHead, JournalRecord, PurgedRecord
from hsm.base import KeyBackend, KeyType, sign_bytes, verify_bytes
from sekisho.clock import CLOCK_AHEAD
from sekisho.db import Database, Prepared, WriteTx
from sekisho.errors import AuditError, SekishoError

MAX_FIELD = {
    "action": 64,
    "actor_account": 256,
    "actor_serial": 42,
    "client_ip": 64,
    "object_serial": 42,
    "device_id": 128,
    "device_mac": 32,
    "request_id": 64,
}

TEXT_FIELDS = (*MAX_FIELD, "object_dn")


class CheckpointSigner:
    """Signs checkpoint bodies with the audit key, through the key backend."""

    def __init__(self, backend: KeyBackend, key_ref: str, key_type: KeyType) -> None:
        self.backend = backend
        self.key_ref = key_ref
        self.key_type = key_type
        self.public_key_der = backend.public_key(key_ref).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, body: bytes) -> bytes:
        return sign_bytes(self.backend.signing_key(self.key_ref), self.key_type, body)


def verify_signature(public_key_der: bytes, signature: bytes, body: bytes) -> bool:
    """Check a checkpoint signature with ``public_key_der`` (the caller decides whether that
    key is trusted: ``audit.verify`` accepts only pinned keys)."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except ValueError:
        return False
    if isinstance(key, ed25519.Ed25519PublicKey):
        key_type = KeyType.ED25519
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_type = KeyType.EC_P384 if key.curve.name == "secp384r1" else KeyType.EC_P256
    elif isinstance(key, rsa.RSAPublicKey):
        key_type = KeyType.RSA_4096 if key.key_size >= 4096 else KeyType.RSA_3072
    else:
        return False
    return verify_bytes(key, key_type, signature, body)


@dataclasses.dataclass(frozen=True)
class _HeadState:
    """The head as read by the hot path (no ORM object)."""

    seq: int
    hash: str
    checkpoint_seq: int
    checkpoint_time: dt.datetime | None


_HEAD = cast(Table, JournalHead.__table__)
_HEAD_KEY = identity_key(JournalHead, 1)
_SELECT_HEAD = Prepared(
    select(_HEAD.c.seq, _HEAD.c.hash, _HEAD.c.checkpoint_seq, _HEAD.c.checkpoint_time)
    .where(_HEAD.c.id == 1)
    .with_for_update(),
    (),
)


def _read_head(session: Session) -> _HeadState | None:
    """The head row, read without a lock (None: the store was not migrated)."""
    row = session.execute(
        select(_HEAD.c.seq, _HEAD.c.hash, _HEAD.c.checkpoint_seq, _HEAD.c.checkpoint_time).where(
            _HEAD.c.id == 1
        )
    ).first()
    return None if row is None else _HeadState(*row)


_HEAD_KEYS = ("seq", "hash")
_UPDATE_HEAD = Prepared(update(_HEAD).where(_HEAD.c.id == 1), _HEAD_KEYS, columns=True)
_UPDATE_HEAD_CHECKPOINT = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1),
    (*_HEAD_KEYS, "checkpoint_seq", "checkpoint_time"),
    columns=True,
)
_RECORDS = cast(Table, JournalRecord.__table__)
_RECORD_KEYS = tuple(c.name for c in _RECORDS.columns)
_INSERT_RECORD = Prepared(insert(_RECORDS), _RECORD_KEYS, columns=True)
# PostgreSQL: the record insert and the head update as ONE statement (a data-modifying CTE,
# always executed to completion): one round trip less per append. Bind names are prefixed so
# the record's seq/hash and the head's do not collide.
_INSERT_RECORD_ADVANCE_HEAD = Prepared(
    update(_HEAD)
    .where(_HEAD.c.id == 1)
    .values(seq=bindparam("head_seq"), hash=bindparam("head_hash"))
    .add_cte(
        insert(_RECORDS)
        .values({name: bindparam(f"rec_{name}") for name in _RECORD_KEYS})
        .cte("appended")
    ),
    ("head_seq", "head_hash", *(f"rec_{name}" for name in _RECORD_KEYS)),
)
_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_SELECT_CHECKPOINT_BODY = Prepared(
    select(_CHECKPOINTS.c.body, _CHECKPOINTS.c.merkle_frontier).where(
        _CHECKPOINTS.c.seq == bindparam("seq")
    ),
    ("seq",),
)
_INSERT_CHECKPOINT = Prepared(
    insert(_CHECKPOINTS),
    (
        "seq",
        "time",
        "head_hash",
        "body",
        "signature",
        "key_ref",
        "public_key_der",
        "merkle_frontier",
    ),
    columns=True,
)
# The records a checkpoint adds to the Merkle tree, a batch at a time.
TREE_BATCH = 5000
_SELECT_LEAVES = (
    select(*(_RECORDS.c[name] for name in FIELDS))
    .where(_RECORDS.c.seq > bindparam("after"), _RECORDS.c.seq <= bindparam("upto"))
    .order_by(_RECORDS.c.seq)
    .limit(TREE_BATCH)
)
_SELECT_LEAVES_PREPARED = Prepared(_SELECT_LEAVES, ("after", "upto"))
# ... and the tombstones of purged records among them (``audit.retention``): their leaf hash.
_PURGED = cast(Table, PurgedRecord.__table__)
_SELECT_STONES = (
    select(_PURGED.c.seq, _PURGED.c.leaf_hash)
    .where(_PURGED.c.seq > bindparam("after"), _PURGED.c.seq <= bindparam("upto"))
    .order_by(_PURGED.c.seq)
    .limit(TREE_BATCH)
)
_SELECT_STONES_PREPARED = Prepared(_SELECT_STONES, ("after", "upto"))


@dataclasses.dataclass(frozen=True)
class Appended:
    seq: int
    hash: str


class Journal:
    def __init__(
        self,
        origin: str,
        signer: CheckpointSigner | None,
        *,
        every: int = 1000,
        interval: dt.timedelta = dt.timedelta(minutes=5),
    ) -> None:
        self.origin = origin
        self.signer = signer
        self.every = max(1, every)
        self.interval = interval

    def append_alone(self, db: Database, event: Event, now: dt.datetime) -> Appended:
        """Chain ``event`` in a transaction of its own (a refusal: nothing else to commit)."""
        with db.connection_scope() as conn:
            return self.append(conn, event, now)

    def append(
        self, session: Session | Connection | WriteTx, event: Event, now: dt.datetime
    ) -> Appended:
        """Chain ``event`` onto the journal in the transaction of ``session`` (an ORM Session,
        a Core Connection inside a transaction, or the ``WriteTx`` of a hot path)."""
        try:
            if isinstance(session, WriteTx):
                return self._append_core(session, event, now)
            if isinstance(session, Connection):
                conn = session
            elif session.identity_map.get(_HEAD_KEY) is not None:
                # The caller holds the head as an ORM object: update it through the ORM so
                # that object stays true.
                return self._append_orm(session, event, now)
            else:
                # Plain statements on the tables in the session's transaction. Flush first, as
                # the ORM query used to (autoflush), so the caller's pending rows are written
                # before the head is locked and their failures surface here too.
                session.flush()
                conn = session.connection()
            with WriteTx.on(conn) as tx:
                return self._append_core(tx, event, now)
        except SekishoError:
            raise
        except Exception as exc:  # any failure here must stop the operation it records
            raise AuditError(
                f"the audit journal could not be written ({type(exc).__name__})"
            ) from exc

    def _append_core(self, tx: WriteTx, event: Event, now: dt.datetime) -> Appended:
        head = tx.first(_SELECT_HEAD)
        if head is None:
            raise AuditError("the journal head row is missing: the store was not migrated")
        head_seq, head_hash, checkpoint_seq, checkpoint_time = head
        seq = head_seq + 1
        fields = self._fields(event, seq, now)
        digest = chain_hash(head_hash, fields)
        record = {"hash": digest, **fields}
        due = self.signer is not None and self._checkpoint_due(
            _HeadState(seq, digest, checkpoint_seq, checkpoint_time), now
        )
        if not due and tx.dialect.name == "postgresql":
            params = {f"rec_{name}": value for name, value in record.items()}
            tx.execute(
                _INSERT_RECORD_ADVANCE_HEAD, {**params, "head_seq": seq, "head_hash": digest}
            )
            return Appended(seq, digest)
        tx.execute(_INSERT_RECORD, record)
        if due:
            found = tx.first(_SELECT_CHECKPOINT_BODY, {"seq": checkpoint_seq})
            previous = _link(checkpoint_seq, found[0] if found else None)
            tree = checkpoint_tree(_reader_tx(tx), checkpoint_seq, found, seq)
            tx.execute(
                _INSERT_CHECKPOINT, self._checkpoint_values(seq, digest, now, previous, tree)
            )
            tx.execute(
                _UPDATE_HEAD_CHECKPOINT,
                {"seq": seq, "hash": digest, "checkpoint_seq": seq, "checkpoint_time": now},
            )
        else:
            tx.execute(_UPDATE_HEAD, {"seq": seq, "hash": digest})
        return Appended(seq, digest)

    def _append_orm(self, session: Session, event: Event, now: dt.datetime) -> Appended:
        head = self._lock_head(session)
        seq = head.seq + 1
        fields = self._fields(event, seq, now)
        digest = chain_hash(head.hash, fields)
        session.add(JournalRecord(hash=digest, **fields))
        head.seq = seq
        head.hash = digest
        if self.signer is not None and self._checkpoint_due(head, now):
            self._checkpoint(session, head, now)
        session.flush()
        return Appended(seq, digest)

    def checkpoint(self, session: Session, now: dt.datetime) -> Checkpoint | None:
        """Sign the current head now (no-op when it is already checkpointed or empty)."""
        if self.signer is None:
            raise AuditError("no audit checkpoint key is configured")
        head = self._lock_head(session)
        if head.seq == 0 or head.seq == head.checkpoint_seq:
            return None
        return self._checkpoint(session, head, now)

    def tail_due(self, session: Session, now: dt.datetime) -> bool:
        """Records wait unsigned and a checkpoint is due (a read, no lock: the caller then
        calls :meth:`checkpoint_if_due` in a write transaction)."""
        if self.signer is None:
            return False
        head = _read_head(session)
        return (
            head is not None and head.seq > head.checkpoint_seq and self._checkpoint_due(head, now)
        )

    def tail_unsigned(self, session: Session) -> bool:
        """Records follow the newest checkpoint (a read, no lock)."""
        head = _read_head(session)
        return head is not None and head.seq > head.checkpoint_seq

    def checkpoint_if_due(self, session: Session, now: dt.datetime) -> Checkpoint | None:
        """The timer half of "every N records or T minutes": appends sign a checkpoint when
        one is due, but records appended before the journal goes quiet would stay unsigned
        (and could be rewritten or cut off unnoticed) until the next append. The refresher
        calls this every tick."""
        if self.signer is None:
            return None
        head = self._lock_head(session)
        if head.seq == head.checkpoint_seq or not self._checkpoint_due(head, now):
            return None
        return self._checkpoint(session, head, now)

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _lock_head(session: Session) -> JournalHead:
        head = session.scalars(
            select(JournalHead).where(JournalHead.id == 1).with_for_update()
        ).one_or_none()
        if head is None:
            raise AuditError("the journal head row is missing: the store was not migrated")
        return head

    def _checkpoint_due(self, head: JournalHead | _HeadState, now: dt.datetime) -> bool:
        """Every ``every`` records, or once ``interval`` has passed since the last checkpoint.
        A last checkpoint more than CLOCK_AHEAD after ``now`` is due as well: the clock stepped
        back, or the head's time was moved forward, and "not yet" would leave every record
        unsigned until the clock caught up with it, which a time set years ahead makes never.
        (Not any later one: an appender reads its clock before it waits for the head, behind
        one that signed a moment later.)"""
        if head.seq - head.checkpoint_seq >= self.every:
            return True
        last = head.checkpoint_time
        return last is None or now < last - CLOCK_AHEAD or now - last >= self.interval

    def _checkpoint_values(
        self,
        seq: int,
        head_hash: str,
        now: dt.datetime,
        previous: tuple[int, str],
        tree: Frontier | None,
    ) -> dict[str, Any]:
        assert self.signer is not None
        root = None if tree is None else tree.root()
        body = checkpoint_body(self.origin, seq, head_hash, now, previous, root)
        signature = self.signer.sign(body.encode("utf-8"))
        return {
            "seq": seq,
            "time": now,
            "head_hash": head_hash,
            "body": body,
            "signature": signature,
            "key_ref": self.signer.key_ref,
            "public_key_der": self.signer.public_key_der,
            "merkle_frontier": None if tree is None else tree.to_bytes(),
        }

    def _checkpoint(self, session: Session, head: JournalHead, now: dt.datetime) -> Checkpoint:
        found = session.execute(
            select(_CHECKPOINTS.c.body, _CHECKPOINTS.c.merkle_frontier).where(
                _CHECKPOINTS.c.seq == head.checkpoint_seq
            )
        ).first()
        previous = _link(head.checkpoint_seq, found[0] if found else None)
        session.flush()  # the records appended in this transaction, for the tree
        tree = checkpoint_tree(leaf_reader(session), head.checkpoint_seq, found, head.seq)
        row = Checkpoint(**self._checkpoint_values(head.seq, head.hash, now, previous, tree))
        session.add(row)
        head.checkpoint_seq = head.seq
        head.checkpoint_time = now
        return row

    @staticmethod
    def _fields(event: Event, seq: int, now: dt.datetime) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "seq": seq,
            "time": now.astimezone(dt.UTC),
            "category": event.category.value,
            "action": event.action,
            "outcome": event.outcome.value,
            "actor_account": event.actor_account,
            "actor_serial": event.actor_serial,
            "client_ip": event.client_ip,
            "object_dn": event.object_dn,
            "object_serial": event.object_serial,
            "device_id": event.device_id,
            "device_mac": normalise_mac(event.device_mac),
            "request_id": event.request_id,
            "detail": canonical_json(event.detail),
        }
        for name in TEXT_FIELDS:
            value = fields[name]
            if value is not None and "\x00" in value:
                # PostgreSQL text cannot hold NUL: the insert would fail and take the operation
                # with it. Replaced on every backend so the chain is the same everywhere.
                fields[name] = value.replace("\x00", "\ufffd")
        for name, limit in MAX_FIELD.items():
            value = fields[name]
            if value is not None and len(value) > limit:
                fields[name] = value[: limit - 1] + "\u2026"
        return fields


def _link(previous_seq: int, previous_body: Any) -> tuple[int, str]:
    """The ``previous`` line of a new checkpoint: the checkpoint the head names (the one signed
    last) and the digest of its body. Its row missing, or not text, can only be tampering:
    the link then names it with the zero hash, which matches no body, so ``audit verify``
    reports it rather than this append failing."""
    if previous_seq == 0 or not isinstance(previous_body, str):
        return previous_seq, GENESIS
    return previous_seq, body_digest(previous_body)


# read(after, upto): (seq, leaf hash) of the records after seq ``after`` up to ``upto``, in
# seq order, some at a time (a record's from its fields, a purged one's from its tombstone).
_Reader = Callable[[int, int], list[tuple[int, bytes]]]


def _merged(
    records: Sequence[Sequence[Any]], stones: Sequence[Sequence[Any]], upto: int
) -> list[tuple[int, bytes]]:
    """The leaves of a batch of records (FIELDS order) and one of tombstones (seq, leaf hash
    hex), in seq order, up to where the first full batch ends (what follows is read next).
    ValueError for a stored value the journal never wrote."""
    upper = upto
    for batch in (records, stones):
        if len(batch) == TREE_BATCH:
            upper = min(upper, batch[-1][0])
    out = [
        (row[0], leaf_hash(canonical(dict(zip(FIELDS, row, strict=True)))))
        for row in records
        if row[0] <= upper
    ]
    out += [(seq, bytes.fromhex(leaf)) for seq, leaf in stones if seq <= upper]
    out.sort(key=lambda entry: entry[0])
    return out


def _reader_tx(tx: WriteTx) -> _Reader:
    def read(after: int, upto: int) -> list[tuple[int, bytes]]:
        bounds = {"after": after, "upto": upto}
        return _merged(
            tx.all(_SELECT_LEAVES_PREPARED, bounds), tx.all(_SELECT_STONES_PREPARED, bounds), upto
        )

    return read


def leaf_reader(session: Session) -> _Reader:
    """``read(after, upto)``: the leaves of records after ``after`` up to ``upto`` (purged
    ones' from their tombstones), some at a time, in seq order."""

    def read(after: int, upto: int) -> list[tuple[int, bytes]]:
        bounds = {"after": after, "upto": upto}
        return _merged(
            session.execute(_SELECT_LEAVES, bounds).all(),
            session.execute(_SELECT_STONES, bounds).all(),
            upto,
        )

    return read


def _resume(previous_seq: int, previous: Sequence[Any] | None) -> Frontier:
    """The tree as the previous checkpoint left it: its stored frontier, used only when it
    folds to the root that checkpoint signs; otherwise (none stored: written before frontiers
    were kept; or not the signed one) the empty tree, rebuilt from record 1."""
    if previous_seq == 0 or previous is None:
        return Frontier()
    body, stored = previous
    try:
        signed = parse_checkpoint_body(body).root if isinstance(body, str) else None
        if signed is None or not isinstance(stored, bytes):
            return Frontier()
        frontier = Frontier.from_bytes(previous_seq, stored)
    except ValueError:
        return Frontier()
    return frontier if frontier.root().hex() == signed else Frontier()


def checkpoint_tree(
    read: _Reader, previous_seq: int, previous: Sequence[Any] | None, seq: int
) -> Frontier | None:
    """The Merkle tree of records 1..seq: the previous checkpoint's frontier extended with the
    records after it. None when the stored records are not 1..seq in order (tampering):
    the checkpoint then signs no root rather than the operation failing, and ``audit verify``
    reports the records."""
    frontier = _resume(previous_seq, previous)
    if frontier.size > seq:
        frontier = Frontier()
    frontier.extend(consecutive_leaves(read, frontier.size, seq))
    return frontier if frontier.size == seq else None


def consecutive_leaves(read: _Reader, after: int, upto: int) -> Iterator[bytes]:
    """The leaves of records ``after + 1`` .. ``upto`` in order, read a batch at a time; it
    stops early at the first seq missing or a stored value the journal never wrote (the
    caller sees fewer than it asked for)."""
    expected = after + 1
    while expected <= upto:
        try:
            leaves = read(expected - 1, upto)
        except (ValueError, TypeError, OverflowError):
            return
        if not leaves:
            return
        for at, leaf in leaves:
            if at != expected:
                return
            yield leaf
            expected += 1


def checkpoint_document(row: Checkpoint) -> dict[str, Any]:
    """A self-contained, exportable checkpoint (verifiable off the box). ``time``, ``seq`` and
    ``head_hash`` repeat what the body signs (``audit verify`` checks they agree); ``key_ref``
    only says where the key lives in this deployment's backend and is not signed (verification
    trusts a pinned public key, never a name)."""
    return {
        "seq": row.seq,
        "time": format_time(row.time),
        "head_hash": row.head_hash,
        "body": row.body,
        "signature": base64.b64encode(row.signature).decode("ascii"),
        "key_ref": row.key_ref,
        "public_key": base64.b64encode(row.public_key_der).decode("ascii"),
    }
