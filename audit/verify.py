"""Verifying the journal: the chain, the head, and the signed checkpoints.

What is detected, and where it is located (the first bad sequence number):
- a changed byte in a record: that record's hash no longer matches;
- a stored value not in the form the journal writes (a time rewritten as another text for the
  same instant, a blob where text belongs, text that is not UTF-8): that record, as tampering;
- a deleted record: the gap in the sequence;
- an inserted or reordered record: the first record whose chained hash breaks;
- a record, or a purged record's tombstone, outside 1..head (seq 0 or below, or beyond the
  head): that record;
- hashes recomputed after a change: the chain is consistent again, but a signed checkpoint
  no longer matches; located as the first record after the last matching checkpoint;
- truncation: records missing behind the head row or behind a checkpoint (stored, or exported
  off the box and passed in with ``external``);
- a checkpoint whose stored (or exported) time is not the time it signs: that checkpoint;
- a journal that does not begin as it always does: records whose first checkpoint is not at
  seq 1 following none (every checkpoint deleted); on a deployment known to be initialised,
  an empty journal or records no checkpoint signs: at seq 1;
- a head whose ``checkpoint_time`` is not the time its checkpoint signs (moved ahead, it held
  back every time-based checkpoint): after that checkpoint;
- a deleted checkpoint: the head names a checkpoint newer than the newest stored one; a
  checkpoint names (signs) the one before it, which is missing or another; an exported
  checkpoint no later than the newest stored one is missing from the store. Located, as a
  rewrite behind one would be, after the newest stored checkpoint before the missing one.

Merkle roots: a checkpoint whose body signs one (``root`` line) must sign the RFC 6962 tree
head of records 1..seq, recomputed from the records (reported at that checkpoint's seq); and
each signed root must be consistent with the one signed before it: a consistency proof is
built from the previous root's frontier and the records between the two and checked against
both signed roots, so two checkpoints that sign forked trees fail at the later one.

Purged records (``audit purge``, ``audit.retention``): a record removed once its retention ended
leaves a tombstone (seq, time, leaf and chain hash, the seq of the ``audit.purge`` record that
removed it). The walk takes the tombstone's chain hash in the record's place (the next record
links to it, a checkpoint signs it); the purge record must follow its tombstones, be a purge,
and name exactly their seqs (count, first, last, SHA-256 of the list). A tombstone no purge
names, or one beside a record still stored, is reported at its seq: a deletion dressed as a
purge.

Records after the newest checkpoint are signed by nothing yet: verify reports how many and
since when, and with a ``TailLimit`` raises ``AuditTailUnsigned`` when they have waited for
longer than the checkpoint interval plus ``TAIL_SLACK`` (the journal stopped signing).

Checkpoints in the three-line form of before sign neither their time nor a link: for those,
only what they sign (origin, seq, head hash) is checked. Checkpoint signatures are checked
with trusted keys only (the deployment's audit key, or keys the auditor supplies), never with
the public key stored beside a checkpoint: whoever rewrites records, chain and checkpoints can
store their own key there too. Every check runs; when several fail, the lowest sequence number
is reported.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, NoReturn, cast

from sqlalchemy import Column, Dialect, RowMapping, Table, func, or_, select, type_coerce
from sqlalchemy.orm import Session
from sqlalchemy.types import NullType

from audit.chain import (
    FIELDS,
    GENESIS,
    PURGE_ACTION,
    CheckpointBody,
    body_digest,
    canonical,
    format_time,
    parse_checkpoint_body,
    parse_time,
    seqs_digest,
)
from audit.journal import verify_signature
from audit.merkle import (
    Frontier,
    consistency_proof,
    extension_node,
    leaf_hash,
    verify_consistency,
)
from audit.models import Checkpoint, JournalHead, JournalRecord, PurgedRecord
from sekisho.clock import CLOCK_AHEAD
from sekisho.db import UndecodableText, undecodable_text
from sekisho.errors import AuditChainBroken, AuditTailUnsigned
from sekisho.settings import MIN_RETENTION_DAYS

BATCH = 5000

_RECORDS = cast(Table, JournalRecord.__table__)
_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_HEAD = cast(Table, JournalHead.__table__)
_PURGED = cast(Table, PurgedRecord.__table__)
_HEX64 = frozenset("0123456789abcdef")


def _raw(*columns: Column[Any]) -> list[Any]:
    """``columns`` as the driver returns them (no type processing, which would raise on a
    malformed value and end the walk with a traceback)."""
    return [type_coerce(c, NullType()).label(c.name) for c in columns]


@dataclasses.dataclass(frozen=True)
class CheckpointClaim:
    seq: int
    head_hash: str
    body: str
    signature: bytes
    public_key_der: bytes
    time: dt.datetime  # as stored or exported, beside the body (which may sign it)
    source: str  # "store" or the export file


# How long records may wait unsigned beyond the checkpoint interval before verify fails.
# Appends sign once the interval has passed and serve's refresher signs a quiet journal's
# tail within a second of it, so a working journal never comes near; the hour leaves room
# for a restart of serve, or records a command made while serve was down for maintenance.
TAIL_SLACK = dt.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class TailLimit:
    """How old the unsigned tail may be: at ``now``, its oldest record no older than the
    checkpoint ``interval`` plus ``TAIL_SLACK``. ``now`` is the time of the store verified:
    the clock for the live store, the time it was copied for a copy."""

    now: dt.datetime
    interval: dt.timedelta

    @property
    def allowed(self) -> dt.timedelta:
        return self.interval + TAIL_SLACK


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    records: int
    head_seq: int
    head_hash: str
    checkpoints: int
    first_time: dt.datetime | None
    last_time: dt.datetime | None
    # The records after the newest checkpoint (stored or exported) that verified: nothing
    # signs them yet, so they could be changed or cut off unnoticed.
    unsigned_records: int
    unsigned_since: dt.datetime | None  # the oldest of them
    # SHA-256 (hex) of the DER SubjectPublicKeyInfo of the key that verified the newest
    # checkpoint: what a cron job compares with the public key kept off the box.
    checkpoint_key_sha256: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Decoder:
    """A record's stored values, checked and decoded one row at a time."""

    def __init__(self, dialect: Dialect) -> None:
        time_type = _RECORDS.c.time.type.dialect_impl(dialect)
        self._load_time = time_type.result_processor(dialect, None)
        self._store_time = time_type.bind_processor(dialect)

    def fields(self, row: RowMapping) -> dict[str, Any]:
        """The fields hashed for ``row``; ValueError naming the first value the journal would
        not have stored."""
        out = {name: row[name] for name in FIELDS}
        for name, value in out.items():
            if isinstance(value, UndecodableText):
                raise ValueError(f"the stored {name} is not UTF-8 text")
            if name not in ("seq", "time") and value is not None and not isinstance(value, str):
                raise ValueError(f"the stored {name} is not text")
        out["time"] = self.time(row["time"])
        return out

    def time(self, stored: Any) -> dt.datetime:
        # SQLite keeps the time as text, and one instant has many spellings that parse alike
        # (the hash covers the instant): only the one the column type writes is accepted, or
        # a time-range search, which compares the text, would silently miss the record.
        try:
            value = self._load_time(stored) if self._load_time else stored
        except (ValueError, TypeError, OverflowError):
            value = None
        if not isinstance(value, dt.datetime):
            raise ValueError("the stored time cannot be read")
        written = self._store_time(value) if self._store_time else value
        if written != stored:
            raise ValueError("the stored time is not in the form the journal writes")
        return value


