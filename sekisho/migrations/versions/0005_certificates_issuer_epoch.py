"""certificates (issuer_id, status_epoch): what one revocation changed, found by index

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 19:00:00.000000
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The OCSP re-sign after a revocation (status_epoch >= the change's, one CA) and the delta
    # CRL (status_epoch > the base's, one CA) read a CA's latest changes: with one index per
    # column, both walked every revoked certificate of the CA.
    op.create_index("ix_certificates_issuer_epoch", "certificates", ["issuer_id", "status_epoch"])


def downgrade() -> None:
    op.drop_index("ix_certificates_issuer_epoch", table_name="certificates")
