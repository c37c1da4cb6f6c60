"""Store tables of the CA core."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from sekisho.db import Base, UTCDateTime, str_enum


class CaKind(enum.StrEnum):
    ROOT = "root"
    ISSUING = "issuing"


class CertStatus(enum.StrEnum):
    RESERVED = "reserved"  # intent committed, signature may or may not exist
    ISSUED = "issued"
    REVOKED = "revoked"  # includes certificateHold (reason says which)
    FAILED = "failed"  # signing never happened or failed cleanly


class CertificateAuthority(Base):
    __tablename__ = "ca_authorities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[CaKind] = mapped_column(str_enum(CaKind, 16))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("ca_authorities.id"))
    subject_dn: Mapped[str] = mapped_column(Text)
    key_ref: Mapped[str] = mapped_column(Text)
    key_type: Mapped[str] = mapped_column(String(16))
    serial: Mapped[str] = mapped_column(String(42))
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The root's key may be exported and removed from the online store (offline root).
    key_online: Mapped[bool] = mapped_column(Boolean, default=True)
    # Highest CRL number used (full and delta CRLs share one sequence, RFC 5280 5.2.3).
    crl_number: Mapped[int] = mapped_column(BigInteger, default=0)
    # thisUpdate of the CRL that got crl_number: the next CRL's is never earlier (None: none yet).
    crl_this_update: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Bumped on every revocation-status change of a certificate this CA issued; a CRL records
    # the epoch it covers, so "is the CRL stale?" and "what goes into the delta?" are exact.
    revocation_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Certificate(Base):
    __tablename__ = "certificates"
    __table_args__ = (
        UniqueConstraint("issuer_id", "serial", name="uq_cert_issuer_serial"),
        # A CA's latest status changes: the OCSP re-sign after a revocation, delta CRLs.
        Index("ix_certificates_issuer_epoch", "issuer_id", "status_epoch"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # Indexed as the first column of (issuer_id, serial) and (issuer_id, status_epoch).
    issuer_id: Mapped[int] = mapped_column(ForeignKey("ca_authorities.id"))
    # Zero-padded lowercase hex (40 digits): text order equals numeric order.
    serial: Mapped[str] = mapped_column(String(42))
    status: Mapped[CertStatus] = mapped_column(str_enum(CertStatus, 16), index=True)
    profile: Mapped[str] = mapped_column(String(64))
    subject_dn: Mapped[str] = mapped_column(Text)
    sans: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of "type:value"
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    tbs_sha256: Mapped[str | None] = mapped_column(String(64))
    der: Mapped[bytes | None] = mapped_column(LargeBinary)
    fingerprint_sha256: Mapped[str | None] = mapped_column(String(64))
    key_type: Mapped[str] = mapped_column(String(16))
    owner_kind: Mapped[str | None] = mapped_column(String(16))
    owner_id: Mapped[str | None] = mapped_column(String(128), index=True)
    tenant: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    failure: Mapped[str | None] = mapped_column(Text)
    # Revocation (RFC 5280 5.3.1 reasons, by name; None while not revoked).
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    invalidity_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    released_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    status_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    # SHA-256 of the subject's SubjectPublicKeyInfo (hex), from the intent on: finds every
    # certificate of a compromised key. None only for rows older than migration 0004 that
    # had no DER to compute it from.
    spki_sha256: Mapped[str | None] = mapped_column(String(64), index=True)


class BlockedKey(Base):
    """A public key never to be certified again (BR 6.1.1.3): one whose certificate was
    revoked for keyCompromise, or reported compromised (``sekisho key block``)."""

    __tablename__ = "blocked_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    spki_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # What blocked it: the certificate revoked for keyCompromise, or None for a report.
    issuer_id: Mapped[int | None] = mapped_column(ForeignKey("ca_authorities.id"))
    serial: Mapped[str | None] = mapped_column(String(42))
    comment: Mapped[str | None] = mapped_column(Text)
    blocked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class CrlKind(enum.StrEnum):
    FULL = "full"
    DELTA = "delta"


class Crl(Base):
    __tablename__ = "crls"
    __table_args__ = (UniqueConstraint("issuer_id", "number", name="uq_crl_issuer_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    issuer_id: Mapped[int] = mapped_column(ForeignKey("ca_authorities.id"), index=True)
    number: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[CrlKind] = mapped_column(str_enum(CrlKind, 8))
    base_number: Mapped[int | None] = mapped_column(BigInteger)
    this_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    epoch: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    der: Mapped[bytes] = mapped_column(LargeBinary)