def _checked_body(
    claim: CheckpointClaim, origin: str, trusted_keys: Collection[bytes]
) -> CheckpointBody:
    """The claim's body once everything about it holds; ValueError naming the problem."""
    try:
        body = parse_checkpoint_body(claim.body)
    except ValueError as exc:
        raise ValueError(f"checkpoint from {claim.source}: {exc}") from None
    if body.origin != origin or body.seq != claim.seq or body.head_hash != claim.head_hash:
        raise ValueError(f"checkpoint from {claim.source} does not match its own body")
    if claim.public_key_der not in trusted_keys:
        raise ValueError(f"checkpoint from {claim.source} is signed by an unknown key")
    if not verify_signature(claim.public_key_der, claim.signature, claim.body.encode("utf-8")):
        raise ValueError(f"checkpoint from {claim.source}: bad signature")
    if body.time is not None and claim.time != body.time:
        raise ValueError(
            f"checkpoint from {claim.source}: its time {format_time(claim.time)} is not the "
            f"signed time {format_time(body.time)}"
        )
    return body


@dataclasses.dataclass
class _Stored:
    """The stored checkpoints: the well-formed ones as claims, every seq (ascending) with the
    digest of its body (None when the body is not text), and (seq, problem) for malformed
    rows."""

    claims: list[CheckpointClaim] = dataclasses.field(default_factory=list)
    seqs: list[int] = dataclasses.field(default_factory=list)
    digests: dict[int, str | None] = dataclasses.field(default_factory=dict)
    failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def before(self, seq: int) -> int:
        """The newest stored checkpoint before ``seq`` (0 when none)."""
        i = bisect.bisect_left(self.seqs, seq)
        return self.seqs[i - 1] if i else 0


