"""PostgreSQL with two roles (security target 33): the schema owner migrates and grants, the
application's role may only read and add to the journal, and cannot lift its guard. A role
that lacks a grant, or could do more, stops a command that writes with a settings error."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text

from audit import retention
from ca.revocation import Reason
from sekisho import db as db_module
from sekisho.db import Database
from sekisho.errors import StoreError
from sekisho.services import open_deployment
from sekisho.settings import load_settings
from tests.audit.conftest import run_cli_process
from tests.ca.helpers import request_for
from tests.conftest import BASE_URL, TEST_ACTOR
from tests.support import pg

pytestmark = pytest.mark.postgres

# Trust authentication in the test cluster ignores passwords; they are in the URLs to show
# that no output ever quotes them.
OWNER_PASSWORD = "owner-pw-Xq7"
APP_PASSWORD = "app-pw-Zr4"
_NUMBERS = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class TwoRoles:
    cluster: pg.PgCluster
    owner: str
    app: str
    data_dir: Path
    database: str

    def url(self, role: str, password: str) -> str:
        return (
            f"postgresql+psycopg://{role}:{password}@127.0.0.1:{self.cluster.port}/{self.database}"
        )

    @property
    def owner_url(self) -> str:
        return self.url(self.owner, OWNER_PASSWORD)

    @property
    def app_url(self) -> str:
        return self.url(self.app, APP_PASSWORD)

    def write_settings(self, *, owner: bool = True, app_url: str | None = None) -> None:
        lines = [
            "[sekisho]",
            f'base_url = "{BASE_URL}"',
            f'database_url = "{app_url or self.app_url}"',
        ]
        if owner:
            lines.append(f'database_owner_url = "{self.owner_url}"')
        (self.data_dir / "sekisho.toml").write_text("\n".join(lines) + "\n")

    def connect(self, role: str) -> psycopg.Connection[Any]:
        """A plain driver connection as ``role`` (autocommit: each statement stands alone)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            user=role,
            dbname=self.database,
            autocommit=True,
            connect_timeout=10,
        )

    def sekisho(self, *args: str) -> tuple[int, str]:
        """The CLI as a child process: (exit code, stdout + stderr), which never holds a
        password."""
        done = run_cli_process(self.data_dir, *args)
        output = done.stdout + done.stderr
        assert OWNER_PASSWORD not in output and APP_PASSWORD not in output
        assert "Traceback" not in output
        return done.returncode, output


def _create_roles(cluster: pg.PgCluster, *names: str) -> None:
    for name in names:
        cluster.execute(f"CREATE ROLE {name} LOGIN")


def _drop_roles(cluster: pg.PgCluster, *names: str) -> None:
    for name in names:
        cluster.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture(scope="module")
def two_roles_template(
    pg_cluster: pg.PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoRoles]:
    """A deployment initialised with an owner role and an application role (roles and
    template database made once per module; ``two_roles`` copies it)."""
    suffix = f"{os.getpid()}"
    owner, app = f"tr_owner_{suffix}", f"tr_app_{suffix}"
    _create_roles(pg_cluster, owner, app)
    database = f"tr_template_{suffix}"
    pg_cluster.execute(f"CREATE DATABASE {database} OWNER {owner}")
    roles = TwoRoles(
        pg_cluster, owner, app, tmp_path_factory.mktemp("two-roles") / "data", database
    )
    roles.data_dir.mkdir(mode=0o700)
    roles.write_settings()
    try:
        code, output = roles.sekisho("init", "--org", "Example Corp")
        assert code == 0, output
        yield roles
    finally:
        pg_cluster.drop_database(database)
        _drop_roles(pg_cluster, app, owner)


@pytest.fixture
def two_roles(two_roles_template: TwoRoles, tmp_path: Path) -> Iterator[TwoRoles]:
    """A copy of the two-role deployment for one test."""
    cluster = two_roles_template.cluster
    database = f"tr_{os.getpid()}_{next(_NUMBERS)}"
    cluster.execute(
        f"CREATE DATABASE {database} TEMPLATE {two_roles_template.database} "
        f"OWNER {two_roles_template.owner}"
    )
    data_dir = tmp_path / "data"
    shutil.copytree(two_roles_template.data_dir, data_dir)
    roles = dataclasses.replace(two_roles_template, data_dir=data_dir, database=database)
    roles.write_settings()
    try:
        yield roles
    finally:
        cluster.drop_database(database)


