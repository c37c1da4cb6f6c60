"""ca_authorities.crl_this_update: the thisUpdate given out with crl_number

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 11:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

import sekisho.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ca_authorities", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("crl_this_update", sekisho.db.UTCDateTime(timezone=True), nullable=True)
        )
    # Existing CAs start from the thisUpdate of their newest CRL (same column type, so the
    # stored values compare as times on both stores): the next CRL is never earlier.
    op.execute(
        "UPDATE ca_authorities SET crl_this_update = "
        "(SELECT max(crls.this_update) FROM crls WHERE crls.issuer_id = ca_authorities.id)"
    )


def downgrade() -> None:
    # In place (ALTER TABLE ... DROP COLUMN, SQLite >= 3.35): rebuilding the table, batch
    # mode's default, fails on the foreign keys that point at ca_authorities.
    with op.batch_alter_table("ca_authorities", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("crl_this_update")
