"""PostgreSQL roles: the schema's owner migrates, the application's role only uses the tables.

With ``database_owner_url`` set, ``Database.upgrade`` runs the migrations through the owner's
connection, so that the owner owns every table, trigger and function, and then ``grant`` gives
the application's role (the user of ``database_url``) what Sekisho uses and nothing more:

* SELECT, INSERT, UPDATE and DELETE on each table (``READ_WRITE``), unless its model names its
  own (``Table.info[APP_PRIVILEGES]``): the journal's records and checkpoints SELECT and INSERT
  only, its head SELECT and UPDATE, the migrations waiting to be journalled SELECT and DELETE;
  SELECT on ``alembic_version``;
* USAGE and SELECT on the sequences of the tables' serial columns, USAGE on the schema.

Whatever the role, or PUBLIC, held on those tables and sequences is revoked first, so that the
grants are the whole of it; they run again after every upgrade, so that a table a migration
adds is covered. Not owning the tables, the role can neither drop the journal's append-only
triggers nor alter or truncate a table, and PostgreSQL refuses its UPDATE and DELETE of the
journal (42501) before the triggers would.

``problems`` is what a command that writes checks before it uses the store: the role lacks a
privilege Sekisho uses (also without an owner URL: a role a DBA set up by hand), or, with an
owner URL, may do more than the grants (it owns a table or may act as its owner, is a
superuser, or holds privileges through another role or PUBLIC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, text

from sekisho.db import APP_PRIVILEGES, Base
from sekisho.errors import ConfigError, shown

READ_WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")
# The table privileges checked (PostgreSQL 17's MAINTAIN changes no row and is left alone).
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT")
ALEMBIC_VERSION = "alembic_version"
DOCS = "docs/decisions.md, Store"


def policy() -> dict[str, tuple[str, ...]]:
    """Table -> the privileges the application's role is granted on it."""
    import sekisho.models  # noqa: F401  (every package's tables on Base.metadata)

    granted = {
        name: tuple(table.info.get(APP_PRIVILEGES, READ_WRITE))
        for name, table in Base.metadata.tables.items()
    }
    granted[ALEMBIC_VERSION] = ("SELECT",)  # the application reads the schema's revision
    for privileges in granted.values():
        assert set(privileges) <= set(TABLE_PRIVILEGES), privileges
    return granted


@dataclasses.dataclass(frozen=True)
class Role:
    """The role a connection acts as, and where."""

    name: str
    database: str
    superuser: bool


def whoami(conn: Connection) -> Role:
    name, database, superuser = conn.execute(
        text(
            "SELECT current_user, current_database(), "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        )
    ).one()
    return Role(str(name), str(database), bool(superuser))


def check_pair(owner: Role, app: Role) -> None:
    """The two URLs must name one database and two roles (a ConfigError says which not)."""
    if owner.database != app.database:
        raise ConfigError(
            f"database_owner_url connects to the database {shown(owner.database)}, "
            f"database_url to {shown(app.database)}: they must name the same database"
        )
    if owner.name == app.name:
        raise ConfigError(
            f"database_owner_url and database_url both connect as {shown(app.name)}: the "
            "application needs a role of its own, which does not own the schema (or unset "
            f"database_owner_url to run with one role) ({DOCS})"
        )


# The sequences that belong to the tables (serial or identity columns), by schema and name.
_SEQUENCES = text(
    "SELECT n.nspname, s.relname, has_sequence_privilege(s.oid, 'USAGE'), "
    "has_sequence_privilege(s.oid, 'UPDATE') "
    "FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace "
    "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid "
    "AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') "
    "WHERE s.relkind = 'S' AND d.refobjid IN "
    "(SELECT to_regclass(t)::oid FROM unnest(CAST(:tables AS text[])) AS t) "
    "ORDER BY 1, 2"
)