def sqlstate(roles: TwoRoles, role: str, statement: str) -> str | None:
    """The SQLSTATE ``statement`` fails with, run as ``role`` (None: it succeeded)."""
    with roles.connect(role) as conn:
        try:
            conn.execute(statement.encode())
        except psycopg.Error as exc:
            return exc.sqlstate
    return None


# What the application's role may not do to the journal: change it, or lift its guard.
REFUSED = {
    "update-record": "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2",
    "delete-record": "DELETE FROM audit_records WHERE seq = 2",
    "truncate-records": "TRUNCATE audit_records",
    "update-checkpoint": "UPDATE audit_checkpoints SET key_ref = 'file:elsewhere' WHERE seq = 1",
    "delete-checkpoint": "DELETE FROM audit_checkpoints WHERE seq = 1",
    "truncate-checkpoints": "TRUNCATE audit_checkpoints",
    "upsert-record": "INSERT INTO audit_records SELECT * FROM audit_records WHERE seq = 2 "
    "ON CONFLICT (seq) DO UPDATE SET actor_account = 'mallory'",
    "delete-head": "DELETE FROM audit_head",
    "drop-trigger": "DROP TRIGGER audit_records_append_only ON audit_records",
    "drop-truncate-trigger": "DROP TRIGGER audit_checkpoints_no_truncate ON audit_checkpoints",
    "disable-trigger": "ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only",
    "disable-user-triggers": "ALTER TABLE audit_checkpoints DISABLE TRIGGER USER",
    "add-column": "ALTER TABLE audit_records ADD COLUMN note text",
    "rename-table": "ALTER TABLE audit_records RENAME TO audit_records_old",
    "drop-table": "DROP TABLE audit_checkpoints",
    "drop-function": "DROP FUNCTION sekisho_append_only() CASCADE",
    "replace-function": "CREATE OR REPLACE FUNCTION sekisho_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
}


def test_the_application_role_cannot_change_the_journal_or_lift_its_guard(
    two_roles: TwoRoles,
) -> None:
    """Each statement of REFUSED, run as the application's role on its own connection, fails
    for want of privilege; the journal verifies afterwards. (One test for all of them: each
    case was a test of its own, with its own database and `audit verify`, 2 s apiece.)"""
    refused = {case: sqlstate(two_roles, two_roles.app, stmt) for case, stmt in REFUSED.items()}
    assert refused == dict.fromkeys(REFUSED, db_module.PG_INSUFFICIENT_PRIVILEGE)
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0, output


def test_the_owner_is_held_by_the_guard_until_it_lifts_it(two_roles: TwoRoles) -> None:
    """The triggers apply to the owner as well (23001, not a privilege): an owner must lift
    the guard on purpose, and `audit verify` then catches the change."""
    change = "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2"
    assert sqlstate(two_roles, two_roles.owner, change) == "23001"
    assert sqlstate(two_roles, two_roles.owner, "TRUNCATE audit_checkpoints") == "23001"
    with two_roles.connect(two_roles.owner) as conn, conn.transaction():
        conn.execute("ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only")
        conn.execute(change.encode())
        conn.execute("ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only")
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 2 and "journal broken at seq 2" in output


def test_the_application_role_holds_only_what_it_is_granted(two_roles: TwoRoles) -> None:
    with two_roles.connect(two_roles.app) as conn:
        held = dict(
            conn.execute(
                "SELECT table_name, string_agg(privilege_type, ',' ORDER BY privilege_type) "
                "FROM information_schema.table_privileges WHERE grantee = current_user "
                "GROUP BY table_name"
            ).fetchall()
        )
        sequences = dict(
            conn.execute(
                "SELECT relname, has_sequence_privilege(oid, 'USAGE') "
                "FROM pg_class WHERE relkind = 'S'"
            ).fetchall()
        )
    assert held.pop("audit_records") == "INSERT,SELECT"
    assert held.pop("audit_checkpoints") == "INSERT,SELECT"
    assert held.pop("audit_purged") == "INSERT,SELECT"
    assert held.pop("audit_head") == "SELECT,UPDATE"
    assert held.pop("audit_schema_changes") == "DELETE,SELECT"  # written by the migrations
    assert held.pop("alembic_version") == "SELECT"
    assert held.pop("certificates") == "DELETE,INSERT,SELECT,UPDATE"
    assert set(held.values()) == {"DELETE,INSERT,SELECT,UPDATE"}
    # The serial columns' sequences (certificates.id, ...): USAGE for their inserts.
    assert sequences and all(sequences.values()), sequences


