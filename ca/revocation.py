"""Revocation: RFC 5280 5.3.1 reasons, certificateHold and its release, re-revocation.

The decision (may this certificate move to that state?) is pure; ``Revoker`` applies it in one
transaction with the journal entry, bumps the CA's revocation epoch (so CRL builders and the
OCSP store see the change) and then tells listeners.

A revocation for keyCompromise also blocks the key (BR 6.1.1.3: ``blocked_keys``; issuance
refuses it from then on) and revokes, in the same transaction, every other certificate that
carries it, under any CA (BR 4.9.1.1: all certificates of a compromised key within 24 hours).
``sekisho key block`` does the same for a key reported compromised without a certificate of
ours revoked first. A sweep (``revoke_blocked``, every refresher tick) revokes a certificate of
a blocked key that an issuance racing the block left behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
from collections.abc import Callable, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from audit.events import Category, Outcome, by_actor, refused
from audit.journal import Journal
from ca.models import BlockedKey, Certificate, CertificateAuthority, CertStatus
from ca.registry import bump_revocation_epoch, ca_row
from ca.tbs import serial_hex, spki_sha256
from sekisho.context import Actor
from sekisho.db import Database
from sekisho.errors import Conflict, InputError, NotFound, SekishoError, shown

log = logging.getLogger("sekisho.ca")


class Reason(enum.StrEnum):
    """RFC 5280 5.3.1 CRLReason values we accept for revocation (removeFromCRL is not one:
    it only appears in delta CRLs when a hold is released)."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key_compromise"
    CA_COMPROMISE = "ca_compromise"
    AFFILIATION_CHANGED = "affiliation_changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation"
    CERTIFICATE_HOLD = "certificate_hold"
    PRIVILEGE_WITHDRAWN = "privilege_withdrawn"
    AA_COMPROMISE = "aa_compromise"

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags(_FLAG[self])

    @classmethod
    def parse(cls, text: str) -> Reason:
        key = text.strip().lower().replace("-", "_")
        aliases = {
            "keycompromise": "key_compromise",
            "cacompromise": "ca_compromise",
            "affiliationchanged": "affiliation_changed",
            "cessationofoperation": "cessation_of_operation",
            "certificatehold": "certificate_hold",
            "hold": "certificate_hold",
            "privilegewithdrawn": "privilege_withdrawn",
            "aacompromise": "aa_compromise",
        }
        try:
            return cls(aliases.get(key, key))
        except ValueError:
            raise InputError(
                f"unknown revocation reason {shown(text)}; one of {', '.join(r.value for r in cls)}"
            ) from None


_FLAG = {
    Reason.UNSPECIFIED: "unspecified",
    Reason.KEY_COMPROMISE: "keyCompromise",
    Reason.CA_COMPROMISE: "cACompromise",
    Reason.AFFILIATION_CHANGED: "affiliationChanged",
    Reason.SUPERSEDED: "superseded",
    Reason.CESSATION_OF_OPERATION: "cessationOfOperation",
    Reason.CERTIFICATE_HOLD: "certificateHold",
    Reason.PRIVILEGE_WITHDRAWN: "privilegeWithdrawn",
    Reason.AA_COMPROMISE: "aACompromise",
}


# The earliest invalidity date accepted: 1950-01-01, where RFC 5280's UTCTime (4.1.2.5.1), and
# so any certificate's validity, begins. Not the certificate's notBefore: a key may well have
# been compromised before its certificate was issued (a CSR made from a leaked key).
EARLIEST_INVALIDITY = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)


def check_invalidity_date(when: dt.datetime, now: dt.datetime) -> None:
    """Refuse an invalidity date (RFC 5280 5.3.2) that cannot be when a key was compromised."""
    if when.tzinfo is None:
        raise InputError("invalidity date needs a time zone (UTC)")
    if when > now:
        raise InputError("invalidity date lies in the future")
    if when < EARLIEST_INVALIDITY:
        raise InputError(
            f"invalidity date {when.date().isoformat()} lies before "
            f"{EARLIEST_INVALIDITY.date().isoformat()}, where X.509 time begins (RFC 5280 "
            "UTCTime): give the date the key is believed to have been compromised"
        )


