"""At most one active OCSP responder per CA (a partial unique index); a store where a race
left two keeps the one that ends last

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 05:00:00.000000
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

import sekisho.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_RESPONDERS = sa.table(
    "ocsp_responders",
    sa.column("id", sa.Integer),
    sa.column("issuer_id", sa.Integer),
    sa.column("active", sa.Boolean),
    sa.column("not_after", sekisho.db.UTCDateTime(timezone=True)),
    sa.column("deactivated_at", sekisho.db.UTCDateTime(timezone=True)),
)


def upgrade() -> None:
    # Before the index: two active responders of one CA (the race it now prevents) both
    # signed. The one whose certificate ends last stays active, as the signer loader chose it.
    bind = op.get_bind()
    keep: dict[int, int] = {}
    extra: list[int] = []
    rows = bind.execute(
        sa.select(_RESPONDERS.c.id, _RESPONDERS.c.issuer_id)
        .where(_RESPONDERS.c.active.is_(True))
        .order_by(_RESPONDERS.c.issuer_id, _RESPONDERS.c.not_after.desc(), _RESPONDERS.c.id.desc())
    )
    for responder_id, issuer_id in rows:
        if issuer_id in keep:
            extra.append(responder_id)
        else:
            keep[issuer_id] = responder_id
    if extra:
        bind.execute(
            sa.update(_RESPONDERS)
            .where(_RESPONDERS.c.id.in_(extra))
            .values(active=False, deactivated_at=dt.datetime.now(dt.UTC))
        )
    op.create_index(
        "uq_ocsp_responders_active",
        "ocsp_responders",
        ["issuer_id"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )


def downgrade() -> None:
    op.drop_index("uq_ocsp_responders_active", table_name="ocsp_responders")
