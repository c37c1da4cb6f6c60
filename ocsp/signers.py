"""Delegated OCSP responders (RFC 6960 4.2.2.2): one per issuing CA, rotated before expiry.

Each issuing CA (active, key online) gets a responder: a new key in the CA's key backend (same
key type as the CA) and a certificate under that CA with the ``ocsp-signer`` profile (issued
through the normal issuance path, so it has a store row and a ``ca.issue`` journal entry). The
responder is recorded in ``ocsp_responders`` with a ``ocsp.signer.provision`` journal entry in
the same transaction. When less than a third of its validity remains, or less than an
answer's validity and the time to the next look, a new key and certificate replace it
(``ocsp.signer.rotate``); the old one is deactivated, responses it already signed stay valid
(its certificate outlives them). The store admits one active responder per CA.

A responder whose certificate is revoked (any reason, certificateHold included) is replaced at
once, by the process that revoked it (:func:`on_revocation`, a ``Revoker`` listener that runs
before the one re-signing the changed statuses), else by the refresher's next tick
(:func:`replace_revoked_responders`). Its certificate carries id-pkix-ocsp-nocheck: relying
parties never learn of the revocation, so we must stop using it ourselves. From the revocation
on nobody signs with it (``ocsp.store.refused_signers``); the answers it signed are re-signed
by the refresher (``OcspService.resign_from_revoked``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select, update

from audit.events import Category, Outcome, by_actor
from ca.hierarchy import discard_new_key
from ca.issuance import IssueRequest
from ca.models import CaKind, Certificate, CertificateAuthority, CertStatus
from ca.registry import ca_revoked
from ca.revocation import Reason
from ca.tbs import serial_hex
from hsm.base import KeyType
from ocsp.models import OcspResponder
from sekisho.context import Actor
from sekisho.errors import DuplicateKey, SekishoError

if TYPE_CHECKING:
    from sekisho.services import Services

log = logging.getLogger("sekisho.ocsp")

PROFILE = "ocsp-signer"
ROTATE_REMAINING = 1 / 3  # rotate when less than this share of the validity remains
# ... or when less than an answer's validity and this remain: the serving process looks at
# its responders every hour, and an answer signed until then must end before its signer does.
ROTATION_SLACK = dt.timedelta(hours=2)
SYSTEM_ACTOR = Actor(account="system:ocsp")


@dataclasses.dataclass(frozen=True)
class ResponderChange:
    ca: str
    action: str  # "provision", "rotate", or "discard" (another process replaced it first)
    serial: str
    key_ref: str
    not_after: dt.datetime


@dataclasses.dataclass(frozen=True)
class _Ca:
    id: int
    name: str
    key_type: str
    subject: x509.Name


def served_cas(services: Services) -> list[CertificateAuthority]:
    """The issuing CAs we answer for: active, key online, and not revoked by their parent (a
    revoked CA issues nothing, a responder included, and its answers are withheld:
    ``ocsp.store.refused_signers``)."""
    with services.db.read_scope() as session:
        rows = session.scalars(
            select(CertificateAuthority)
            .where(
                CertificateAuthority.kind == CaKind.ISSUING,
                CertificateAuthority.active.is_(True),
                CertificateAuthority.key_online.is_(True),
            )
            .order_by(CertificateAuthority.id)
        )
        return [row for row in rows if not ca_revoked(session, row)]


def active_responders(services: Services) -> dict[int, OcspResponder]:
    """issuer_id -> the active responder with the latest notAfter."""
    out: dict[int, OcspResponder] = {}
    with services.db.read_scope() as session:
        for row in session.scalars(
            select(OcspResponder)
            .where(OcspResponder.active.is_(True))
            .order_by(OcspResponder.not_after)
        ):
            out[row.issuer_id] = row
    return out


def needs_rotation(
    responder: OcspResponder,
    now: dt.datetime,
    answer_validity: dt.timedelta = dt.timedelta(0),
    ca_not_after: dt.datetime | None = None,
) -> bool:
    """Less than a third of its validity left; or too little for an answer signed before the
    next look (``answer_validity`` from then) to end before the responder does, while a
    successor would end later (not once both are cut to the CA's own end: the certificates
    answered for end with the CA too)."""
    remaining = responder.not_after - now
    lifetime = responder.not_after - responder.not_before
    if remaining < lifetime * ROTATE_REMAINING:
        return True
    cut_to_ca = ca_not_after is not None and responder.not_after >= ca_not_after
    return remaining < answer_validity + ROTATION_SLACK and not cut_to_ca


def revoked_active_responders(services: Services, ca_id: int | None = None) -> set[int]:
    """The ids of the active responders (of CA ``ca_id``, or of any CA) whose certificate is
    revoked: they must be replaced now. One small query."""
    with services.db.read_scope() as session:
        query = (
            select(OcspResponder.id)
            .join(Certificate, Certificate.id == OcspResponder.certificate_id)
            .where(OcspResponder.active.is_(True), Certificate.status == CertStatus.REVOKED)
        )
        if ca_id is not None:
            query = query.where(OcspResponder.issuer_id == ca_id)
        return {int(i) for i in session.scalars(query)}


def ensure_responders(
    services: Services,
    now: dt.datetime,
    actor: Actor = SYSTEM_ACTOR,
    *,
    rotate: bool = False,
    failures: dict[str, SekishoError] | None = None,
) -> list[ResponderChange]:
    """Provision a responder for every served CA lacking one; rotate those due
    (:func:`needs_rotation`) or whose certificate is revoked (every one with ``rotate``: an
    operator's key roll). Returns what changed (nothing when all is in order). A CA whose
    responder could not be made is left for the others; then the first such error is raised,
    or, when ``failures`` is given, every one is put there by CA name and nothing is raised."""
    revoked = revoked_active_responders(services)
    validity = services.settings.ocsp_validity

    def due(old: OcspResponder | None, ca: CertificateAuthority) -> bool:
        if old is None or rotate or old.id in revoked:
            return True
        return needs_rotation(old, now, validity, ca.not_after)

    return _renew(services, now, actor, due, revoked, failures)


def replace_revoked_responders(
    services: Services, now: dt.datetime, actor: Actor = SYSTEM_ACTOR, *, ca_id: int | None = None
) -> list[ResponderChange]:
    """Replace every active responder (of CA ``ca_id``, or of any CA) whose certificate is
    revoked: a new key and certificate, journalled as a rotation. Cheap when there is none
    (one query): the refresher calls it every tick."""
    revoked = revoked_active_responders(services, ca_id)
    if not revoked:
        return []
    # Whatever happens next, this process signs nothing more with the revoked responder: its
    # next issuer reload refuses it (ocsp.store.refused_signers).
    services.ocsp.invalidate_issuers()
    return _renew(
        services, now, actor, lambda old, _ca: old is not None and old.id in revoked, revoked
    )


def provision_new_ca(
    services: Services, ca_id: int, now: dt.datetime, actor: Actor = SYSTEM_ACTOR
) -> list[ResponderChange]:
    """A responder for CA ``ca_id`` if it has none active (a CA just created: without one its
    CA key would sign its answers until the refresher's hourly look). A failure is raised
    (the CA exists all the same; the refresher tries again)."""
    return _renew(services, now, actor, lambda old, ca: old is None and ca.id == ca_id, set())


def on_revocation(services: Services, ca_id: int, _epoch: int) -> None:
    """Revoker listener (before the one that re-signs the changed statuses): a revoked
    responder of that CA is replaced before revoke() returns. A failure here (the key backend
    away) is logged by the Revoker; the refresher tries again every tick, and meanwhile that
    CA's live answers are tryLater."""
    replace_revoked_responders(services, services.clock(), ca_id=ca_id)


def _renew(
    services: Services,
    now: dt.datetime,
    actor: Actor,
    due: Callable[[OcspResponder | None, CertificateAuthority], bool],
    revoked: set[int],
    failures: dict[str, SekishoError] | None = None,
) -> list[ResponderChange]:
    """A new responder for every served CA whose active one (or None) is ``due``."""
    changes: list[ResponderChange] = []
    successors: list[tuple[int, str]] = []
    failed: dict[str, SekishoError] = {} if failures is None else failures
    current = active_responders(services)
    for ca in served_cas(services):
        info = _Ca(
            ca.id,
            ca.name,
            ca.key_type,
            x509.load_der_x509_certificate(ca.certificate_der).subject,
        )
        old = current.get(ca.id)
        if not due(old, ca):
            continue
        revoked_old = old is not None and old.id in revoked
        try:
            change = _provision(services, info, old, now, actor, revoked_old)
        except SekishoError as exc:
            # One CA's failure (its key away, a conflict) leaves the others' responders and,
            # in the refresher, everyone's answers to be kept signed; raised after them.
            log.warning(
                "OCSP responder of CA %s not provisioned", ca.name,
                extra={"ca": ca.name, "error": exc.code, "detail": exc.message},
            )  # fmt: skip
            failed[ca.name] = exc
            continue
        changes.append(change)
        if revoked_old and change.action != "discard":
            successors.append((ca.id, change.serial))
    if changes:
        services.ocsp.invalidate_issuers()
    for ca_id, serial in successors:
        # Its own answer: pre-signing at its issuance found no signer for the CA (the revoked
        # one refused, this one not recorded yet).
        services.ocsp.sign_serials(ca_id, [serial], now)
    if failed and failures is None:
        raise next(iter(failed.values()))
    return changes


def _subject(ca: _Ca) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, f"{ca.name.capitalize()} OCSP Responder")]
    org = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value)))
    return x509.Name(attrs)


