"""Backups of a deployment, and restoring one into a new data directory.

A backup is one tar archive: a consistent copy of the SQLite store (``VACUUM INTO`` inside one
read transaction: the service keeps running), the key files the copy refers to (still
encrypted under the key passphrase, which is never in the archive), the settings file, and the
audit public key. ``MANIFEST.json`` lists every member with its size and SHA-256, the journal
head and the CAs; ``MANIFEST.sig`` is its signature by the audit key. ``backup verify`` checks
an archive with no secret at all; ``backup restore`` checks it the same way, then checks every
CA key against its certificate under the passphrase before the new data directory appears.
Decisions and limits: docs/decisions.md, "Backup and restore".
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy import case, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from audit.chain import format_time
from audit.events import Category, Outcome, by_actor
from audit.journal import verify_signature
from audit.models import JournalHead
from ca.models import CertificateAuthority
from ca.registry import CA_NAME, bump_revocation_epoch
from hsm.secrets import read_secret
from hsm.software import PEM_LABEL, SoftwareBackend, pem_unwrap
from sekisho import __version__
from sekisho.context import Actor
from sekisho.db import Database, read_only_sqlite_uri, sqlite_file, store_errors
from sekisho.errors import (
    PATH_SHOWN,
    ConfigError,
    Conflict,
    InputError,
    KeyBackendError,
    MalformedInput,
    NotFound,
    OutputError,
    PolicyViolation,
    SekishoError,
    StoreError,
    WrongPassphrase,
    shown,
)
from sekisho.files import (
    FileRefused,
    NewFiles,
    open_regular,
    read_regular,
    replace_synced,
    sync_directory,
)
from sekisho.settings import CONFIG_NAME, ENV_PREFIX, MAX_SETTINGS_FILE, URL_SETTINGS, Settings

log = logging.getLogger("sekisho.backup")
FORMAT = "sekisho-backup/1"
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.sig"
AUDIT_KEY = "audit-public-key.pem"
DATABASE = "sekisho.db"
PG_DUMP = "sekisho.pgdump"  # pg_dump's custom format
_STORES = {"sqlite": DATABASE, "postgresql": PG_DUMP}
# pg_dump / pg_restore of a large store take minutes; a tool that hangs (a lock it waits for,
# a server gone) is stopped after this.
PG_TOOL_SECONDS = 6 * 3600.0
# CRLs the lost deployment signed after the backup are not in the copy; the restored one's
# next CRL must still carry a higher number than any of them (RFC 5280 5.2.3). A CA signs a
# few CRLs a minute at most: this lasts for centuries of them, and CRL numbers stay far below
# 2^63 (the column) and 2^159 (BR 7.2) after thousands of restores.
CRL_NUMBER_JUMP = 1 << 32
# ... and higher than any CRL an earlier restore of the same archive (or of an older one) has
# signed since: the jump alone gave a second restore of one archive the very numbers the
# first had used, on other CRLs. At least the restore's time in seconds times 2^30 (more than
# any CRL a CA signs in the seconds between two restores; below 2^63 until the year 2242).
CRL_NUMBER_TIME_SHIFT = 30
# The members an archive may hold: the first three in this order, then the others.
_HEADER = (MANIFEST, SIGNATURE, AUDIT_KEY)
_KEY_MEMBER = re.compile(r"keys/[a-z0-9][a-z0-9._-]{0,62}\.key")
_LIMITS = {
    MANIFEST: 1 << 20,
    SIGNATURE: 16 << 10,
    AUDIT_KEY: 64 << 10,
    CONFIG_NAME: MAX_SETTINGS_FILE,
}
MAX_KEY_FILE = 64 << 10
_CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}")
_HEAD_HASH = re.compile(r"(?:[0-9a-f]{64})?")  # empty: a journal with no record yet
MAX_MEMBERS = 10_000
SNAPSHOT_ATTEMPTS = 3
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class BackupDamaged(SekishoError):
    """The archive is not what its signed manifest says (or the manifest's signature does not
    verify): exit 2, as a broken audit chain."""

    code = "backup-damaged"
    http_status = 422
    exit_code = 2


def _limit(name: str) -> int | None:
    """The size a member of this name may have (None: the store copy, as large as it is);
    raises BackupDamaged for a name no backup holds."""
    if name in _LIMITS:
        return _LIMITS[name]
    if name in (DATABASE, PG_DUMP):
        return None
    if _KEY_MEMBER.fullmatch(name):
        return MAX_KEY_FILE
    raise BackupDamaged(f"the archive holds {shown(name)}, which no Sekisho backup holds")


# -- create -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Facts:
    """What the store copy says the backup must hold."""

    cas: list[dict[str, Any]]
    responder_refs: list[str]
    head_seq: int
    head_hash: str
    revisions: list[str]


def _snapshot(db_path: Path, into: Path) -> None:
    """A consistent copy of the live store (one read transaction; writers carry on)."""
    uri, _immutable = read_only_sqlite_uri(db_path)
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as conn:
            conn.execute("VACUUM INTO ?", (str(into),))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot copy the store {db_path}: {exc}") from None


def _read_facts(query: Callable[[str], Sequence[Any]]) -> _Facts:
    """The facts, read by ``query`` (SQL text -> rows) from the copy, or within the snapshot
    the copy is made of."""
    cas = [
        {"name": name, "key_ref": ref, "key_online": bool(online)}
        for name, ref, online in query(
            "SELECT name, key_ref, key_online FROM ca_authorities ORDER BY id"
        )
    ]
    responders = [r for (r,) in query("SELECT key_ref FROM ocsp_responders WHERE active")]
    head = query("SELECT seq, hash FROM audit_head WHERE id = 1")
    revisions = sorted(v for (v,) in query("SELECT version_num FROM alembic_version"))
    seq, digest = head[0] if head else (0, "")
    return _Facts(cas, responders, int(seq), str(digest), revisions)


def _read_only_uri(path: Path) -> str:
    """An SQLite URI opening ``path`` read-only: the path quoted, so that a ``#``, ``?`` or
    ``%`` in a directory name (the output's, $TMPDIR, the target's parent) neither cuts the
    path short (opening, and creating, another file read-write) nor drops ``mode=ro``."""
    return f"file:{quote(str(path))}?mode=ro"


def _copy_sqlite(db_path: Path, into: Path) -> _Facts:
    into.unlink(missing_ok=True)
    _snapshot(db_path, into)
    with contextlib.closing(sqlite3.connect(_read_only_uri(into), uri=True)) as conn:
        return _read_facts(lambda sql: conn.execute(sql).fetchall())


def pg_tool(name: str) -> str:
    """The path of a PostgreSQL client program (``pg_dump``, ``pg_restore``)."""
    found = shutil.which(name)
    if found is None:
        newest = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=_pg_version)
        found = str(newest[-1]) if newest else None
    if found is None:
        raise ConfigError(f"{name} is not installed: install PostgreSQL's client programs")
    return found


def _pg_version(path: Path) -> int:
    version = path.parent.parent.name
    return int(version) if version.isdigit() else 0


def _libpq_uri(url: str, env: dict[str, str]) -> str:
    """``url`` as a libpq URI without its password, which goes into ``env`` (PGPASSWORD)."""
    parsed = make_url(url)
    password = _password(parsed)
    if password is not None:
        env["PGPASSWORD"] = password
    return _without_password(parsed.set(drivername="postgresql")).render_as_string(
        hide_password=False
    )


def _password(parsed: URL) -> str | None:
    """The URL's password: in its authority, or a ``password`` query parameter (libpq reads
    that too; the last one if repeated)."""
    given = parsed.query.get("password")
    if given is not None:
        return given[-1] if isinstance(given, tuple) else given
    return None if parsed.password is None else str(parsed.password)


def _without_password(parsed: URL) -> URL:
    """``parsed`` without its password, nor a ``password`` query parameter (libpq reads one)
    (``URL.set(password=None)`` keeps it: None means "unchanged" there)."""
    return URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query={k: v for k, v in parsed.query.items() if k != "password"},
    )


def _settings_without_passwords(data: bytes) -> tuple[bytes, list[str]]:
    """The settings file as archived: database URLs without their passwords (an archive is
    copied off the box, and `backup verify` extracts it anywhere); the keys changed."""
    from sekisho.settings import with_setting

    text = data.decode("utf-8")
    doc = tomllib.loads(text)
    section = doc.get("sekisho", doc)
    removed = []
    for key in sorted(URL_SETTINGS):
        value = section.get(key)
        if isinstance(value, str) and _password(make_url(value)) is not None:
            bare = _without_password(make_url(value)).render_as_string(hide_password=False)
            text = with_setting(text, key, bare)
            removed.append(key)
    return text.encode("utf-8"), removed


def _run_pg_tool(args: list[str], url: str | None = None) -> str:
    """Run a PostgreSQL client program, on the database of ``url`` if given: the connection in
    libpq's own URI form without the password, which goes through the environment (never
    argv, where `ps` shows it). Its standard output; StoreError (exit 74) with its last error
    line."""
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "5")
    if url is not None:
        args = [*args, f"--dbname={_libpq_uri(url, env)}"]
    tool = Path(args[0]).name
    try:
        done = subprocess.run(
            args,
            env=env,
            capture_output=True,
            timeout=PG_TOOL_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StoreError(f"{tool} did not finish within {PG_TOOL_SECONDS:.0f} s") from None
    except OSError as exc:
        raise ConfigError(f"cannot run {tool}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"]
        raise StoreError(f"{tool} failed (exit {done.returncode}): {shown(lines[-1], 300)}")
    return done.stdout.decode("utf-8", "replace")


def _copy_postgres(services: Any, into: Path) -> _Facts:
    """pg_dump of the snapshot the facts are read in (exported to it: one view of the store)."""
    tool = pg_tool("pg_dump")
    into.unlink(missing_ok=True)
    with services.db.read_scope(snapshot=True) as session:
        conn = session.connection()
        snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
        facts = _read_facts(lambda sql: conn.exec_driver_sql(sql).all())
        _run_pg_tool(
            [
                tool,
                "--format=custom",
                "--no-owner",
                "--no-privileges",
                f"--snapshot={snapshot}",
                f"--file={into}",
            ],
            services.settings.db_url,
        )
    return facts


def _key_files(backend: Any, facts: _Facts, audit_ref: str) -> tuple[dict[str, bytes], list[str]]:
    """The key files the store copy refers to (software backend): member name -> content, and
    the CAs whose key the copy says is online but whose file is gone (taken offline meanwhile).
    A token's keys stay on the token: nothing to copy."""
    if not isinstance(backend, SoftwareBackend):
        return {}, []
    wanted = [(ca["key_ref"], ca["name"]) for ca in facts.cas if ca["key_online"]]
    wanted += [(ref, None) for ref in [*facts.responder_refs, audit_ref]]
    files: dict[str, bytes] = {}
    missing = []
    # Under the keys directory's lock, as `ca offline` removes a key: its removal overwrites
    # the file before unlinking it, and a file read in between was archived as the key
    # (random bytes: the archive verified, and no restore of it could open the key).
    with backend.exclusive():
        for ref, ca_name in wanted:
            path = backend.key_path(ref)
            try:
                data = read_regular(path, MAX_KEY_FILE, follow_symlinks=False)
                pem_unwrap(data, PEM_LABEL)
            except FileNotFoundError:
                if ca_name is not None:
                    missing.append(ca_name)
                continue
            except (FileRefused, OSError) as exc:
                raise KeyBackendError(f"cannot read key {ref}: {exc}") from None
            except KeyBackendError as exc:
                raise KeyBackendError(f"key file {ref} is damaged: {exc.message}") from None
            files[f"keys/{path.name}"] = data
    return files, missing