def _stored_checkpoints(session: Session, decoder: _Decoder) -> _Stored:
    stored = _Stored()
    stmt = select(
        *_raw(
            _CHECKPOINTS.c.seq,
            _CHECKPOINTS.c.time,
            _CHECKPOINTS.c.head_hash,
            _CHECKPOINTS.c.body,
            _CHECKPOINTS.c.signature,
            _CHECKPOINTS.c.public_key_der,
        )
    ).order_by(_CHECKPOINTS.c.seq)
    for seq, time, head_hash, body, signature, public_key_der in session.execute(stmt):
        text = isinstance(body, str)  # UndecodableText is bytes: not text either
        stored.seqs.append(seq)
        stored.digests[seq] = body_digest(body) if text else None
        try:
            when = decoder.time(time)
        except ValueError:
            when = None
        if not (
            when is not None
            and isinstance(head_hash, str)
            and text
            and isinstance(signature, bytes)
            and isinstance(public_key_der, bytes)
        ):
            problem = "checkpoint from store: a value is not of its column type"
            stored.failures.append((seq, problem))
            continue
        stored.claims.append(
            CheckpointClaim(seq, head_hash, body, signature, public_key_der, when, "store")
        )
    return stored


def _missing_checkpoints(
    stored: _Stored, checked: Iterable[tuple[CheckpointClaim, CheckpointBody]]
) -> list[tuple[int, str]]:
    """Checkpoints gone from the store: the one a stored checkpoint signs that it follows (or
    one stored between the two), and an exported one no later than the newest stored one
    (a later one is either truncation, which the walk reports, or the newest ones deleted with
    the head edited, whose records the export still proves). Each is located, as a rewrite
    behind a checkpoint would be, at the first record after the newest stored checkpoint
    before it."""
    problems = []
    newest = stored.seqs[-1] if stored.seqs else 0
    for claim, body in checked:
        at = f"the checkpoint at {claim.seq} ({claim.source})"
        # A stored row that cannot be read (None) is reported as such, at its own seq.
        if claim.source != "store":
            found = stored.digests.get(claim.seq, "")
            if claim.seq <= newest and found is not None and found != body_digest(claim.body):
                where = "differs in" if found else "is missing from"
                problems.append((stored.before(claim.seq) + 1, f"{at} {where} the store"))
            continue
        if body.previous is None:
            continue  # the three-line form signs no link
        previous, digest = body.previous
        found = stored.digests.get(previous, "")
        if previous and found is not None and found != digest:
            state = "was replaced" if found else "is missing"
            problems.append(
                (
                    stored.before(min(previous, claim.seq)) + 1,
                    f"the checkpoint at {previous} {state}: {at} signs that it follows it",
                )
            )
        between = stored.before(claim.seq)
        if between > previous:
            problems.append(
                (
                    stored.before(between) + 1,
                    f"the checkpoint at {between} is stored between {at} and the one at "
                    f"{previous}, which it signs that it follows",
                )
            )
    return problems


