"""``audit_schema_changes``: a migration waits there, written in its own transaction, until a
process that writes journals it (``system.migrate``) and deletes it; before, a process that
migrated the store and then failed (a wrong key passphrase) left the migration unrecorded

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 11:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import sekisho.db

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_schema_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("before", sa.String(256), nullable=False),
        sa.Column("after", sa.String(256), nullable=False),
        sa.Column("process", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("audit_schema_changes")
