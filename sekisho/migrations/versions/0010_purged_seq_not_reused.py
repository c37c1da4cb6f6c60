"""PostgreSQL: a purged seq cannot be written again (SQLite's insert guard refuses it since
0008): a record inserted at the seq of a tombstone would stand where the journal says nothing
is, and only ``audit verify`` found it. The guard functions look the journal's tables up in
their own schema only: run as the invoker, an unqualified name was looked up in ``pg_temp``
first, where the application's role could shadow a table with a temporary one (TEMP is
PUBLIC's by default) and make the guard look at that

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Written out here rather than imported: a migration stays what it was when it ran.
PG_FUNCTION = "sekisho_seq_not_purged"
# The guard functions of 0007 and 0008, which name the journal's tables unqualified too.
PG_EARLIER_FUNCTIONS = (
    "sekisho_append_only",
    "sekisho_purge_only",
    "sekisho_tombstone_for_a_record",
)
_PG_FUNCTION_SQL = """
CREATE FUNCTION sekisho_seq_not_purged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_purged WHERE seq = NEW.seq) THEN
        RAISE EXCEPTION 'audit_records is append-only: seq % was purged', NEW.seq
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return  # audit_records_no_replace of 0008 refuses it already
    op.execute(_PG_FUNCTION_SQL)
    op.execute(
        "CREATE TRIGGER audit_records_not_purged BEFORE INSERT ON audit_records "
        f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()"
    )
    # The schema the tables are in (the migration's own), then pg_temp, named last so that it
    # is searched last (unnamed, it is searched first).
    schema = op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one()
    path = '"{}", pg_temp'.format(str(schema).replace('"', '""'))
    for function in (PG_FUNCTION, *PG_EARLIER_FUNCTIONS):
        op.execute(f"ALTER FUNCTION {function}() SET search_path = {path}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute("DROP TRIGGER IF EXISTS audit_records_not_purged ON audit_records")
    op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
    for function in PG_EARLIER_FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() RESET search_path")
