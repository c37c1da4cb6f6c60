"""Issuance: authorised request in, certificate out, with the intent recorded before signing.

The cycle (after Boulder's "store what you plan to sign, then sign, then store"):

1. Build the to-be-signed value (``Tbs``) and run every rule on it. A rule break is refused
   with the rule's name and journalled as a rejection; nothing is signed.
2. Sign through the key backend, wrapped so that a hook sees the exact TBS bytes first. The
   hook commits the intent: a ``reserved`` row with the serial, the SHA-256 of the TBS and of
   the subject's public key, written only if that key is not blocked (compromised: refused
   as ``blocked-key`` before any signature). The unique constraint (issuer, serial) catches a
   collision; we draw a new serial and retry.
3. Commit the issued row (DER, fingerprint) and its ``ca.issue`` journal entry together.

If step 3 fails (store or journal down, process killed), the certificate is not handed out and
the ``reserved`` row stays: it is revocable and lands on the CRL when revoked. If signing
itself fails (token away), the row is marked ``failed``: nothing was signed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from sqlalchemy import Table, bindparam, exists, insert, select, update

from audit.events import Category, Outcome, by_actor, refused
from audit.journal import Journal
from ca import rules
from ca.csr import parse_csr
from ca.lint import Linter
from ca.models import BlockedKey, Certificate, CertStatus
from ca.profiles import ProfileSet
from ca.registry import CaRegistry, bump_revocation_epoch
from ca.subject import encode_subject
from ca.tbs import SanEntry, Tbs, new_serial, serial_hex, spki_sha256, tbs_sha256
from hsm.base import KeyBackend, KeyType, key_type_of, signature_hash
from hsm.observed import observed
from hsm.software import generate_private_key
from sekisho.context import Actor
from sekisho.db import Database, Prepared, WriteTx
from sekisho.errors import (
    Conflict,
    DuplicateKey,
    InputError,
    KeyBackendError,
    NotFound,
    PolicyViolation,
    SekishoError,
    StoreError,
    shown,
)

Clock = Callable[[], dt.datetime]
# (issuer_id, serial) -> work for the store transaction, or None.
IssuedHook = Callable[[int, int], Callable[[WriteTx], None] | None]
MAX_SERIAL_ATTEMPTS = 5
# Hot-path statements, prepared once and run on the driver's cursor (``Database.write_tx``):
# the ORM unit of work, then Core's per-execution work, each cost more than the database.
_CERTIFICATES = cast(Table, Certificate.__table__)
_INTENT_COLUMNS = (
    "issuer_id",
    "serial",
    "status",
    "profile",
    "subject_dn",
    "sans",
    "not_before",
    "not_after",
    "tbs_sha256",
    "key_type",
    "owner_kind",
    "owner_id",
    "tenant",
    "created_at",
    "status_epoch",
    "spki_sha256",
)
_BLOCKED = cast(Table, BlockedKey.__table__)
# The intent, written only if the key is not blocked, in the same statement (one round trip;
# no issuance slips between a separate look and the insert): no row back means blocked.
_INSERT_INTENT = Prepared(
    insert(_CERTIFICATES)
    .from_select(
        list(_INTENT_COLUMNS),
        select(*(bindparam(c, type_=_CERTIFICATES.c[c].type) for c in _INTENT_COLUMNS)).where(
            ~exists().where(_BLOCKED.c.spki_sha256 == bindparam("spki_sha256"))
        ),
    )
    .returning(_CERTIFICATES.c.id),
    _INTENT_COLUMNS,
)
_STORE_ISSUED = Prepared(
    update(_CERTIFICATES)
    .where(_CERTIFICATES.c.id == bindparam("row_id"))
    .values(
        der=bindparam("new_der"),
        fingerprint_sha256=bindparam("new_fingerprint"),
        status=CertStatus.ISSUED,
    )
    .where(_CERTIFICATES.c.status == CertStatus.RESERVED),
    ("row_id", "new_der", "new_fingerprint"),
)
_MARK_FAILED = (
    update(_CERTIFICATES)
    .where(_CERTIFICATES.c.id == bindparam("row_id"))
    .where(_CERTIFICATES.c.status == CertStatus.RESERVED)
    .values(status=CertStatus.FAILED, failure=bindparam("why"))
)
# notBefore is backdated slightly so relying parties with a skewed clock accept a fresh cert.
BACKDATE = dt.timedelta(minutes=1)
# The widths of the columns that keep them (ca/models.py).
MAX_OWNER_KIND = 16
MAX_OWNER_ID = 128
MAX_TENANT = 128


def check_label(what: str, value: str | None, limit: int) -> None:
    """An owner or tenant as the store keeps it and `cert show` prints it: 1 to ``limit``
    characters on one line, each printable (no control, bidirectional or other invisible
    character); else InputError. Unchecked, a longer value failed on PostgreSQL as a store
    error (after the key was made) and SQLite kept it whole, and an escape sequence reached
    the terminal of whoever listed the certificate."""
    if value is None:
        return
    if not 1 <= len(value) <= limit:
        raise InputError(f"{what} {shown(value)} must have 1 to {limit} characters")
    if not value.isprintable():
        bad = next(ch for ch in value if not ch.isprintable())
        raise InputError(
            f"{what} {shown(value)} holds a control or invisible character ({shown(bad)})"
        )


@dataclasses.dataclass(frozen=True)
class IssueRequest:
    """An *authorised* request: subject and SANs are what the caller decided to certify."""

    ca: str
    profile: str
    subject: x509.Name
    public_key: CertificateIssuerPublicKeyTypes
    sans: tuple[SanEntry, ...] = ()
    validity: dt.timedelta | None = None
    owner_kind: str | None = None
    owner_id: str | None = None
    tenant: str | None = None
    name_constraints: x509.NameConstraints | None = None
    # Made by this process or its key backend, never received: no Debian weak-key lookup.
    key_generated_here: bool = False


class _SerialTaken(Exception):
    """Raised from inside the signing hook when the serial is already used."""


BLOCKED_KEY = "blocked-key"


def key_blocked() -> PolicyViolation:
    return PolicyViolation(
        BLOCKED_KEY,
        "this public key is blocked: it was reported compromised (a certificate for it was "
        "revoked for keyCompromise, or `sekisho key block`); make a new key",
    )


class CaService:
    def __init__(
        self,
        db: Database,
        backend: KeyBackend,
        journal: Journal,
        registry: CaRegistry,
        profiles: ProfileSet,
        clock: Clock,
        linter: Linter | None = None,
    ) -> None:
        self.db = db
        self.backend = backend
        self.journal = journal
        self.registry = registry
        self.profiles = profiles
        self.clock = clock
        # The lint gate (``lint_before_signing``): the TBS the key is about to sign, linted
        # before the intent is written; None when the setting turns it off.
        self.linter = linter
        # Called with (issuer_id, serial) once a certificate is signed, before it is stored;
        # each may return work to run in the store transaction (the OCSP pre-signer signs the
        # first response in the hook and writes it there: it commits with the certificate).
        # A hook that cannot do its part returns None and the issuance goes on (the refresher
        # repairs a missing response); work that fails in the transaction fails the issuance,
        # as any other store failure does.
        self.issued_hooks: list[IssuedHook] = []

    # -- public API -----------------------------------------------------------------------
    def issue(self, request: IssueRequest, actor: Actor) -> x509.Certificate:
        try:
            tbs = self.prepare(request)
        except (InputError, NotFound, Conflict) as exc:
            self.journal_rejection(request.ca, request.profile, request.subject, exc, actor)
            raise
        try:
            return self._sign_and_store(tbs, request, actor)
        except PolicyViolation as exc:  # the key found blocked as the intent was written
            self.journal_rejection(request.ca, request.profile, request.subject, exc, actor)
            raise

    def issue_from_csr(
        self,
        csr_data: bytes,
        *,
        ca: str,
        profile: str,
        actor: Actor,
        subject: x509.Name | None = None,
        sans: tuple[SanEntry, ...] | None = None,
        validity: dt.timedelta | None = None,
        owner_kind: str | None = None,
        owner_id: str | None = None,
        tenant: str | None = None,
    ) -> x509.Certificate:
        """Issue from a CSR. ``subject``/``sans`` given by the caller override the CSR's;
        otherwise the CSR's are used only after the profile rules accept them."""
        try:
            parsed = parse_csr(csr_data)
        except InputError as exc:
            self.journal_rejection(ca, profile, subject, exc, actor)
            raise
        request = IssueRequest(
            ca=ca,
            profile=profile,
            subject=subject if subject is not None else parsed.subject,
            public_key=parsed.public_key,
            sans=sans if sans is not None else parsed.sans,
            validity=validity,
            owner_kind=owner_kind,
            owner_id=owner_id,
            tenant=tenant,
        )
        return self.issue(request, actor)

    def issue_with_new_key(
        self, request_without_key: IssueRequest, key_type: KeyType, actor: Actor
    ) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        """Server-side key generation: the key is returned to the caller and never stored."""
        key = generate_private_key(key_type)
        request = dataclasses.replace(
            request_without_key, public_key=key.public_key(), key_generated_here=True
        )
        return self.issue(request, actor), key

    # -- steps ----------------------------------------------------------------------------
    def prepare(self, request: IssueRequest) -> Tbs:
        check_label("owner kind", request.owner_kind, MAX_OWNER_KIND)
        check_label("owner", request.owner_id, MAX_OWNER_ID)
        check_label("tenant", request.tenant, MAX_TENANT)
        profile = self.profiles.get(request.profile)
        # The registry caches CA contexts (dropped when a CA row changes here, re-read every
        # few seconds for changes made elsewhere): usually no transaction at all.
        issuer = self.registry.cached(request.ca)
        if issuer is None:
            with self.db.read_scope() as session:
                issuer = self.registry.get(session, request.ca)
        if not issuer.key_online:
            raise Conflict(f"the key of CA {issuer.name} is offline: bring it online first")
        if issuer.revoked:
            raise Conflict(
                f"the certificate of CA {issuer.name} is revoked or on hold by its parent (`ca "
                "show` says which): it issues nothing, until released from a hold"
            )
        now = self.clock()
        # Backdated for clock skew, but never before the issuer's own start.
        not_before = max(now - BACKDATE, issuer.not_before)
        not_after = rules.clamp_validity(
            not_before, request.validity, profile.default_validity, issuer.not_after
        )
        tbs = Tbs(
            serial=new_serial(),
            issuer=issuer,
            profile=profile,
            # In the string types X.520 gives each attribute, not the CSR's or the caller's;
            # a value no type can carry is refused here, before the rules and the intent.
            subject=encode_subject(request.subject),
            public_key=request.public_key,
            key_type=key_type_of(request.public_key),
            not_before=not_before,
            not_after=not_after,
            sans=request.sans,
            name_constraints=request.name_constraints,
            key_generated_here=request.key_generated_here,
        )
        rules.check(tbs)
        return tbs

    def _sign_and_store(self, tbs: Tbs, request: IssueRequest, actor: Actor) -> x509.Certificate:
        key = self.backend.signing_key(tbs.issuer.key_ref)
        algorithm = signature_hash(tbs.issuer.key_type)
        for _attempt in range(MAX_SERIAL_ATTEMPTS):
            reserved: list[int] = []
            hook = self._intent_hook(tbs, request, reserved)
            try:
                cert = tbs.builder().sign(observed(key, hook), algorithm)  # type: ignore[arg-type]
            except _SerialTaken:
                tbs = dataclasses.replace(tbs, serial=new_serial())
                continue
            except SekishoError:
                if reserved:
                    self._mark_failed(reserved[0], tbs.issuer.id, "signing failed")
                raise
            except Exception as exc:
                if reserved:
                    why = f"signing failed: {exc.__class__.__name__}"
                    self._mark_failed(reserved[0], tbs.issuer.id, why)
                raise KeyBackendError(f"signing failed: {exc.__class__.__name__}") from exc
            try:
                # The key the backend signed with must be the CA certificate's: a token key
                # swapped or restored under the same label and id (public object included)
                # signs certificates that verify under no CA. Never stored, never handed out.
                cert.verify_directly_issued_by(tbs.issuer.certificate)
            except (ValueError, TypeError, InvalidSignature):
                self._mark_failed(
                    reserved[0], tbs.issuer.id, "signing failed: signature does not verify"
                )
                raise KeyBackendError(
                    f"the key {tbs.issuer.key_ref} of CA {tbs.issuer.name} signed a certificate "
                    "that does not verify under the CA's certificate: the key backend holds "
                    "another key under that reference"
                ) from None
            extras = [hook(tbs.issuer.id, tbs.serial) for hook in self.issued_hooks]
            self._store_issued(reserved[0], tbs, cert, actor, [e for e in extras if e])
            return cert
        raise StoreError("could not find a free serial number after several attempts")

    def _intent_hook(
        self, tbs: Tbs, request: IssueRequest, reserved: list[int]
    ) -> Callable[[bytes], None]:
        def commit_intent(tbs_bytes: bytes) -> None:
            if reserved:
                raise RuntimeError("the certificate builder signed twice")
            if self.linter is not None:
                self.linter.check_tbs(tbs_bytes, tbs.issuer.key_type)  # refused: nothing written
            values = {
                "issuer_id": tbs.issuer.id,
                "serial": serial_hex(tbs.serial),
                "status": CertStatus.RESERVED,
                "profile": tbs.profile.name,
                "subject_dn": tbs.subject.rfc4514_string(),
                "sans": json.dumps([str(s) for s in tbs.sans]),
                "not_before": tbs.not_before,
                "not_after": tbs.not_after,
                "tbs_sha256": tbs_sha256(tbs_bytes),
                "key_type": tbs.key_type.value,
                "owner_kind": request.owner_kind,
                "owner_id": request.owner_id,
                "tenant": request.tenant,
                "created_at": self.clock(),
                "status_epoch": 0,
                "spki_sha256": spki_sha256(tbs.public_key),
            }
            try:
                # Committed before this returns, so before the signature exists (one
                # statement: autocommit on PostgreSQL).
                with self.db.write_tx(single=True) as tx:
                    row = tx.first(_INSERT_INTENT, values)
            except DuplicateKey:
                raise _SerialTaken() from None
            if row is None:
                raise key_blocked()  # nothing written, nothing signed
            reserved.append(int(row[0]))

        return commit_intent

    def _store_issued(
        self,
        row_id: int,
        tbs: Tbs,
        cert: x509.Certificate,
        actor: Actor,
        extras: Sequence[Callable[[WriteTx], None]] = (),
    ) -> None:
        der = cert.public_bytes(serialization.Encoding.DER)
        fingerprint = hashlib.sha256(der).hexdigest()
        now = self.clock()
        with self.db.write_tx() as tx:
            changed = tx.execute(
                _STORE_ISSUED, {"row_id": row_id, "new_der": der, "new_fingerprint": fingerprint}
            )
            if changed != 1:
                # Revoked (or marked failed) between intent and store: never hand it out.
                raise Conflict(f"serial {serial_hex(tbs.serial)} changed state during issuance")
            self.journal.append(
                tx,
                by_actor(
                    actor,
                    Category.CA,
                    "ca.issue",
                    Outcome.SUCCESS,
                    object_dn=tbs.subject.rfc4514_string(),
                    object_serial=serial_hex(tbs.serial),
                    detail={
                        "ca": tbs.issuer.name,
                        "profile": tbs.profile.name,
                        "not_after": tbs.not_after.isoformat(),
                        "sans": [str(s) for s in tbs.sans],
                        "sha256": fingerprint,
                    },
                ),
                now,
            )
            for extra in extras:
                extra(tx)

    def _mark_failed(self, row_id: int, issuer_id: int, why: str) -> None:
        """Reserved -> failed (nothing was signed), a status change like any other: the CA's
        revocation epoch one up and the row's status epoch set to it, so that an OCSP answer
        stored for the reserved row ("good") counts as behind and is not served, and
        ``ocsp serve`` finds the change. Row first, then the CA's: the order revocations take
        their locks in."""
        try:
            with self.db.connection_scope() as conn:
                if conn.execute(_MARK_FAILED, {"row_id": row_id, "why": why}).rowcount != 1:
                    return  # revoked meanwhile: that change has its epoch
                epoch = bump_revocation_epoch(conn, issuer_id)[0]
                conn.execute(
                    update(_CERTIFICATES)
                    .where(_CERTIFICATES.c.id == row_id)
                    .values(status_epoch=epoch)
                )
        except SekishoError:
            # The row stays reserved: revocable, and `cert check` reports it (reserved-stale).
            pass

    def journal_rejection(
        self, ca: str, profile: str, subject: x509.Name | None, exc: SekishoError, actor: Actor
    ) -> None:
        """Journal a refused issuance (``ca.issue``, failure: the code, the rule, the reason);
        also for a request its caller refused before it reached this service."""
        self.journal.append_alone(
            self.db,
            refused(
                actor,
                Category.CA,
                "ca.issue",
                exc,
                object_dn=subject.rfc4514_string() if subject is not None else None,
                detail={"ca": ca, "profile": profile},
            ),
            self.clock(),
        )