def test_issuance_and_revocation_run_as_the_application_role(two_roles: TwoRoles) -> None:
    settings = load_settings(env={}, overrides={"data_dir": two_roles.data_dir})
    services = open_deployment(settings)
    try:
        with services.db.read_scope() as session:
            assert session.execute(text("SELECT current_user")).scalar() == two_roles.app
        cert = services.ca.issue(request_for("device"), TEST_ACTOR)
        services.ca.issue(request_for("admin-client"), TEST_ACTOR)
        services.revoker.revoke("device", cert.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        services.crls.generate("device", services.clock())
    finally:
        services.close()
    with two_roles.connect(two_roles.owner) as conn:
        # No session of the owner's outlives the command: only an upgrade opens one.
        owners = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
            (two_roles.owner,),
        ).fetchone()
        assert owners == (0,)
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0 and "journal intact" in output, output


def test_a_purge_runs_as_the_owner_and_the_application_role_cannot_delete(
    two_roles: TwoRoles,
) -> None:
    """Three years on, the journal's old records may leave: through the owner's connection
    they do (tombstones in place, journal intact); the application's role may not delete them,
    and `audit purge` served without the owner's URL says so before it starts (exit 78)."""
    settings = load_settings(env={}, overrides={"data_dir": two_roles.data_dir})
    services = open_deployment(settings)
    later = services.clock() + dt.timedelta(days=3 * 365)
    try:
        with pytest.raises(StoreError):
            retention.purge(services.db, services.journal, later, 730, TEST_ACTOR)
        owner = Database(two_roles.owner_url)
        try:
            result = retention.purge(owner, services.journal, later, 730, TEST_ACTOR)
        finally:
            owner.engine.dispose()
        assert result.purged > 0
    finally:
        services.close()
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0 and "journal intact" in output, output
    code, output = two_roles.sekisho("audit", "purge")  # with the owner's URL: nothing is due
    assert code == 0 and "purged 0 of 0" in output, output
    two_roles.write_settings(owner=False)
    code, output = two_roles.sekisho("audit", "purge")
    assert code == 78 and "set database_owner_url" in output, output
    code, output = two_roles.sekisho("audit", "purge", "--dry-run")
    assert code == 0 and "would purge 0" in output, output


def test_temporary_tables_do_not_blind_the_journals_guard(two_roles: TwoRoles) -> None:
    """The guard's functions run as the invoker: they looked the journal's tables up on its
    search path, where pg_temp comes first, so the application's role made a temporary table
    of the same name and the guard looked at that (found by a review): a record written at a
    purged seq, or a tombstone for a record that is not there. Refused now as without one."""
    settings = load_settings(env={}, overrides={"data_dir": two_roles.data_dir})
    services = open_deployment(settings)
    later = services.clock() + dt.timedelta(days=3 * 365)
    try:
        owner = Database(two_roles.owner_url)
        try:
            assert retention.purge(owner, services.journal, later, 730, TEST_ACTOR).purged > 0
        finally:
            owner.engine.dispose()
    finally:
        services.close()
    with two_roles.connect(two_roles.owner) as conn:
        purged, head = conn.execute(
            "SELECT (SELECT min(seq) FROM audit_purged), (SELECT max(seq) FROM audit_records)"
        ).fetchone()
    purged, after = int(purged), int(head) + 1  # (numbers, written into the statements)
    record = (
        "INSERT INTO audit_records (seq, time, category, action, outcome, detail, hash) "  # noqa: S608
        f"VALUES ({purged}, '2020-01-01 00:00:00', 'system', 'x', 'success', '{{}}', 'h')"
    )
    tombstone = (
        "INSERT INTO audit_purged (seq, time, action, leaf_hash, hash, purge_seq) "  # noqa: S608
        f"VALUES ({after}, '2020-01-01 00:00:00', 'x', 'x', 'y', 1)"
    )
    planted = f"INSERT INTO audit_records VALUES ({after})"  # noqa: S608
    for statement, shadow in (
        (record, "CREATE TEMP TABLE audit_purged (seq bigint)"),
        (tombstone, f"CREATE TEMP TABLE audit_records (seq bigint); {planted}"),
    ):
        assert sqlstate(two_roles, two_roles.app, statement) == "23001", statement
        shadowed = f"{shadow}; {statement}"
        assert sqlstate(two_roles, two_roles.app, shadowed) == "23001", shadowed
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0 and "journal intact" in output, output


