"""The pre-signed OCSP store and the responder service built on it.

Every certificate of every served (issuing, active, key online) CA has one stored response:
a SHA-1 CertID, no nonce, ``producedAt = thisUpdate``, valid ``ocsp_validity`` (RFC 5019).
Status: ``issued`` and ``reserved`` rows are good (a reserved serial may have been signed),
``revoked`` rows are revoked with their time and reason (certificateHold included), ``failed``
rows (never signed) are unknown. A serial the CA never assigned has no row: answered live,
``unknown``, never good.

When responses are (re)signed:

* at issuance: :meth:`OcspService.on_issued`, a hook ``CaService`` calls once the certificate
  is signed; the response is written in the certificate's own store transaction (a signing
  failure leaves it to the refresher's repair and the issuance goes on; a store failure
  there fails the issuance like any other);
* on revocation and release: :meth:`OcspService.on_revocation` is a ``Revoker`` listener,
  called after the commit and before ``revoke()`` returns. It re-signs the certificates that
  change touched (``status_epoch`` at least the change's) whose stored response is older;
* when due: :func:`refresh_due` re-signs responses past ``ocsp_refresh_fraction`` of their
  validity and repairs rows that disagree with the certificates table (a revocation made by
  a process whose listener did not run: at the next tick) or are missing (an issuance hook
  that failed: at the next look at every certificate, every ``FULL_REPAIR_EVERY``);
* on demand: :func:`resign_all` (journalled ``ocsp.resign``);
* when their signer's certificate was revoked: :meth:`OcspService.resign_from_revoked`, a
  refresher step that finds them by that responder's ID in their DER, and re-signs them with
  its successor (:mod:`ocsp.signers` replaces a revoked responder at once).

A write never replaces a response that reflects a newer ``status_epoch`` of the certificate,
so a refresh racing a revocation cannot bring back "good".

Serving (:meth:`OcspService.answer`): a request without nonce and with exactly one CertID
equal to the SHA-1 CertID we pre-signed gets the stored DER byte for byte while it is within
its validity; everything else (nonce, SHA-256 CertID, several CertIDs, no stored row) is
signed on the fly from the certificates table. Stored responses served are held in memory:
while the database is unreachable they are served until their nextUpdate, then ``tryLater``;
an answer signed afresh from a held status (a nonce, a SHA-256 CertID) carries a nextUpdate no
later than the held one, and is refused (``tryLater``) once less than 8 h of it is left.

Who signs, for pre-signing and for serving, is reloaded CA by CA (:class:`Signers`, the rules
the standalone server follows too): a CA whose signer may not sign now (revoked, status
unknown, expiring, never loaded) is skipped when pre-signing and answered ``tryLater`` live.

The read API (:class:`StoredResponse`, :func:`load_issuers`, :func:`snapshot`,
:func:`changes_since`, :func:`lookup`) is what the standalone OCSP server and the static
export build on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import Table, and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Integer

from audit.events import Category, Outcome, by_actor
from ca.lint import Linter
from ca.models import CaKind, Certificate, CertificateAuthority, CertStatus
from ca.registry import ca_revoked
from ca.revocation import Reason
from ca.tbs import serial_hex
from hsm.base import KeyBackend, key_type_of
from ocsp import core
from ocsp.models import OcspResponder, OcspResponse
from sekisho.context import Actor
from sekisho.db import Database, Prepared, WriteTx
from sekisho.errors import SekishoError, StoreError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sekisho.services import Services
    from sekisho.settings import Settings

log = logging.getLogger("sekisho.ocsp")

CHANGES_OVERLAP = dt.timedelta(seconds=5)
ISSUERS_TTL = 10.0  # seconds between reloads of the served issuers (rotation, CAs taken offline)
REFUSED_EVERY = 0.5  # seconds between two looks at the signers' status (revoked: stop at once)
MISS_RELOAD = 5.0  # a request for an issuer we do not know reloads at most this often
HELD_MAX = 200_000  # stored responses held in memory for serving while the database is down
MAX_SERIAL = 1 << 160
IN_FLIGHT = dt.timedelta(minutes=5)  # a reserved row younger than this may still be signing
DEFAULT_BATCH = 500
# The refresher's repair looks at every certificate this often (and when it starts); in
# between, at the statuses changed since its last look only (OcspService.repair).
FULL_REPAIR_EVERY = dt.timedelta(minutes=10)
# A process that loaded a responder before its revocation may sign with it until its next
# issuer reload (ISSUERS_TTL): the answers it signed are looked for once more after this.
REVOKED_SIGNER_GRACE = dt.timedelta(minutes=1)
RESIGN_SECONDS = 2.0  # per refresher tick at most, re-signing a revoked responder's answers

GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"
_DER = Encoding.DER


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    """A stored response, or (``der`` empty: :data:`WITHDRAWN`) word that the one stored for
    that certificate is behind its status and must not be served: the certificate changed
    state (revoked, held, released) and no answer reflecting it is stored yet."""

    issuer_id: int
    serial: int
    der: bytes
    this_update: dt.datetime
    next_update: dt.datetime
    updated_at: dt.datetime


WITHDRAWN = b""


@dataclasses.dataclass(frozen=True)
class FollowCursor:
    """Where :func:`changes_since` goes on from: the newest ``updated_at`` seen, and each CA's
    revocation epoch as last read (every status change bumps it in its own transaction)."""

    updated_at: dt.datetime
    epochs: Mapping[int, int]


# -- certificate status -----------------------------------------------------------------------
def status_of(
    status: CertStatus | str, reason: str | None, revoked_at: dt.datetime | None
) -> core.Status:
    """The OCSP status of a certificates row."""
    status = CertStatus(status)
    if status in (CertStatus.ISSUED, CertStatus.RESERVED):
        return core.GOOD
    if status is CertStatus.REVOKED and revoked_at is not None:
        flag = Reason(reason).flag if reason else None
        return core.Revoked(revoked_at, flag)
    return core.UNKNOWN


def status_label(status: core.Status) -> str:
    """The ``cert_status`` column's word for an OCSP status."""
    if isinstance(status, core.Good):
        return GOOD
    if isinstance(status, core.Revoked):
        return REVOKED
    return UNKNOWN


def _fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