def _beginning_problem(
    stored: _Stored,
    checked: Iterable[tuple[CheckpointClaim, CheckpointBody]],
    head_seq: int,
    initialised: bool,
) -> tuple[int, str] | None:
    """(1, problem) when the journal does not begin as the journal begins. ``init`` journals
    its plan at seq 1 and signs it as soon as the audit key exists (before that order, the
    key came first and the first append signed seq 1), so a journal with records has its first
    checkpoint at seq 1, following none: with every checkpoint deleted and the head made to
    name none, the next one signed became the first, at any seq, and verify was satisfied.
    ``initialised``: the caller knows the deployment was made (its root CA, its audit key),
    so its journal has begun and seq 1 is signed: neither empty nor unsigned."""
    if head_seq == 0:
        return (
            (1, "the journal is empty, but this deployment was initialised")
            if initialised
            else None
        )
    if not stored.seqs:
        if not initialised:
            return None  # an init stopped before its audit key existed
        return 1, f"records 1 to {head_seq} are signed by no checkpoint: init signs seq 1"
    if stored.seqs[0] != 1:
        return 1, f"the journal's first checkpoint is at seq {stored.seqs[0]}: init signs seq 1"
    for claim, body in checked:
        if claim.seq == 1 and body.previous not in (None, (0, GENESIS)):
            return 1, f"the checkpoint at 1 signs that it follows the one at {body.previous[0]}"
    return None


def _head_time_problem(
    decoder: _Decoder, checkpoint_seq: int, stored: Any, signed: Mapping[int, dt.datetime]
) -> tuple[int, str] | None:
    """(seq, problem) when the head's ``checkpoint_time`` is not the time the checkpoint it
    names signs (no checkpoint: none). Appends measure the checkpoint interval from it: moved
    ahead, it held back every time-based checkpoint. Located after that checkpoint."""
    if checkpoint_seq and checkpoint_seq not in signed:
        return None  # that checkpoint is missing or bad: reported as such
    expected = signed.get(checkpoint_seq)
    try:
        found = None if stored is None else decoder.time(stored)
    except ValueError as exc:
        return checkpoint_seq + 1, f"the head's checkpoint_time: {exc}"
    if found == expected:
        return None
    shown = "none" if found is None else format_time(found)
    if expected is None:
        return 1, f"the head's checkpoint_time is {shown}, but no checkpoint was signed"
    later = " (later: checkpoints were held back)" if found and found > expected else ""
    return (
        checkpoint_seq + 1,
        f"the head's checkpoint_time {shown} is not the time the checkpoint at "
        f"{checkpoint_seq} signs, {format_time(expected)}{later}",
    )


def _first_outside(
    session: Session, where: Any, head: str, table: Table = _RECORDS
) -> tuple[int, str] | None:
    """(seq, problem) for the lowest record (or, with ``table`` the tombstones, the lowest
    tombstone) matching ``where``: what the walk of 1..head never reaches, or None."""
    first, count = session.execute(select(func.min(table.c.seq), func.count()).where(where)).one()
    if not count:
        return None
    more = f" (and {count - 1} more)" if count > 1 else ""
    what = "record" if table is _RECORDS else "tombstone of a purged record"
    return first, f"{what} {first} is outside the journal ({head}){more}"


def _outside(session: Session, head_seq: int | None) -> list[tuple[int, str]]:
    """Records and tombstones outside 1..head (``head_seq`` None: the head is unreadable, so
    only those below 1). A tombstone there is no purge's (a purge removes records of the
    chain), yet `cert check` takes its action and serial for a purged ca.issue or ca.revoke
    record: a forged one silenced a certificate revoked by hand."""
    found = []
    for table in (_RECORDS, _PURGED):
        if head_seq is None:
            where, head = table.c.seq < 1, "it starts at seq 1"
        else:
            where = or_(table.c.seq < 1, table.c.seq > head_seq)
            head = f"seq 1 to the head, {head_seq}"
        outside = _first_outside(session, where, head, table)
        if outside is not None:
            found.append(outside)
    return found