def _invalid_before_revoked(
    cert: Certificate, current: Reason | None, invalidity_date: dt.datetime | None
) -> None:
    """A certificate revoked already, or on hold (a re-revocation to keyCompromise, and a hold
    made permanent, keep the revocation date) was invalid from that date on: an invalidity
    date after it says nothing true."""
    kept = cert.revoked_at if current is not None else None
    if invalidity_date is not None and kept is not None and invalidity_date > kept:
        raise InputError(
            f"the invalidity date {invalidity_date.isoformat()} lies after this certificate's "
            f"revocation date {kept.isoformat()}, which it keeps: give an earlier date, or none"
        )


def decide_revocation(status: CertStatus, current: Reason | None, new: Reason) -> None:
    """Raise Conflict unless ``status/current -> revoked(new)`` is allowed.

    - issued or reserved (a reserved serial may have been signed) -> any reason;
    - on hold -> any reason other than hold (the hold becomes permanent);
    - revoked for another reason -> only keyCompromise (RFC 5280 permits changing the
      reason to keyCompromise; every other change is refused);
    - failed (never signed) -> nothing to revoke.
    """
    if status in (CertStatus.ISSUED, CertStatus.RESERVED):
        return
    if status is CertStatus.FAILED:
        raise Conflict("this serial was never signed (issuance failed); nothing to revoke")
    if current is Reason.CERTIFICATE_HOLD:
        if new is Reason.CERTIFICATE_HOLD:
            raise Conflict("certificate is already on hold")
        return
    if new is Reason.KEY_COMPROMISE and current is not Reason.KEY_COMPROMISE:
        return
    raise Conflict(
        f"certificate is already revoked ({current.value if current else '?'}); "
        "it may only be re-revoked for key_compromise"
    )


# Told after each change's commit: (CA id, the CA's revocation epoch of the change). Every
# certificate the change revoked or released carries that epoch as its status_epoch.
Listener = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Revocation:
    """What ``Revoker.revoke`` did: the certificate; for keyCompromise, the key's other
    certificates it revoked too ((CA name, serial), any CA) and whether it blocked the key
    (False when it was blocked already)."""

    certificate: Certificate
    also_revoked: tuple[tuple[str, str], ...] = ()
    key_blocked: bool = False


SWEEP_ACTOR = Actor(account="system:blocked-keys")


def _compromisable(cert: Certificate) -> bool:
    """Issued or reserved (a signature may exist), on hold, or revoked for another reason: what
    a certificate of a compromised key may still be, and must not stay."""
    if cert.status in (CertStatus.ISSUED, CertStatus.RESERVED):
        return True
    return (
        cert.status is CertStatus.REVOKED and cert.revocation_reason != Reason.KEY_COMPROMISE.value
    )


def _spki_of_der(der: bytes | None) -> str | None:
    """The key hash of a stored certificate (rows from before migration 0004 lack it)."""
    if der is None:
        return None
    try:
        return spki_sha256(x509.load_der_x509_certificate(der).public_key())  # type: ignore[arg-type]
    except ValueError:
        return None


