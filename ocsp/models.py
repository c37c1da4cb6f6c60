"""Store tables of the OCSP responder: delegated responder certificates and the pre-signed
responses (one per issuer and serial)."""

from __future__ import annotations

import datetime as dt

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
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from sekisho.db import Base, UTCDateTime


class OcspResponder(Base):
    """A delegated OCSP signer (RFC 6960 4.2.2.2) of one issuing CA: its key lives in the key
    backend (``key_ref``), its certificate is a row of ``certificates`` (``certificate_id``)."""

    __tablename__ = "ocsp_responders"
    __table_args__ = (
        # One active responder per CA: two processes replacing or provisioning it at once
        # cannot both record theirs active (ocsp.signers: the second discards its own).
        Index(
            "uq_ocsp_responders_active",
            "issuer_id",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    issuer_id: Mapped[int] = mapped_column(ForeignKey("ca_authorities.id"), index=True)
    certificate_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("certificates.id")
    )
    serial: Mapped[str] = mapped_column(String(42))
    key_ref: Mapped[str] = mapped_column(Text)
    key_type: Mapped[str] = mapped_column(String(16))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class OcspResponse(Base):
    """The current pre-signed response for one certificate (SHA-1 CertID, no nonce)."""

    __tablename__ = "ocsp_responses"
    __table_args__ = (
        UniqueConstraint("issuer_id", "serial", name="uq_ocsp_issuer_serial"),
        Index("ix_ocsp_responses_updated_at", "updated_at"),
        # A CA's answers due for re-signing, oldest first (the refresher, every tick).
        Index("ix_ocsp_responses_issuer_next_update", "issuer_id", "next_update"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    issuer_id: Mapped[int] = mapped_column(ForeignKey("ca_authorities.id"))
    # Zero-padded lowercase hex (40 digits), as certificates.serial.
    serial: Mapped[str] = mapped_column(String(42))
    der: Mapped[bytes] = mapped_column(LargeBinary)
    cert_status: Mapped[str] = mapped_column(String(16))  # good / revoked / unknown
    # The certificate's status_epoch the response reflects: an older answer never overwrites
    # a newer one (a refresh racing a revocation).
    status_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    this_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