@dataclasses.dataclass
class _Walk:
    """How far the chain was followed, and the first problem on the way (which ends it)."""

    last_seq: int = 0
    last_hash: str = GENESIS
    first_time: dt.datetime | None = None
    last_time: dt.datetime | None = None
    failure: tuple[int, str] | None = None
    signed_seq: int = 0  # the newest checkpoint that held
    unsigned_since: dt.datetime | None = None  # the time of the record after it
    tree: Frontier = dataclasses.field(default_factory=Frontier)  # records 1..last_seq
    # The newest signed root that held: (its frontier, the root), and the leaves since.
    signed_root: tuple[Frontier, bytes] | None = None
    leaves_since: list[bytes] = dataclasses.field(default_factory=list)

    def check_roots(self, seq: int, roots: Iterable[tuple[str, str]]) -> None:
        """Each root signed at ``seq`` (hex, source) is the tree head of records 1..seq and
        consistent with the newest root signed before it; a failure ends the walk."""
        computed = self.tree.root()
        for root_hex, source in roots:
            signed = bytes.fromhex(root_hex)
            at = f"the checkpoint at {seq} ({source})"
            if self.signed_root is not None:
                older, older_root = self.signed_root
                node = extension_node(older, self.leaves_since)
                proof = consistency_proof(older.size, seq, node)
                if not verify_consistency(older.size, seq, older_root, signed, proof):
                    self.failure = (
                        seq,
                        f"{at} signs a Merkle root not consistent with the one signed at "
                        f"{older.size}: a fork of the journal",
                    )
                    return
            if signed != computed:
                self.failure = (
                    seq,
                    f"{at} signs a Merkle root that is not the root of records 1 to {seq}",
                )
                return
        self.signed_root = (self.tree.copy(), computed)
        self.leaves_since = []


def _batch(session: Session, table: Table, after: int, upto: int) -> Sequence[RowMapping]:
    """At most BATCH rows of ``table`` (records or tombstones) after seq ``after`` up to
    ``upto``, in seq order, as the driver returns them."""
    return (
        session.execute(
            select(*_raw(*table.columns))
            .where(table.c.seq > after, table.c.seq <= upto)
            .order_by(table.c.seq)
            .limit(BATCH)
        )
        .mappings()
        .all()
    )


def _entries(session: Session, after: int, head_seq: int) -> list[RowMapping]:
    """The next records and tombstones after seq ``after`` (up to the head), merged in seq
    order: a batch of each at most, cut where either batch ends (what follows comes next
    call). A tombstone's mapping has ``purge_seq``; a record's does not."""
    records = _batch(session, _RECORDS, after, head_seq)
    upper = records[-1]["seq"] if len(records) == BATCH else head_seq
    stones = _batch(session, _PURGED, after, upper)
    if len(stones) == BATCH:
        upper = stones[-1]["seq"]
    merged = [row for row in (*records, *stones) if row["seq"] <= upper]
    merged.sort(key=lambda row: (row["seq"], "purge_seq" in row))
    return merged


