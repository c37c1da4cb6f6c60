"""Retention: which journal records may leave, and ``audit purge`` (CA/B Forum BR 5.4.3).

A record is kept while any of these holds (``R`` = ``audit_retention_days``, two years at
least):

* it is younger than ``R`` (security events: two years after the event);
* it names a certificate (``object_serial``) that has not expired, or expired less than ``R``
  ago: a subscriber certificate's lifecycle records stay two years past its expiry, and a CA
  certificate's (``ca_authorities``) too;
* it is a CA key lifecycle record (category ``ca``, naming a CA in ``detail.ca``, other than a
  certificate's issuance, revocation or release or a CRL): kept while that CA's certificate
  has not expired or expired less than ``R`` ago; a CA this store does not know keeps it. One
  naming no CA (a backup, a restore: every CA's keys) and the deployment's own creation
  (``system.init``) are kept while any CA is;
* it records a purge (``audit.purge``), which ``audit verify`` needs to tell a purge from a
  deletion.

Only records a checkpoint signed no later than the retention limit covers are purged (the
purge record names that checkpoint, ``through``), and the checkpoint that signs a purge is
``R`` after its limit: ``audit verify`` checks both, so a purge record forged without the key
in the unsigned tail, and signed by the deployment's next checkpoint, removes nothing retention
keeps for its age.

Each removed record leaves a tombstone (``audit_purged``: seq, time, action, certificate
serial, leaf hash, chain hash, the purge's seq), so the chain and every signed Merkle root
stay verifiable; each batch appends one ``audit.purge`` record naming how many seqs it
removed and the SHA-256 of their list (``audit.chain.seqs_digest``), in the transaction that
removes them; a checkpoint is signed after the last batch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from audit.chain import (
    FIELDS,
    PURGE_ACTION,
    canonical,
    format_time,
    parse_checkpoint_body,
    seqs_digest,
)
from audit.events import Category, Outcome, by_actor
from audit.journal import Journal
from audit.merkle import leaf_hash
from audit.models import Checkpoint, JournalHead, JournalRecord, PurgedRecord
from ca.models import Certificate, CertificateAuthority
from sekisho.context import Actor
from sekisho.db import Database
from sekisho.errors import AuditError

BATCH = 5000  # records removed per transaction (and per audit.purge record)
# Records about one certificate, or one CRL: the certificate's rule (or the time rule) decides.
_NOT_LIFECYCLE = frozenset({"ca.issue", "ca.revoke", "ca.release", "ca.crl", "ca.crl.prune"})
_DEPLOYMENT = frozenset({"system.init", "system.init.begin"})


@dataclasses.dataclass(frozen=True)
class Retention:
    """What keeps records at ``now``: ``limit`` = now - R; certificates (by serial) and CAs (by
    name) whose certificate expires after ``limit``."""

    now: dt.datetime
    days: int
    limit: dt.datetime
    live_serials: frozenset[str]
    ca_expiry: Mapping[str, dt.datetime]

    @classmethod
    def load(cls, session: Session, now: dt.datetime, days: int) -> Retention:
        limit = now - dt.timedelta(days=days)
        serials = set(
            session.scalars(select(Certificate.serial).where(Certificate.not_after > limit))
        )
        serials.update(
            session.scalars(
                select(CertificateAuthority.serial).where(CertificateAuthority.not_after > limit)
            )
        )
        rows = session.execute(select(CertificateAuthority.name, CertificateAuthority.not_after))
        expiry = {name: not_after for name, not_after in rows}
        return cls(now, days, limit, frozenset(serials), expiry)

    def why_kept(self, fields: Mapping[str, Any]) -> str | None:
        """Why ``fields`` (a record) must stay at ``now``, or None when it may leave."""
        until = fields["time"] + dt.timedelta(days=self.days)
        if fields["time"] > self.limit:
            return f"younger than the retention period (kept until {format_time(until)})"
        action = fields["action"]
        if action == PURGE_ACTION:
            return "records a purge"
        serial = fields.get("object_serial")
        if serial and serial in self.live_serials:
            return (
                f"certificate {serial} has not expired, or expired less than {self.days} days ago"
            )
        if action in _DEPLOYMENT:
            if self._any_ca_kept():
                return "records the deployment's creation, and a CA certificate is still kept"
            return None
        if fields["category"] == Category.CA and action not in _NOT_LIFECYCLE:
            name = _detail_ca(fields.get("detail"))
            if name is None:
                # Of no one CA (a backup, a restore: every CA's keys): kept while any CA is.
                if self._any_ca_kept():
                    return "CA key lifecycle record of every CA, and a CA certificate is kept"
                return None
            expiry = self.ca_expiry.get(name)
            if expiry is None:
                return f"CA key lifecycle record of a CA this store does not hold ({name!r})"
            if expiry > self.limit:
                return (
                    f"CA key lifecycle record of CA {name!r}, whose certificate has not "
                    f"expired or expired less than {self.days} days ago"
                )
        return None

    def _any_ca_kept(self) -> bool:
        return any(expiry > self.limit for expiry in self.ca_expiry.values())


def _detail_ca(detail: Any) -> str | None:
    try:
        value = json.loads(detail) if isinstance(detail, str) else detail
    except (ValueError, RecursionError):
        return None
    name = value.get("ca") if isinstance(value, dict) else None
    return name if isinstance(name, str) else None


@dataclasses.dataclass
class PurgeResult:
    """What a purge did (or, dry, would do)."""

    # The newest checkpoint that signs a time no later than the limit: records after it are
    # never purged (each purge record names it, and ``audit verify`` checks it).
    through: int
    limit: dt.datetime
    examined: int = 0  # records older than the limit, up to ``through``
    purged: int = 0
    kept: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # kept, by rule
    first_kept: tuple[int, str] | None = None
    purge_records: list[int] = dataclasses.field(default_factory=list)
    checkpoint: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "through": self.through,
            "limit": format_time(self.limit),
            "examined": self.examined,
            "purged": self.purged,
            "kept": self.kept,
            "kept_by_rule": dict(sorted(self.reasons.items())),
            "first_kept": (
                {"seq": self.first_kept[0], "why": self.first_kept[1]} if self.first_kept else None
            ),
            "purge_records": self.purge_records,
            "checkpoint": self.checkpoint,
        }


def _rule(why: str) -> str:
    """The rule's name, for counting (the reason without the record's particulars)."""
    if why.startswith("younger"):
        return "younger than the retention period"
    if why.startswith("certificate"):
        return "certificate kept"
    if why.startswith("CA key"):
        return "CA key lifecycle"
    return why


def _fields(record: JournalRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS}


def purge(
    db: Database,
    journal: Journal,
    now: dt.datetime,
    days: int,
    actor: Actor,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
) -> PurgeResult:
    """Remove every record whose retention has ended and a checkpoint signs, in batches of
    ``batch`` (each one transaction with its ``audit.purge`` record); sign a checkpoint after
    the last. ``dry_run``: count, remove nothing."""
    if journal.signer is None and not dry_run:
        # Each purge is signed at once: without the key, what was removed and the records
        # naming it would wait unsigned, open to a rewrite that hides more.
        raise AuditError("no audit checkpoint key is configured: nothing is purged unsigned")
    with db.read_scope() as session:
        retention = Retention.load(session, now, days)
        through = _signed_by(session, retention.limit)
    result = PurgeResult(through=through, limit=retention.limit)
    after = 0
    while True:
        with db.scope() as session:
            if not dry_run:
                # The head locked first, as an append locks it: a purge running beside this
                # one waits, then reads what that one left (on PostgreSQL each statement sees
                # what committed before it; SQLite's writers queue already).
                session.execute(select(JournalHead.id).where(JournalHead.id == 1).with_for_update())
            records = list(
                session.scalars(
                    select(JournalRecord)
                    .where(
                        JournalRecord.seq > after,
                        JournalRecord.seq <= through,
                        JournalRecord.time <= retention.limit,
                    )
                    .order_by(JournalRecord.seq)
                    .limit(batch)
                )
            )
            if not records:
                break
            after = records[-1].seq
            leaving = _sort(records, retention, result)
            if leaving and not dry_run:
                _remove(session, journal, leaving, retention, actor, result)
    if result.purged and not dry_run:
        with db.scope() as session:
            journal.checkpoint(session, now)  # None when an append signed the head already
            result.checkpoint = session.scalar(
                select(JournalHead.checkpoint_seq).where(JournalHead.id == 1)
            )
    return result


def _signed_by(session: Session, limit: dt.datetime) -> int:
    """The newest checkpoint (up to the one the head names) that signs a time no later than
    ``limit``, 0 when none: the records up to it were written by then, which ``audit verify``
    can tell from what is signed. A purge forged by whoever may write the tables (appended to
    the unsigned tail, then signed by the deployment's next checkpoint) could otherwise remove
    any record, yesterday's too; naming this checkpoint, it can remove none that retention
    keeps for its age."""
    head = session.scalar(select(JournalHead.checkpoint_seq).where(JournalHead.id == 1)) or 0
    rows = session.execute(
        select(Checkpoint.seq, Checkpoint.body)
        .where(Checkpoint.seq <= head, Checkpoint.time <= limit)
        .order_by(Checkpoint.seq.desc())
    )
    for seq, body in rows:
        try:
            signed = parse_checkpoint_body(body).time
        except ValueError:
            continue
        if signed is not None and signed <= limit:  # the three-line form signs no time
            return int(seq)
    return 0


def _sort(
    records: Sequence[JournalRecord], retention: Retention, result: PurgeResult
) -> list[JournalRecord]:
    """The records of a batch that may leave; the others counted by rule."""
    leaving = []
    for record in records:
        result.examined += 1
        why = retention.why_kept(_fields(record))
        if why is None:
            leaving.append(record)
            continue
        result.kept += 1
        rule = _rule(why)
        result.reasons[rule] = result.reasons.get(rule, 0) + 1
        if result.first_kept is None:
            result.first_kept = (record.seq, why)
    result.purged += len(leaving)
    return leaving


def _remove(
    session: Session,
    journal: Journal,
    leaving: Sequence[JournalRecord],
    retention: Retention,
    actor: Actor,
    result: PurgeResult,
) -> None:
    seqs = [record.seq for record in leaving]
    appended = journal.append(
        session,
        by_actor(
            actor,
            Category.SYSTEM,
            PURGE_ACTION,
            Outcome.SUCCESS,
            detail={
                "count": len(seqs),
                "first": seqs[0],
                "last": seqs[-1],
                "seqs_sha256": seqs_digest(seqs),
                "through": result.through,
                "retention_days": retention.days,
                "limit": format_time(retention.limit),
            },
        ),
        retention.now,
    )
    session.execute(
        insert(PurgedRecord),
        [
            {
                "seq": record.seq,
                "time": record.time,
                "action": record.action,
                "object_serial": record.object_serial,
                "leaf_hash": leaf_hash(canonical(_fields(record))).hex(),
                "hash": record.hash,
                "purge_seq": appended.seq,
            }
            for record in leaving
        ],
    )
    session.execute(delete(JournalRecord).where(JournalRecord.seq.in_(seqs)))
    session.flush()
    result.purge_records.append(appended.seq)
