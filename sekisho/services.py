"""Composition root: builds every service once from settings and hands them out.

The CLI, the web app and the background workers all get their collaborators from here;
nothing else constructs a database, a key backend or a journal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from audit.chain import parse_checkpoint_body
from audit.events import Category, Event, Outcome
from audit.journal import CheckpointSigner, Journal
from audit.models import Checkpoint, JournalRecord, SchemaChange
from ca.crl import CrlPublisher
from ca.issuance import CaService
from ca.lint import Linter
from ca.models import CaKind, CertificateAuthority
from ca.profiles import ProfileSet, load_profiles
from ca.registry import CaRegistry, Urls
from ca.revocation import Revoker
from hsm.base import KeyBackend, KeyType
from hsm.secrets import create_secret_file, read_secret
from hsm.software import SoftwareBackend
from ocsp.signers import on_revocation as responder_revoked
from ocsp.store import OcspService
from sekisho.clock import utcnow
from sekisho.db import Database, head_revisions, schema_problem, sqlite_file
from sekisho.errors import (
    PATH_SHOWN,
    ConfigError,
    KeyBackendError,
    NotFound,
    SecretUnavailable,
    SekishoError,
    StoreError,
    shown,
)
from sekisho.settings import Settings

log = logging.getLogger("sekisho")
AUDIT_KEY_LABEL = "audit"
AUDIT_KEY_TYPE = KeyType.EC_P256


@dataclasses.dataclass
class Services:
    settings: Settings
    db: Database
    backend: KeyBackend
    journal: Journal
    registry: CaRegistry
    profiles: ProfileSet
    ca: CaService
    revoker: Revoker
    crls: CrlPublisher
    clock: Callable[[], dt.datetime]
    ocsp: OcspService

    def close(self) -> None:
        self.backend.close()
        self.db.dispose()


NO_DEPLOYMENT_HINT = "run `sekisho init` to create one (or check --data-dir)"


def require_data_dir(settings: Settings) -> None:
    """The data directory, and the SQLite database in it, must exist: every command but
    ``init`` and ``run`` works on an existing deployment. Creating one here turned a mistyped
    ``--data-dir`` into a new, empty deployment, and a listing then said "no certificates"."""
    where = settings.data_dir
    try:
        st = where.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"no Sekisho deployment in {where} (no such directory): {NO_DEPLOYMENT_HINT}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot use data directory {where}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"data directory {where} is not a directory")
    database = sqlite_file(settings.db_url)
    if database is not None and not os.path.lexists(database):
        raise ConfigError(
            f"no Sekisho deployment in {where} (no database {database}): {NO_DEPLOYMENT_HINT}"
        )


def ensure_data_dir(settings: Settings, *, create: bool = False) -> None:
    """The data directory of a command that writes. Only ``create`` (``init``, the first
    ``run``) creates it (0700) and, for the embedded default, a random key passphrase;
    otherwise it must hold a deployment already (``require_data_dir``). The directory, and its
    keys/ and secrets/ where they exist, must belong to this user: one another user created
    (or a symlink to one) could swap keys and settings."""
    if not create:
        require_data_dir(settings)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        _check_own_dir(settings.data_dir, "data directory")
        os.chmod(settings.data_dir, 0o700)
        for sub in (settings.keys_dir, settings.data_dir / "secrets"):
            if os.path.lexists(sub):
                _check_own_dir(sub, "directory")
    except OSError as exc:
        raise ConfigError(
            f"cannot use data directory {settings.data_dir}: {exc.strerror}"
        ) from None
    path = settings.passphrase_path
    if not create or settings.key_backend != "software":
        return  # an existing deployment has its passphrase; the PKCS#11 PIN is the operator's
    if path is not None and not settings.key_passphrase_file and not path.exists():
        create_secret_file(path)


def _check_own_dir(path: Path, what: str) -> None:
    st = path.stat()  # a symlink is judged by what it points to
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): "
            "Sekisho keeps keys there; use a directory of your own"
        )


def open_backend(settings: Settings) -> KeyBackend:
    if settings.key_backend == "pkcs11":
        from hsm.pkcs11 import Pkcs11Backend

        pin = read_secret(
            Path(settings.pkcs11_pin_file) if settings.pkcs11_pin_file else None,
            settings.pkcs11_pin_env,
            what="PKCS#11 PIN",
            min_length=4,
        )
        try:
            text = pin.decode("utf-8", "strict")
        except UnicodeDecodeError:
            # Not the codec's message: it quotes the offending bytes of the PIN.
            raise ConfigError("the PKCS#11 PIN is not valid UTF-8") from None
        return Pkcs11Backend(
            settings.pkcs11_module,
            settings.pkcs11_token,
            text,
            label_prefix=settings.pkcs11_label_prefix,
        )
    passphrase = read_secret(settings.passphrase_path, settings.key_passphrase_env)
    path = settings.passphrase_path
    source = (
        f"the file {shown(path, PATH_SHOWN)}"
        if path is not None
        else f"the environment variable {shown(settings.key_passphrase_env)}"
    )
    return SoftwareBackend(settings.keys_dir, passphrase, source)


class UnavailableBackend:
    """In place of a key backend a command that only reads could not open (e.g. an auditor
    who may not read the key passphrase): every use of a key is a KeyBackendError saying why,
    so that what needs no key (listings, ``audit verify --public-key``) still works."""

    name = "unavailable"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> NoReturn:
        raise KeyBackendError(f"the key backend is unavailable: {self.reason}")

    def generate(self, label: str, key_type: KeyType) -> str:
        self._refuse()

    def reference(self, label: str) -> str:
        return f"unavailable:{label}"

    def public_key(self, ref: str) -> CertificateIssuerPublicKeyTypes:
        self._refuse()

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        self._refuse()

    def has_key(self, ref: str) -> bool:
        self._refuse()

    def close(self) -> None:
        pass


class UnreadableAuditKey(CheckpointSigner):
    """The audit key of a command that only reads, when the backend cannot read it (a wrong
    key passphrase): what needs no key still works, as with an unavailable passphrase
    (listings, ``audit verify --public-key``); what needs the key fails with the backend's
    error (WrongPassphrase, exit 77) when it asks for it. Reading its public key used to
    decrypt the key as the services were built, and failed every such command."""

    def __init__(self, backend: KeyBackend, key_ref: str, error: KeyBackendError) -> None:
        # Not CheckpointSigner.__init__: it reads the public key, which is what fails.
        self.backend = backend
        self.key_ref = key_ref
        self.key_type = AUDIT_KEY_TYPE
        self.error = error

    def _refuse(self) -> NoReturn:
        raise type(self.error)(self.error.message)

    @property
    def public_key_der(self) -> bytes:  # type: ignore[override]
        self._refuse()

    def sign(self, body: bytes) -> bytes:
        self._refuse()


class DeferredAuditKey(CheckpointSigner):
    """The audit key of a process that started while the key backend was away: its public
    key is read when first needed, and every use until then is the backend's error
    (KeyBackendError, HTTP 503 / exit 69), so that a checkpoint that falls due fails the
    operation, as it would have in a process started before the outage."""

    def __init__(self, backend: KeyBackend, key_ref: str) -> None:
        # Not CheckpointSigner.__init__: it reads the public key, which is what fails now.
        self.backend = backend
        self.key_ref = key_ref
        self.key_type = AUDIT_KEY_TYPE
        self._public_key_der: bytes | None = None

    @property
    def public_key_der(self) -> bytes:  # type: ignore[override]
        if self._public_key_der is None:
            try:
                public = self.backend.public_key(self.key_ref)
            except NotFound as exc:  # back, but without the key: fail closed, say so
                raise KeyBackendError(
                    f"the audit checkpoint key is missing: {exc.message}"
                ) from None
            self._public_key_der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return self._public_key_der

    def sign(self, body: bytes) -> bytes:
        self.public_key_der  # noqa: B018 (the key is there, and is the one recorded)
        return super().sign(body)


def audit_key_ref(backend: KeyBackend) -> str:
    """Where the audit checkpoint key lives in this backend."""
    return backend.reference(AUDIT_KEY_LABEL)


def journal_origin(db: Database, settings: Settings) -> str:
    """The journal's origin line: the one the journal's first checkpoint already carries, so
    changing ``base_url`` later does not split the journal into two origins (every old
    checkpoint would fail to verify); for a new journal, ``audit_origin`` when set, else
    derived from ``base_url``. An ``audit_origin`` that differs from the journal's is a
    ConfigError (exit 78): used, it would make an intact journal fail verification."""
    try:
        with db.scope() as session:
            body = session.scalar(select(Checkpoint.body).order_by(Checkpoint.seq).limit(1))
    except (SekishoError, SQLAlchemyError):
        body = None  # no schema yet (first start): nothing to stay consistent with
    stored = None
    if body:
        try:
            stored = parse_checkpoint_body(body).origin
        except ValueError:
            pass  # a damaged checkpoint: `audit verify` reports it
    if settings.audit_origin:
        if stored is not None and stored != settings.audit_origin:
            raise ConfigError(
                f"audit_origin {shown(settings.audit_origin)} differs from the origin of the "
                f"journal's checkpoints, {shown(stored)}: they would no longer verify; set "
                f"audit_origin (SEKISHO_AUDIT_ORIGIN) to {shown(stored)}, or unset it"
            )
        return settings.audit_origin
    return stored if stored is not None else settings.journal_origin


def _has_checkpoints(db: Database) -> bool:
    try:
        with db.read_scope() as session:
            return session.scalar(select(Checkpoint.seq).limit(1)) is not None
    except (SekishoError, SQLAlchemyError):
        return False


INIT_BEGUN = "system.init.begin"  # journalled first, with the plan
INIT_DONE = "system.init"  # journalled last


class InitState(enum.Enum):
    NONE = "none"  # nothing begun
    INTERRUPTED = "interrupted"  # begun, never finished (a crash, a kill, a failed step)
    COMPLETE = "complete"


def init_state(db: Database) -> InitState:
    """Where ``init`` got to, from the journal: its first records are the init's. A store
    from before INIT_BEGUN has INIT_DONE first (journalled at the start then) and a root."""
    with db.read_scope() as session:
        first = session.execute(
            select(JournalRecord.seq, JournalRecord.action)
            .where(
                JournalRecord.action.in_([INIT_BEGUN, INIT_DONE]),
                JournalRecord.outcome == Outcome.SUCCESS.value,
            )
            .order_by(JournalRecord.seq)
            .limit(1)
        ).first()
        if first is None:
            return InitState.COMPLETE if has_root_ca(db) else InitState.NONE
        if first.action == INIT_DONE:
            return InitState.COMPLETE
        done = session.scalar(
            select(JournalRecord.seq)
            .where(
                JournalRecord.seq > first.seq,
                JournalRecord.action == INIT_DONE,
                JournalRecord.outcome == Outcome.SUCCESS.value,
            )
            .order_by(JournalRecord.seq)
            .limit(1)
        )
    return InitState.COMPLETE if done is not None else InitState.INTERRUPTED


def has_root_ca(db: Database) -> bool:
    """Whether the store holds a deployment: ``init`` creates the root CA (the last step of
    a refused ``init`` that got as far as the schema does not)."""
    with db.read_scope() as session:
        found = session.scalar(
            select(CertificateAuthority.id).where(CertificateAuthority.kind == CaKind.ROOT)
        )
    return found is not None


def open_deployment(
    settings: Settings, *, read_only: bool = False, migrate: bool = True
) -> Services:
    """The services of an existing, initialised deployment: what every command but ``init``
    and ``run`` uses. Nothing is created: a data directory or database that holds no
    deployment is a ConfigError (exit 78) naming the directory.

    ``read_only``, for commands that only read (listings, audit verification, exports): the
    store is opened read-only (``Database``), and the data directory is neither changed nor
    required to be this user's (``ensure_data_dir`` is not run): such a command makes no
    certificate, key or journal entry that a planted directory could subvert, and it must work
    on an auditor's read-only copy, or on one owned by root. The settings file is still
    checked (``load_settings``: it can name a PKCS#11 module to load). A key backend whose
    secret this user cannot have (SecretUnavailable: a passphrase file of another user, say)
    leaves the command without keys (``UnavailableBackend``); an exposed secret is refused as
    for any command. A schema this version must migrate is migrated only by a command that
    writes: with ``read_only`` it is a StoreError (exit 74) saying so. A command that writes
    first checks the database role's privileges (``Database.check_roles``: exit 78 when it
    lacks one; with ``database_owner_url``, when it may do more than Sekisho grants it, after
    granting again)."""
    require_data_dir(settings)
    db = Database(settings.db_url, read_only=read_only, owner_url=settings.database_owner_url)
    try:
        if not read_only:
            # PostgreSQL: the role's privileges (with an owner URL, granted again if wanting).
            db.check_roles(regrant=migrate)
        revisions = db.schema_revisions()
        if revisions is None:
            raise no_tables(settings)
        heads = head_revisions()
        if migrate and set(revisions) != set(heads):
            if read_only:
                problem = schema_problem(revisions, db.has_tables())
                raise StoreError(problem or _not_migrated(revisions, heads))
            db.upgrade()
        if not has_root_ca(db):
            raise ConfigError(
                f"the deployment in {settings.data_dir} is not initialised (no root CA): "
                f"{NO_DEPLOYMENT_HINT}"
            )
        if not read_only and init_state(db) is InitState.INTERRUPTED:
            # (A command that only reads still works: `audit verify` on what there is.)
            raise ConfigError(
                f"the initialisation of {settings.data_dir} was interrupted: run `sekisho "
                "init` (with the options it was first given) or `sekisho run` to finish it"
            )
        backend = _read_only_backend(settings) if read_only else open_backend(settings)
        return build_services(settings, backend=backend, db=db, migrate=False)
    except BaseException:
        db.dispose()
        raise


def no_tables(settings: Settings) -> ConfigError:
    """A data directory whose database has no schema: never initialised."""
    return ConfigError(
        f"no Sekisho deployment in {settings.data_dir} (its database has no tables): "
        f"{NO_DEPLOYMENT_HINT}"
    )


def _not_migrated(revisions: tuple[str, ...], heads: tuple[str, ...]) -> str:
    """Why a command that only reads refuses a store at another schema. It migrated the store
    where it could write it: an auditor's `ca list`, as root, changed the schema of another
    user's deployment (which every command that writes refuses to touch), and a newer Sekisho
    run to read a store changed it under the older one serving it."""
    return (
        f"the database schema is at {', '.join(revisions) or 'no migration'}, this version of "
        f"Sekisho reads {', '.join(heads)}: a command that only reads does not migrate it; the "
        "deployment's owner migrates it with a command that writes (`sekisho serve` does as "
        "it starts), or read it with the version that wrote it"
    )


def _read_only_backend(settings: Settings) -> KeyBackend:
    try:
        return open_backend(settings)
    except SecretUnavailable as exc:  # an exposed secret is still refused, as for any command
        return UnavailableBackend(exc.message)


def build_services(
    settings: Settings,
    *,
    backend: KeyBackend | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    migrate: bool = True,
    db: Database | None = None,
) -> Services:
    # The wall clock, looked up when called (a test moves every command's clock at once by
    # replacing ``sekisho.services.utcnow``).
    clock = clock or utcnow
    db = db or Database(settings.db_url, owner_url=settings.database_owner_url)
    if migrate:
        db.upgrade()
        db.check_roles()
    backend = backend or open_backend(settings)
    audit_ref = audit_key_ref(backend)
    # A store opened read-only appends nothing: a missing key is no news for its journal (a
    # reading command that needs the key says so itself), where it would print two errors
    # on every listing by an auditor who may not read the passphrase.
    appends = not db.read_only
    signer: CheckpointSigner | None = None
    try:
        has_audit_key = backend.has_key(audit_ref)
    except KeyBackendError as exc:
        if appends:
            log.error("audit key unavailable", extra={"key_ref": audit_ref, "detail": exc.message})
        has_audit_key = False
        if appends and _has_checkpoints(db):
            # The key backend is away (a token unreachable as this process starts): the key
            # is looked for again when a checkpoint falls due. Without it the journal would
            # append unsigned for the life of this process, the token back or not, and what
            # docs/hsm.md 2.4 says fails a few minutes into an outage would go through.
            signer = DeferredAuditKey(backend, audit_ref)
    if has_audit_key:
        try:
            signer = CheckpointSigner(backend, audit_ref, AUDIT_KEY_TYPE)
        except KeyBackendError as exc:  # a wrong passphrase, a damaged key file
            if appends:
                raise
            signer = UnreadableAuditKey(backend, audit_ref, exc)
    if signer is None and appends and _has_checkpoints(db):
        # The journal was checkpointed before: appending without checkpoints would weaken
        # its tamper evidence unnoticed. Say so loudly (`audit verify --public-key` still works).
        log.error("the audit checkpoint key is missing: no new checkpoints will be signed",
                  extra={"key_ref": audit_ref})  # fmt: skip
    journal = Journal(
        journal_origin(db, settings),
        signer,
        every=settings.audit_checkpoint_every,
        interval=dt.timedelta(minutes=settings.audit_checkpoint_minutes),
    )
    urls = Urls(settings.base_url)
    registry = CaRegistry(urls)
    extra_profiles = settings.data_dir / "profiles.toml"
    profiles = load_profiles(extra_profiles if extra_profiles.exists() else None)
    linter = Linter(settings.base_url) if settings.lint_before_signing else None
    ca = CaService(db, backend, journal, registry, profiles, clock, linter)
    revoker = Revoker(db, journal, clock)
    crls = CrlPublisher(
        db,
        backend,
        journal,
        settings.crl_next_update,
        settings.delta_crl_next_update,
        urls.delta_crl,
        deltas=settings.crl_deltas,
        linter=linter,
    )
    # Pre-signed OCSP responses: signed at issuance, re-signed before revoke()/release() return.
    ocsp = OcspService(db, backend, settings, clock, linter)
    ca.issued_hooks.append(ocsp.on_issued)
    revoker.listeners.append(ocsp.on_revocation)
    services = Services(
        ocsp=ocsp,
        settings=settings,
        db=db,
        backend=backend,
        journal=journal,
        registry=registry,
        profiles=profiles,
        ca=ca,
        revoker=revoker,
        crls=crls,
        clock=clock,
    )
    # A revoked OCSP responder is replaced first, so that what is re-signed next is signed by
    # its successor (ocsp.signers).
    revoker.listeners.insert(0, functools.partial(responder_revoked, services))
    if not db.read_only:
        try:
            journal_schema_changes(services)
        except StoreError as exc:
            # The store is down (a web worker starts anyway, and says so on /healthz) or not
            # migrated yet: the rows wait for the next process that writes.
            log.warning("migrations not journalled yet", extra={"detail": exc.message})
        except BaseException:
            services.close()
            raise
    return services


MIGRATED = "system.migrate"


def journal_schema_changes(services: Services) -> int:
    """Journal the migrations waiting in ``audit_schema_changes`` (a schema change can change
    the journal's own guard, and an auditor must see when), each as ``system.migrate`` with the
    revisions before and after, when and by which process; each row is deleted in the
    transaction of its record, and only a row this transaction deleted is journalled, so two
    processes starting at once record it once. A new store's first migration leaves no row
    (its initialisation is journalled). How many were journalled."""
    with services.db.read_scope() as session:
        if session.scalar(select(SchemaChange.id).limit(1)) is None:
            return 0  # the usual case: read without taking the write lock
    done = 0
    with services.db.scope() as session:
        pending = session.execute(
            select(SchemaChange.id, SchemaChange.time, SchemaChange.before,
                   SchemaChange.after, SchemaChange.process).order_by(SchemaChange.id)
        ).all()  # fmt: skip
        for row_id, when, before, after, process in pending:
            gone = session.connection().execute(
                delete(SchemaChange).where(SchemaChange.id == row_id)
            )
            if gone.rowcount != 1:
                continue  # another process journalled it
            services.journal.append(
                session,
                Event(
                    Category.SYSTEM,
                    MIGRATED,
                    Outcome.SUCCESS,
                    actor_account="system:migrate",
                    detail={
                        "from": before.split(","),
                        "to": after.split(","),
                        "migrated_at": when.isoformat(),
                        "process": process,
                    },
                ),
                services.clock(),
            )
            done += 1
    return done


def enable_checkpoints(services: Services) -> None:
    """Create the audit checkpoint key (first run) and attach it to the journal."""
    ref = audit_key_ref(services.backend)
    if not services.backend.has_key(ref):
        generated = services.backend.generate(AUDIT_KEY_LABEL, AUDIT_KEY_TYPE)
        # The backend finds it by its label as well (a token key's reference adds an id).
        if not services.backend.has_key(ref):
            raise KeyBackendError(f"the audit key {generated} cannot be found as {ref}")
    services.journal.signer = CheckpointSigner(services.backend, ref, AUDIT_KEY_TYPE)


def data_file(settings: Settings, *parts: str) -> Path:
    return settings.data_dir.joinpath(*parts)