class Revoker:
    def __init__(self, db: Database, journal: Journal, clock: Callable[[], dt.datetime]) -> None:
        self.db = db
        self.journal = journal
        self.clock = clock
        self.listeners: list[Listener] = []

    def _locked_cert(self, session: Session, ca: CertificateAuthority, serial: int) -> Certificate:
        stmt = (
            select(Certificate)
            .where(Certificate.issuer_id == ca.id, Certificate.serial == serial_hex(serial))
            .with_for_update()
        )
        cert = session.scalar(stmt)
        if cert is None:
            raise NotFound(f"CA {ca.name} has no certificate with serial {serial:x}")
        return cert

    def revoke(
        self,
        ca_name: str,
        serial: int,
        reason: Reason,
        actor: Actor,
        invalidity_date: dt.datetime | None = None,
    ) -> Revocation:
        """:meth:`_revoke`; a refusal (bad input, no such certificate or CA, a change the state
        machine forbids) is journalled as a failure, as rejected issuances are."""
        try:
            return self._revoke(ca_name, serial, reason, actor, invalidity_date)
        except (InputError, NotFound, Conflict) as exc:
            self._journal_refusal(
                "ca.revoke", ca_name, serial, exc, actor, {"revocation_reason": reason.value}
            )
            raise

    def _journal_refusal(
        self,
        action: str,
        ca_name: str,
        serial: int,
        exc: SekishoError,
        actor: Actor,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        self.journal.append_alone(
            self.db,
            refused(
                actor,
                Category.CA,
                action,
                exc,
                object_serial=serial_hex(serial) if 0 < serial < 1 << 160 else None,
                detail={"ca": ca_name, **(detail or {})},
            ),
            self.clock(),
        )

    def _revoke(
        self,
        ca_name: str,
        serial: int,
        reason: Reason,
        actor: Actor,
        invalidity_date: dt.datetime | None = None,
    ) -> Revocation:
        """Revoke one certificate; for keyCompromise also block its key and revoke every other
        certificate that carries it. Locks are taken in one order by every writer: certificate
        rows (by id), then CA rows (by id: the epochs), then the journal head; a compromised
        key's block row before all of them, so two revocations of one key queue holding
        nothing. A target revoked for keyCompromise already is a Conflict and changes nothing,
        even if a certificate of its key escaped (an issuance racing the block): the sweep
        (``revoke_blocked``) revokes that one within a refresher tick."""
        now = self.clock()
        if invalidity_date is not None:
            check_invalidity_date(invalidity_date, now)
        hex_serial = serial_hex(serial)
        with self.db.scope() as session:
            ca = ca_row(session, ca_name)
            spki = (
                self._key_of(session, ca.id, hex_serial)
                if reason is Reason.KEY_COMPROMISE
                else None
            )
            if spki is None:
                cert = self._locked_cert(session, ca, serial)
                current = Reason(cert.revocation_reason) if cert.revocation_reason else None
                decide_revocation(cert.status, current, reason)
                _invalid_before_revoked(cert, current, invalidity_date)
                epochs = self._revoke_all(session, [cert], reason, actor, now, invalidity_date)
                done = Revocation(cert)
            else:
                added = self._block_row(session, spki, now, issuer_id=ca.id, serial=hex_serial)
                certs = self._lock_keys(session, [spki], (ca.id, hex_serial))
                found = [c for c in certs if c.issuer_id == ca.id and c.serial == hex_serial]
                if not found:
                    raise NotFound(f"CA {ca.name} has no certificate with serial {serial:x}")
                cert = found[0]
                current = Reason(cert.revocation_reason) if cert.revocation_reason else None
                decide_revocation(cert.status, current, reason)
                _invalid_before_revoked(cert, current, invalidity_date)
                cert.spki_sha256 = spki
                others = [c for c in certs if c is not cert and _compromisable(c)]
                cause = f"the same key as {ca.name} {hex_serial}, compromised"
                epochs = self._revoke_all(
                    session, [cert, *others], reason, actor, now, invalidity_date,
                    {c.id: cause for c in others},
                )  # fmt: skip
                if added:
                    self._journal_block(session, spki, actor, now, cert=cert, ca_name=ca.name)
                done = Revocation(cert, self._named(session, others), added)
        self._notify(epochs)
        return done

    def block_key(
        self, key: CertificateIssuerPublicKeyTypes, actor: Actor, comment: str | None = None
    ) -> tuple[bool, list[tuple[str, str]]]:
        """Block a key reported compromised and revoke (keyCompromise) every certificate of
        ours that carries it: (newly blocked, [(CA name, serial) revoked])."""
        now = self.clock()
        spki = spki_sha256(key)
        with self.db.scope() as session:
            added = self._block_row(session, spki, now, comment=comment)
            certs = [c for c in self._lock_keys(session, [spki]) if _compromisable(c)]
            epochs = self._revoke_all(
                session, certs, Reason.KEY_COMPROMISE, actor, now, None,
                dict.fromkeys((c.id for c in certs), "its key was reported compromised"),
            )  # fmt: skip
            done = list(self._named(session, certs))
            if added:
                self._journal_block(session, spki, actor, now, comment=comment)
        self._notify(epochs)
        return added, done

    def revoke_blocked(self, now: dt.datetime, actor: Actor = SWEEP_ACTOR) -> int:
        """Revoke (keyCompromise) every certificate of a blocked key not revoked so yet: one
        that an issuance racing the block wrote after the block looked (PostgreSQL runs the
        two side by side). When there is none: one read, no write lock (it runs every
        refresher tick), driven by the blocked keys through the key-hash index (the status is
        wrapped so that SQLite does not scan certificates through its status index instead)."""
        status = func.coalesce(Certificate.status, "")
        pending = select(Certificate.spki_sha256).where(
            Certificate.spki_sha256.in_(select(BlockedKey.spki_sha256)),
            or_(
                status.in_([CertStatus.ISSUED, CertStatus.RESERVED]),
                and_(
                    status == CertStatus.REVOKED,
                    Certificate.revocation_reason != Reason.KEY_COMPROMISE.value,
                ),
            ),
        )
        with self.db.read_scope() as session:
            keys = sorted({str(k) for k in session.scalars(pending)})
        if not keys:
            return 0
        with self.db.scope() as session:
            certs = [c for c in self._lock_keys(session, keys) if _compromisable(c)]
            epochs = self._revoke_all(
                session, certs, Reason.KEY_COMPROMISE, actor, now, None,
                dict.fromkeys((c.id for c in certs), "its key is blocked"),
            )  # fmt: skip
        self._notify(epochs)
        return len(certs)

    def _named(self, session: Session, certs: Sequence[Certificate]) -> tuple[tuple[str, str], ...]:
        """(CA name, serial) of each of ``certs``."""
        names = dict(
            session.execute(
                select(CertificateAuthority.id, CertificateAuthority.name).where(
                    CertificateAuthority.id.in_({c.issuer_id for c in certs})
                )
            ).all()
        )
        return tuple((str(names[c.issuer_id]), c.serial) for c in certs)

    def _key_of(self, session: Session, ca_id: int, serial: str) -> str | None:
        """The key hash of a certificate (unlocked read; None if unknown or no such row)."""
        row = session.execute(
            select(Certificate.spki_sha256, Certificate.der).where(
                Certificate.issuer_id == ca_id, Certificate.serial == serial
            )
        ).first()
        if row is None:
            return None
        return str(row[0]) if row[0] else _spki_of_der(row[1])

    def _lock_keys(
        self, session: Session, keys: Sequence[str], also: tuple[int, str] | None = None
    ) -> list[Certificate]:
        """Every certificate of the keys ``keys`` (and the one ``also`` names: CA id, serial),
        locked in id order."""
        where: ColumnElement[bool] = Certificate.spki_sha256.in_(list(keys))
        if also is not None:
            where = or_(
                where, and_(Certificate.issuer_id == also[0], Certificate.serial == also[1])
            )
        return list(
            session.scalars(
                select(Certificate).where(where).order_by(Certificate.id).with_for_update()
            )
        )

    def _revoke_all(
        self,
        session: Session,
        certs: Sequence[Certificate],
        reason: Reason,
        actor: Actor,
        now: dt.datetime,
        invalidity_date: dt.datetime | None,
        causes: Mapping[int, str] | None = None,
    ) -> dict[int, int]:
        """Revoke ``certs`` (locked, the decision taken), each with its journal entry (naming
        ``causes[cert.id]`` when given); each CA's epoch bumped once, in id order, before the
        journal (and before the certificates change: each is then written once, when the
        journal flushes). The new epoch of each CA touched, by CA id."""
        touched = {cert.issuer_id for cert in certs}
        bumped = {ca_id: bump_revocation_epoch(session, ca_id) for ca_id in sorted(touched)}
        for cert in certs:
            current = Reason(cert.revocation_reason) if cert.revocation_reason else None
            previous = cert.status
            epoch, ca_name = bumped[cert.issuer_id]
            cert.status = CertStatus.REVOKED
            cert.revocation_reason = reason.value
            if cert.revoked_at is None:
                # A hold made permanent keeps the hold's date: the certificate has not been
                # valid since then, and a relying party checking a signature made during the
                # hold must not find it valid at that time.
                cert.revoked_at = now
            if (
                invalidity_date is not None
                and invalidity_date <= cert.revoked_at
                and (cert.invalidity_date is None or invalidity_date < cert.invalidity_date)
            ):
                # Not for one revoked before it (another certificate of a compromised key,
                # revoked earlier for another reason): it was invalid from then on already.
                # Nor a later date than one recorded before: a re-revocation to keyCompromise
                # never narrows the time from which the key is distrusted.
                cert.invalidity_date = invalidity_date
            cert.status_epoch = epoch
            detail: dict[str, object] = {
                "ca": ca_name,
                "reason": reason.value,
                "previous": previous.value,
                "previous_reason": current.value if current else None,
                "invalidity_date": invalidity_date.isoformat() if invalidity_date else None,
            }
            if causes and cert.id in causes:
                detail["cause"] = causes[cert.id]
            self.journal.append(
                session,
                by_actor(
                    actor,
                    Category.CA,
                    "ca.revoke",
                    Outcome.SUCCESS,
                    object_dn=cert.subject_dn,
                    object_serial=cert.serial,
                    detail=detail,
                ),
                now,
            )
        return {ca_id: epoch for ca_id, (epoch, _name) in bumped.items()}

    def _block_row(
        self,
        session: Session,
        spki: str,
        now: dt.datetime,
        *,
        issuer_id: int | None = None,
        serial: str | None = None,
        comment: str | None = None,
    ) -> bool:
        """Add ``spki`` to the blocklist unless there already (a concurrent block of the same
        key waits here, holding nothing else, and then adds nothing): True when added."""
        values = {
            "spki_sha256": spki,
            "issuer_id": issuer_id,
            "serial": serial,
            "comment": comment,
            "blocked_at": now,
        }
        dialect = session.get_bind().dialect.name
        upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        added = session.execute(
            upsert(BlockedKey)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["spki_sha256"])
            .returning(BlockedKey.id)
        ).first()
        return added is not None

    def _journal_block(
        self,
        session: Session,
        spki: str,
        actor: Actor,
        now: dt.datetime,
        *,
        cert: Certificate | None = None,
        ca_name: str | None = None,
        comment: str | None = None,
    ) -> None:
        detail: dict[str, object] = {"spki_sha256": spki}
        if ca_name is not None:
            detail["ca"] = ca_name
        if comment:
            detail["comment"] = comment
        self.journal.append(
            session,
            by_actor(
                actor,
                Category.CA,
                "ca.key.block",
                Outcome.SUCCESS,
                object_dn=cert.subject_dn if cert is not None else None,
                object_serial=cert.serial if cert is not None else None,
                detail=detail,
            ),
            now,
        )

    def release(self, ca_name: str, serial: int, actor: Actor) -> Certificate:
        """Take a certificate off hold (it reappears as removeFromCRL in the next delta); a
        refusal is journalled as a failure."""
        try:
            return self._release(ca_name, serial, actor)
        except (NotFound, Conflict) as exc:
            self._journal_refusal("ca.release", ca_name, serial, exc, actor)
            raise

    def _release(self, ca_name: str, serial: int, actor: Actor) -> Certificate:
        now = self.clock()
        with self.db.scope() as session:
            ca = ca_row(session, ca_name)
            cert = self._locked_cert(session, ca, serial)
            if (
                cert.status is not CertStatus.REVOKED
                or cert.revocation_reason != Reason.CERTIFICATE_HOLD.value
            ):
                raise Conflict("only a certificate on hold can be released")
            cert.status = CertStatus.ISSUED if cert.der is not None else CertStatus.RESERVED
            cert.revocation_reason = None
            cert.revoked_at = None
            cert.invalidity_date = None
            cert.released_at = now
            epoch = bump_revocation_epoch(session, ca.id)[0]
            cert.status_epoch = epoch
            self.journal.append(
                session,
                by_actor(
                    actor,
                    Category.CA,
                    "ca.release",
                    Outcome.SUCCESS,
                    object_dn=cert.subject_dn,
                    object_serial=cert.serial,
                    detail={"ca": ca.name},
                ),
                now,
            )
            ca_id = ca.id
        self._notify({ca_id: epoch})
        return cert

    def _notify(self, epochs: Mapping[int, int]) -> None:
        """Tell the listeners, CA by CA in id order, the epoch of a committed change."""
        for ca_id, epoch in sorted(epochs.items()):
            for listener in list(self.listeners):
                try:
                    listener(ca_id, epoch)
                except Exception:
                    # The OCSP refresher repairs what a failed listener left behind.
                    log.warning("revocation listener failed", exc_info=True, extra={"ca_id": ca_id})