class _IssuerIds:
    """Issuer -> ca_authorities.id, by the SHA-256 of the CA certificate (reloaded on a miss)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._ids: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __call__(self, issuer: core.Issuer) -> int | None:
        key = _fingerprint(issuer.certificate.public_bytes(_DER))
        found = self._ids.get(key)
        if found is None:
            with self.db.read_scope() as session:
                rows = session.execute(
                    select(CertificateAuthority.id, CertificateAuthority.certificate_der)
                ).all()
            with self._lock:
                self._ids = {_fingerprint(bytes(der)): int(ca_id) for ca_id, der in rows}
            found = self._ids.get(key)
        return found


def lookup(db: Database) -> core.Lookup:
    """A status lookup on the certificates table: issued/reserved -> good, revoked -> revoked
    (time, reason), failed or never assigned -> unknown. Store errors propagate as
    :class:`StoreError` (the core answers tryLater)."""
    issuer_ids = _IssuerIds(db)

    def _lookup(issuer: core.Issuer, serial: int) -> core.Status:
        if not 0 < serial < MAX_SERIAL:
            return core.UNKNOWN
        issuer_id = issuer_ids(issuer)
        if issuer_id is None:
            return core.UNKNOWN
        with db.read_scope() as session:
            row = session.execute(
                select(
                    Certificate.status, Certificate.revocation_reason, Certificate.revoked_at
                ).where(
                    Certificate.issuer_id == issuer_id, Certificate.serial == serial_hex(serial)
                )
            ).first()
        if row is None:
            return core.UNKNOWN
        return status_of(row[0], row[1], row[2])

    return _lookup


# -- issuers ----------------------------------------------------------------------------------
_CA_SIGNS_LOGGED: set[int] = set()


_CaRow = tuple[int, str, str, bytes, tuple[str, bytes] | None]


def _served_cas(db: Database, sign_with_ca: bool) -> list[_CaRow]:
    """(id, name, CA key ref, CA certificate DER, (responder key ref, certificate DER) or
    None) of every served CA (issuing, active, key online). The responder is the active one
    with the latest notAfter; None: the CA key signs."""
    with db.read_scope() as session:
        cas = session.execute(
            select(
                CertificateAuthority.id,
                CertificateAuthority.name,
                CertificateAuthority.key_ref,
                CertificateAuthority.certificate_der,
            ).where(
                CertificateAuthority.kind == CaKind.ISSUING,
                CertificateAuthority.active.is_(True),
                CertificateAuthority.key_online.is_(True),
            )
        ).all()
        responders = _active_responders(session)
    out: list[_CaRow] = []
    for ca_id, name, key_ref, cert_der in cas:
        responder = None if sign_with_ca else responders.get(int(ca_id))
        if responder is None and not sign_with_ca and int(ca_id) not in _CA_SIGNS_LOGGED:
            _CA_SIGNS_LOGGED.add(int(ca_id))  # once per process: issuers reload every 10 s
            log.info("no OCSP responder for CA %s (yet); the CA key signs", name)
        out.append((int(ca_id), str(name), str(key_ref), bytes(cert_der), responder))
    return out


def _active_responders(
    session: Session, ca_ids: Sequence[int] | None = None
) -> dict[int, tuple[str, bytes]]:
    """CA id -> (key ref, certificate DER) of the responder that signs for it: the active one
    with the latest notAfter; of every CA, or of ``ca_ids``."""
    query = (
        select(OcspResponder.issuer_id, OcspResponder.key_ref, OcspResponder.certificate_der)
        .where(OcspResponder.active.is_(True))
        .order_by(OcspResponder.not_after)
    )
    if ca_ids is not None:
        query = query.where(OcspResponder.issuer_id.in_(list(ca_ids)))
    return {int(i): (str(ref), bytes(der)) for i, ref, der in session.execute(query)}


def chosen_responders(db: Database, ca_ids: Sequence[int]) -> dict[int, bytes]:
    """CA id -> certificate DER of the responder a reload would choose for it now, for those
    of ``ca_ids`` that have one (one small query, no key loaded). Store errors propagate."""
    with db.read_scope() as session:
        return {i: der for i, (_ref, der) in _active_responders(session, ca_ids).items()}


def _issuer(
    backend: KeyBackend, ca_cert: x509.Certificate, row: _CaRow, linter: Linter | None
) -> core.Issuer:
    """Who signs for one served CA: its delegated responder, or the CA key; with the lint gate
    when ``linter`` is given."""
    key_ref, responder = row[2], row[4]
    if responder is None:
        key = backend.signing_key(key_ref)
        return core.Issuer.create(ca_cert, key, lint=_gate(linter, key))
    ref, der = responder
    key = backend.signing_key(ref)
    return core.Issuer.create(
        ca_cert, key, x509.load_der_x509_certificate(der), lint=_gate(linter, key)
    )


def _gate(
    linter: Linter | None, key: CertificateIssuerPrivateKeyTypes
) -> Callable[[bytes, Callable[[bytes], bytes]], None] | None:
    """The lint gate of an issuer signing with ``key`` (``ocsp.core.Issuer.lint``)."""
    if linter is None:
        return None
    key_type = key_type_of(key.public_key())
    return lambda tbs, wrap: linter.check_ocsp_tbs(tbs, key_type, wrap)


def _load_issuers(
    db: Database, backend: KeyBackend, sign_with_ca: bool, linter: Linter | None
) -> dict[int, core.Issuer]:
    return {
        row[0]: _issuer(backend, x509.load_der_x509_certificate(row[3]), row, linter)
        for row in _served_cas(db, sign_with_ca)
    }


def load_issuers(services: Services) -> dict[int, core.Issuer]:
    """issuer_id -> Issuer for every served CA: the active delegated responder's certificate
    and key, or the CA's own key when ``ocsp_sign_with_ca`` is set (or no responder exists).
    One signer that cannot be loaded fails the call; :func:`load_issuers_each` does not."""
    return _load_issuers(
        services.db, services.backend, services.settings.ocsp_sign_with_ca, services.ocsp.linter
    )


def _why(exc: Exception) -> str:
    """What went wrong, fit for a log: our errors' code and message (they carry no secret),
    only the type of anything else (a library's message may quote what it was given)."""
    if isinstance(exc, SekishoError):
        return f"{exc.code}: {exc.message}"
    return type(exc).__name__


def load_issuers_each(
    services: Services,
) -> tuple[dict[int, core.Issuer], dict[int, core.SignerDown]]:
    """:func:`load_issuers` one CA at a time: (the served CAs whose signer loaded, the served
    CAs whose signer did not, with why). A store error propagates: then nothing is known."""
    return _load_each(
        services.db, services.backend, services.settings.ocsp_sign_with_ca, services.ocsp.linter
    )


def _load_each(
    db: Database, backend: KeyBackend, sign_with_ca: bool, linter: Linter | None
) -> tuple[dict[int, core.Issuer], dict[int, core.SignerDown]]:
    loaded: dict[int, core.Issuer] = {}
    down: dict[int, core.SignerDown] = {}
    for row in _served_cas(db, sign_with_ca):
        ca_cert = x509.load_der_x509_certificate(row[3])
        try:
            loaded[row[0]] = _issuer(backend, ca_cert, row, linter)
        except (SekishoError, ValueError, TypeError) as exc:
            # A key away or unreadable (KeyBackendError), a responder certificate that does not
            # fit its key or its CA (ConfigError), one that does not parse (ValueError).
            down[row[0]] = core.SignerDown(ca_cert, f"CA {row[1]}: {_why(exc)}")
    return loaded, down


def refused_signers(db: Database, issuers: Mapping[int, core.Issuer]) -> dict[int, str]:
    """CA id -> why the signer of ``issuers[id]`` must not sign: its certificate (the delegated
    responder's, issued by the CA; or the CA's own, issued by its parent) is revoked, or the
    store holds no issued certificate for it (status unknown: fail closed); or, signing for a
    CA revoked by its parent, the delegated responder of that CA (a revoked CA's answers are
    withheld: it may be a compromised key's). Its validity period is the caller's to check.
    Store errors propagate."""
    if not issuers:
        return {}
    with db.read_scope() as session:
        parents = {
            int(ca_id): parent_id
            for ca_id, parent_id in session.execute(
                select(CertificateAuthority.id, CertificateAuthority.parent_id).where(
                    CertificateAuthority.id.in_(list(issuers))
                )
            )
        }
        # CA id -> (issuer id, serial) of its signer's certificate; and of the CA's own
        # certificate, under its parent, when a delegated responder signs.
        signer: dict[int, tuple[int, str]] = {}
        ca_own: dict[int, tuple[int, str]] = {}
        for ca_id, issuer in issuers.items():
            parent = parents.get(ca_id)
            under = ca_id if issuer.delegated else parent
            if under is not None:
                signer[ca_id] = (int(under), serial_hex(issuer.responder_certificate.serial_number))
            if issuer.delegated and parent is not None:
                ca_own[ca_id] = (int(parent), serial_hex(issuer.certificate.serial_number))
        wanted = {*signer.values(), *ca_own.values()}
        found: dict[tuple[int, str], CertStatus] = {}
        if wanted:
            rows = session.execute(
                select(Certificate.issuer_id, Certificate.serial, Certificate.status).where(
                    or_(
                        *(
                            and_(Certificate.issuer_id == under, Certificate.serial == serial)
                            for under, serial in sorted(wanted)
                        )
                    )
                )
            )
            found = {(int(i), str(s)): CertStatus(status) for i, s, status in rows}
    refused: dict[int, str] = {}
    for ca_id in issuers:
        status = found.get(signer[ca_id]) if ca_id in signer else None
        own = found.get(ca_own[ca_id]) if ca_id in ca_own else CertStatus.ISSUED
        if own is CertStatus.REVOKED:
            refused[ca_id] = CA_REVOKED
        elif own is not CertStatus.ISSUED:
            refused[ca_id] = (
                "the store holds no issued certificate for the CA itself under the CA above it "
                "(status unknown)"
            )
        elif status is CertStatus.REVOKED:
            # The CA's own key signs (no delegated responder): its certificate is the CA's.
            delegated = issuers[ca_id].delegated
            refused[ca_id] = "its certificate is revoked" if delegated else CA_REVOKED
        elif status is not CertStatus.ISSUED:
            refused[ca_id] = "the store holds no issued certificate for it (status unknown)"
    return refused


# -- who signs, CA by CA ----------------------------------------------------------------------
# The served CAs whose signer loaded, and those whose signer did not (load_issuers_each).
IssuersFn = Callable[[], tuple[Mapping[int, core.Issuer], Mapping[int, core.SignerDown]]]
# CA id -> why that issuer's signing certificate must not sign (refused_signers).
RefusedFn = Callable[[Mapping[int, core.Issuer]], Mapping[int, str]]
# CA id -> the responder certificate (DER) a reload would choose (chosen_responders).
ChosenFn = Callable[[Sequence[int]], Mapping[int, bytes]]
_UNSEEN = b""  # no responder certificate is empty
EXPIRY_MARGIN = 60.0  # a signer whose certificate ends before the next reload + this: none
WITHHELD = "live answers tryLater; pre-signed answers served until their nextUpdate"
# A CA its parent revoked is withheld by design (``resign_all`` counts it no failure): said at
# INFO, not as a warning in every process that loads the issuers (each `issue`, from any CA).
CA_REVOKED = "the CA's own certificate is revoked (by the CA above it)"


def _trouble_level(detail: str) -> int:
    """INFO for the CA revoked alone; with another failure (its signer that did not load),
    a warning."""
    return logging.INFO if detail == f"responder: {CA_REVOKED}" else logging.WARNING


def signer_ending(issuer: core.Issuer, now: float, horizon: float) -> str | None:
    """Why ``issuer``'s signing certificate may not sign from ``now`` (POSIX seconds) until
    the next reload, ``horizon`` seconds away (plus a minute), or None."""
    cert = issuer.responder_certificate
    if now < cert.not_valid_before_utc.timestamp():
        return "its certificate is not valid yet"
    not_after = cert.not_valid_after_utc
    if not_after.timestamp() <= now:
        return f"its certificate expired at {not_after.isoformat()}"
    if not_after.timestamp() <= now + horizon + EXPIRY_MARGIN:
        return f"its certificate expires at {not_after.isoformat()}"
    return None


class Signers:
    """Who signs for which CA in one process, reloaded CA by CA; the standalone server and
    :class:`OcspService` (pre-signing, the web app's endpoint) both keep theirs here, under
    the same rules (docs/decisions.md, "One CA's signer broken"):

    * a CA whose signer cannot be loaded keeps the last good one this process used for it
      (same CA certificate), while that one may sign; one that never loaded is not served;
    * none may sign whose certificate is revoked or has no issued row in the store
      (``refused``: status unknown, fail closed), or is not valid until the next reload,
      ``horizon`` seconds away, plus a minute (checked even when the reload fails);
    * ``served``: every CA served, with its signer; ``signing``: those whose signer may sign
      now (the others' live answers are tryLater, their pre-signed ones still served).

    Each CA's trouble is logged once per streak, and when it is over. Not thread-safe: one
    caller reloads at a time."""

    def __init__(
        self,
        load: IssuersFn,
        refused: RefusedFn | None,
        horizon: float,
        logger: logging.Logger,
        served: Mapping[int, core.Issuer] | None = None,
        chosen: ChosenFn | None = None,
    ) -> None:
        self.load = load
        self.refused = refused
        self.chosen = chosen
        # CA id -> the responder the store chose when successor_waiting last asked for a
        # reload for it: a successor whose key does not load is not retried every poll.
        self.awaited: dict[int, bytes | None] = {}
        self.horizon = horizon
        self.log = logger
        self.served: dict[int, core.Issuer] = dict(served or {})
        self.signing: frozenset[int] = frozenset(self.served)
        self.troubles: dict[int, tuple[str, str]] = {}
        self.down: Mapping[int, core.SignerDown] = {}  # at the last reload

    def signers(self) -> dict[int, core.Issuer]:
        """The served CAs whose signer may sign now."""
        return {i: x for i, x in self.served.items() if i in self.signing}

    def reload(self, now: float) -> None:
        """Load every served CA's signer and decide who signs from ``now`` (POSIX seconds). A
        store error propagates and changes nothing (then see :meth:`withdraw_ending`)."""
        loaded, down = self.load()
        served = dict(loaded)
        for ca_id, issuer in served.items():
            last = self.served.get(ca_id)
            if last is not None and last.responder_certificate == issuer.responder_certificate:
                # The same signer: the shapes the lint gate passed stay passed (each reload,
                # every 10 s, had the first answers of every shape linted again).
                issuer.linted.update(last.linted)
        for ca_id, failure in down.items():
            last = self.served.get(ca_id)
            if last is not None and last.certificate == failure.certificate:
                served[ca_id] = last
        refused = dict(self.refused(served)) if self.refused is not None else {}
        for ca_id, issuer in served.items():
            ending = signer_ending(issuer, now, self.horizon)
            if ending is not None:
                refused.setdefault(ca_id, ending)
        signing = frozenset(served) - refused.keys()
        self._report(served, down, refused, signing)
        self.served, self.signing, self.down = served, signing, down

    def withdraw_ending(self, now: float) -> bool:
        """(Reload failed.) Whatever else is unknown, stop signing with a certificate that
        is not valid until the next reload. True when who signs changed."""
        ending = {
            i: why
            for i in self.signing
            if (why := signer_ending(self.served[i], now, self.horizon)) is not None
        }
        for ca_id, why in sorted(ending.items()):
            self.log.warning(
                "OCSP signer of a CA may not sign",
                extra={
                    "ca_id": ca_id,
                    "ca": self.served[ca_id].certificate.subject.rfc4514_string(),
                    "detail": why,
                    "action": WITHHELD,
                },
            )
            self.troubles[ca_id] = ("", WITHHELD)  # reported again once the store answers
        self.signing = self.signing - ending.keys()
        return bool(ending)

    def withdraw_refused(self) -> bool:
        """(Between two reloads.) Stop signing at once with a signer the store refuses now:
        its certificate revoked meanwhile, maybe by another process (one small query, no key
        loaded). True when who signs changed. A store error propagates and changes nothing."""
        if self.refused is None or not self.signing:
            return False
        refused = self.refused({i: self.served[i] for i in self.signing})
        if not refused:
            return False
        for ca_id, why in sorted(refused.items()):
            # Worded as the next reload reports it (_report): logged once for the streak.
            failure = self.down.get(ca_id)
            detail = f"responder: {why}"
            if failure is not None:
                detail = f"{failure.reason}; the last good responder: {why}"
            trouble = (detail, WITHHELD)
            self.log.log(
                _trouble_level(detail),
                "OCSP signer of a CA unavailable",
                extra={
                    "ca_id": ca_id,
                    "ca": self.served[ca_id].certificate.subject.rfc4514_string(),
                    "detail": trouble[0],
                    "action": trouble[1],
                },
            )
            self.troubles[ca_id] = trouble
        self.signing = self.signing - refused.keys()
        return True

    def successor_waiting(self) -> bool:
        """(Between two reloads.) True when a CA served but withheld now has another
        responder in the store than the one held (its successor, made by the process that
        revoked it; a rotation): the caller reloads at once rather than answer tryLater until
        the next reload. One small query, no key loaded, only while a CA is withheld; each
        responder so found asks once. A store error propagates."""
        withheld = sorted(self.served.keys() - self.signing)
        if self.chosen is None or not withheld:
            return False
        chosen = self.chosen(withheld)
        due = False
        for ca_id in withheld:
            issuer = self.served[ca_id]
            held = None
            if issuer.delegated:
                held = issuer.responder_certificate.public_bytes(Encoding.DER)
            now = chosen.get(ca_id)
            if now != held and now != self.awaited.get(ca_id, _UNSEEN):
                self.awaited[ca_id] = now
                due = True
        return due

    def _report(
        self,
        served: Mapping[int, core.Issuer],
        down: Mapping[int, core.SignerDown],
        refused: Mapping[int, str],
        signing: frozenset[int],
    ) -> None:
        """Log each CA's signer trouble when it starts or changes, and when it is over (not
        every reload while it lasts)."""
        troubles: dict[int, tuple[str, str]] = {}
        subjects: dict[int, str] = {}
        for ca_id, failure in down.items():
            subjects[ca_id] = failure.certificate.subject.rfc4514_string()
            if ca_id not in served:
                troubles[ca_id] = (failure.reason, "not served until its signer loads")
            elif ca_id in refused:
                detail = f"{failure.reason}; the last good responder: {refused[ca_id]}"
                troubles[ca_id] = (detail, WITHHELD)
            else:
                last = served[ca_id].responder_certificate
                action = (
                    f"the last good responder (serial {last.serial_number:x}) signs, "
                    f"until {last.not_valid_after_utc.isoformat()} at most"
                )
                troubles[ca_id] = (failure.reason, action)
        for ca_id, why in refused.items():
            if ca_id not in down:
                subjects[ca_id] = served[ca_id].certificate.subject.rfc4514_string()
                troubles[ca_id] = (f"responder: {why}", WITHHELD)
        for ca_id, (detail, action) in sorted(troubles.items()):
            if self.troubles.get(ca_id) != (detail, action):
                self.log.log(
                    _trouble_level(detail),
                    "OCSP signer of a CA unavailable",
                    extra={
                        "ca_id": ca_id,
                        "ca": subjects[ca_id],
                        "detail": detail,
                        "action": action,
                    },
                )
        for ca_id in sorted(self.troubles.keys() - troubles.keys()):
            over = "signs again" if ca_id in signing else "is no longer served"
            self.log.info("OCSP signer trouble over: the CA %s", over, extra={"ca_id": ca_id})
        self.troubles = troubles


# -- read API ---------------------------------------------------------------------------------
_STORED_COLUMNS = (
    OcspResponse.issuer_id,
    OcspResponse.serial,
    OcspResponse.der,
    OcspResponse.this_update,
    OcspResponse.next_update,
    OcspResponse.updated_at,
)


# A stored answer is behind when the certificate's status changed after it was signed.
_BEHIND = OcspResponse.status_epoch < Certificate.status_epoch


def _stored(row: Sequence[Any]) -> StoredResponse:
    """A row of ``_STORED_COLUMNS`` (+ ``_BEHIND``, if there): a behind one is withdrawn."""
    behind = len(row) > 6 and bool(row[6])
    return StoredResponse(
        issuer_id=int(row[0]),
        serial=int(row[1], 16),
        der=WITHDRAWN if behind else bytes(row[2]),
        this_update=row[3],
        next_update=row[4],
        updated_at=row[5],
    )


def _cursor_of(rows: Iterable[StoredResponse], floor: dt.datetime) -> dt.datetime:
    cursor = floor
    for row in rows:
        if row.updated_at > cursor:
            cursor = row.updated_at
    return cursor


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _epochs(session: Session) -> dict[int, int]:
    return {
        int(ca_id): int(epoch)
        for ca_id, epoch in session.execute(
            select(CertificateAuthority.id, CertificateAuthority.revocation_epoch)
        )
    }


def snapshot(
    db: Database, issuer_ids: Iterable[int] | None = None
) -> tuple[list[StoredResponse], FollowCursor]:
    """Every stored response that reflects its certificate's status (of the given CAs only,
    if ``issuer_ids``; one behind is left out: its status is looked up when asked), and the
    cursor to pass to :func:`changes_since` next. The epochs are read first: a change made
    while the responses are read is found again by the next :func:`changes_since`."""
    query = (
        select(*_STORED_COLUMNS)
        .outerjoin(Certificate, _SAME_CERT)
        .where(or_(Certificate.status_epoch.is_(None), ~_BEHIND))
    )
    if issuer_ids is not None:
        query = query.where(OcspResponse.issuer_id.in_(list(issuer_ids)))
    with db.read_scope() as session:
        epochs = _epochs(session)
    with db.read_scope() as session:
        rows = [_stored(r) for r in session.execute(query)]
    return rows, FollowCursor(_cursor_of(rows, _EPOCH), epochs)


def stored_response(db: Database, issuer_id: int, serial: int) -> StoredResponse | None:
    """The response stored for one certificate, as stored (also when behind its status)."""
    with db.read_scope() as session:
        row = session.execute(
            select(*_STORED_COLUMNS).where(
                OcspResponse.issuer_id == issuer_id, OcspResponse.serial == serial_hex(serial)
            )
        ).first()
    return _stored(row) if row is not None else None


def changes_since(db: Database, cursor: FollowCursor) -> tuple[list[StoredResponse], FollowCursor]:
    """What changed since ``cursor``, in the order to apply it, and the next cursor:

    1. for each CA whose revocation epoch moved, the certificates whose status changed since:
       the stored answer if it reflects that change, else :data:`WITHDRAWN` (a revocation is
       committed before its answer is re-signed, and while a CA's signer may not sign, it is
       not re-signed at all: the answer held until then says "good");
    2. the answers written at or after the cursor's ``updated_at`` minus a 5 s overlap
       (writers commit out of order; the caller may see one twice), each withdrawn if behind.

    The first does not depend on the writers' clocks, so an answer ``updated_at`` misses (a
    writer whose clock lags, a batch signed for longer than the overlap) never leaves a stale
    status served: at worst, that certificate's status is looked up when asked."""
    # One snapshot for both reads: a change committed between them would otherwise show the
    # same certificate two ways in one batch.
    with db.read_scope(snapshot=True) as session:
        epochs = _epochs(session)
        rows: list[StoredResponse] = []
        for ca_id, epoch in sorted(epochs.items()):
            seen = cursor.epochs.get(ca_id, 0)
            if epoch <= seen:
                continue
            rows.extend(
                _stored(r)
                for r in session.execute(
                    select(*_STORED_COLUMNS, _BEHIND)
                    .select_from(Certificate)
                    .join(OcspResponse, _SAME_CERT)
                    .where(Certificate.issuer_id == ca_id, Certificate.status_epoch > seen)
                )
            )
        written = [
            _stored(r)
            for r in session.execute(
                select(*_STORED_COLUMNS, _BEHIND)
                .outerjoin(Certificate, _SAME_CERT)
                .where(OcspResponse.updated_at >= cursor.updated_at - CHANGES_OVERLAP)
            )
        ]
    return rows + written, FollowCursor(_cursor_of(written, cursor.updated_at), epochs)


# -- the service ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Held:
    der: bytes
    status: core.Status
    next_update: dt.datetime


@dataclasses.dataclass(frozen=True)
class _Row:
    """What a certificates row says, ready to sign."""

    issuer_id: int
    serial: str
    status: core.Status
    epoch: int


_CERT_COLUMNS = (
    Certificate.issuer_id,
    Certificate.serial,
    Certificate.status,
    Certificate.revocation_reason,
    Certificate.revoked_at,
    Certificate.status_epoch,
)


# A certificate and its stored response (if any).
_SAME_CERT = and_(
    OcspResponse.issuer_id == Certificate.issuer_id, OcspResponse.serial == Certificate.serial
)


def _cert_rows(db: Database, *where: Any, limit: int) -> list[_Row]:
    """Certificates rows matching ``where``, joined to their stored response if any."""
    with db.read_scope() as session:
        return [
            _row(r)
            for r in session.execute(
                select(*_CERT_COLUMNS)
                .outerjoin(OcspResponse, _SAME_CERT)
                .where(*where)
                .limit(limit)
            )
        ]


def _row(values: Sequence[Any]) -> _Row:
    return _Row(
        int(values[0]), str(values[1]), status_of(values[2], values[3], values[4]), int(values[5])
    )


_UPSERTS: dict[str, Any] = {}
# Columns a newer answer replaces (the key is issuer_id, serial).
_REPLACED = ("der", "cert_status", "status_epoch", "this_update", "next_update", "updated_at")


def _upsert_statement(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE for stored responses, built once per dialect (building
    it, ``excluded`` above all, cost more than running it)."""
    found = _UPSERTS.get(dialect)
    if found is not None:
        return found
    table = cast(Table, OcspResponse.__table__)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["issuer_id", "serial"],
        set_={name: excluded[name] for name in _REPLACED},
        # Never replace an answer reflecting a newer state of the certificate.
        where=table.c.status_epoch <= excluded.status_epoch,
    )
    _UPSERTS[dialect] = stmt
    return stmt


_UPSERT = Prepared(
    None,
    ("issuer_id", "serial", *_REPLACED),
    columns=True,
    by_dialect=_upsert_statement,
)


class _Position(FunctionElement[int]):
    """``_Position(haystack, needle)``: 1 + where the bytes ``needle`` first occur in the
    binary column ``haystack``, 0 where they do not (SQLite's ``instr``, PostgreSQL's
    ``position``): the database looks, without sending every response over."""

    type = Integer()
    inherit_cache = True
    name = "position"


@compiles(_Position)
def _position_sqlite(element: _Position, compiler: SQLCompiler, **kw: Any) -> str:
    haystack, needle = list(element.clauses)
    return f"instr({compiler.process(haystack, **kw)}, {compiler.process(needle, **kw)})"


@compiles(_Position, "postgresql")
def _position_postgresql(element: _Position, compiler: SQLCompiler, **kw: Any) -> str:
    haystack, needle = list(element.clauses)
    return f"position({compiler.process(needle, **kw)} in {compiler.process(haystack, **kw)})"


@dataclasses.dataclass
class _Sweep:
    """How far the re-signing of one revoked responder's answers went (in memory)."""

    started: dt.datetime | None  # when the current pass began; None: the next one waits
    after: str = ""  # the last serial this pass looked at


class OcspService:
    def __init__(
        self,
        db: Database,
        backend: KeyBackend,
        settings: Settings,
        clock: Callable[[], dt.datetime],
        linter: Linter | None = None,
    ) -> None:
        self.db = db
        self.backend = backend
        # The lint gate (``lint_before_signing``): each issuer's first response of a shape.
        self.linter = linter
        self.validity = settings.ocsp_validity
        self.refresh_fraction = settings.ocsp_refresh_fraction
        self.sign_with_ca = settings.ocsp_sign_with_ca
        self.clock = clock
        self.lookup = lookup(db)
        # Who signs for which CA, CA by CA, under the standalone server's rules (Signers);
        # ``_issuers``: (every CA served, those whose signer may sign), swapped whole.
        self._signers = Signers(
            lambda: _load_each(db, backend, self.sign_with_ca, self.linter),
            lambda served: refused_signers(db, served),
            ISSUERS_TTL,
            log,
            chosen=None if self.sign_with_ca else lambda ids: chosen_responders(db, ids),
        )
        self._issuers: tuple[dict[int, core.Issuer], dict[int, core.Issuer]] | None = None
        self._issuers_at = 0.0
        self._checked_at = 0.0  # the signers' status looked at (between reloads)
        self._reloading = threading.Lock()
        self._held: dict[tuple[int, int], _Held] = {}
        self._lock = threading.Lock()
        # Re-signing the answers of revoked responders (refresher): by responder id, those
        # under way and those done; ``resigning``: more is to do at once.
        self._sweeps: dict[int, _Sweep] = {}
        self._swept: set[int] = set()
        self.resigning = False
        # Repair (refresher): by CA id, the revocation epoch up to which every status change
        # has had its answer looked at; when the next look at every certificate is due.
        self._repaired_epochs: dict[int, int] = {}
        self._full_repair_at: dt.datetime | None = None
        self._full_repaired: dt.datetime | None = None  # the last complete look, by ``now``

    # -- issuers ------------------------------------------------------------------------------
    def issuers(self) -> dict[int, core.Issuer]:
        """The served CAs whose signer may sign now (pre-signing signs for these only)."""
        return self._current()[1]

    def withheld(self) -> dict[int, Withheld]:
        """CA id -> why nothing is signed for it here now: the CAs served (issuing, active,
        key online) left out of :meth:`issuers`, their signer not loaded (``signer_down``),
        refused (revoked, status unknown; the CA's own certificate revoked or held by its
        parent included) or its certificate ending. Store errors propagate."""
        served, signing = self._current()
        down = self._signers.down
        out = {ca_id: "" for ca_id in served.keys() - signing.keys()}
        out.update({ca_id: failure.reason for ca_id, failure in down.items()})
        for ca_id in out:
            trouble = self._signers.troubles.get(ca_id)
            if trouble is not None and trouble[0]:
                out[ca_id] = trouble[0]
        return {
            ca_id: Withheld(why or "no signer may sign", ca_id in down)
            for ca_id, why in out.items()
            if ca_id not in signing
        }

    def _current(self) -> tuple[dict[int, core.Issuer], dict[int, core.Issuer]]:
        """(every CA served, those whose signer may sign), reloaded CA by CA every
        ``ISSUERS_TTL`` seconds (:class:`Signers`: one CA's signer out of reach does not stop
        the others). While the database is down the last ones are kept, less any signer whose
        certificate ends before the next reload; one thread reloads, the others go on with
        what is there meanwhile."""
        current = self._issuers
        mono = time.monotonic()
        if current is not None and mono - self._issuers_at < ISSUERS_TTL:
            if mono - self._checked_at < REFUSED_EVERY:
                return current
            return self._withdraw_refused(current)
        if current is None:
            self._reloading.acquire()
        elif not self._reloading.acquire(blocking=False):
            return current
        try:
            current = self._issuers
            if current is not None and time.monotonic() - self._issuers_at < ISSUERS_TTL:
                return current  # reloaded by another thread meanwhile
            now = self.clock().timestamp()
            try:
                self._signers.reload(now)
            except (StoreError, SQLAlchemyError):
                if current is None:
                    raise
                if not self._signers.withdraw_ending(now):
                    return current
            else:
                self._issuers_at = self._checked_at = time.monotonic()
            current = (dict(self._signers.served), self._signers.signers())
            self._issuers = current
            return current
        finally:
            self._reloading.release()

    def _withdraw_refused(
        self, current: tuple[dict[int, core.Issuer], dict[int, core.Issuer]]
    ) -> tuple[dict[int, core.Issuer], dict[int, core.Issuer]]:
        """Between two reloads, every ``REFUSED_EVERY`` seconds: a responder revoked since
        (by another process, which makes its successor) signs nothing more here, not even
        until the next reload (one small query; :meth:`Signers.withdraw_refused`); a withheld
        CA whose successor responder is in the store is reloaded at once
        (:meth:`Signers.successor_waiting`). A store error leaves it to the reload."""
        if not self._reloading.acquire(blocking=False):
            return current
        successor = False
        try:
            self._checked_at = time.monotonic()
            if self._issuers is not current:
                return self._issuers or current  # reloaded by another thread meanwhile
            if self._signers.withdraw_refused():
                current = (dict(self._signers.served), self._signers.signers())
                self._issuers = current
            successor = self._signers.successor_waiting()
        except (StoreError, SQLAlchemyError):
            log.debug("checking the OCSP signers' status failed", exc_info=True)
        finally:
            self._reloading.release()
        if successor:  # a withheld CA's successor responder is there: reload now
            self.invalidate_issuers()
            return self._current()
        return current

    def _reload_on_miss(self) -> tuple[dict[int, core.Issuer], dict[int, core.Issuer]]:
        """A CA we do not know yet (created by another process): reload, at most every few
        seconds (misses are cheap to cause)."""
        if time.monotonic() - self._issuers_at >= MISS_RELOAD:
            self.invalidate_issuers()
        return self._current()

    def invalidate_issuers(self) -> None:
        with self._lock:
            self._issuers_at = 0.0

    # -- serving ------------------------------------------------------------------------------
    def answer(self, request_der: bytes, now: dt.datetime) -> bytes:
        """Bytes in, OCSPResponse bytes out; never raises for client input or a store outage."""
        try:
            request = core.parse_request(request_der)
        except core.MalformedRequest:
            return core.MALFORMED_REQUEST
        try:
            served, signing = self._current()
        except (StoreError, SQLAlchemyError):
            return core.TRY_LATER
        issuer = core.select_issuer(request, list(served.values()))
        if issuer is None:
            try:
                served, signing = self._reload_on_miss()
            except (StoreError, SQLAlchemyError):
                return core.UNAUTHORIZED
            issuer = core.select_issuer(request, list(served.values()))
            if issuer is None:
                return core.UNAUTHORIZED
        issuer_id = next(i for i, v in served.items() if v is issuer)
        signs = issuer_id in signing
        single = request.cert_ids[0] if len(request.cert_ids) == 1 else None
        if single is not None:
            presigned = single.hash_algorithm == "sha1" and 0 < single.serial < MAX_SERIAL
            if presigned and issuer.cert_id(single.serial).der != single.der:
                presigned = False  # same CertID fields, other encoding: echo theirs, sign live
            if presigned:
                found = self._stored_answer(issuer, issuer_id, single.serial, request, now, signs)
                if found is not None:
                    return found
        if not signs:
            return core.TRY_LATER  # ours, but its signer may not sign now

        held_until: list[dt.datetime] = []

        def live(chosen: core.Issuer, serial: int) -> core.Status:
            try:
                return self.lookup(chosen, serial)
            except (StoreError, SQLAlchemyError) as exc:
                # Database down: a status we hold (from a stored response) until its nextUpdate.
                held = self._held.get((issuer_id, serial))
                if held is not None and now < held.next_update:
                    held_until.append(held.next_update)
                    return held.status
                raise StoreError(f"database unavailable: {exc.__class__.__name__}") from exc

        def validity() -> dt.timedelta:
            # A status answered from memory is vouched for no longer than its stored response.
            if held_until:
                return min(self.validity, min(held_until) - now)
            return self.validity

        return core.answer(request, [issuer], live, now=now, validity=validity)

    def _stored_answer(
        self,
        issuer: core.Issuer,
        issuer_id: int,
        serial: int,
        request: core.OcspRequest,
        now: dt.datetime,
        signs: bool,
    ) -> bytes | None:
        key = (issuer_id, serial)
        try:
            with self.db.read_scope() as session:
                row = session.execute(
                    select(
                        OcspResponse.der,
                        OcspResponse.next_update,
                        OcspResponse.this_update,
                        Certificate.status,
                        Certificate.revocation_reason,
                        Certificate.revoked_at,
                        _BEHIND,
                    )
                    .join(
                        Certificate,
                        _SAME_CERT,
                    )
                    .where(
                        OcspResponse.issuer_id == issuer_id,
                        OcspResponse.serial == serial_hex(serial),
                    )
                ).first()
        except (StoreError, SQLAlchemyError):
            return self._held_answer(issuer, key, request, now, signs)
        if row is None:
            return None  # a miss: signed live from the certificates table
        der, next_update, this_update = bytes(row[0]), row[1], row[2]
        status = status_of(row[3], row[4], row[5])
        if row[6]:
            # The certificate changed state since this was signed (a revocation not re-signed
            # yet, or not at all while the CA's signer may not): never serve it. Signed live
            # from the row if the signer may sign, else tryLater.
            with self._lock:
                self._held.pop(key, None)
            return None
        if this_update > now or now >= next_update:
            return None
        self._hold(key, _Held(der, status, next_update))
        if request.nonce is not None:
            return None
        return der

    def _hold(self, key: tuple[int, int], held: _Held) -> None:
        with self._lock:
            if len(self._held) >= HELD_MAX and key not in self._held:
                self._held.pop(next(iter(self._held)))
            self._held[key] = held

    def _held_answer(
        self,
        issuer: core.Issuer,
        key: tuple[int, int],
        request: core.OcspRequest,
        now: dt.datetime,
        signs: bool,
    ) -> bytes:
        held = self._held.get(key)
        if held is None or now >= held.next_update:
            return core.TRY_LATER
        if request.nonce is None:
            return held.der
        if not signs:
            return core.TRY_LATER
        # A nonce asks for a fresh signature: sign the status we last saw stored.
        return core.answer(
            request,
            [issuer],
            lambda _i, _s: held.status,
            now=now,
            validity=min(self.validity, held.next_update - now),
        )

    def warm(self) -> int:
        """Hold every stored response in memory (for serving through an outage); one behind
        its certificate's status is not held."""
        rows, _ = snapshot(self.db)
        with self.db.read_scope() as session:
            statuses = {
                (int(r[0]), str(r[1])): status_of(r[2], r[3], r[4])
                for r in session.execute(
                    select(*_CERT_COLUMNS[:5]).join(
                        OcspResponse,
                        _SAME_CERT,
                    )
                )
            }
        for r in rows:
            status = statuses.get((r.issuer_id, serial_hex(r.serial)), core.UNKNOWN)
            self._hold((r.issuer_id, r.serial), _Held(r.der, status, r.next_update))
        return len(rows)

    # -- signing ------------------------------------------------------------------------------
    def sign_rows(self, rows: Sequence[_Row], now: dt.datetime) -> int:
        """Pre-sign and store a response for each row; rows of CAs we do not serve are
        skipped. Returns how many were written."""
        values = self._signed_values(rows, now)
        if values:
            self._upsert(values)
        self._rehold(rows, values)
        return len(values)

    def _rehold(self, rows: Sequence[_Row], values: Sequence[Mapping[str, Any]]) -> None:
        """What is held for serving through an outage follows what was just signed: a held
        answer is replaced by the new one, or dropped when its status is not the row's any
        more and nothing could be signed (else a revocation made here would be answered from
        the old "good" once the database is down)."""
        signed = {(v["issuer_id"], v["serial"]): v for v in values}
        with self._lock:
            for row in rows:
                key = (row.issuer_id, int(row.serial, 16))
                held = self._held.get(key)
                if held is None:
                    continue
                value = signed.get((row.issuer_id, row.serial))
                if value is not None:
                    self._held[key] = _Held(value["der"], row.status, value["next_update"])
                elif held.status != row.status:
                    del self._held[key]

    def _signed_values(self, rows: Sequence[_Row], now: dt.datetime) -> list[dict[str, Any]]:
        if not rows:
            return []
        served, _ = self._current()
        if any(row.issuer_id not in served for row in rows):
            self.invalidate_issuers()  # a CA created since (sign_rows is not client-driven)
        issuers = self.issuers()  # a CA served whose signer may not sign now: skipped
        this_update = now.astimezone(dt.UTC).replace(microsecond=0)
        next_update = this_update + self.validity
        values: list[dict[str, Any]] = []
        for row in rows:
            issuer = issuers.get(row.issuer_id)
            if issuer is None:
                continue
            der = core.precompute(issuer, int(row.serial, 16), row.status, this_update, next_update)
            values.append(
                {
                    "issuer_id": row.issuer_id,
                    "serial": row.serial,
                    "der": der,
                    "cert_status": status_label(row.status),
                    "status_epoch": row.epoch,
                    "this_update": this_update,
                    "next_update": next_update,
                }
            )
        # When written, not when signing began (a batch of slow signatures takes seconds): the
        # standalone server follows the store by this time (changes_since).
        written = self.clock()
        for value in values:
            value["updated_at"] = written
        return values

    def _upsert(self, values: list[dict[str, Any]]) -> None:
        with self.db.connection_scope() as conn:
            conn.execute(_upsert_statement(conn.dialect.name), values)

    def sign_serials(self, issuer_id: int, serials: Sequence[str], now: dt.datetime) -> int:
        """(Re-)sign the given serials (40-hex) of one CA from their certificates rows."""
        if not serials:
            return 0
        with self.db.read_scope() as session:
            rows = [
                _row(r)
                for r in session.execute(
                    select(*_CERT_COLUMNS).where(
                        Certificate.issuer_id == issuer_id, Certificate.serial.in_(list(serials))
                    )
                )
            ]
        return self.sign_rows(rows, now)

    # -- hooks --------------------------------------------------------------------------------
    def on_issued(self, issuer_id: int, serial: int) -> Callable[[WriteTx], None] | None:
        """Issuance hook, called once the certificate is signed: the first response ("good",
        status epoch 0, the row's state at issuance), signed now and written in the
        certificate's own store transaction. A revocation that gets in later has a higher
        epoch, and the upsert never replaces a newer epoch's answer. A signing failure leaves
        the response to the refresher's repair and the issuance goes on (None); the write
        itself fails the issuance if the store refuses it."""
        try:
            values = self._signed_values(
                [_Row(issuer_id, serial_hex(serial), core.GOOD, 0)], self.clock()
            )
        except (SekishoError, ValueError) as exc:
            log.warning("ocsp pre-sign at issuance failed (the refresher repairs it)",
                        extra={"detail": str(exc)})  # fmt: skip
            return None
        if not values:
            return None

        def write(tx: WriteTx) -> None:
            tx.execute(_UPSERT, values[0])

        return write

    def on_revocation(self, ca_id: int, epoch: int) -> None:
        """Revoker listener: re-sign what the change (at ``epoch``) changed, before
        revoke()/release() returns. Only rows of that epoch or later are looked at, through the
        (issuer, status epoch) index: the work is the change's, not every revoked certificate
        of the CA's (a scan of them all took 150 ms per revocation at 10^5). A change whose
        listener did not run (another process, a failure) is the refresher's repair."""
        self.resign_changed(ca_id, self.clock(), since=epoch)

    def resign_changed(
        self, ca_id: int, now: dt.datetime, batch: int = 10_000, since: int = 1
    ) -> int:
        """Re-sign the certificates of one CA whose status changed (at epoch ``since`` or
        later) since they were signed."""
        total = 0
        while True:
            found, written = self._resign_changed_batch(ca_id, now, since, batch)
            total += written
            if found < batch or written == 0:
                return total

    def _resign_changed_batch(
        self, ca_id: int, now: dt.datetime, since: int, batch: int
    ) -> tuple[int, int]:
        """One batch of :meth:`resign_changed`: (rows found, answers written)."""
        rows = _cert_rows(
            self.db,
            Certificate.issuer_id == ca_id,
            Certificate.status_epoch >= max(since, 1),
            or_(
                OcspResponse.id.is_(None),
                OcspResponse.status_epoch < Certificate.status_epoch,
            ),
            limit=batch,
        )
        return len(rows), self.sign_rows(rows, now)

    def resign_from_revoked(
        self, now: dt.datetime, batch: int = DEFAULT_BATCH, seconds: float = RESIGN_SECONDS
    ) -> int:
        """Re-sign the stored answers signed by a responder whose certificate is revoked (and
        not expired: a client refuses what an expired one signed anyway), a batch at a time in
        serial order, for up to ``seconds``; ``resigning`` then says whether more is to do at
        once. They are found by that responder's ID (byKey) in their DER, in the database.
        They are signed by whoever signs for their CA now: its successor (ocsp.signers); a CA
        with no signer that may sign waits. Returns how many were written.

        A pass that ends before the revocation is :data:`REVOKED_SIGNER_GRACE` old is followed
        by one more then: another process may have signed with the responder until its next
        issuer reload. What was swept is kept in memory: after a restart, each revoked
        responder whose certificate is still valid costs one look through its CA's answers."""
        self.resigning = False  # until found otherwise (a failure here: not at once again)
        revoked = self._revoked_signers(now)
        if revoked.keys() - self._sweeps.keys() - self._swept:
            # Revoked since we last looked, maybe by another process: the signers this one
            # holds may be from before (ISSUERS_TTL); reload them, which refuses it.
            self.invalidate_issuers()
        self._sweeps = {i: x for i, x in self._sweeps.items() if i in revoked}
        deadline = time.monotonic() + seconds
        written, more = 0, False
        for responder_id, (issuer_id, needle, revoked_at) in sorted(revoked.items()):
            if responder_id in self._swept:
                continue
            sweep = self._sweeps.setdefault(responder_id, _Sweep(now))
            if sweep.started is None:
                if now < revoked_at + REVOKED_SIGNER_GRACE:
                    continue
                sweep.started, sweep.after = now, ""
            while self._signs_instead(issuer_id, needle):
                if time.monotonic() >= deadline:
                    more = True
                    break
                serials = self._signed_by(issuer_id, needle, sweep.after, batch)
                signed = self.sign_serials(issuer_id, serials, now)
                if serials and not signed and not self._signs_instead(issuer_id, needle):
                    break  # its signer went away meanwhile: this batch again next tick
                written += signed
                sweep.after = serials[-1] if serials else sweep.after
                if len(serials) < batch:  # the end of this pass
                    if sweep.started >= revoked_at + REVOKED_SIGNER_GRACE:
                        self._swept.add(responder_id)
                        del self._sweeps[responder_id]
                    else:
                        sweep.started = None
                    break
        self.resigning = more
        return written

    def _signs_instead(self, issuer_id: int, needle: bytes) -> bool:
        """Someone signs for that CA now, other than the revoked responder ``needle`` names."""
        signer = self.issuers().get(issuer_id)
        return signer is not None and signer.responder_id_der != needle

    def _revoked_signers(self, now: dt.datetime) -> dict[int, tuple[int, bytes, dt.datetime]]:
        """Responder id -> (its CA's id, its responderID DER, when it was revoked), for every
        responder whose certificate is revoked and not expired. One small query."""
        with self.db.read_scope() as session:
            rows = session.execute(
                select(
                    OcspResponder.id,
                    OcspResponder.issuer_id,
                    OcspResponder.certificate_der,
                    Certificate.revoked_at,
                )
                .join(Certificate, Certificate.id == OcspResponder.certificate_id)
                .where(Certificate.status == CertStatus.REVOKED, OcspResponder.not_after > now)
            ).all()
        return {
            int(responder_id): (
                int(issuer_id),
                core.responder_id_by_key(x509.load_der_x509_certificate(bytes(der))),
                revoked_at or now,
            )
            for responder_id, issuer_id, der, revoked_at in rows
        }

    def _signed_by(self, issuer_id: int, needle: bytes, after: str, limit: int) -> list[str]:
        """Serials after ``after`` of the CA's stored answers whose DER holds ``needle``."""
        with self.db.read_scope() as session:
            return [
                str(serial)
                for serial in session.scalars(
                    select(OcspResponse.serial)
                    .where(
                        OcspResponse.issuer_id == issuer_id,
                        OcspResponse.serial > after,
                        _Position(OcspResponse.der, needle) > 0,
                    )
                    .order_by(OcspResponse.serial)
                    .limit(limit)
                )
            ]

    def repair(self, now: dt.datetime, batch: int = DEFAULT_BATCH) -> int:
        """Sign what is missing or disagrees with the certificates table (status or epoch), up
        to ``batch`` rows. Every FULL_REPAIR_EVERY (and at the first call) every certificate
        is looked at; in between, CA by CA, only the statuses changed since the last look (by
        revocation epoch, down the (issuer, status epoch) index): a revocation whose listener
        did not run still has its answer re-signed within a tick. The whole look cost 170 ms
        per tick at 10^5 certificates; a certificate whose issuance hook failed has no stored
        answer until the next whole look, and is answered live from the certificates table
        meanwhile."""
        served = list(self.issuers())
        if not served:
            return 0
        epochs = self._revocation_epochs(served)
        last, due = self._full_repaired, self._full_repair_at
        # (A clock stepped back before the last look does not put the next one off.)
        if last is not None and due is not None and last <= now < due:
            return self._repair_changed(epochs, now, batch)
        rows = self._disagreeing(served, now, batch)
        written = self.sign_rows(rows, now)
        if len(rows) < batch and written == len(rows):  # all of it looked at and signed
            self._full_repaired, self._full_repair_at = now, now + FULL_REPAIR_EVERY
            self._repaired_epochs = epochs
        return written

    def _revocation_epochs(self, ca_ids: Iterable[int]) -> dict[int, int]:
        """The revocation epoch of each CA, read before the certificates are: every change at
        or below it is committed (its CA row was locked until then)."""
        with self.db.read_scope() as session:
            return {
                int(ca_id): int(epoch)
                for ca_id, epoch in session.execute(
                    select(CertificateAuthority.id, CertificateAuthority.revocation_epoch).where(
                        CertificateAuthority.id.in_(list(ca_ids))
                    )
                )
            }

    def _repair_changed(self, epochs: Mapping[int, int], now: dt.datetime, batch: int) -> int:
        written = 0
        for ca_id, epoch in sorted(epochs.items()):
            since = self._repaired_epochs.get(ca_id)
            if since is None:  # served since the last whole look: look at everything next
                self._full_repair_at = None
                continue
            if epoch <= since:
                continue  # nothing changed: no query
            found, signed = self._resign_changed_batch(ca_id, now, since + 1, batch)
            written += signed
            if found < batch and signed == found:
                self._repaired_epochs[ca_id] = epoch
        return written

    def _disagreeing(self, served: list[int], now: dt.datetime, batch: int) -> list[_Row]:
        """Up to ``batch`` certificates of ``served`` CAs whose stored answer is missing or
        disagrees with them."""
        good_statuses = (CertStatus.ISSUED, CertStatus.RESERVED)
        expected_mismatch = or_(
            and_(Certificate.status.in_(good_statuses), OcspResponse.cert_status != GOOD),
            and_(Certificate.status == CertStatus.REVOKED, OcspResponse.cert_status != REVOKED),
            and_(Certificate.status == CertStatus.FAILED, OcspResponse.cert_status != UNKNOWN),
            OcspResponse.status_epoch < Certificate.status_epoch,
        )
        missing = and_(
            OcspResponse.id.is_(None),
            Certificate.status != CertStatus.FAILED,
            # A young reserved row is an issuance in flight: its hook signs it.
            or_(
                Certificate.status != CertStatus.RESERVED, Certificate.created_at < now - IN_FLIGHT
            ),
        )
        return _cert_rows(
            self.db, Certificate.issuer_id.in_(served), or_(missing, expected_mismatch), limit=batch
        )

    def refresh_due(self, now: dt.datetime, batch: int = DEFAULT_BATCH) -> int:
        """Re-sign up to ``batch`` stored responses past the refresh point (the configured
        share of their validity), oldest first; then repair up to ``batch`` rows."""
        remaining = self.validity * (1 - self.refresh_fraction)
        signing = list(self.issuers())
        if not signing:
            return 0
        due: list[tuple[dt.datetime, int, str]] = []
        with self.db.read_scope() as session:
            # Only CAs that can sign now (the others' rows, due first, would be picked again
            # every tick and hold back everyone else's), one at a time down the (issuer,
            # next_update) index: each CA's oldest ``batch``, without reading the rest. One
            # query over them all sorted every row of the CAs, 160 ms at 10^5 on SQLite.
            for issuer_id in sorted(signing):
                due.extend(
                    (when, int(ca), str(serial))
                    for when, ca, serial in session.execute(
                        select(
                            OcspResponse.next_update, OcspResponse.issuer_id, OcspResponse.serial
                        )
                        .where(
                            OcspResponse.issuer_id == issuer_id,
                            OcspResponse.next_update <= now + remaining,
                        )
                        .order_by(OcspResponse.next_update)
                        .limit(batch)
                    )
                )
        due.sort(key=lambda r: r[0])
        by_issuer: dict[int, list[str]] = {}
        for _next_update, issuer_id, serial in due[:batch]:
            by_issuer.setdefault(issuer_id, []).append(serial)
        written = sum(self.sign_serials(i, s, now) for i, s in by_issuer.items())
        return written + self.repair(now, batch)

    def resign_all(self, now: dt.datetime, batch: int = 2000) -> dict[str, int]:
        """Re-sign every certificate of every served CA. Returns counts by status."""
        counts = {GOOD: 0, REVOKED: 0, UNKNOWN: 0}
        issuers = self.issuers()
        for issuer_id in sorted(issuers):
            after = ""
            while True:
                with self.db.read_scope() as session:
                    rows = [
                        _row(r)
                        for r in session.execute(
                            select(*_CERT_COLUMNS)
                            .where(
                                Certificate.issuer_id == issuer_id,
                                Certificate.serial > after,
                                or_(
                                    Certificate.status != CertStatus.FAILED,
                                    Certificate.serial.in_(
                                        select(OcspResponse.serial).where(
                                            OcspResponse.issuer_id == issuer_id
                                        )
                                    ),
                                ),
                            )
                            .order_by(Certificate.serial)
                            .limit(batch)
                        )
                    ]
                if not rows:
                    break
                self.sign_rows(rows, now)
                for row in rows:
                    counts[status_label(row.status)] += 1
                after = rows[-1].serial
        return counts

    def stored_count(self) -> int:
        with self.db.read_scope() as session:
            return int(session.scalar(select(func.count()).select_from(OcspResponse)) or 0)


# -- entry points on Services -----------------------------------------------------------------
def refresh_due(services: Services, now: dt.datetime, batch: int = DEFAULT_BATCH) -> int:
    return services.ocsp.refresh_due(now, batch)


class Withheld(NamedTuple):
    why: str
    signer_down: bool  # its signer's key or certificate did not load (else: refused, ending)


@dataclasses.dataclass(frozen=True)
class Resigned:
    counts: dict[str, int]  # answers re-signed, by status (good, revoked, unknown)
    not_resigned: dict[str, str]  # CA name -> why nothing was signed for it
    signer_down: frozenset[str] = frozenset()  # those of them whose signer did not load
    # CAs revoked or held by their parent: withheld by design (no failure), named here.
    revoked_cas: tuple[str, ...] = ()


def resign_all(services: Services, now: dt.datetime, actor: Actor | None = None) -> Resigned:
    """Re-sign everything (after a responder change, or on demand); journalled ``ocsp.resign``
    with the served CAs whose answers were not re-signed (no signer may sign for them here:
    ``OcspService.withheld``), if any: then the outcome is a failure."""
    actor = actor or Actor(account="system:ocsp")
    services.ocsp.invalidate_issuers()
    counts = services.ocsp.resign_all(now)
    withheld = services.ocsp.withheld()
    detail: dict[str, object] = {**counts, "total": sum(counts.values())}
    not_resigned: dict[str, str] = {}
    down: set[str] = set()
    revoked: list[str] = []
    with services.db.scope() as session:
        by_id = {}
        if withheld:
            by_id = {
                row.id: row
                for row in session.scalars(
                    select(CertificateAuthority).where(CertificateAuthority.id.in_(list(withheld)))
                )
            }
        for ca_id, (why, signer_down) in sorted(withheld.items()):
            row = by_id.get(ca_id)
            name = row.name if row is not None else str(ca_id)
            if row is not None and ca_revoked(session, row):
                revoked.append(name)  # its answers are withheld by design: no failure
                continue
            not_resigned[name] = why
            if signer_down:
                down.add(name)
        if not_resigned:
            detail["not_resigned"] = not_resigned
        if revoked:
            detail["withheld_revoked_cas"] = revoked
        services.journal.append(
            session,
            by_actor(
                actor,
                Category.CA,
                "ocsp.resign",
                Outcome.FAILURE if not_resigned else Outcome.SUCCESS,
                detail=detail,
            ),
            now,
        )
    return Resigned(counts, not_resigned, frozenset(down), tuple(revoked))
