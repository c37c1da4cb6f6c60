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


def downgrade() -> None:
    with op.batch_alter_table("ca_authorities", schema=None) as batch_op:
        batch_op.drop_column("crl_this_update")