def test_a_command_that_writes_grants_again_what_is_missing_or_too_much(
    two_roles: TwoRoles,
) -> None:
    with two_roles.connect(two_roles.owner) as conn:
        conn.execute(f"REVOKE INSERT ON audit_records FROM {two_roles.app}".encode())
        conn.execute(f"GRANT UPDATE, TRUNCATE ON audit_checkpoints TO {two_roles.app}".encode())
    assert sqlstate(two_roles, two_roles.app, "TRUNCATE audit_checkpoints") == "23001"  # guard
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    assert sqlstate(two_roles, two_roles.app, "TRUNCATE audit_checkpoints") == "42501"
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0, output


def test_without_the_owner_url_a_missing_grant_is_a_settings_error(two_roles: TwoRoles) -> None:
    """The application role alone (a DBA granted it): a grant it lacks stops `init`, `serve`
    and every command that writes before they touch the store, with exit 78 and one line."""
    two_roles.write_settings(owner=False)
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output  # the grants the owner gave are enough
    with two_roles.connect(two_roles.owner) as conn:
        conn.execute(f"REVOKE INSERT ON audit_records FROM {two_roles.app}".encode())
    expected = (
        f"error: config: the database role '{two_roles.app}' lacks privileges Sekisho uses "
        "(audit_records: lacks INSERT): set database_owner_url"
    )
    for args in (("crl", "generate"), ("init",), ("serve", "--port", str(pg.free_port()))):
        code, output = two_roles.sekisho(*args)
        assert code == 78, (args, output)
        assert output.startswith(expected) and output.count("\n") == 1, (args, output)
    code, output = two_roles.sekisho("audit", "verify")  # a reader needs SELECT only
    assert code == 0, output


def test_without_the_owner_url_a_role_that_may_not_migrate_is_a_settings_error(
    two_roles: TwoRoles,
) -> None:
    from alembic import command

    engine = db_module.make_engine(two_roles.owner_url)
    try:
        command.downgrade(db_module.alembic_config(engine), "0006")
    finally:
        engine.dispose()
    two_roles.write_settings(owner=False)
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 78, output
    # (0007 creates a function: PostgreSQL 15 lets only the schema's owner create in public.)
    assert output.startswith(
        "error: config: the database role may not migrate the schema (permission denied for "
        "schema public): set database_owner_url to the schema owner's connection"
    )
    assert output.count("\n") == 1


