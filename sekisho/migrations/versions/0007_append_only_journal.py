"""The journal's records and checkpoints are append-only in the schema: triggers refuse UPDATE,
DELETE (and on PostgreSQL TRUNCATE), on SQLite also an INSERT over a stored row (REPLACE)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 09:00:00.000000
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Written out here rather than imported: a migration stays what it was when it ran.
TABLES = ("audit_records", "audit_checkpoints")
PG_FUNCTION = "sekisho_append_only"


def _sqlite_triggers(table: str) -> dict[str, str]:
    """name -> CREATE TRIGGER. RAISE(ABORT) fails the statement with SQLITE_CONSTRAINT_TRIGGER
    and undoes what it did. REPLACE (``INSERT OR REPLACE``) deletes the stored row without
    firing DELETE triggers (unless recursive_triggers is on), hence the insert trigger: a seq
    already stored cannot be written again. The application never writes one twice (appenders
    lock the head), so it costs one primary-key lookup per append and changes nothing else."""
    return {
        f"{table}_no_update": (
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END"
        ),
        f"{table}_no_delete": (
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END"
        ),
        f"{table}_no_replace": (
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE seq = NEW.seq) "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: seq already stored'); END"
        ),
    }


# SQLSTATE 23001 (restrict_violation): an integrity rule forbids the change, as SQLite reports
# its RAISE(ABORT) (SQLITE_CONSTRAINT_TRIGGER); not 42501, which the privileges of a separate
# application role give (docs/decisions.md, Journal).
_PG_FUNCTION_SQL = f"""
CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'the audit journal only grows (docs/decisions.md, Journal)';
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in TABLES:
            for statement in _sqlite_triggers(table).values():
                op.execute(statement)
        return
    op.execute(_PG_FUNCTION_SQL)
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in TABLES:
            for name in _sqlite_triggers(table):
                op.execute(f"DROP TRIGGER IF EXISTS {name}")
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
