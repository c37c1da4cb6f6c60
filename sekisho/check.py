"""``sekisho cert check``: the certificate store against its own signatures, the CRLs, the
stored OCSP answers and the audit journal (a reconciler in the manner of Boulder's
cert-checker; it reads, never writes).

The certificates table is not hash-chained; the journal is. For every certificate the check
reads the stored DER and asks whether the rest of the deployment agrees with it:

* **The certificate itself**: the DER parses; its SHA-256 is the row's fingerprint; its serial,
  validity, subject and public key are the row's; it is signed by its CA (issuer name and
  signature); its TBS is the one whose intent was committed before signing (``tbs_sha256``),
  so nothing else was signed in its name.
* **The journal**: a successful ``ca.issue`` record of that CA names the serial with the same
  fingerprint. That binds each row to the chain ``audit verify`` checks: a DER swapped in the
  store disagrees with the journal.
* **The CRLs**: the CA's newest full CRL, with its delta, is signed by the CA and lists exactly
  the revoked certificates of the revocation epoch it covers, with their reasons and dates
  (an entry may leave once its certificate expired before the full CRL); a serial it lists
  that no row has is reported.
* **The stored OCSP answer** (certificates not yet expired): present when the responders
  serve the CA (an issuing CA, active, its key online), for this serial and CA,
  signed by the CA or by a responder it certified, unexpired, and saying what the row says
  at the status epoch it records.
* **Leftovers**: a ``reserved`` row older than the grace period is an issuance that crashed
  after its intent: a signature may exist that nobody received. It is revocable and answered
  "good"; the check reports it so that an operator revokes it. A ``failed`` row must have no
  DER.

A change newer than the grace period (default 15 minutes: the refresher's whole look at the
OCSP answers runs every 10) is still on its way to the CRL and OCSP and is not reported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp
from sqlalchemy import String, and_, select, type_coerce
from sqlalchemy.orm import Session

from audit.models import JournalRecord
from ca.crl import latest
from ca.models import CaKind, Certificate, CertificateAuthority, CertStatus, CrlKind
from ca.revocation import Reason
from ca.tbs import serial_hex
from ocsp.core import responder_key_hash, verify_signature
from ocsp.models import OcspResponse
from ocsp.store import GOOD, REVOKED, UNKNOWN
from sekisho.errors import KeyBackendError, NotFound, shown

DEFAULT_GRACE = dt.timedelta(minutes=15)
BATCH = 1000  # rows per statement, and per journal lookup

# CRL entries on a full CRL, serial -> (reason, revocation date); 10^6 entries take some
# 200 MB here. A delta CRL's removeFromCRL entries are ``None``.
_Listed = dict[int, tuple[x509.ReasonFlags, dt.datetime] | None]


@dataclasses.dataclass(frozen=True)
class Finding:
    ca: str
    serial: str  # 40 hex digits; "" for a finding about the CA or its CRL
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Totals:
    cas: int = 0
    certificates: int = 0
    ocsp_answers: int = 0
    crl_entries: int = 0
    findings: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Crls:
    listed: _Listed
    covered_epoch: int  # every status change at or below it is on these CRLs
    full_this_update: dt.datetime


class StoreCheck:
    """One run of the check over ``session`` (which should read one snapshot)."""

    def __init__(
        self,
        session: Session,
        now: dt.datetime,
        *,
        ca_names: tuple[str, ...] = (),
        grace: dt.timedelta = DEFAULT_GRACE,
    ) -> None:
        self.session = session
        self.now = now
        self.grace = grace
        self.by_id = {ca.id: ca for ca in session.scalars(select(CertificateAuthority))}
        by_name = {ca.name: ca for ca in self.by_id.values()}
        for name in ca_names:
            if name not in by_name:
                raise NotFound(f"no CA named {shown(name)}")
        self.cas = [by_name[n] for n in sorted(set(ca_names))] or sorted(
            self.by_id.values(), key=lambda ca: ca.id
        )
        self.totals = Totals()

    def findings(self, progress: Callable[[Totals], None] | None = None) -> Iterator[Finding]:
        """Every finding, CA by CA, certificate by certificate (serial order); ``progress``
        is called after each batch of certificates."""
        for ca in self.cas:
            self.totals.cas += 1
            try:
                checker = _CaCheck(self.session, ca, self.by_id, self.now, self.grace, self.totals)
            except ValueError:
                self.totals.findings += 1
                yield Finding(ca.name, "", "ca-certificate", "the stored DER is not a certificate")
                continue
            for finding in checker.run(progress):
                self.totals.findings += 1
                yield finding


class _CaCheck:
    def __init__(
        self,
        session: Session,
        ca: CertificateAuthority,
        by_id: dict[int, CertificateAuthority],
        now: dt.datetime,
        grace: dt.timedelta,
        totals: Totals,
    ) -> None:
        self.session = session
        self.ca = ca
        self.by_id = by_id
        self.now = now
        self.settled = now - grace  # changes before this have had time to reach CRL and OCSP
        self.totals = totals
        self.cert = x509.load_der_x509_certificate(ca.certificate_der)
        self.key_hash = responder_key_hash(self.cert)  # the issuerKeyHash of its CertIDs
        # Whose answers the responders keep signed (ocsp.store): an issuing CA, active, its
        # key online. Another CA's answers, if any, are checked; none is not a finding.
        self.served = ca.kind is CaKind.ISSUING and ca.active and ca.key_online
        self.responders: dict[bytes, bool] = {}  # responder certificate DER -> from this CA

    def finding(self, serial: str, kind: str, detail: str) -> Finding:
        return Finding(self.ca.name, serial, kind, detail)

    def run(self, progress: Callable[[Totals], None] | None) -> Iterator[Finding]:
        yield from self._ca_certificate()
        crls, found = self._crls()
        yield from found
        after = ""
        while True:
            rows = [_row(values) for values in self.session.execute(_batch(self.ca.id, after))]
            if not rows:
                break
            journal = self._journalled([row.serial for row in rows if row.der is not None])
            for row in rows:
                self.totals.certificates += 1
                if isinstance(row, _Unreadable):
                    if crls is not None:
                        crls.listed.pop(int(row.serial, 16), None)
                    yield self.finding(row.serial, "row-invalid", row.why)
                    continue
                yield from self._certificate(row, journal.get(row.serial))
                yield from self._answer(row, row.answer)
                if crls is not None:
                    yield from self._crl_entry(row, crls)
            after = rows[-1].serial
            if progress is not None:
                progress(self.totals)
        if crls is not None:
            for serial in sorted(crls.listed):
                if crls.listed[serial] is not None:
                    yield self.finding(
                        serial_hex(serial), "crl-unknown-serial", "listed, but no such certificate"
                    )

    # -- the CA's own certificate -------------------------------------------------------------
    def _ca_certificate(self) -> Iterator[Finding]:
        parent = self.by_id.get(self.ca.parent_id) if self.ca.parent_id else self.ca
        if parent is None:
            yield self.finding("", "ca-certificate", "its parent CA row is missing")
            return
        try:
            self.cert.verify_directly_issued_by(
                x509.load_der_x509_certificate(parent.certificate_der)
            )
        except (ValueError, TypeError, InvalidSignature):
            yield self.finding("", "ca-certificate", f"not signed by CA {parent.name}")
        if self.ca.parent_id is None:
            return
        issued = self.session.scalar(
            select(Certificate.der).where(
                Certificate.issuer_id == parent.id, Certificate.serial == self.ca.serial
            )
        )
        if issued != self.ca.certificate_der:
            yield self.finding(
                "", "ca-certificate", f"not the certificate CA {parent.name} issued for it"
            )

    # -- CRLs ---------------------------------------------------------------------------------
    def _crls(self) -> tuple[_Crls | None, list[Finding]]:
        full_row = latest(self.session, self.ca.id, CrlKind.FULL)
        if full_row is None:
            return None, [self.finding("", "crl-missing", "the CA has no full CRL")]
        findings: list[Finding] = []
        full = self._load_crl(full_row.der, full_row.number, "full", findings)
        if full is None:
            return None, findings
        listed: _Listed = {}
        for entry in full:
            listed[entry.serial_number] = (_reason(entry), entry.revocation_date_utc)
        covered = full_row.epoch
        delta_row = latest(self.session, self.ca.id, CrlKind.DELTA)
        if delta_row is not None and delta_row.number > full_row.number:
            delta = self._load_crl(delta_row.der, delta_row.number, "delta", findings)
            if delta_row.base_number != full_row.number:
                findings.append(
                    self.finding(
                        "",
                        "crl-delta",
                        f"delta CRL {delta_row.number} is not against "
                        f"the newest full CRL {full_row.number}",
                    )
                )
            elif delta is not None:
                for entry in delta:
                    reason = _reason(entry)
                    if reason is x509.ReasonFlags.remove_from_crl:
                        listed[entry.serial_number] = None
                    else:
                        listed[entry.serial_number] = (reason, entry.revocation_date_utc)
                covered = delta_row.epoch
        self.totals.crl_entries += len(listed)
        return _Crls(listed, covered, full_row.this_update), findings

    def _load_crl(
        self, der: bytes, number: int, kind: str, findings: list[Finding]
    ) -> x509.CertificateRevocationList | None:
        try:
            crl = x509.load_der_x509_crl(der)
            signed = crl.issuer == self.cert.subject and crl.is_signature_valid(
                self.cert.public_key()  # type: ignore[arg-type]
            )
            numbered = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except (ValueError, TypeError, x509.ExtensionNotFound):
            findings.append(self.finding("", "crl-malformed", f"{kind} CRL {number}"))
            return None
        if not signed:
            findings.append(self.finding("", "crl-signature", f"{kind} CRL {number}"))
        if numbered != number:
            findings.append(self.finding("", "crl-number", f"{kind} CRL {number} says {numbered}"))
        return crl

    def _crl_entry(self, row: _Row, crls: _Crls) -> Iterator[Finding]:
        serial = int(row.serial, 16)
        entry = crls.listed.pop(serial, None)
        if row.status_epoch > crls.covered_epoch:  # changed since these CRLs
            if _changed_at(row) <= self.settled:
                yield self.finding(row.serial, "crl-behind", "its status change is on no CRL")
            return
        revoked = row.status is CertStatus.REVOKED
        if not revoked:
            if entry is not None:
                yield self.finding(row.serial, "crl-extra", f"listed, but {row.status.value}")
            return
        if entry is None:
            if row.not_after >= crls.full_this_update:  # still in scope of the full CRL
                yield self.finding(row.serial, "crl-missing", "revoked, not on the CRL")
            return
        reason, when = entry
        wanted = row.reason.flag if row.reason else None
        if (wanted or x509.ReasonFlags.unspecified) != reason or when != _seconds(row.revoked_at):
            yield self.finding(
                row.serial,
                "crl-entry",
                f"listed as {reason.value} at {when.isoformat()}, the store says "
                f"{row.reason or '-'} at {_iso(row.revoked_at)}",
            )

    # -- the certificate ----------------------------------------------------------------------
    def _journalled(self, serials: list[str]) -> dict[str, str | None]:
        """serial -> the fingerprint its successful ``ca.issue`` record (of this CA) names."""
        found: dict[str, str | None] = {}
        if not serials:
            return found
        for serial, detail in self.session.execute(
            select(JournalRecord.object_serial, JournalRecord.detail).where(
                JournalRecord.action == "ca.issue",
                JournalRecord.outcome == "success",
                JournalRecord.object_serial.in_(serials),
            )
        ):
            try:
                doc = json.loads(detail)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("ca") == self.ca.name:
                fingerprint = doc.get("sha256")
                found[str(serial)] = fingerprint if isinstance(fingerprint, str) else None
        return found

    def _certificate(self, row: _Row, journalled: str | None) -> Iterator[Finding]:
        if row.der is None:
            if row.status is CertStatus.RESERVED and row.created_at <= self.settled:
                yield self.finding(
                    row.serial,
                    "reserved-stale",
                    f"issuance stopped after its intent ({_iso(row.created_at)}): a signature "
                    "may exist that nobody received; revoke it",
                )
            return
        if row.status in (CertStatus.RESERVED, CertStatus.FAILED):
            yield self.finding(row.serial, "der-unexpected", f"a {row.status.value} row has DER")
        if hashlib.sha256(row.der).hexdigest() != row.fingerprint_sha256:
            yield self.finding(row.serial, "der-fingerprint", "the DER is not the fingerprint's")
        if journalled != row.fingerprint_sha256:
            yield self.finding(
                row.serial,
                "journal",
                "no ca.issue record names it"
                if journalled is None
                else f"the ca.issue record names fingerprint {journalled[:16]}...",
            )
        try:
            cert = x509.load_der_x509_certificate(row.der)
            tbs = cert.tbs_certificate_bytes
            subject = cert.subject.rfc4514_string()
            spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        except ValueError:
            yield self.finding(row.serial, "der-malformed", "the stored DER is not a certificate")
            return
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            yield self.finding(row.serial, "der-signature", "not signed by its CA")
        if hashlib.sha256(tbs).hexdigest() != row.tbs_sha256:
            yield self.finding(row.serial, "der-tbs", "not the TBS whose intent was committed")
        differs = [
            name
            for name, ours, theirs in (
                ("serial", cert.serial_number, int(row.serial, 16)),
                ("notBefore", cert.not_valid_before_utc, row.not_before),
                ("notAfter", cert.not_valid_after_utc, row.not_after),
                ("subject", subject, row.subject_dn),
                ("key", hashlib.sha256(spki).hexdigest(), row.spki_sha256),
            )
            if ours != theirs
        ]
        if differs:
            yield self.finding(row.serial, "der-fields", "not the row's: " + ", ".join(differs))

    # -- the stored OCSP answer ---------------------------------------------------------------
    def _answer(self, row: _Row, answer: _Answer | None) -> Iterator[Finding]:
        if row.not_after <= self.now:
            return  # expired: OCSP need not answer for it any more
        if answer is None:
            served = self.served and row.status is not CertStatus.FAILED
            if served and row.created_at <= self.settled:
                yield self.finding(row.serial, "ocsp-missing", "no stored OCSP answer")
            return
        self.totals.ocsp_answers += 1
        if answer.status_epoch < row.status_epoch:
            if _changed_at(row) <= self.settled:
                yield self.finding(row.serial, "ocsp-behind", "the answer predates its status")
            return
        wanted = _wanted_status(row)
        problem = self._answer_problem(row, answer, wanted)
        if problem is not None:
            yield self.finding(row.serial, "ocsp-answer", problem)

    def _certified(self, responder: x509.Certificate) -> bool:
        """Whether this CA signed ``responder`` (each responder verified once per run)."""
        der = responder.public_bytes(Encoding.DER)
        if der not in self.responders:
            try:
                responder.verify_directly_issued_by(self.cert)
                self.responders[der] = True
            except (ValueError, TypeError, InvalidSignature):
                self.responders[der] = False
        return self.responders[der]

    def _answer_problem(self, row: _Row, answer: _Answer, wanted: str) -> str | None:
        if answer.status_epoch > row.status_epoch:
            return f"it reflects epoch {answer.status_epoch}, the row is at {row.status_epoch}"
        if answer.cert_status != wanted:
            return f"stored as {answer.cert_status}, the row says {wanted}"
        if answer.next_update <= self.now:
            return f"expired at {_iso(answer.next_update)}"
        try:
            response = ocsp.load_der_ocsp_response(answer.der)
            single = response.serial_number, response.issuer_key_hash, response.certificate_status
        except ValueError:
            return "the stored DER is not an OCSP response"
        if single[:2] != (int(row.serial, 16), self.key_hash):
            return "the DER answers for another certificate"
        said = {
            ocsp.OCSPCertStatus.GOOD: GOOD,
            ocsp.OCSPCertStatus.REVOKED: REVOKED,
            ocsp.OCSPCertStatus.UNKNOWN: UNKNOWN,
        }[single[2]]
        if said != wanted:
            return f"the DER says {said}, the row says {wanted}"
        if said == REVOKED:
            unspecified = row.reason in (None, Reason.UNSPECIFIED)
            wanted_reason = None if unspecified or row.reason is None else row.reason.flag
            if response.revocation_time_utc != _seconds(row.revoked_at):
                return "the DER's revocation time is not the row's"
            if response.revocation_reason != wanted_reason:
                return "the DER's revocation reason is not the row's"
        signer = self.cert
        if response.certificates:
            signer = response.certificates[0]
            if not self._certified(signer):
                return "its responder certificate is not from this CA"
        try:
            verify_signature(signer, response.signature, response.tbs_response_bytes)
        except KeyBackendError:
            return "its signature does not verify"
        return None


@dataclasses.dataclass(frozen=True)
class _Answer:
    der: bytes
    cert_status: str
    status_epoch: int
    next_update: dt.datetime


@dataclasses.dataclass(frozen=True)
class _Row:
    """A certificates row as the check reads it (status and reason checked, not trusted)."""

    serial: str
    status: CertStatus
    reason: Reason | None
    revoked_at: dt.datetime | None
    released_at: dt.datetime | None
    created_at: dt.datetime
    status_epoch: int
    der: bytes | None
    fingerprint_sha256: str | None
    tbs_sha256: str | None
    spki_sha256: str | None
    subject_dn: str
    not_before: dt.datetime
    not_after: dt.datetime
    answer: _Answer | None


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    serial: str
    der: None
    why: str


_STATUSES = frozenset(s.value for s in CertStatus)
_REASONS = frozenset(r.value for r in Reason)
_C, _O = Certificate, OcspResponse
# Status and reason as stored text: a value no enum member has is a finding, not a crash.
_COLUMNS = (
    _C.serial, type_coerce(_C.status, String), _C.revocation_reason, _C.revoked_at,
    _C.released_at, _C.created_at, _C.status_epoch, _C.der, _C.fingerprint_sha256,
    _C.tbs_sha256, _C.spki_sha256, _C.subject_dn, _C.not_before, _C.not_after,
    _O.id, _O.der, _O.cert_status, _O.status_epoch, _O.next_update,
)  # fmt: skip


def _batch(ca_id: int, after: str) -> Any:
    """The CA's next BATCH certificates after serial ``after``, each with its stored answer."""
    joined = and_(_O.issuer_id == _C.issuer_id, _O.serial == _C.serial)
    return (
        select(*_COLUMNS)
        .outerjoin(_O, joined)
        .where(_C.issuer_id == ca_id, _C.serial > after)
        .order_by(_C.serial)
        .limit(BATCH)
    )


