"""Indexes for work done per CA: its latest status changes, its answers due for re-signing

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
    # The OCSP re-sign after a revocation and the refresher's repair (status_epoch above a
    # mark, one CA) and delta CRLs (status_epoch above the base's): with one index per
    # column, they walked every revoked certificate of the CA.
    op.create_index("ix_certificates_issuer_epoch", "certificates", ["issuer_id", "status_epoch"])
    # The refresher's answers due (one CA, next_update up to a time, oldest first): through
    # (issuer_id, serial) it sorted every answer of the CA, every tick.
    op.create_index(
        "ix_ocsp_responses_issuer_next_update", "ocsp_responses", ["issuer_id", "next_update"]
    )


def downgrade() -> None:
    op.drop_index("ix_ocsp_responses_issuer_next_update", table_name="ocsp_responses")
    op.drop_index("ix_certificates_issuer_epoch", table_name="certificates")
