"""PostgreSQL: CRLs are stored with lz4 compression where the server has it. A full CRL of 10^6
entries is 50 MB of DER; the default (pglz) compressed it to about the same size as lz4 does,
in twice the time (1.0-1.1 s against 0.43-0.48 s on this machine), paid at every build and
every read. Values stored before keep their compression until rewritten. SQLite: nothing

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _lz4_available() -> bool:
    """PostgreSQL 14 or later, built with lz4 (``default_toast_compression`` offers it)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    offered = bind.execute(
        sa.text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        )
    ).scalar()
    return bool(offered)


def upgrade() -> None:
    if _lz4_available():
        op.execute("ALTER TABLE crls ALTER COLUMN der SET COMPRESSION lz4")


def downgrade() -> None:
    if _lz4_available():
        op.execute("ALTER TABLE crls ALTER COLUMN der SET COMPRESSION DEFAULT")