def _row(values: Any) -> _Row | _Unreadable:
    serial, status, reason = str(values[0]), values[1], values[2]
    if status not in _STATUSES:
        return _Unreadable(serial, None, f"status {shown(status)} is not one Sekisho knows")
    if reason and reason not in _REASONS:
        return _Unreadable(serial, None, f"reason {shown(reason)} is not one Sekisho knows")
    answer = None if values[14] is None else _Answer(*values[15:19])
    (revoked_at, released_at, created_at, epoch, der, fingerprint, tbs, spki, subject, not_before,
     not_after) = values[3:14]  # fmt: skip
    return _Row(
        serial, CertStatus(status), Reason(reason) if reason else None, revoked_at, released_at,
        created_at, epoch, der, fingerprint, tbs, spki, subject, not_before, not_after, answer,
    )  # fmt: skip


def _wanted_status(row: _Row) -> str:
    if row.status in (CertStatus.ISSUED, CertStatus.RESERVED):
        return GOOD
    if row.status is CertStatus.REVOKED and row.revoked_at is not None:
        return REVOKED
    return UNKNOWN


def _changed_at(row: _Row) -> dt.datetime:
    """When the row's last status change happened (as far as the row tells)."""
    return max(t for t in (row.created_at, row.revoked_at, row.released_at) if t is not None)


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified


def _seconds(value: dt.datetime | None) -> dt.datetime | None:
    """As CRLs and OCSP answers carry times: whole seconds."""
    return value.replace(microsecond=0) if value is not None else None


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value is not None else "-"