class _Hashing:
    """A write-only file object that hashes and counts what goes through it (tarfile asks
    ``tell``)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _add(tar: tarfile.TarFile, name: str, data: bytes | Path, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o600, mtime
    if isinstance(data, Path):
        info.size = data.stat().st_size
        with data.open("rb") as fh:
            tar.addfile(info, fh)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _quiet(_stage: str) -> None:
    pass


def create(
    services: Any,
    output: Path,
    actor: Actor,
    step: Callable[[str], None] = _quiet,
    config: Path | None = None,
) -> dict[str, Any]:
    """Write a backup of the deployment to the new file ``output`` (0600), signed by the audit
    key, and journal it (``ca.backup``); the result's summary. Nothing is left at ``output``
    when any step fails, the journal entry included. ``config``: the settings file in use
    (default: the data directory's), archived as the data directory's ``sekisho.toml``."""
    from sekisho.services import audit_key_ref

    settings: Settings = services.settings
    db_path = sqlite_file(settings.db_url)
    database = "sqlite" if db_path is not None else "postgresql"
    signer = services.journal.signer
    if signer is None:
        raise KeyBackendError("the audit key is unavailable: the backup could not be signed")
    now = services.clock()
    # What the journal holds unsigned goes into the copy signed.
    with services.db.scope() as session:
        services.journal.checkpoint(session, now)
    files = NewFiles([output])
    with files, tempfile.TemporaryDirectory(prefix=".sekisho-backup-", dir=output.parent) as tmp:
        copy = Path(tmp) / _STORES[database]
        for _attempt in range(SNAPSHOT_ATTEMPTS):
            step(f"copying the store ({database})")
            if db_path is not None:
                facts = _copy_sqlite(db_path, copy)
            else:
                facts = _copy_postgres(services, copy)
            keys, missing = _key_files(services.backend, facts, audit_key_ref(services.backend))
            if not missing:
                break
        else:
            raise Conflict(
                f"the key of CA {', '.join(missing)} left the keys directory while the backup "
                "was taken (`ca offline`?): try again"
            )
        audit_pem = serialization.load_der_public_key(signer.public_key_der).public_bytes(
            serialization.Encoding.PEM, _SPKI
        )
        members: dict[str, bytes | Path] = {AUDIT_KEY: audit_pem}
        config = config or settings.data_dir / CONFIG_NAME
        removed: list[str] = []
        try:
            members[CONFIG_NAME], removed = _settings_without_passwords(
                read_regular(config, MAX_SETTINGS_FILE)
            )
        except FileNotFoundError:
            pass  # all defaults, or settings from the environment
        except (FileRefused, OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the settings file {shown(config, PATH_SHOWN)}: {exc}"
            ) from None
        members.update(keys)
        members[copy.name] = copy
        included = {name.removeprefix("keys/") for name in keys}
        manifest = {
            "format": FORMAT,
            "created_at": format_time(now),
            "sekisho_version": __version__,
            "database": database,
            "schema_revisions": facts.revisions,
            "key_backend": services.backend.name,
            "journal_origin": services.journal.origin,
            "journal_head": {"seq": facts.head_seq, "hash": facts.head_hash},
            "audit_public_key_sha256": hashlib.sha256(signer.public_key_der).hexdigest(),
            "settings_passwords_removed": removed,
            "cas": [
                {
                    **ca,
                    "key_in_backup": isinstance(services.backend, SoftwareBackend)
                    and services.backend.key_path(ca["key_ref"]).name in included,
                }
                for ca in facts.cas
            ],
            "files": [
                {
                    "name": name,
                    "size": data.stat().st_size if isinstance(data, Path) else len(data),
                    "sha256": file_digest(data)
                    if isinstance(data, Path)
                    else hashlib.sha256(data).hexdigest(),
                }
                for name, data in members.items()
                if name != AUDIT_KEY
            ],
        }
        body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8") + b"\n"
        signature = signer.sign(body)
        mtime = int(now.timestamp())
        step(f"writing {shown(output, PATH_SHOWN)}")
        with files.open_binary(output) as fh:
            out = _Hashing(fh)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                _add(tar, MANIFEST, body, mtime)
                _add(tar, SIGNATURE, signature, mtime)
                for name, data in members.items():
                    _add(tar, name, data, mtime)
        summary = {
            "file": str(output),
            "sha256": out.sha256.hexdigest(),
            "size": out.size,
            "created_at": manifest["created_at"],
            "journal_head_seq": facts.head_seq,
            "cas": [ca["name"] for ca in facts.cas],
            "keys": sorted(included),
        }
        with services.db.scope() as session:
            services.journal.append(
                session,
                by_actor(actor, Category.CA, "ca.backup", Outcome.SUCCESS, detail=summary),
                services.clock(),
            )
    return summary


# -- read (verify, restore) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Extracted:
    directory: Path
    manifest: dict[str, Any]
    audit_key_der: bytes
    # The manifest's signature was checked with a key the caller gave (--public-key), not only
    # with the audit key the archive itself carries (integrity, not authenticity).
    key_given: bool


def _manifest(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise MalformedInput("not a Sekisho backup: its manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise MalformedInput(f"not a Sekisho backup of format {FORMAT} (format {shown(got)})")
    files = doc.get("files")
    head = doc.get("journal_head")
    if (
        not isinstance(files, list)
        or not all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str)
            for f in files
        )
        or not isinstance(head, dict)
        or type(head.get("seq")) is not int
        or not isinstance(head.get("hash"), str)
        or not all(isinstance(doc.get(k), str) for k in ("journal_origin", "created_at"))
        or not isinstance(doc.get("schema_revisions"), list)
        or not isinstance(doc.get("cas"), list)
        or doc.get("database") not in _STORES
        or not isinstance(doc.get("settings_passwords_removed", []), list)
    ):
        raise BackupDamaged("the manifest lacks a field every backup has")
    # What verify and restore print, and restore journals, comes from the manifest: a value
    # of another type was a traceback (exit 70, after a restore had finished), and text with
    # escape sequences reached the terminal ("checked with the given public key" forged).
    if (
        not _CREATED_AT.fullmatch(doc["created_at"])
        or not isinstance(doc.get("sekisho_version"), str)
        or not _VERSION.fullmatch(doc["sekisho_version"])
        or not _HEAD_HASH.fullmatch(head["hash"])
        or not all(
            isinstance(ca, dict)
            and isinstance(ca.get("name"), str)
            and CA_NAME.fullmatch(ca["name"]) is not None
            and isinstance(ca.get("key_online"), bool)
            for ca in doc["cas"]
        )
    ):
        raise BackupDamaged("the manifest holds a value no Sekisho backup writes")
    return doc


def _within(member: tarfile.TarInfo, limit: int | None) -> None:
    if limit is not None and member.size > limit:
        raise BackupDamaged(f"{shown(member.name)} is larger than a backup's ({member.size} bytes)")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    _within(member, limit)
    fh = tar.extractfile(member)
    assert fh is not None  # a regular file
    return fh.read(limit + 1)


def _copy_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path, expected: Mapping[str, Any]
) -> None:
    """Write the member under ``into`` (new file, 0600; its directory 0700), checking its size
    and SHA-256 against the manifest."""
    _within(member, _limit(member.name))
    if member.size != expected["size"]:
        raise BackupDamaged(f"{shown(member.name)} is not the size the manifest says")
    path = into / member.name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as fh:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(
            f"cannot write {shown(path, PATH_SHOWN)}: {exc.strerror or exc}"
        ) from None
    if digest.hexdigest() != expected["sha256"]:
        raise BackupDamaged(f"{shown(member.name)} does not match the manifest's SHA-256")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    seen: set[str] = set()
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise BackupDamaged(f"the archive holds more than {MAX_MEMBERS} members")
        # isreg() also takes sparse members, whose holes extraction fills with zeros: a few
        # KiB of archive that write any size the (self-)signed manifest names before the
        # digest fails. A backup never holds one, nor a contiguous file.
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
            raise BackupDamaged(f"{shown(member.name)} is not a regular file")
        if member.name in seen:
            raise BackupDamaged(f"{shown(member.name)} is in the archive twice")
        seen.add(member.name)
        yield member


def extract(
    archive: Path,
    into: Path,
    trusted_keys: Collection[bytes] = (),
    step: Callable[[str], None] = _quiet,
) -> Extracted:
    """Check ``archive`` and write its members under the existing empty directory ``into``.

    The manifest's signature must verify with one of ``trusted_keys`` (DER SPKI: the auditor's
    copy of the audit public key) or, with none given, with the audit key the archive carries
    (which shows the archive whole, not who made it). Every member must be one the manifest
    lists, of its size and SHA-256, and every one it lists must be there."""
    step(f"checking {shown(archive, PATH_SHOWN)}")
    seen_manifest: list[bool] = []
    try:
        with open_regular(archive) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            return _extract(tar, into, trusted_keys, seen_manifest)
    except tarfile.TarError as exc:
        if seen_manifest:  # a Sekisho backup, cut short or damaged after its manifest
            raise BackupDamaged(
                f"{shown(archive, PATH_SHOWN)} is damaged after its manifest (truncated?): {exc}"
            ) from None
        raise MalformedInput(f"{shown(archive, PATH_SHOWN)} is not a tar archive: {exc}") from None
    except FileRefused as exc:  # a FIFO or a device: refused unread, never waited on
        raise InputError(f"{shown(archive, PATH_SHOWN)} {exc}") from None
    except FileNotFoundError:
        raise NotFound(f"no such file: {shown(archive, PATH_SHOWN)}") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise InputError(f"cannot read {shown(archive, PATH_SHOWN)}: {exc.strerror}") from None


def _extract(
    tar: tarfile.TarFile, into: Path, trusted_keys: Collection[bytes], seen_manifest: list[bool]
) -> Extracted:
    members = _members(tar)
    header: dict[str, bytes] = {}
    manifest: dict[str, Any] | None = None
    for name in _HEADER:
        member = next(members, None)
        if member is None or member.name != name:
            got = "the end" if member is None else shown(member.name)
            if manifest is not None:  # a Sekisho manifest was read: damaged, not foreign
                raise BackupDamaged(f"the archive has {got} where {name} should be")
            raise MalformedInput(f"not a Sekisho backup: {got} where {name} should be")
        header[name] = _read_member(tar, member, _LIMITS[name])
        if name == MANIFEST:
            manifest = _manifest(header[MANIFEST])
            seen_manifest.append(True)
    assert manifest is not None
    try:
        key = serialization.load_pem_public_key(header[AUDIT_KEY])
    except (ValueError, UnsupportedAlgorithm):
        raise BackupDamaged(f"{AUDIT_KEY} is not a PEM public key") from None
    audit_der = key.public_bytes(serialization.Encoding.DER, _SPKI)
    if hashlib.sha256(audit_der).hexdigest() != manifest.get("audit_public_key_sha256"):
        raise BackupDamaged(f"{AUDIT_KEY} is not the audit key the manifest names")
    keys = list(trusted_keys) or [audit_der]
    if not any(verify_signature(k, header[SIGNATURE], header[MANIFEST]) for k in keys):
        whose = "the audit public key given" if trusted_keys else "the archive's own audit key"
        raise BackupDamaged(f"the manifest's signature does not verify with {whose}")
    expected = {f["name"]: f for f in manifest["files"]}
    for name in expected:
        _limit(name)  # a name no backup holds, even if listed and signed
    (into / AUDIT_KEY).write_bytes(header[AUDIT_KEY])
    for member in members:
        if member.name not in expected:
            raise BackupDamaged(f"{shown(member.name)} is not in the manifest")
        _copy_member(tar, member, into, expected[member.name])
    absent = sorted(n for n in expected if not (into / n).exists())
    if absent:
        raise BackupDamaged(f"the archive lacks {', '.join(absent)}, which the manifest lists")
    if _STORES[manifest["database"]] not in expected:
        raise BackupDamaged("the archive holds no store")
    return Extracted(into, manifest, audit_der, bool(trusted_keys))


def check_store(extracted: Extracted) -> dict[str, Any]:
    """The extracted store. An SQLite copy: SQLite's integrity check, then its journal
    (``_check_journal``). A PostgreSQL dump: pg_restore reads its table of contents; its
    journal is checked once restored (no server to load it into here). Raises
    BackupDamaged or AuditChainBroken (exit 2)."""
    if extracted.manifest["database"] == "postgresql":
        try:
            listing = _run_pg_tool(
                [pg_tool("pg_restore"), "--list", str(extracted.directory / PG_DUMP)]
            )
        except StoreError as exc:
            raise BackupDamaged(f"the PostgreSQL dump cannot be read: {exc.message}") from None
        if "TABLE DATA public audit_records" not in listing:
            raise BackupDamaged("the PostgreSQL dump holds no audit journal")
        return {"records": None, "checkpoints": None}
    path = extracted.directory / DATABASE
    try:
        with contextlib.closing(sqlite3.connect(_read_only_uri(path), uri=True)) as conn:
            result = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        raise BackupDamaged(f"the store in the archive cannot be read: {exc}") from None
    if result != [("ok",)]:
        raise BackupDamaged(
            f"the store in the archive fails SQLite's integrity check: {result[0][0]}"
        )
    return _check_journal(URL.create("sqlite", database=str(path)).render_as_string(), extracted)


def _check_journal(url: str, extracted: Extracted) -> dict[str, Any]:
    """The journal of the store at ``url``: hash chain and every checkpoint, against the
    audit key the manifest was checked with, up to the head the manifest names."""
    from audit.verify import verify

    db = Database(url, read_only=True)
    try:
        with db.read_scope(snapshot=True) as session:
            checked = verify(
                session,
                extracted.manifest["journal_origin"],
                trusted_keys=[extracted.audit_key_der],
                initialised=True,
            )
            head = session.get(JournalHead, 1)
    finally:
        db.dispose()
    named = extracted.manifest["journal_head"]
    if head is None or (head.seq, head.hash) != (named["seq"], named.get("hash")):
        raise BackupDamaged("the store's journal head is not the one the manifest names")
    return {"records": checked.records, "checkpoints": checked.checkpoints}


def verify_archive(
    archive: Path, trusted_keys: Collection[bytes] = (), step: Callable[[str], None] = _quiet
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=".sekisho-verify-") as tmp:
        extracted = extract(archive, Path(tmp), trusted_keys, step)
        step("checking the store and its journal")
        journal = check_store(extracted)
    return _summary(extracted, journal)


def _summary(extracted: Extracted, journal: Mapping[str, Any]) -> dict[str, Any]:
    manifest = extracted.manifest
    return {
        "ok": True,
        "created_at": manifest["created_at"],
        "sekisho_version": manifest.get("sekisho_version"),
        "signature_checked_with": "given public key"
        if extracted.key_given
        else "archive's own key",
        "audit_key_sha256": hashlib.sha256(extracted.audit_key_der).hexdigest(),
        "journal_records": journal["records"],
        "journal_checkpoints": journal["checkpoints"],
        "cas": manifest["cas"],
        "files": len(manifest["files"]),
    }


# -- restore ----------------------------------------------------------------------------------
def _empty_target(target: Path) -> bool:
    """Whether ``target`` exists (as an empty directory); anything else there is refused,
    before any work: a symbolic link (renaming the staging directory over it fails at the
    very end), a mount point (it cannot be removed and replaced, and the staging directory
    beside it is on another file system)."""
    if target.is_symlink():
        raise Conflict(
            f"{shown(target, PATH_SHOWN)} is a symbolic link: give the directory it points to"
        )
    if os.path.ismount(target):
        raise Conflict(
            f"{shown(target, PATH_SHOWN)} is a mount point: restore into a new directory on it "
            "(e.g. --data-dir <mount>/var)"
        )
    try:
        entries = os.listdir(target)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise Conflict(f"{shown(target, PATH_SHOWN)} exists and is not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot use {shown(target, PATH_SHOWN)}: {exc.strerror or exc}") from None
    if entries:
        raise Conflict(
            f"{shown(target, PATH_SHOWN)} is not empty: a backup is restored only into a new or "
            "empty data directory, never over a deployment"
        )
    return True


def _restore_passphrase_wrong(passphrase_file: Path | None) -> WrongPassphrase:
    """The keys did not open: named by what the operator gave, not by the staging directory's
    paths (gone once the restore fails)."""
    given = (
        f"the passphrase in {shown(passphrase_file, PATH_SHOWN)}"
        if passphrase_file is not None
        else "the key passphrase the restored settings name"
    )
    return WrongPassphrase(
        f"the archive's keys do not open with {given}: wrong passphrase, or a damaged key file"
    )


def _staging_settings(
    staging: Path, passphrase: bytes | None, manifest: Mapping[str, Any]
) -> Settings:
    from sekisho.settings import load_settings

    database = manifest["database"]
    if database == "sqlite":
        _drop_sqlite_url(staging / CONFIG_NAME)
    # The staging directory's settings file (the archive's), never one SEKISHO_CONFIG names:
    # that is not what the restored data directory holds (the CLI refuses a restore with it).
    env = {k: v for k, v in os.environ.items() if k != ENV_PREFIX + "CONFIG"}
    settings = load_settings(None, env=env, overrides={"data_dir": staging})
    if database == "sqlite" and sqlite_file(settings.db_url) != (staging / DATABASE).resolve():
        raise ConfigError(
            "database_url names another database (SEKISHO_DATABASE_URL, or a PostgreSQL URL in "
            "the restored settings): this backup restores an SQLite store into the data "
            "directory; unset SEKISHO_DATABASE_URL to restore"
        )
    if database == "postgresql":
        if sqlite_file(settings.db_url) is not None:
            raise ConfigError(
                "this backup holds a PostgreSQL store: set SEKISHO_DATABASE_URL to the new, "
                "empty database to restore it into"
            )
        removed = manifest.get("settings_passwords_removed", [])
        _record_database_urls(staging / CONFIG_NAME, settings, removed)
    default_source = not settings.key_passphrase_env and not settings.key_passphrase_file
    if settings.key_backend != "software" or not default_source:
        if passphrase is not None:
            source = (
                "keys on a PKCS#11 token"
                if settings.key_backend != "software"
                else "a passphrase source of their own"
            )
            raise InputError(f"--passphrase-file is not used: the restored settings name {source}")
        return settings
    if passphrase is None:
        raise InputError(
            "give the key passphrase with --passphrase-file FILE (the backup never holds it; "
            "it is copied into the new data directory, as `init` keeps it)"
        )
    secrets_dir = staging / "secrets"
    secrets_dir.mkdir(mode=0o700)
    fd = os.open(secrets_dir / "ca-passphrase", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(passphrase)
        fh.flush()
        os.fsync(fh.fileno())
    return settings


def _drop_sqlite_url(path: Path) -> None:
    """An SQLite backup's store is restored into the data directory, where the default
    ``database_url`` names it: a ``database_url`` in the restored settings file naming an
    SQLite database (the lost deployment's path, or the default spelled out) is dropped. The
    file is in the signed archive: refusing it (as before) left no way to restore such a
    backup at all. A file this cannot edit safely is a ConfigError."""
    if not path.exists():
        return
    try:
        text = path.read_text("utf-8")
        before = tomllib.loads(text)
    except (OSError, ValueError) as exc:  # (UnicodeDecodeError and TOMLDecodeError included)
        raise ConfigError(f"cannot read the restored settings file: {exc}") from None
    section = before.get("sekisho", before)
    url = section.get("database_url") if isinstance(section, dict) else None
    if not isinstance(url, str) or not url:
        return
    try:
        if make_url(url).get_backend_name() != "sqlite":
            return  # a PostgreSQL URL: load_settings' check below refuses it, as before
    except (ArgumentError, ValueError):  # not a URL: load_settings says so
        return
    kept = "".join(
        line
        for line in text.splitlines(keepends=True)
        if not re.match(r"\s*database_url\s*=", line)
    )
    try:
        after = tomllib.loads(kept)
    except tomllib.TOMLDecodeError:
        after = None
    wanted = {k: v for k, v in section.items() if k != "database_url"}
    if after is None or after.get("sekisho", after) != wanted:
        raise ConfigError(
            "the restored settings file names an SQLite database_url that cannot be dropped "
            "safely: extract the archive and edit it by hand"
        )
    log.warning(
        "database_url dropped from the restored settings: the store is the data directory's"
    )
    replace_synced(path, kept.encode("utf-8"))


def _record_database_urls(path: Path, settings: Settings, passwords_removed: list[str]) -> None:
    """The restored settings file names the database restored into (SEKISHO_DATABASE_URL and
    SEKISHO_DATABASE_OWNER_URL may name another than the lost one): without it, the new
    deployment would go back to the old database once the variables are gone. A URL's
    password is written only where the lost deployment's file held one (the archive does not:
    ``passwords_removed``). A file this cannot edit safely is a ConfigError."""
    from sekisho.settings import with_setting

    if not path.exists():
        return  # the URLs never were in the file: they still come from the environment
    text = path.read_text("utf-8")
    section = tomllib.loads(text)
    section = section.get("sekisho", section)
    for key in sorted(URL_SETTINGS):
        old, url = section.get(key), getattr(settings, key)
        if old is None or not url:
            continue  # from the environment, as before
        if key not in passwords_removed:
            # The lost deployment's password came from elsewhere (PGPASSWORD, ~/.pgpass), so
            # does the new one's.
            url = _without_password(make_url(url)).render_as_string(hide_password=False)
        if old != url:
            text = with_setting(text, key, url)
    if text != path.read_text("utf-8"):
        replace_synced(path, text.encode("utf-8"))


def _load_postgres(url: str, dump: Path) -> None:
    """pg_restore ``dump`` into the database of ``url``, which must hold nothing (in one
    transaction: a failure leaves it empty)."""
    db = Database(url)
    try:
        with store_errors(), db.engine.connect() as conn:
            objects = conn.exec_driver_sql(
                "SELECT (SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = 'public')"
                " + (SELECT count(*) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n"
                " ON n.oid = p.pronamespace WHERE n.nspname = 'public')"
            ).scalar_one()
    finally:
        db.dispose()
    if objects:
        raise Conflict(
            "the database to restore into is not empty: a backup is restored only into a new, "
            "empty database, never over a deployment"
        )
    _run_pg_tool(
        [
            pg_tool("pg_restore"),
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            str(dump),
        ],
        url,
    )


def _empty_postgres(url: str) -> None:
    """Take back what ``_load_postgres`` put into the (then empty) database: a later check
    failed. Best effort: a failure here is logged by the caller's error, not raised."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            tables = (
                conn.exec_driver_sql(
                    "SELECT quote_ident(tablename) FROM pg_catalog.pg_tables "
                    "WHERE schemaname = 'public'"
                )
                .scalars()
                .all()
            )
            if tables:
                conn.exec_driver_sql(
                    "DROP TABLE " + ", ".join(f"public.{t}" for t in tables) + " CASCADE"
                )
            functions = (
                conn.exec_driver_sql(
                    "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = 'public'"
                )
                .scalars()
                .all()
            )
            for function in functions:
                conn.exec_driver_sql(f"DROP FUNCTION {function} CASCADE")
    except (SekishoError, SQLAlchemyError):
        pass
    finally:
        db.dispose()