@dataclasses.dataclass
class _Purges:
    """Tombstones seen, by the seq of the purge record they name, until it is reached; then
    the purges whose limit the checkpoint that signs them must show to be R ago.

    A purge record is appended like any other, so whoever may write the tables can append one
    to the unsigned tail without the key, naming any record, and the deployment's next
    checkpoint signs it. What a purge removes must therefore follow from what is signed: its
    ``through`` checkpoint signs a time no later than its ``limit`` (every record it removes
    is at or before that checkpoint, so was written by then), and the checkpoint that first
    signs the purge is at least ``MIN_RETENTION_DAYS`` after that limit (its time is the
    deployment's clock, not the attacker's)."""

    signed_times: Mapping[int, Sequence[dt.datetime]]
    pending: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    # (first removed seq, purge seq, limit) of purges no checkpoint has signed yet
    unsigned: list[tuple[int, int, dt.datetime]] = dataclasses.field(default_factory=list)

    def tombstone(self, row: RowMapping, seq: int) -> str | None:
        purge_seq = row["purge_seq"]
        if not isinstance(purge_seq, int) or purge_seq <= seq:
            return (
                f"record {seq} was removed, but it is not among the seqs a purge names "
                f"(its tombstone names {purge_seq!r}; a purge follows what it removes)"
            )
        self.pending.setdefault(purge_seq, []).append(seq)
        return None

    def record(self, fields: Mapping[str, Any]) -> tuple[int, str] | None:
        """The record at a purge seq tombstones named: is it that purge, naming them all?"""
        seqs = self.pending.pop(fields["seq"], None)
        if seqs is None:
            return None
        if fields["action"] != PURGE_ACTION:
            return seqs[0], self.not_a_purge(seqs[0], fields["seq"])
        try:
            named = json.loads(fields["detail"])
            first, last, count = (_number(named[key]) for key in ("first", "last", "count"))
            through = _number(named["through"])
            digest = named["seqs_sha256"]
            limit = _parse_time(named["limit"])
        except (ValueError, TypeError, KeyError):
            return seqs[0], f"the purge at {fields['seq']} does not say what it removed"
        if (first, last, count, digest) != (seqs[0], seqs[-1], len(seqs), seqs_digest(seqs)):
            return seqs[0], (
                f"record {seqs[0]} was removed, but the seqs the purge at {fields['seq']} names "
                f"are not those removed ({count} from {first} to {last}; {len(seqs)} "
                "tombstones name it)"
            )
        times = self.signed_times.get(through, ())
        if not (seqs[-1] <= through < fields["seq"] and times and max(times) <= limit):
            return seqs[0], (
                f"record {seqs[0]} was removed, but the purge at {fields['seq']} may remove "
                f"only records a checkpoint signed by its limit {format_time(limit)}: it names "
                f"the checkpoint at {through}, which is not one"
            )
        self.unsigned.append((seqs[0], fields["seq"], limit))
        return None

    def signed(self, seq: int) -> tuple[int, str] | None:
        """Checkpoints at ``seq`` sign the purges before them: were they made R after their
        limit?"""
        times = self.signed_times.get(seq)
        if not times or not self.unsigned:
            return None
        for first, purge_seq, limit in self.unsigned:
            if min(times) + CLOCK_AHEAD < limit + dt.timedelta(days=MIN_RETENTION_DAYS):
                return first, (
                    f"record {first} was removed, but the purge at {purge_seq} names a limit "
                    f"{format_time(limit)} less than {MIN_RETENTION_DAYS} days before the "
                    f"checkpoint at {seq} signed it"
                )
        self.unsigned = []
        return None

    @staticmethod
    def not_a_purge(seq: int, purge_seq: int) -> str:
        return (
            f"record {seq} was removed, but the record its tombstone names ({purge_seq}) is "
            "not a purge"
        )

    def left(self) -> tuple[int, str] | None:
        """Tombstones whose purge record the walk never reached (none, or purged itself)."""
        if not self.pending:
            return None
        purge_seq, seqs = min(self.pending.items(), key=lambda item: item[1][0])
        return seqs[0], self.not_a_purge(seqs[0], purge_seq)


