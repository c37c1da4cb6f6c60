"""Checkpoints keep the Merkle tree's frontier (``audit_checkpoints.merkle_frontier``), so the
next checkpoint extends the tree with the records after it instead of re-reading the journal

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column added in place (ALTER TABLE ... ADD COLUMN on both stores), never
    # through batch mode: that copies and renames the table on SQLite and drops the
    # append-only triggers of 0007 with it. Adding a column updates no row, so those
    # triggers do not fire; rows written before keep NULL (no frontier: the next checkpoint
    # builds the tree from record 1).
    op.add_column(
        "audit_checkpoints", sa.Column("merkle_frontier", sa.LargeBinary(), nullable=True)
    )


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later), again without rebuilding the table.
    op.execute("ALTER TABLE audit_checkpoints DROP COLUMN merkle_frontier")