def _check_keys(services: Any, manifest: Mapping[str, Any]) -> None:
    """Every CA key the restored store says is online opens under the passphrase (or is on the
    token) and is the key of its CA's certificate; the audit key is the manifest's."""
    from sekisho.services import audit_key_ref

    with services.db.read_scope() as session:
        rows = list(session.scalars(select(CertificateAuthority)))
    for row in rows:
        if not row.key_online:
            continue
        want = x509.load_der_x509_certificate(row.certificate_der).public_key()
        got = services.backend.public_key(row.key_ref)
        if got.public_bytes(serialization.Encoding.DER, _SPKI) != want.public_bytes(
            serialization.Encoding.DER, _SPKI
        ):
            raise KeyBackendError(
                f"the key of CA {row.name} is not the key its certificate certifies"
            )
    signer = services.journal.signer
    if signer is None or hashlib.sha256(signer.public_key_der).hexdigest() != manifest.get(
        "audit_public_key_sha256"
    ):
        raise KeyBackendError(
            f"the audit key {audit_key_ref(services.backend)} is not the backup's"
        )


def _responders_without_key(services: Any) -> list[str]:
    """The CAs whose active OCSP responder has no key in the restored deployment (its file was
    already gone when the backup was made): their answers cannot be re-signed until the
    responder is replaced (`ocsp responders --rotate`)."""
    from ocsp.models import OcspResponder

    with services.db.read_scope() as session:
        rows = session.execute(
            select(CertificateAuthority.name, OcspResponder.key_ref)
            .join(OcspResponder, OcspResponder.issuer_id == CertificateAuthority.id)
            .where(OcspResponder.active)
            .order_by(CertificateAuthority.id)
        ).all()
    return [name for name, ref in rows if not services.backend.has_key(ref)]


