"""The journal's append-only guard (migrations 0007, 0008 and 0010) lifted for a test that plays
the attacker.

The triggers refuse UPDATE and DELETE of journal records and checkpoints to the application's
role. Whoever owns the tables (PostgreSQL) or can write the database file (SQLite) can take
them away, change the journal, and put them back: that attacker is the one ``audit verify``
must catch, so the tampering tests change the journal inside ``guard_lifted``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, bindparam, text

JOURNAL_TABLES = ("audit_records", "audit_checkpoints", "audit_purged")
# The triggers of migrations 0007, 0008 and 0010, by name.
SQLITE_GUARD = tuple(
    f"{table}_{what}"
    for table in JOURNAL_TABLES
    for what in ("no_update", "no_delete", "no_replace")
)
PG_GUARD = (
    *(
        (table, f"{table}_{what}")
        for table in JOURNAL_TABLES
        for what in ("append_only", "no_truncate")
    ),
    ("audit_records", "audit_records_purge_only"),
    ("audit_purged", "audit_purged_for_a_record"),
    ("audit_records", "audit_records_not_purged"),
)


@contextlib.contextmanager
def guard_lifted(conn: Connection) -> Iterator[None]:
    """The guard's triggers gone for the statements run on ``conn`` in this block, and back
    before its transaction commits (SQLite: dropped and created again from their stored SQL;
    PostgreSQL: disabled and enabled, which only the tables' owner may do). A statement that
    fails leaves the transaction to roll back, the guard's removal with it."""
    if conn.dialect.name == "sqlite":
        stored = conn.execute(
            text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN :names"
            ).bindparams(bindparam("names", list(SQLITE_GUARD), expanding=True))
        ).all()
        assert sorted(name for name, _ in stored) == sorted(SQLITE_GUARD), stored
        for name, _ in stored:
            conn.exec_driver_sql(f"DROP TRIGGER {name}")
        yield
        for _, create in stored:
            conn.exec_driver_sql(create)
        return
    for table, trigger in PG_GUARD:
        conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
    yield
    for table, trigger in PG_GUARD:
        conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
