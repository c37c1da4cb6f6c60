"""certificates.spki_sha256 and blocked_keys: compromised keys are never certified again

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 16:40:00.000000
"""

import hashlib

import sqlalchemy as sa
from alembic import op
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import sekisho.db

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BATCH = 1000


def _spki_sha256(der: bytes) -> str | None:
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:  # a row the store should not hold: left for `sekisho cert show`
        return None
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("certificates", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("spki_sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "blocked_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("spki_sha256", sa.String(length=64), nullable=False),
        sa.Column("issuer_id", sa.Integer(), nullable=True),
        sa.Column("serial", sa.String(length=42), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("blocked_at", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["issuer_id"], ["ca_authorities.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("spki_sha256"),
    )
    # Existing certificates get their key's hash from their DER (reserved rows have none:
    # their key is unknown, as before), a batch at a time; then every key of a certificate
    # already revoked for keyCompromise is blocked.
    bind = op.get_bind()
    certs = sa.table(
        "certificates",
        sa.column("id", sa.Integer()),
        sa.column("der", sa.LargeBinary()),
        sa.column("spki_sha256", sa.String()),
    )
    last = 0
    while True:
        rows = bind.execute(
            sa.select(certs.c.id, certs.c.der)
            .where(certs.c.id > last, certs.c.der.is_not(None))
            .order_by(certs.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        last = int(rows[-1][0])
        values = [
            {"row_id": int(i), "hash": h} for i, der in rows if (h := _spki_sha256(bytes(der)))
        ]
        if values:
            bind.execute(
                certs.update()
                .where(certs.c.id == sa.bindparam("row_id"))
                .values(spki_sha256=sa.bindparam("hash")),
                values,
            )
    # The index after the backfill: built once, not updated row by row.
    with op.batch_alter_table("certificates", schema=None, recreate="never") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_certificates_spki_sha256"), ["spki_sha256"], unique=False
        )
    op.execute(
        "INSERT INTO blocked_keys (spki_sha256, comment, blocked_at) "
        "SELECT spki_sha256, 'a certificate revoked for keyCompromise before migration 0004', "
        "min(revoked_at) "
        "FROM certificates WHERE revocation_reason = 'key_compromise' "
        "AND spki_sha256 IS NOT NULL AND revoked_at IS NOT NULL GROUP BY spki_sha256"
    )


def downgrade() -> None:
    op.drop_table("blocked_keys")
    with op.batch_alter_table("certificates", schema=None, recreate="never") as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_spki_sha256"))
        batch_op.drop_column("spki_sha256")