def restore(
    archive: Path,
    target: Path,
    actor: Actor,
    *,
    passphrase_file: Path | None = None,
    trusted_keys: Collection[bytes] = (),
    now: dt.datetime | None = None,
    step: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """Restore ``archive`` as the deployment in ``target`` (absent or an empty directory).

    Everything happens in a staging directory beside it, renamed to ``target`` only once the
    archive, the store, the journal and every CA key have been checked, each CA's CRL number
    moved on (CRL_NUMBER_JUMP, CRL_NUMBER_TIME_SHIFT), fresh CRLs signed where the key is
    online and the restore journalled (``ca.restore``) and signed: a failure leaves nothing at
    ``target`` (nor in a PostgreSQL database it loaded)."""
    from sekisho.bootstrap import publish_ca_files
    from sekisho.services import open_deployment

    target = Path(os.path.abspath(target))  # "." has no name to stage beside
    existed = _empty_target(target)
    # Checked before anything else (owner-only, long enough: as `init` would take it), not
    # after minutes of extracting and checking a large store.
    passphrase = read_secret(passphrase_file) if passphrase_file is not None else None
    staging = target.parent / f".{target.name}.restoring-{secrets.token_hex(4)}"
    # A restore killed outright (SIGKILL, a power loss) cannot clean up: its staging directory
    # holds the key files and the copied passphrase. Named, for the operator to remove (not
    # removed here: another restore into the same target may be running).
    with contextlib.suppress(OSError):
        left = sorted(target.parent.glob(f".{glob.escape(target.name)}.restoring-*"))
        if left:
            log.warning(
                "staging directories of an interrupted restore are left beside the target "
                "(they hold key files and the passphrase): remove them once no restore runs",
                extra={"paths": [str(p) for p in left]},
            )
    # The directories this makes above the target, removed again on failure (deepest first).
    made = [p for p in target.parents if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(
            f"cannot write in {shown(target.parent, PATH_SHOWN)}: {exc.strerror or exc}"
        ) from None
    loaded: str | None = None  # the PostgreSQL database restored into
    try:
        extracted = extract(archive, staging, trusted_keys, step)
        database = extracted.manifest["database"]
        step("checking the store and its journal")
        journal = check_store(extracted)
        (staging / AUDIT_KEY).unlink()  # (`audit public-key` writes it when wanted)
        settings = _staging_settings(staging, passphrase, extracted.manifest)
        if database == "postgresql":
            step("loading the store into PostgreSQL")
            # As the schema owner when there is one: the application's role then gets only its
            # grants (``open_deployment`` below grants them), as on any upgrade.
            owner = settings.database_owner_url or settings.db_url
            _load_postgres(owner, staging / PG_DUMP)
            loaded = owner
            (staging / PG_DUMP).unlink()
            journal = _check_journal(owner, extracted)
        try:
            services = open_deployment(settings)  # migrates a store of an older version
        except WrongPassphrase:
            raise _restore_passphrase_wrong(passphrase_file) from None
        try:
            step("checking the CA keys")
            try:
                _check_keys(services, extracted.manifest)
            except WrongPassphrase:
                raise _restore_passphrase_wrong(passphrase_file) from None
            when = now or services.clock()
            floor = int(when.timestamp()) << CRL_NUMBER_TIME_SHIFT
            jumped = CertificateAuthority.crl_number + CRL_NUMBER_JUMP
            with services.db.scope() as session:
                session.execute(
                    update(CertificateAuthority).values(
                        crl_number=case((jumped > floor, jumped), else_=floor)
                    )
                )
                services.journal.append(
                    session,
                    by_actor(
                        actor,
                        Category.CA,
                        "ca.restore",
                        Outcome.SUCCESS,
                        detail={
                            "backup_created_at": extracted.manifest["created_at"],
                            "backup_journal_head": {
                                "seq": extracted.manifest["journal_head"]["seq"],
                                "hash": extracted.manifest["journal_head"]["hash"],
                            },
                            "crl_number_jump": CRL_NUMBER_JUMP,
                        },
                    ),
                    when,
                )
            step("signing fresh CRLs")
            published, waiting, refused = _fresh_crls(services, when)
            keyless = _responders_without_key(services)
            with services.db.scope() as session:
                services.journal.checkpoint(session, when)
            publish_ca_files(services)
        finally:
            services.close()
        try:
            # The names made in the staging directory on disk before it takes the target's
            # name (the files themselves were synced as written; SQLite syncs its own).
            for directory in (staging / "keys", staging / "secrets", staging / "public"):
                if directory.is_dir():
                    sync_directory(directory)
            sync_directory(staging)
            if existed:
                target.rmdir()
            os.rename(staging, target)
            sync_directory(target.parent)
        except OSError as exc:
            raise Conflict(
                f"cannot put the restored deployment at {shown(target, PATH_SHOWN)} "
                f"(changed meanwhile?): {exc.strerror or exc}"
            ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty
        if loaded is not None:
            _empty_postgres(loaded)
        raise
    return {
        **_summary(extracted, journal),
        "data_dir": str(target),
        "crls_signed": published,
        "crls_waiting": waiting,
        "crls_refused": refused,
        "responders_without_key": keyless,
    }


def _fresh_crls(services: Any, now: dt.datetime) -> tuple[list[str], list[str], list[str]]:
    """A full CRL (and its delta) for each CA that can sign one now, carrying the moved-on
    numbers: relying parties holding a newer CRL of the lost deployment than the copy's get
    one that supersedes it at once, not at the refresher's next half-validity. The CAs whose
    key is offline (or whose certificate ends within the hour) are returned apart, and so are
    those whose CRL the lint gate refused (the restore is whole without them: the refresher
    tries again and /healthz names them)."""
    published, waiting, refused = [], [], []
    with services.db.read_scope() as session:
        rows = session.execute(
            select(
                CertificateAuthority.id, CertificateAuthority.name, CertificateAuthority.key_online
            )
            .where(CertificateAuthority.active)
            .order_by(CertificateAuthority.id)
        ).all()
    for ca_id, name, online in rows:
        if not online:
            waiting.append(name)
            continue
        try:
            services.crls.generate(name, now)
            if services.crls.deltas:
                services.crls.generate(name, now, delta=True)
        except Conflict:
            waiting.append(name)
            continue
        except PolicyViolation as exc:
            log.error("CRL of a CA not published", extra={"ca": name, "code": exc.code,
                                                          "detail": exc.message})  # fmt: skip
            # The backup's CRL would otherwise stand until half its validity, nothing due: its
            # revocation state moved on by one (as a failed issuance does), so the refresher
            # finds it behind, tries again, and /healthz names the CA failing.
            with services.db.scope() as session:
                bump_revocation_epoch(session, ca_id)
            refused.append(name)
            continue
        published.append(name)
    return published, waiting, refused
