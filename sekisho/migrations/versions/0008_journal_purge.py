"""Journal records may leave once their retention ends, and only so: ``audit_purged`` keeps
each removed record's place (seq, time, leaf and chain hash, the purge that removed it), and
the DELETE guard of 0007 now lets a record go only when its tombstone is stored

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import sekisho.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Written out here rather than imported: a migration stays what it was when it ran.
PG_FUNCTION = "sekisho_append_only"  # of 0007: refuses whatever fires it
PG_PURGE_FUNCTION = "sekisho_purge_only"

# SQLite: the record guards of 0007 (same names, so they are found and replaced as one set),
# now letting a DELETE through when the record's tombstone is stored, and refusing an INSERT
# of a seq that was purged (written again, it would stand where the tombstone says nothing is).
_SQLITE_RECORDS = {
    "audit_records_no_delete": (
        "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records "
        "WHEN NOT EXISTS (SELECT 1 FROM audit_purged WHERE seq = OLD.seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: DELETE refused (a record "
        "leaves only through audit purge, with its tombstone)'); END"
    ),
    "audit_records_no_replace": (
        "CREATE TRIGGER audit_records_no_replace BEFORE INSERT ON audit_records "
        "WHEN EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq) "
        "OR EXISTS (SELECT 1 FROM audit_purged WHERE seq = NEW.seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: seq already stored'); END"
    ),
}
_SQLITE_RECORDS_BEFORE = {
    "audit_records_no_delete": (
        "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records "
        "BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: DELETE refused'); END"
    ),
    "audit_records_no_replace": (
        "CREATE TRIGGER audit_records_no_replace BEFORE INSERT ON audit_records "
        "WHEN EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: seq already stored'); END"
    ),
}
# The tombstones are append-only, as the records were in 0007; one is written only for a
# record still stored (the purge writes it, then deletes the record, in one transaction).
_SQLITE_PURGED = {
    "audit_purged_no_update": (
        "CREATE TRIGGER audit_purged_no_update BEFORE UPDATE ON audit_purged "
        "BEGIN SELECT RAISE(ABORT, 'audit_purged is append-only: UPDATE refused'); END"
    ),
    "audit_purged_no_delete": (
        "CREATE TRIGGER audit_purged_no_delete BEFORE DELETE ON audit_purged "
        "BEGIN SELECT RAISE(ABORT, 'audit_purged is append-only: DELETE refused'); END"
    ),
    "audit_purged_no_replace": (
        "CREATE TRIGGER audit_purged_no_replace BEFORE INSERT ON audit_purged "
        "WHEN EXISTS (SELECT 1 FROM audit_purged WHERE seq = NEW.seq) "
        "OR NOT EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_purged: a tombstone is written once, for a stored "
        "record'); END"
    ),
}

# PostgreSQL: DELETE of a record passes when its tombstone is stored (SQLSTATE 23001 else, as
# 0007's guard); UPDATE and TRUNCATE stay refused by 0007's function.
_PG_PURGE_FUNCTION_SQL = """
CREATE FUNCTION sekisho_purge_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_purged WHERE seq = OLD.seq) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'a record leaves only through audit purge, with its tombstone';
END
$$
"""

# PostgreSQL: a tombstone only for a record still stored (the purge writes it first).
PG_TOMBSTONE_FUNCTION = "sekisho_tombstone_for_a_record"
_PG_TOMBSTONE_FUNCTION_SQL = """
CREATE FUNCTION sekisho_tombstone_for_a_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_purged: a tombstone is written once, for a stored record'
        USING ERRCODE = 'restrict_violation';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "audit_purged",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("time", sekisho.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_serial", sa.String(42), nullable=True),
        sa.Column("leaf_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("purge_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index(op.f("ix_audit_purged_purge_seq"), "audit_purged", ["purge_seq"])
    op.create_index(op.f("ix_audit_purged_object_serial"), "audit_purged", ["object_serial"])
    if op.get_bind().dialect.name == "sqlite":
        for name, create in [*_SQLITE_RECORDS.items(), *_SQLITE_PURGED.items()]:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
            op.execute(create)
        return
    op.execute(_PG_PURGE_FUNCTION_SQL)
    op.execute(_PG_TOMBSTONE_FUNCTION_SQL)
    # 0007's one trigger for UPDATE OR DELETE becomes two: UPDATE still refused outright.
    op.execute("DROP TRIGGER audit_records_append_only ON audit_records")
    op.execute(
        "CREATE TRIGGER audit_records_append_only BEFORE UPDATE ON audit_records "
        f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
    )
    op.execute(
        "CREATE TRIGGER audit_records_purge_only BEFORE DELETE ON audit_records "
        f"FOR EACH ROW EXECUTE FUNCTION {PG_PURGE_FUNCTION}()"
    )
    op.execute(
        "CREATE TRIGGER audit_purged_append_only BEFORE UPDATE OR DELETE ON audit_purged "
        f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
    )
    op.execute(
        "CREATE TRIGGER audit_purged_no_truncate BEFORE TRUNCATE ON audit_purged "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()"
    )
    op.execute(
        "CREATE TRIGGER audit_purged_for_a_record BEFORE INSERT ON audit_purged "
        f"FOR EACH ROW EXECUTE FUNCTION {PG_TOMBSTONE_FUNCTION}()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in _SQLITE_PURGED:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for name, create in _SQLITE_RECORDS_BEFORE.items():
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
            op.execute(create)
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_purged_for_a_record ON audit_purged")
        op.execute("DROP TRIGGER IF EXISTS audit_purged_no_truncate ON audit_purged")
        op.execute("DROP TRIGGER IF EXISTS audit_purged_append_only ON audit_purged")
        op.execute("DROP TRIGGER IF EXISTS audit_records_purge_only ON audit_records")
        op.execute("DROP TRIGGER IF EXISTS audit_records_append_only ON audit_records")
        op.execute(
            "CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records "
            f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
        )
        op.execute(f"DROP FUNCTION IF EXISTS {PG_PURGE_FUNCTION}()")
        op.execute(f"DROP FUNCTION IF EXISTS {PG_TOMBSTONE_FUNCTION}()")
    op.drop_index(op.f("ix_audit_purged_object_serial"), table_name="audit_purged")
    op.drop_index(op.f("ix_audit_purged_purge_seq"), table_name="audit_purged")
    op.drop_table("audit_purged")
