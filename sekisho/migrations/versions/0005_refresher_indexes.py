"""Indexes for work done per CA: its latest status changes, its answers due for re-signing;
the single-column indexes they replace are dropped

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
    # No query reads these alone any more (issuer_id is the first column of two composite
    # indexes), and every issuance and OCSP write kept them up to date.
    op.drop_index("ix_certificates_status_epoch", table_name="certificates")
    op.drop_index("ix_certificates_issuer_id", table_name="certificates")
    op.drop_index("ix_ocsp_responses_next_update", table_name="ocsp_responses")


def downgrade() -> None:
    op.create_index("ix_ocsp_responses_next_update", "ocsp_responses", ["next_update"])
    op.create_index("ix_certificates_issuer_id", "certificates", ["issuer_id"])
    op.create_index("ix_certificates_status_epoch", "certificates", ["status_epoch"])
    op.drop_index("ix_ocsp_responses_issuer_next_update", table_name="ocsp_responses")
    op.drop_index("ix_certificates_issuer_epoch", table_name="certificates")