def _number(value: Any) -> int:
    """An integer as the purge writes it (JSON number, not a bool or a string)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def _parse_time(value: Any) -> dt.datetime:
    return parse_time(value if isinstance(value, str) else "")


def _tombstone_hash(row: RowMapping, name: str) -> str:
    value = row[name]
    if not isinstance(value, str) or len(value) != 64 or not _HEX64.issuperset(value):
        raise ValueError(f"the tombstone's {name} is not a SHA-256 in hex")
    return value


def _walk(
    session: Session,
    head_seq: int,
    claims: Mapping[int, list[CheckpointClaim]],
    roots: Mapping[int, list[tuple[str, str]]],
    signed_times: Mapping[int, Sequence[dt.datetime]],
) -> _Walk:
    """Follow the chain from seq 1 to the head, in batches, until the first problem."""
    decoder = _Decoder(session.get_bind().dialect)
    walk = _Walk()
    purges = _Purges(signed_times)
    while True:
        rows = _entries(session, walk.last_seq, head_seq)
        if not rows:
            walk.failure = purges.left()
            return walk
        for row in rows:
            seq = walk.last_seq + 1
            if row["seq"] != seq:
                if row["seq"] == seq - 1:  # a tombstone beside the record (sorted after it)
                    walk.failure = (row["seq"], f"record {row['seq']} is stored and purged")
                else:
                    walk.failure = (seq, f"record {seq} is missing (next is {row['seq']})")
                return walk
            if "purge_seq" in row:
                try:
                    digest = _tombstone_hash(row, "hash")
                    leaf = bytes.fromhex(_tombstone_hash(row, "leaf_hash"))
                    fields: dict[str, Any] = {"seq": seq, "time": decoder.time(row["time"])}
                except ValueError as exc:
                    walk.failure = (seq, str(exc))
                    return walk
                problem = purges.tombstone(row, seq)
                if problem is not None:
                    walk.failure = (seq, problem)
                    return walk
            else:
                try:
                    fields = decoder.fields(row)
                    data = canonical(fields)
                except ValueError as exc:
                    walk.failure = (seq, str(exc))
                    return walk
                digest = hashlib.sha256(bytes.fromhex(walk.last_hash) + data).hexdigest()
                leaf = leaf_hash(data)
                if digest != row["hash"]:
                    walk.failure = (seq, "record content does not match its chain hash")
                    return walk
                walk.failure = purges.record(fields)
                if walk.failure is not None:
                    return walk
            walk.tree.append(leaf)
            if walk.signed_root is not None:
                walk.leaves_since.append(leaf)
            for claim in claims.get(seq, ()):
                if claim.head_hash != digest:
                    walk.failure = (
                        walk.signed_seq + 1,
                        f"records after {walk.signed_seq} differ from the signed "
                        f"checkpoint at {seq} ({claim.source})",
                    )
                    return walk
            walk.failure = purges.signed(seq)
            if walk.failure is not None:
                return walk
            if seq in roots:
                walk.check_roots(seq, roots[seq])
                if walk.failure is not None:
                    return walk
            if seq in claims:
                walk.signed_seq, walk.unsigned_since = seq, None
            elif walk.unsigned_since is None:
                walk.unsigned_since = fields["time"]
            walk.first_time = walk.first_time or fields["time"]
            walk.last_time = fields["time"]
            walk.last_seq, walk.last_hash = seq, digest


def verify(
    session: Session,
    origin: str,
    *,
    trusted_keys: Collection[bytes],
    external: Iterable[CheckpointClaim] = (),
    initialised: bool = False,
    tail_limit: TailLimit | None = None,
) -> VerifyResult:
    """Walk the whole journal; raise ``AuditChainBroken`` at the first bad sequence number.

    ``trusted_keys``: the public keys (DER SubjectPublicKeyInfo) checkpoints may be signed
    with; a checkpoint signed by any other key is tampering (with none given, every one is).
    ``initialised``: the deployment is known to be made (the store alone cannot say it once
    its journal is gone): an empty journal, or records no checkpoint signs, are tampering.
    ``tail_limit``: raise ``AuditTailUnsigned`` when records have waited unsigned for longer
    than it allows; without it the unsigned tail is only reported (``VerifyResult``).
    """
    # SQLite text that is not UTF-8 (only an edited file holds it) comes back as
    # UndecodableText: reported at its row, where sqlite3 would fail the whole batch.
    with undecodable_text(session, keep=True):
        result, signed_seq = _verify(
            session, origin, frozenset(trusted_keys), external, initialised
        )
    if tail_limit is not None:
        _check_tail(result, signed_seq, tail_limit)
    return result


def _verify(
    session: Session,
    origin: str,
    trusted: frozenset[bytes],
    external: Iterable[CheckpointClaim],
    initialised: bool,
) -> tuple[VerifyResult, int]:
    """The result, and the seq of the newest checkpoint that held."""
    decoder = _Decoder(session.get_bind().dialect)
    stored = _stored_checkpoints(session, decoder)
    failures = list(stored.failures)  # (seq, problem); the lowest is reported
    claims: dict[int, list[CheckpointClaim]] = {}
    checked = []
    for claim in [*stored.claims, *external]:
        try:
            body = _checked_body(claim, origin, trusted)
        except ValueError as exc:
            failures.append((claim.seq, str(exc)))
            continue
        claims.setdefault(claim.seq, []).append(claim)
        checked.append((claim, body))
    failures.extend(_missing_checkpoints(stored, checked))

    head = session.execute(
        select(
            *_raw(_HEAD.c.seq, _HEAD.c.hash, _HEAD.c.checkpoint_seq, _HEAD.c.checkpoint_time)
        ).where(_HEAD.c.id == 1)
    ).first()
    if head is None or not (
        isinstance(head[0], int) and isinstance(head[1], str) and isinstance(head[2], int)
    ):
        failures.append((1, "the journal head row is missing or malformed"))
        failures.extend(_outside(session, None))
        _raise_first(failures)
    head_seq, head_hash, head_checkpoint, head_checkpoint_time = head
    problem = _beginning_problem(stored, checked, head_seq, initialised)
    if problem is not None:
        failures.append(problem)
    signed_times = {
        claim.seq: body.time or claim.time for claim, body in checked if claim.source == "store"
    }
    problem = _head_time_problem(decoder, head_checkpoint, head_checkpoint_time, signed_times)
    if problem is not None:
        failures.append(problem)
    failures.extend(_outside(session, head_seq))

    roots: dict[int, list[tuple[str, str]]] = {}
    for claim, body in checked:
        if body.root is not None and (body.root, claim.source) not in roots.get(claim.seq, []):
            roots.setdefault(claim.seq, []).append((body.root, claim.source))
    purge_times: dict[int, list[dt.datetime]] = {}
    for claim, body in checked:
        if body.time is not None:  # the three-line form of before signs no time
            purge_times.setdefault(claim.seq, []).append(body.time)
    walk = _walk(session, head_seq, claims, roots, purge_times)
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
        if head_seq > last_seq:
            failures.append(
                (
                    last_seq + 1,
                    f"journal truncated: the head is at {head_seq}, last record {last_seq}",
                )
            )
        elif head_hash != walk.last_hash:
            failures.append((last_seq, f"the head's hash does not match record {last_seq}"))

    # The head names the checkpoint signed last: a deleted (or slipped in) checkpoint row
    # leaves them apart. Located after the older of the two, as for a rewrite behind one.
    newest = stored.seqs[-1] if stored.seqs else 0
    if head_checkpoint != newest:
        failures.append(
            (
                min(head_checkpoint, newest) + 1,
                f"the head names the checkpoint at seq {head_checkpoint}, "
                f"the newest stored checkpoint is at {newest}",
            )
        )
    if failures:
        _raise_first(failures)
    result = VerifyResult(
        records=last_seq,
        head_seq=head_seq,
        head_hash=head_hash,
        checkpoints=len(claims),
        first_time=walk.first_time,
        last_time=walk.last_time,
        unsigned_records=last_seq - walk.signed_seq,
        unsigned_since=walk.unsigned_since,
        checkpoint_key_sha256=(
            hashlib.sha256(claims[walk.signed_seq][0].public_key_der).hexdigest()
            if walk.signed_seq
            else None
        ),
    )
    return result, walk.signed_seq


def _check_tail(result: VerifyResult, signed_seq: int, limit: TailLimit) -> None:
    """Raise when the oldest unsigned record is older than ``limit`` allows. A journal that
    stops signing (its audit key gone: appends go on, unsigned) otherwise verified as intact
    for good, while every record it took could be rewritten unnoticed."""
    since = result.unsigned_since
    if since is None or limit.now - since <= limit.allowed:
        return
    raise AuditTailUnsigned(
        signed_seq + 1,
        f"{result.unsigned_records} records after the checkpoint at {signed_seq} have "
        f"waited unsigned since {format_time(since)}, longer than the checkpoint interval "
        f"({_minutes(limit.interval)}) and {_minutes(TAIL_SLACK)} more allow: checkpoints "
        "are not being signed (is the audit key missing? is `sekisho serve`, which signs a "
        "quiet journal's tail, running?)",
    )


def _minutes(span: dt.timedelta) -> str:
    return f"{span.total_seconds() / 60:g} min"


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
            if not isinstance(doc, Mapping):
                raise TypeError("not a JSON object")
            seq, head_hash, body = doc["seq"], doc["head_hash"], doc["body"]
            if not (
                isinstance(seq, int)
                and not isinstance(seq, bool)
                and isinstance(head_hash, str)
                and isinstance(body, str)
                and isinstance(doc["time"], str)
            ):
                raise TypeError("seq must be a number, head_hash, body and time text")
            if not 1 <= seq < 1 << 63:
                # (It was reported as tampering at that seq: "journal broken at seq -5".)
                raise ValueError(f"seq {seq if abs(seq) < 10**20 else '(too long)'} out of range")
            time = dt.datetime.fromisoformat(doc["time"])
            if time.tzinfo is None:
                raise ValueError("time without a UTC offset")
            out.append(
                CheckpointClaim(
                    seq=seq,
                    head_hash=head_hash,
                    body=body,
                    signature=base64.b64decode(doc["signature"], validate=True),
                    public_key_der=base64.b64decode(doc["public_key"], validate=True),
                    time=time,
                    source=f"{source}:{n}",
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} line {n}: not a checkpoint document ({exc})") from None
    return out