def grant(conn: Connection, role: str) -> None:
    """As the schema's owner, in ``conn``'s transaction: ``role`` holds on Sekisho's tables and
    their sequences what the module docstring lists, and nothing else (run after migrating,
    under the migration lock: two sessions granting on one table at once can fail)."""
    import psycopg

    granted = policy()
    driver: Any = conn.connection.driver_connection  # psycopg: identifiers quoted by its sql
    try:
        _grant(conn, driver, role, granted)
    except psycopg.Error as exc:
        # Statements sent on the driver's connection: SQLAlchemy does not wrap their errors,
        # and unwrapped they were "internal: a bug in Sekisho" (exit 70).
        from sekisho.db import PG_INSUFFICIENT_PRIVILEGE, _pg_message, _store_error

        if exc.sqlstate == PG_INSUFFICIENT_PRIVILEGE:
            raise ConfigError(
                f"the role of database_owner_url may not grant what Sekisho uses "
                f"({_pg_message(exc)}): it must own every table of Sekisho's ({DOCS})"
            ) from None
        raise _store_error(exc, exc) from exc


def _grant(conn: Connection, driver: Any, role: str, granted: dict[str, tuple[str, ...]]) -> None:
    from psycopg import sql

    who = sql.Identifier(role)
    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    driver.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), who))
    for name, privileges in granted.items():
        table = sql.Identifier(name)
        driver.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM PUBLIC, {}").format(table, who))
        driver.execute(
            sql.SQL("GRANT {} ON TABLE {} TO {}").format(_privileges(privileges), table, who)
        )
    for namespace, relname, *_ in conn.execute(_SEQUENCES, {"tables": list(granted)}).all():
        sequence = sql.Identifier(namespace, relname)
        driver.execute(sql.SQL("REVOKE ALL ON SEQUENCE {} FROM PUBLIC, {}").format(sequence, who))
        driver.execute(
            sql.SQL("GRANT {} ON SEQUENCE {} TO {}").format(
                _privileges(SEQUENCE_PRIVILEGES), sequence, who
            )
        )


def _privileges(names: Iterable[str]) -> Any:
    from psycopg import sql

    return sql.SQL(", ").join(sql.SQL(name) for name in names)  # fixed keywords, never input


# Privileges PostgreSQL also grants on single columns: held on one column is held too much
# (``GRANT UPDATE (actor_account) ON audit_records`` passed a table-level check).
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")
_HELD = ", ".join(
    [f"has_table_privilege(c.oid, '{p}')" for p in TABLE_PRIVILEGES]
    + [f"has_any_column_privilege(c.oid, '{p}')" for p in COLUMN_PRIVILEGES]
)
# Per table: whether the role finds it (on its search_path), may act as its owner, and holds
# each privilege (directly, through another role, or through PUBLIC).
_TABLES = text(
    f"SELECT t.name, c.oid IS NOT NULL, pg_has_role(c.relowner, 'MEMBER'), {_HELD} "  # noqa: S608
    "FROM unnest(CAST(:tables AS text[])) AS t(name) "
    "LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)::oid"
)


# What lets a role step outside its table grants without owning a table (asked only with an
# owner URL): a role it may SET ROLE to that is a superuser or may grant itself membership in
# the owner (CREATEROLE: any non-superuser role before PostgreSQL 16); CREATE in, or ownership
# of, a schema holding Sekisho's tables (it could drop the journal as
# the schema's owner, or plant a function or operator that the owner's migrations and grants
# then run as the owner); CREATE on the database (a schema named like the owner comes first
# on the owner's search_path, "$user").
_ESCAPES = text(
    "SELECT CASE WHEN r.rolname = current_user THEN 'it has '"
    " ELSE 'it may act as the role ' || quote_ident(r.rolname) || ', which has ' END"
    " || CASE WHEN r.rolsuper THEN 'SUPERUSER' ELSE 'CREATEROLE' END"
    " FROM pg_catalog.pg_roles r"
    " WHERE (r.rolsuper OR r.rolcreaterole) AND pg_catalog.pg_has_role(r.oid, 'MEMBER')"
    " UNION ALL"
    " SELECT 'schema ' || quote_ident(n.nspname) || ': may '"
    " || CASE WHEN pg_catalog.pg_has_role(n.nspowner, 'MEMBER') THEN 'act as its owner'"
    " ELSE 'CREATE in it' END"
    " FROM pg_catalog.pg_namespace n"
    " WHERE (n.oid IN (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid IN"
    " (SELECT pg_catalog.to_regclass(t)::oid FROM pg_catalog.unnest(CAST(:tables AS text[])) t))"
    " OR n.nspname = ANY(CAST(:schemas AS text[])))"
    " AND (pg_catalog.pg_has_role(n.nspowner, 'MEMBER')"
    " OR pg_catalog.has_schema_privilege(n.oid, 'CREATE'))"
    " UNION ALL"
    " SELECT 'database ' || quote_ident(d.datname) || ': may '"
    " || CASE WHEN pg_catalog.pg_has_role(d.datdba, 'MEMBER') THEN 'act as its owner'"
    " ELSE 'CREATE schemas in it' END"
    " FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()"
    " AND (pg_catalog.pg_has_role(d.datdba, 'MEMBER')"
    " OR pg_catalog.has_database_privilege(d.oid, 'CREATE'))"
)