def _provision(
    services: Services,
    ca: _Ca,
    old: OcspResponder | None,
    now: dt.datetime,
    actor: Actor,
    revoked: bool = False,
) -> ResponderChange:
    key_type = KeyType(ca.key_type)
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")
    label = f"ocsp-{ca.name}-{stamp}-{secrets.token_hex(3)}"
    ref = services.backend.generate(label, key_type)
    try:
        cert = services.ca.issue(
            IssueRequest(
                ca=ca.name,
                profile=PROFILE,
                subject=_subject(ca),
                public_key=services.backend.public_key(ref),
                owner_kind="ocsp",
                owner_id=ca.name,
                key_generated_here=True,
            ),
            actor,
        )
    except BaseException:
        # Refused (the journal cannot be written, the CA key away): no certificate, so no key
        # (the hourly rotation piled up a key file per CA per try, for as long as it lasted).
        discard_new_key(services.ca, ref)
        raise
    serial = serial_hex(cert.serial_number)
    record = _Record(services, ca, old, cert, ref, key_type, now, actor, revoked)
    try:
        lost = record.store(lost=False)
    except DuplicateKey:
        # Another process recorded an active responder for this CA first, and we had no old
        # one to deactivate (its first responder): the index allows one active per CA.
        lost = record.store(lost=True)
    action = record.action(lost)
    log.info("ocsp responder %s", action, extra={"ca": ca.name, "serial": serial})
    if lost:
        # Never used: revoked, so that a key no responder row makes active signs nothing
        # anyone accepts. (Its certificate is inactive; the listener replaces active ones.)
        services.revoker.revoke(ca.name, cert.serial_number, Reason.SUPERSEDED, actor)
    return ResponderChange(ca.name, action.rsplit(".", 1)[1], serial, ref, cert.not_valid_after_utc)


