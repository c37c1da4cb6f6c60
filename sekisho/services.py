"""Composition root: builds every service once from settings and hands them out.

The CLI, the web app and the background workers all get their collaborators from here;
nothing else constructs a database, a key backend or a journal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from audit.chain import parse_checkpoint_body
from audit.journal import CheckpointSigner, Journal
from audit.models import Checkpoint
from ca.crl import CrlPublisher
from ca.issuance import CaService
from ca.profiles import ProfileSet, load_profiles
from ca.registry import CaRegistry, Urls
from ca.revocation import Revoker
from hsm.base import KeyBackend, KeyType
from hsm.secrets import create_secret_file, read_secret
from hsm.software import SoftwareBackend
from ocsp.store import OcspService
from sekisho.clock import utcnow
from sekisho.db import Database
from sekisho.errors import ConfigError, KeyBackendError, SekishoError
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


def ensure_data_dir(settings: Settings) -> None:
    """Create the data directory (0700) and, for the embedded default, a random passphrase.
    The directory, and its keys/ and secrets/ where they exist, must belong to this user:
    one another user created (or a symlink to one) could swap keys and settings."""
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
    if settings.key_backend != "software":
        return  # the PKCS#11 PIN is the operator's to provide
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
        return Pkcs11Backend(
            settings.pkcs11_module,
            settings.pkcs11_token,
            pin.decode("utf-8", "strict"),
            label_prefix=settings.pkcs11_label_prefix,
        )
    passphrase = read_secret(settings.passphrase_path, settings.key_passphrase_env)
    return SoftwareBackend(settings.keys_dir, passphrase)


def audit_key_ref(backend: KeyBackend) -> str:
    """Where the audit checkpoint key lives in this backend."""
    return backend.reference(AUDIT_KEY_LABEL)


def journal_origin(db: Database, settings: Settings) -> str:
    """The journal's origin line: ``audit_origin`` when set; otherwise the one the journal's
    first checkpoint already carries, so changing ``base_url`` later does not split the
    journal into two origins (every old checkpoint would fail to verify); for a new journal,
    derived from ``base_url``."""
    if settings.audit_origin:
        return settings.audit_origin
    try:
        with db.scope() as session:
            body = session.scalar(select(Checkpoint.body).order_by(Checkpoint.seq).limit(1))
    except (SekishoError, SQLAlchemyError):
        body = None  # no schema yet (first start): nothing to stay consistent with
    if body:
        try:
            return parse_checkpoint_body(body).origin
        except ValueError:
            pass  # a damaged checkpoint: `audit verify` reports it
    return settings.journal_origin


def _has_checkpoints(db: Database) -> bool:
    try:
        with db.read_scope() as session:
            return session.scalar(select(Checkpoint.seq).limit(1)) is not None
    except (SekishoError, SQLAlchemyError):
        return False


def build_services(
    settings: Settings,
    *,
    backend: KeyBackend | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
    migrate: bool = True,
) -> Services:
    db = Database(settings.db_url)
    if migrate:
        db.upgrade()
    backend = backend or open_backend(settings)
    audit_ref = audit_key_ref(backend)
    try:
        has_audit_key = backend.has_key(audit_ref)
    except KeyBackendError as exc:
        log.error("audit key unavailable", extra={"key_ref": audit_ref, "detail": exc.message})
        has_audit_key = False
    signer = CheckpointSigner(backend, audit_ref, AUDIT_KEY_TYPE) if has_audit_key else None
    if signer is None and _has_checkpoints(db):
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
    ca = CaService(db, backend, journal, registry, profiles, clock)
    revoker = Revoker(db, journal, clock)
    crls = CrlPublisher(
        db,
        backend,
        journal,
        settings.crl_next_update,
        settings.delta_crl_next_update,
        urls.delta_crl,
    )
    # Pre-signed OCSP responses: signed at issuance, re-signed before revoke()/release() return.
    ocsp = OcspService(db, backend, settings, clock)
    ca.issued_hooks.append(ocsp.on_issued)
    revoker.listeners.append(ocsp.on_revocation)
    return Services(
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