def escapes(conn: Connection, schemas: Iterable[str] = ()) -> list[str]:
    """How the role ``conn`` acts as could step outside its table grants (``_ESCAPES``; none:
    it cannot). No grant mends these, and the owner must not migrate or grant while one is
    open: a function or operator the role planted would run in the owner's session.
    ``schemas``: more schemas to judge than those holding Sekisho's tables (the owner's, into
    which a first migration creates them)."""
    params = {"tables": list(policy()), "schemas": list(schemas)}
    return [str(found) for found in conn.execute(_ESCAPES, params).scalars()]


def journal_owned_by_another(conn: Connection) -> bool:
    """``audit_records`` exists and belongs to a role that the role ``conn`` acts as cannot act
    as: two roles, whatever the settings say. (A role that may act as the owner, being it or
    a member of it, is one role by this reading, as a login role using a group role's tables
    is; only ``database_owner_url`` says two roles for sure.)"""
    return bool(
        conn.execute(
            text(
                "SELECT NOT pg_catalog.pg_has_role(c.relowner, 'MEMBER') "
                "FROM pg_catalog.pg_class c "
                "WHERE c.oid = pg_catalog.to_regclass('audit_records')"
            )
        ).scalar()
    )


def problems(conn: Connection, *, separate: bool, schemas: Iterable[str] = ()) -> list[str]:
    """What is wrong with the privileges of the role ``conn`` acts as, one phrase per table
    (none: nothing). A table the role does not find is skipped: a migration not yet run adds
    it (if ``alembic_version`` is not found either, there is no schema to check). ``separate``
    (an owner URL is set): more than ``policy`` grants is wrong too."""
    granted = policy()
    if separate and whoami(conn).superuser:
        return ["it is a superuser, whom no privilege binds"]
    found: list[str] = escapes(conn, schemas) if separate else []
    for name, exists, owns, *held in conn.execute(_TABLES, {"tables": list(granted)}).all():
        if not exists:
            continue
        on_table, on_a_column = held[: len(TABLE_PRIVILEGES)], held[len(TABLE_PRIVILEGES) :]
        holds = {p for p, yes in zip(TABLE_PRIVILEGES, on_table, strict=True) if yes}
        some = holds | {p for p, yes in zip(COLUMN_PRIVILEGES, on_a_column, strict=True) if yes}
        missing = [p for p in granted[name] if p not in holds]
        if missing:
            found.append(f"{name}: lacks {', '.join(missing)}")
        if not separate:
            continue
        if owns:
            found.append(f"{name}: may act as its owner")
        elif extra := [p for p in TABLE_PRIVILEGES if p in some and p not in granted[name]]:
            found.append(f"{name}: may also {', '.join(extra)}")
    for _namespace, relname, usage, update in conn.execute(
        _SEQUENCES, {"tables": list(granted)}
    ).all():
        if not usage:
            found.append(f"{relname}: lacks USAGE")
        elif separate and update:
            found.append(f"{relname}: may also UPDATE")
    return found


def refusal(role: str, found: list[str], *, separate: bool) -> ConfigError:
    """The settings error for ``problems`` found for ``role`` (the user of database_url)."""
    listed = "; ".join(found)
    if not separate:
        return ConfigError(
            f"the database role {shown(role)} lacks privileges Sekisho uses ({listed}): set "
            "database_owner_url to the schema owner's connection (upgrades then grant them), "
            f"or grant them as the owner ({DOCS})"
        )
    return ConfigError(
        f"the database role {shown(role)} of database_url must hold only what the schema "
        f"owner grants it ({listed}): give the application a role of its own, neither a "
        "superuser nor a member of the owner's role, with no other privileges on Sekisho's "
        "tables, no CREATEROLE, and neither owning nor allowed to CREATE in the database or "
        f"its schema ({DOCS})"
    )