def test_an_upgrade_grants_the_tables_it_adds(two_roles: TwoRoles, tmp_path: Path) -> None:
    """Back at 0003 (no blocked_keys table), a command that writes migrates through the owner
    and grants the table the migration made: blocking a key then works as the application."""
    from alembic import command

    engine = db_module.make_engine(two_roles.owner_url)
    try:
        command.downgrade(db_module.alembic_config(engine), "0003")
    finally:
        engine.dispose()
    assert sqlstate(two_roles, two_roles.app, "SELECT 1 FROM blocked_keys") == "42P01"
    key = tmp_path / "key.pem"
    key.write_bytes(
        request_for("device").public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    code, output = two_roles.sekisho("key", "block", str(key), "--comment", "test")
    assert code == 0, output
    assert sqlstate(two_roles, two_roles.app, "SELECT 1 FROM blocked_keys") is None
    assert sqlstate(two_roles, two_roles.app, "DELETE FROM audit_records") == "42501"
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0, output


@pytest.mark.parametrize("case", ["superuser", "same-role", "member-of-owner"])
def test_an_application_role_that_could_lift_the_guard_is_refused(
    two_roles: TwoRoles, case: str
) -> None:
    """With an owner URL, the application's role must be bound by what it is granted: a
    superuser, the owner itself, or a member of the owner's role could drop the triggers."""
    if case == "superuser":
        two_roles.write_settings(app_url=two_roles.url(pg.SUPERUSER, APP_PASSWORD))
        expected = "it is a superuser"
    elif case == "same-role":
        two_roles.write_settings(app_url=two_roles.url(two_roles.owner, APP_PASSWORD))
        expected = f"database_owner_url and database_url both connect as '{two_roles.owner}'"
    else:
        two_roles.cluster.execute(f"GRANT {two_roles.owner} TO {two_roles.app}")
        expected = "audit_records: may act as its owner"
    try:
        for args in (("crl", "generate"), ("serve", "--port", str(pg.free_port()))):
            code, output = two_roles.sekisho(*args)
            assert code == 78, (args, output)
            assert output.startswith("error: config: ") and expected in output, output
    finally:
        if case == "member-of-owner":
            two_roles.cluster.execute(f"REVOKE {two_roles.owner} FROM {two_roles.app}")


def test_a_deployment_of_one_role_moves_to_two(two_roles: TwoRoles) -> None:
    """One role owning and using the schema (the default) becomes two as docs/decisions.md
    says: the objects reassigned to a new owner, database_owner_url set; the next command that
    writes grants the application role its share."""
    with two_roles.connect(pg.SUPERUSER) as conn:
        conn.execute(f"REASSIGN OWNED BY {two_roles.owner} TO {two_roles.app}".encode())
    two_roles.write_settings(owner=False)
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    change = "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2"
    assert sqlstate(two_roles, two_roles.app, change) == "23001"  # the guard, which it owns
    with two_roles.connect(pg.SUPERUSER) as conn:
        conn.execute(f"REASSIGN OWNED BY {two_roles.app} TO {two_roles.owner}".encode())
    two_roles.write_settings()
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    assert sqlstate(two_roles, two_roles.app, change) == "42501"
    assert sqlstate(two_roles, two_roles.app, REFUSED["drop-trigger"]) == "42501"
    code, output = two_roles.sekisho("audit", "verify")
    assert code == 0, output


def test_backup_and_restore_with_two_roles(
    two_roles: TwoRoles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backed up as the application's role; restored into a new database as its owner, the
    application's role granted its share again and no more, the settings naming the new
    database; no password in the archive."""
    from sekisho.cli import main

    archive = tmp_path / "two-roles.tar"
    code, output = two_roles.sekisho("backup", "create", str(archive))
    assert code == 0, output
    blob = archive.read_bytes()
    assert OWNER_PASSWORD.encode() not in blob and APP_PASSWORD.encode() not in blob
    new_db = f"tr_restored_{os.getpid()}_{next(_NUMBERS)}"
    two_roles.cluster.execute(f"CREATE DATABASE {new_db} OWNER {two_roles.owner}")
    restored = dataclasses.replace(two_roles, data_dir=tmp_path / "restored", database=new_db)
    try:
        monkeypatch.setenv("SEKISHO_DATABASE_URL", restored.app_url)
        monkeypatch.setenv("SEKISHO_DATABASE_OWNER_URL", restored.owner_url)
        passphrase = two_roles.data_dir / "secrets" / "ca-passphrase"
        code = main(
            ["--data-dir", str(restored.data_dir), "backup", "restore", str(archive),
             "--unauthenticated", "--passphrase-file", str(passphrase)]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        assert OWNER_PASSWORD not in out + err and APP_PASSWORD not in out + err
        monkeypatch.delenv("SEKISHO_DATABASE_URL")
        monkeypatch.delenv("SEKISHO_DATABASE_OWNER_URL")
        settings = load_settings(env={}, overrides={"data_dir": restored.data_dir})
        assert (settings.database_url, settings.database_owner_url) == (
            restored.app_url,
            restored.owner_url,
        )
        # The application's role may not change the restored journal, and the tables are
        # the owner's.
        update = "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2"
        assert sqlstate(restored, restored.app, update) == "42501"
        code, output = restored.sekisho("audit", "verify")
        assert code == 0, output
        code, output = restored.sekisho("crl", "generate", "--ca", "admin")
        assert code == 0, output
    finally:
        two_roles.cluster.drop_database(new_db)


# Ways out of the table grants that own no table: each lets the application's role run SQL as
# the owner (an operator or function in a schema the owner's migrations and grants search),
# drop the journal (the schema's owner may drop any table in it), or become the owner.
ESCAPES = {
    "create-on-schema": (
        "owner",
        "GRANT CREATE ON SCHEMA public TO {app}",
        "REVOKE CREATE ON SCHEMA public FROM {app}",
        "schema public: may CREATE in it",
    ),
    "owns-the-database": (
        "superuser",
        "ALTER DATABASE {database} OWNER TO {app}",
        "ALTER DATABASE {database} OWNER TO {owner}",
        "schema public: may act as its owner",
    ),
    "create-on-database": (
        "superuser",
        "GRANT CREATE ON DATABASE {database} TO {app}",
        "REVOKE CREATE ON DATABASE {database} FROM {app}",
        ": may CREATE schemas in it",
    ),
    "createrole": (
        "superuser",
        "ALTER ROLE {app} CREATEROLE",
        "ALTER ROLE {app} NOCREATEROLE",
        "it has CREATEROLE",
    ),
    "member-of-a-superuser": (
        "superuser",
        "GRANT {super} TO {app}",
        "REVOKE {super} FROM {app}",
        "it may act as the role {super}, which has SUPERUSER",
    ),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_an_application_role_that_can_step_outside_its_grants_is_refused(
    two_roles: TwoRoles, case: str
) -> None:
    as_role, give, take_back, expected = ESCAPES[case]
    names = {
        "app": two_roles.app,
        "owner": two_roles.owner,
        "database": two_roles.database,
        "super": f"tr_admins_{os.getpid()}",
    }
    runner = two_roles.owner if as_role == "owner" else pg.SUPERUSER
    if case == "member-of-a-superuser":
        two_roles.cluster.execute(f"CREATE ROLE {names['super']} NOLOGIN SUPERUSER")
    try:
        with two_roles.connect(runner) as conn:
            conn.execute(give.format(**names).encode())
        try:
            code, output = two_roles.sekisho("crl", "generate")
            assert code == 78, output
            assert output.startswith("error: config: ") and expected.format(**names) in output
        finally:
            with two_roles.connect(runner) as conn:
                conn.execute(take_back.format(**names).encode())
        code, output = two_roles.sekisho("crl", "generate")
        assert code == 0, output
    finally:
        if case == "member-of-a-superuser":
            two_roles.cluster.execute(f"DROP ROLE {names['super']}")


def test_an_owner_url_whose_role_does_not_own_a_table_is_a_settings_error(
    two_roles: TwoRoles,
) -> None:
    """A table left with another owner (a move to two roles whose REASSIGN missed it): the
    grants fail on it, which is exit 78 naming the table, not an internal error (70)."""
    other = f"tr_other_{os.getpid()}"
    two_roles.cluster.execute(f"CREATE ROLE {other}")
    try:
        with two_roles.connect(pg.SUPERUSER) as conn:
            conn.execute(f"ALTER TABLE blocked_keys OWNER TO {other}".encode())
            conn.execute(f"GRANT ALL ON blocked_keys TO {two_roles.app}".encode())
        code, output = two_roles.sekisho("crl", "generate")
        assert code == 78, output
        assert output.startswith(
            "error: config: the role of database_owner_url may not grant what Sekisho uses "
            "(permission denied for table blocked_keys)"
        ), output
    finally:
        with two_roles.connect(pg.SUPERUSER) as conn:
            conn.execute(f"REASSIGN OWNED BY {other} TO {two_roles.owner}".encode())
            conn.execute(f"DROP OWNED BY {other}".encode())
        two_roles.cluster.execute(f"DROP ROLE {other}")


def test_a_column_privilege_on_the_journal_is_granted_away_too(two_roles: TwoRoles) -> None:
    """UPDATE on one column of the records is more than the grants: a command that writes
    grants again (REVOKE ALL takes the column's privilege with it), and PostgreSQL refuses the
    update before the trigger does."""
    change = "UPDATE audit_records SET actor_account = 'mallory' WHERE seq = 2"
    with two_roles.connect(two_roles.owner) as conn:
        conn.execute(f"GRANT UPDATE (actor_account) ON audit_records TO {two_roles.app}".encode())
    assert sqlstate(two_roles, two_roles.app, change) == "23001"  # only the guard held
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    assert sqlstate(two_roles, two_roles.app, change) == db_module.PG_INSUFFICIENT_PRIVILEGE


def test_the_owner_never_connects_while_the_application_role_may_plant_code(
    two_roles: TwoRoles,
) -> None:
    """An operator the application's role creates in public (given CREATE there) wins over
    pg_catalog's for `oid = regclass`, which the grants' sequence query uses: run by the
    owner, its function runs as the owner. `init` (which upgrades first) and a command that
    grants again must stop before the owner's session does."""
    marker = f"planted_{os.getpid()}"
    with two_roles.connect(two_roles.owner) as conn:
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {two_roles.app}".encode())
    try:
        with two_roles.connect(two_roles.app) as conn:
            conn.execute(
                f"""CREATE FUNCTION public.planted_eq(oid, regclass) RETURNS boolean
                LANGUAGE plpgsql AS $$ BEGIN
                    IF current_user = '{two_roles.owner}' THEN
                        EXECUTE 'CREATE TABLE IF NOT EXISTS public.{marker} (x int)';
                    END IF;
                    RETURN $1 = $2::oid;
                END $$""".encode()
            )
            conn.execute(
                b"CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, "
                b"FUNCTION = public.planted_eq)"
            )
        with two_roles.connect(two_roles.owner) as conn:
            conn.execute(f"REVOKE INSERT ON crls FROM {two_roles.app}".encode())  # regrant
        for args in (("init",), ("crl", "generate")):
            code, output = two_roles.sekisho(*args)
            assert code == 78 and "schema public: may CREATE in it" in output, (args, output)
        assert sqlstate(two_roles, pg.SUPERUSER, f"SELECT 1 FROM public.{marker}") == "42P01"  # noqa: S608
    finally:
        with two_roles.connect(pg.SUPERUSER) as conn:
            conn.execute(b"DROP OPERATOR IF EXISTS public.= (oid, regclass)")
            conn.execute(b"DROP FUNCTION IF EXISTS public.planted_eq(oid, regclass)")
            conn.execute(f"DROP TABLE IF EXISTS public.{marker}".encode())
            conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {two_roles.app}".encode())


def test_a_first_init_stops_while_the_application_role_may_plant_code(
    two_roles_template: TwoRoles, tmp_path: Path
) -> None:
    """On a new, empty database the tables' schema holds no table yet: the check also covers
    the owner's schema, into which the first migration would create them as the owner."""
    cluster = two_roles_template.cluster
    database = f"tr_fresh_{os.getpid()}_{next(_NUMBERS)}"
    cluster.execute(f"CREATE DATABASE {database} OWNER {two_roles_template.owner}")
    fresh = dataclasses.replace(two_roles_template, data_dir=tmp_path / "data", database=database)
    fresh.data_dir.mkdir(mode=0o700)
    fresh.write_settings()
    try:
        with fresh.connect(fresh.owner) as conn:
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {fresh.app}".encode())
        code, output = fresh.sekisho("init", "--org", "Example Corp")
        assert code == 78 and "schema public: may CREATE in it" in output, output
        assert sqlstate(fresh, pg.SUPERUSER, "SELECT 1 FROM audit_records") == "42P01"
        with fresh.connect(fresh.owner) as conn:
            conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {fresh.app}".encode())
        code, output = fresh.sekisho("init", "--org", "Example Corp")
        assert code == 0, output
    finally:
        cluster.drop_database(database)


def test_served_without_the_owner_url_a_role_given_more_is_still_refused(
    two_roles: TwoRoles,
) -> None:
    """docs/decisions.md advises serving without database_owner_url. A journal owned by a
    role the application's cannot act as says the deployment has two roles: what the
    application's role may do beyond its grants is refused then too (it served on before)."""
    two_roles.write_settings(owner=False)
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
    more = {
        "createrole": (
            f"ALTER ROLE {two_roles.app} CREATEROLE",
            f"ALTER ROLE {two_roles.app} NOCREATEROLE",
            "it has CREATEROLE",
        ),
        "create-in-public": (
            f"GRANT CREATE ON SCHEMA public TO {two_roles.app}",
            f"REVOKE CREATE ON SCHEMA public FROM {two_roles.app}",
            "schema public: may CREATE in it",
        ),
        "update-journal": (
            f"GRANT UPDATE ON audit_records TO {two_roles.app}",
            f"REVOKE UPDATE ON audit_records FROM {two_roles.app}",
            "audit_records: may also UPDATE",
        ),
    }
    for grant_more, take_back, said in more.values():
        with two_roles.connect(pg.SUPERUSER) as conn:
            conn.execute(grant_more.encode())
        try:
            code, output = two_roles.sekisho("crl", "generate")
            assert code == 78 and said in output, (grant_more, output)
        finally:
            with two_roles.connect(pg.SUPERUSER) as conn:
                conn.execute(take_back.encode())
    code, output = two_roles.sekisho("crl", "generate")
    assert code == 0, output
