"""Store tables of the audit journal."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from sekisho.db import APP_PRIVILEGES, Base, UTCDateTime

_BIGINT = BigInteger().with_variant(Integer, "sqlite")


class JournalRecord(Base):
    """One journal entry. ``hash`` = SHA-256(previous hash || canonical(record))."""

    __tablename__ = "audit_records"
    # Append-only: the application role reads and adds records, never changes one (with an
    # owner role of its own; the triggers of migration 0007 refuse it to every role).
    __table_args__ = {"info": {APP_PRIVILEGES: ("SELECT", "INSERT")}}

    seq: Mapped[int] = mapped_column(_BIGINT, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    category: Mapped[str] = mapped_column(String(16), index=True)  # ca, system, auth
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # success, failure, denied
    actor_account: Mapped[str | None] = mapped_column(String(256), index=True)
    actor_serial: Mapped[str | None] = mapped_column(String(42), index=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), index=True)
    object_dn: Mapped[str | None] = mapped_column(Text)
    object_serial: Mapped[str | None] = mapped_column(String(42), index=True)
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)
    device_mac: Mapped[str | None] = mapped_column(String(32), index=True)
    request_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON object
    hash: Mapped[str] = mapped_column(String(64))


class JournalHead(Base):
    """Single row (id=1): the chain head. Appenders lock it to serialise the chain."""

    __tablename__ = "audit_head"
    # The row exists from the first migration on; appenders only move it.
    __table_args__ = {"info": {APP_PRIVILEGES: ("SELECT", "UPDATE")}}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    checkpoint_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    checkpoint_time: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    """A signed statement of the chain head at ``seq`` (C2SP tlog-checkpoint style body)."""

    __tablename__ = "audit_checkpoints"
    __table_args__ = {"info": {APP_PRIVILEGES: ("SELECT", "INSERT")}}  # append-only

    seq: Mapped[int] = mapped_column(_BIGINT, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    head_hash: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    key_ref: Mapped[str] = mapped_column(Text)
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    # The Merkle tree's frontier at ``seq`` (``audit.merkle.Frontier.to_bytes``), from which
    # the next checkpoint extends the tree with the records after this one. Not signed: the
    # next checkpoint uses it only when it folds to the root this body signs, and ``audit
    # verify`` recomputes every root from the records. None: written before it existed.
    merkle_frontier: Mapped[bytes | None] = mapped_column(LargeBinary)


class PurgedRecord(Base):
    """What is left of a record ``audit purge`` removed once its retention ended: its place in
    the chain and the tree, its action and certificate serial, never the rest. ``leaf_hash`` =
    SHA-256(0x00 || canonical) keeps every signed Merkle root computable, ``hash`` the chain
    hash the next record links to;
    ``purge_seq`` is the ``audit.purge`` record that removed it (which names every seq it
    removed by digest, so a tombstone added by anyone else is found by ``audit verify``)."""

    __tablename__ = "audit_purged"
    # Append-only, as the records (migration 0008): SELECT and INSERT for the application.
    __table_args__ = {"info": {APP_PRIVILEGES: ("SELECT", "INSERT")}}

    seq: Mapped[int] = mapped_column(_BIGINT, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # What it was about, no more (``cert check`` tells a certificate whose ca.issue record
    # was purged from one that never had one): the action and the certificate serial.
    action: Mapped[str] = mapped_column(String(64))
    object_serial: Mapped[str | None] = mapped_column(String(42), index=True)
    leaf_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    purge_seq: Mapped[int] = mapped_column(BigInteger, index=True)


class SchemaChange(Base):
    """A migration not journalled yet. The migration run writes it in its own transaction
    (``sekisho/migrations/env.py``); the next process that opens the store to write journals
    it as ``system.migrate`` and deletes it in one transaction (``sekisho.services``). So a
    migration is recorded once, even when the process that applied it failed right after."""

    __tablename__ = "audit_schema_changes"
    __table_args__ = {"info": {APP_PRIVILEGES: ("SELECT", "DELETE")}}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    before: Mapped[str] = mapped_column(String(256))  # revisions, comma-separated
    after: Mapped[str] = mapped_column(String(256))
    process: Mapped[str] = mapped_column(String(64))  # "uid N pid M" of the migrating process
