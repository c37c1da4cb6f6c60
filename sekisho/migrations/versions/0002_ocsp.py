"""ocsp responders and pre-signed responses

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import sekisho.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ocsp_responders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("issuer_id", sa.Integer(), nullable=False),
        sa.Column(
            "certificate_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("serial", sa.String(length=42), nullable=False),
        sa.Column("key_ref", sa.Text(), nullable=False),
        sa.Column("key_type", sa.String(length=16), nullable=False),
        sa.Column("certificate_der", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("not_after", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deactivated_at", sekisho.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"]),
        sa.ForeignKeyConstraint(["issuer_id"], ["ca_authorities.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ocsp_responders", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ocsp_responders_issuer_id"), ["issuer_id"], unique=False
        )
    op.create_table(
        "ocsp_responses",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("issuer_id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=42), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("cert_status", sa.String(length=16), nullable=False),
        sa.Column("status_epoch", sa.BigInteger(), nullable=False),
        sa.Column("this_update", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("next_update", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["issuer_id"], ["ca_authorities.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("issuer_id", "serial", name="uq_ocsp_issuer_serial"),
    )
    with op.batch_alter_table("ocsp_responses", schema=None) as batch_op:
        batch_op.create_index("ix_ocsp_responses_updated_at", ["updated_at"], unique=False)
        batch_op.create_index("ix_ocsp_responses_next_update", ["next_update"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ocsp_responses", schema=None) as batch_op:
        batch_op.drop_index("ix_ocsp_responses_next_update")
        batch_op.drop_index("ix_ocsp_responses_updated_at")
    op.drop_table("ocsp_responses")
    with op.batch_alter_table("ocsp_responders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ocsp_responders_issuer_id"))
    op.drop_table("ocsp_responders")
