"""Revocation: RFC 5280 5.3.1 reasons, certificateHold and its release, re-revocation.

The decision (may this certificate move to that state?) is pure; ``Revoker`` applies it in one
transaction with the journal entry, bumps the CA's revocation epoch (so CRL builders and the
OCSP store see the change) and then tells listeners.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Callable

from cryptography import x509
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from audit.events import Category, Outcome, by_actor
from audit.journal import Journal
from ca.models import Certificate, CertificateAuthority, CertStatus
from ca.registry import ca_row
from ca.tbs import serial_hex
from sekisho.context import Actor
from sekisho.db import Database
from sekisho.errors import Conflict, InputError, NotFound, shown

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


Listener = Callable[[int], None]


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

    def _bump_epoch(self, session: Session, ca: CertificateAuthority) -> int:
        session.execute(
            update(CertificateAuthority)
            .where(CertificateAuthority.id == ca.id)
            .values(revocation_epoch=CertificateAuthority.revocation_epoch + 1)
        )
        epoch = session.scalar(
            select(CertificateAuthority.revocation_epoch).where(CertificateAuthority.id == ca.id)
        )
        assert epoch is not None
        return int(epoch)

    def revoke(
        self,
        ca_name: str,
        serial: int,
        reason: Reason,
        actor: Actor,
        invalidity_date: dt.datetime | None = None,
    ) -> Certificate:
        now = self.clock()
        if invalidity_date is not None:
            check_invalidity_date(invalidity_date, now)
        with self.db.scope() as session:
            ca = ca_row(session, ca_name)
            cert = self._locked_cert(session, ca, serial)
            current = Reason(cert.revocation_reason) if cert.revocation_reason else None
            decide_revocation(cert.status, current, reason)
            previous = cert.status
            cert.status = CertStatus.REVOKED
            cert.revocation_reason = reason.value
            if cert.revoked_at is None or current is Reason.CERTIFICATE_HOLD:
                cert.revoked_at = now
            cert.invalidity_date = invalidity_date or cert.invalidity_date
            cert.status_epoch = self._bump_epoch(session, ca)
            self.journal.append(
                session,
                by_actor(
                    actor,
                    Category.CA,
                    "ca.revoke",
                    Outcome.SUCCESS,
                    object_dn=cert.subject_dn,
                    object_serial=cert.serial,
                    detail={
                        "ca": ca.name,
                        "reason": reason.value,
                        "previous": previous.value,
                        "previous_reason": current.value if current else None,
                        "invalidity_date": invalidity_date.isoformat() if invalidity_date else None,
                    },
                ),
                now,
            )
            ca_id = ca.id
        self._notify(ca_id)
        return cert

    def release(self, ca_name: str, serial: int, actor: Actor) -> Certificate:
        """Take a certificate off hold (it reappears as removeFromCRL in the next delta)."""
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
            cert.status_epoch = self._bump_epoch(session, ca)
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
        self._notify(ca_id)
        return cert

    def _notify(self, ca_id: int) -> None:
        for listener in list(self.listeners):
            try:
                listener(ca_id)
            except Exception:
                # The OCSP refresher repairs what a failed listener left behind.
                log.warning("revocation listener failed", exc_info=True, extra={"ca_id": ca_id})