@dataclasses.dataclass(frozen=True)
class _Record:
    """Recording a new responder (its row and journal entry, one transaction) once its
    certificate is issued."""

    services: Services
    ca: _Ca
    old: OcspResponder | None
    cert: x509.Certificate
    ref: str
    key_type: KeyType
    now: dt.datetime
    actor: Actor
    revoked: bool

    def action(self, lost: bool) -> str:
        if lost:
            return "ocsp.signer.discard"
        return "ocsp.signer.rotate" if self.old is not None else "ocsp.signer.provision"

    def store(self, *, lost: bool) -> bool:
        """Deactivate the old responder and record the new one active; or, ``lost`` (another
        process replaced the old one first), record the new one inactive. Returns ``lost``,
        found true when the old one was no longer active. DuplicateKey: another process
        recorded an active responder for the CA meanwhile; nothing was written."""
        ca, old, cert, now = self.ca, self.old, self.cert, self.now
        serial = serial_hex(cert.serial_number)
        with self.services.db.scope() as session:
            cert_id = session.scalar(
                select(Certificate.id).where(
                    Certificate.issuer_id == ca.id, Certificate.serial == serial
                )
            )
            assert cert_id is not None
            if old is not None and not lost:
                replaced = session.execute(
                    update(OcspResponder)
                    .where(OcspResponder.id == old.id, OcspResponder.active.is_(True))
                    .values(active=False, deactivated_at=now)
                    .returning(OcspResponder.id)
                ).all()
                # None: another process replaced it meanwhile (the revoking CLI's listener and
                # the refresher both saw it revoked): two active successors would both sign.
                lost = len(replaced) != 1
            session.add(
                OcspResponder(
                    issuer_id=ca.id,
                    certificate_id=cert_id,
                    serial=serial,
                    key_ref=self.ref,
                    key_type=self.key_type.value,
                    certificate_der=cert.public_bytes(serialization.Encoding.DER),
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    active=not lost,
                    created_at=now,
                    deactivated_at=now if lost else None,
                )
            )
            session.flush()  # a second active responder for the CA fails here: DuplicateKey
            detail: dict[str, object] = {
                "ca": ca.name,
                "key_ref": self.ref,
                "key_type": self.key_type.value,
                "not_after": cert.not_valid_after_utc.isoformat(),
            }
            if old is not None:
                detail["previous_serial"] = old.serial
                detail["previous_key_ref"] = old.key_ref
                if self.revoked:
                    detail["previous_revoked"] = True
            self.services.journal.append(
                session,
                by_actor(
                    self.actor,
                    Category.CA,
                    self.action(lost),
                    Outcome.SUCCESS,
                    object_dn=cert.subject.rfc4514_string(),
                    object_serial=serial,
                    detail=detail,
                ),
                now,
            )
        return lost
