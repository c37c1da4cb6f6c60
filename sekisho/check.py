"""``sekisho cert check``: the certificate store against its own signatures, the CRLs, the
stored OCSP answers and the audit journal (a reconciler in the manner of Boulder's
cert-checker; it reads, never writes).

The certificates table is not hash-chained; the journal is. For every certificate the check
reads the stored DER and asks whether the rest of the deployment agrees with it:

* **The certificate itself**: the DER parses; its SHA-256 is the row's fingerprint; its serial,
  validity, subject and public key are the row's; it is signed by its CA (issuer name and
  signature); its TBS is the one whose intent was committed before signing (``tbs_sha256``),
  so nothing else was signed in its name. An unexpired certificate whose RSA key is a
  Debian weak key (certified before the lists were installed, or by an earlier version) and
  that is not revoked for keyCompromise is reported (``weak-key``; BR 4.9.1.1); RSA keys
  that could not be looked up (the lists missing) are counted (``rsa_keys_unlisted``), a
  note rather than a discrepancy.
* **The journal**: a successful ``ca.issue`` record of that CA names the serial with the same
  fingerprint, and the newest successful ``ca.revoke`` / ``ca.release`` record of the serial
  says what the row's status and reason say. That binds each row to the chain ``audit
  verify`` checks: a DER swapped, or a revocation undone, in the store disagrees with the
  journal even once CRLs and OCSP answers have been made again from the altered rows.
* **The CRLs**: the CA's newest full CRL, with its delta, parses, is signed by the CA, is
  unexpired, and lists exactly the revoked certificates of the revocation epoch it covers,
  with their reasons, revocation and invalidity dates. An entry may leave only as
  ``ca.crl`` lets it: once its certificate expired before the full CRL's horizon. A serial it
  lists that no row has is reported.
* **The stored OCSP answers** of unexpired certificates of issuing CAs (no responder answers
  for a root), where the responders keep them signed
  (an issuing CA, active, its key online, not revoked by its parent): present, for this
  serial and CA key, signed by the CA or by one of its responders that is not revoked,
  unexpired (as stored and as signed), and saying what the row says at the status epoch it
  records. A CA whose key is offline has its answers left to expire by design: one finding
  for the CA when they are missing, behind or expired, not one per certificate. A CA revoked
  by its parent has its answers withheld (``ocsp.store.refused_signers``): not checked.
  An answer valid after its signer's certificate ends (the responder's, or the CA's) while
  the certificate it answers for is still valid is reported: a relying party rejects it from
  then on, though its nextUpdate says it is fresh.
* **Answers without a certificate**: a stored OCSP answer of a CA for a serial that no
  certificates row of that CA has, or whose CA row is gone (``ocsp-orphan``). No code
  writes one (an answer is signed from its row, no row is ever deleted, a ``failed`` row
  keeps its answer): a row deleted by hand leaves an answer the standalone responder still
  serves. Its time, for the grace period, is when it was written.
* **Leftovers**: a ``reserved`` row older than the grace period is an issuance that crashed
  after its intent: a signature may exist that nobody received. It is revocable and answered
  "good"; the check reports it so that an operator revokes it. A ``failed`` row must have no
  DER.

A change newer than the grace period (default 15 minutes: the refresher's whole look at the
OCSP answers runs every 10) is still on its way to the CRL and OCSP and is not reported; the
time of a status change is the newest of the row's times and its journal records' (a
re-revocation keeps the first revocation time). Stored values no code writes (a status, a
reason or a serial that is none) are reported as ``row-invalid``; DER that does not parse, or
of an algorithm this build does not know, is reported, never raised.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp
from sqlalchemy import String, and_, select, type_coerce
from sqlalchemy.orm import Session

from audit.models import JournalRecord, PurgedRecord
from ca.crl import latest
from ca.models import CaKind, Certificate, CertificateAuthority, CertStatus, Crl, CrlKind
from ca.registry import ca_revoked
from ca.revocation import Reason
from ca.tbs import serial_hex
from ca.weakkeys import is_debian_weak
from ocsp.core import responder_key_hash, verify_signature
from ocsp.models import OcspResponder, OcspResponse
from ocsp.store import GOOD, REVOKED, UNKNOWN, status_label, status_of
from sekisho.errors import Discrepancies, KeyBackendError, NotFound, PolicyViolation, shown

DEFAULT_GRACE = dt.timedelta(minutes=15)
BATCH = 1000  # rows per statement, and per journal lookup
# Answers missing, behind or expired are listed one by one up to this many per CA, then
# counted (one cause, the refresher not running, would otherwise list every certificate).
MAX_STALE_LISTED = 20
# What parsing stored DER may raise: malformed, or an algorithm this build does not know.
_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound)
_BAD_SIGNATURE = (*_UNREADABLE, InvalidSignature, KeyBackendError)
# What reading a row whose stored value no column type reads raises (SQLAlchemy's result
# processing: a date that is none, text in an integer or binary column, an unknown enum).
_UNREADABLE_ROW = (*_UNREADABLE, LookupError, AttributeError, OverflowError)
_SERIAL = re.compile(r"[0-9a-f]{40}")


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
    # RSA keys not looked up in the Debian weak-key lists (not installed): a note, not a
    # discrepancy (keys made here, by keygen or for a CA, are fine without them).
    rsa_keys_unlisted: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Entry:
    reason: x509.ReasonFlags
    revoked_at: dt.datetime | None
    invalidity: dt.datetime | None


# CRL entries of the newest full CRL with its delta applied, serial -> entry; None: the delta
# removes it (removeFromCRL). 10^6 entries take some 250 MB here.
_Listed = dict[int, _Entry | None]


@dataclasses.dataclass
class _Crls:
    listed: _Listed
    covered_epoch: int  # every status change at or below it is on these CRLs
    horizon: dt.datetime  # a revoked certificate expiring at or after it must be listed


@dataclasses.dataclass(frozen=True)
class _Journalled:
    """What the journal says of one serial of this CA."""

    fingerprint: str | None = None  # of its successful ca.issue record
    last_change: str | None = None  # "ca.revoke" or "ca.release", the newest successful one
    reason: str | None = None  # of that ca.revoke
    changed_at: dt.datetime | None = None
    # Some of its records were purged once their retention ended (``audit purge``): what the
    # journal no longer says is not a discrepancy.
    purged: bool = False


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
        self.ca_names = ca_names
        try:
            self.by_id = {ca.id: ca for ca in session.scalars(select(CertificateAuthority))}
        except _UNREADABLE_ROW as exc:
            raise Discrepancies(
                f"the CA rows could not be read ({type(exc).__name__}): a stored value is not "
                "of its column's type"
            ) from None
        by_name = {ca.name: ca for ca in self.by_id.values()}
        for name in ca_names:
            if name not in by_name:
                raise NotFound(f"no CA named {shown(name)}")
        self.cas = [by_name[n] for n in sorted(set(ca_names))] or sorted(
            self.by_id.values(), key=lambda ca: ca.id
        )
        self.totals = Totals()

    def findings(self, progress: Callable[[Totals], None] | None = None) -> Iterator[Finding]:
        """Every finding, CA by CA, certificate by certificate (serial order), then (all CAs
        checked) the stored answers of no CA; ``progress`` is called after each batch of
        certificates."""
        for ca in self.cas:
            self.totals.cas += 1
            try:
                cert = x509.load_der_x509_certificate(ca.certificate_der)
                cert.public_key()
            except _UNREADABLE:
                self.totals.findings += 1
                yield Finding(ca.name, "", "ca-certificate", "the stored DER is not a certificate")
                continue
            try:
                checker = _CaCheck(
                    self.session, ca, cert, self.by_id, self.now, self.grace, self.totals
                )
                for finding in checker.run(progress):
                    self.totals.findings += 1
                    yield finding
            except _UNREADABLE_ROW as exc:
                # A value stored by hand that no column type reads (a date that is none, text
                # in a number): the rest of this CA cannot be read, the other CAs can.
                self.totals.findings += 1
                yield Finding(
                    ca.name, "", "check-error",
                    f"the rest of this CA could not be read ({type(exc).__name__}): a stored "
                    "value is not of its column's type",
                )  # fmt: skip
        if not self.ca_names:
            try:
                for finding in self._answers_of_no_ca():
                    self.totals.findings += 1
                    yield finding
            except _UNREADABLE_ROW as exc:
                self.totals.findings += 1
                yield Finding(
                    "", "", "check-error",
                    f"the stored OCSP answers could not be read ({type(exc).__name__}): a "
                    "stored value is not of its column's type",
                )  # fmt: skip

    def _answers_of_no_ca(self) -> Iterator[Finding]:
        """Stored answers whose CA row is gone: foreign keys keep that from happening, unless
        they are off (the ``sqlite3`` shell's default)."""
        settled = self.now - self.grace
        query = (
            select(_O.id, _O.serial, _O.cert_status, _O.updated_at, _O.issuer_id)
            .outerjoin(CertificateAuthority, CertificateAuthority.id == _O.issuer_id)
            .where(CertificateAuthority.id.is_(None))
        )
        for batch in _batches(self.session, query, _O.id):
            for _id, serial, said, written, issuer_id in batch:
                self.totals.ocsp_answers += 1
                if written <= settled:
                    yield _orphan("", serial, said, written, f"no CA has its CA id {issuer_id}")


class _CaCheck:
    def __init__(
        self,
        session: Session,
        ca: CertificateAuthority,
        cert: x509.Certificate,
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
        self.cert = cert
        self.public_key = self.cert.public_key()
        self.key_hash = responder_key_hash(self.cert)  # the issuerKeyHash of its CertIDs
        self.revoked = ca_revoked(session, ca)  # by its parent (never for a root)
        # Whose answers the refresher keeps signed (ocsp.signers.served_cas).
        self.maintained = (
            ca.kind is CaKind.ISSUING and ca.active and ca.key_online and not self.revoked
        )
        self.unmaintained = 0  # answers missing, behind or expired of a CA not maintained
        # Responder certificate DER -> its revocation time (None: not revoked).
        self.responders: dict[bytes, dt.datetime | None] = {}
        self.stale = 0  # per-certificate OCSP findings of answers missing, behind or expired

    def finding(self, serial: str, kind: str, detail: str) -> Finding:
        return Finding(self.ca.name, serial, kind, detail)

    def run(self, progress: Callable[[Totals], None] | None) -> Iterator[Finding]:
        yield from self._ca_certificate()
        yield from self._responders()
        crls, found = self._crls()
        yield from found
        for batch in _batches(self.session, _certificates(self.ca.id), _C.serial):
            rows = [_row(values) for values in batch]
            journal = self._journalled([row.serial for row in rows])
            for row in rows:
                self.totals.certificates += 1
                if isinstance(row, _Unreadable):
                    if crls is not None and row.number is not None:
                        crls.listed.pop(row.number, None)
                    # A serial that is none is quoted (escaped) in ``why``, never printed
                    # raw: it is whatever was written into the column.
                    where = row.serial if row.number is not None else ""
                    yield self.finding(where, "row-invalid", row.why)
                    continue
                said = journal.get(row.serial, _Journalled())
                yield from self._certificate(row, said)
                yield from self._status(row, said)
                yield from self._answer(row, said)
                if crls is not None:
                    yield from self._crl_entry(row, said, crls)
            if progress is not None:
                progress(self.totals)
        if crls is not None:
            for serial in sorted(crls.listed):
                if crls.listed[serial] is not None:
                    yield self.finding(
                        serial_hex(serial), "crl-unknown-serial", "listed, but no such certificate"
                    )
        yield from self._orphans()
        if self.maintained and self.stale > MAX_STALE_LISTED:
            yield self.finding(
                "",
                "ocsp-stale",
                f"{self.stale} OCSP answers missing, behind or expired in all (the first "
                f"{MAX_STALE_LISTED} are listed): is the refresher (serve, run) running?",
            )
        if self.unmaintained:
            yield self.finding(
                "",
                "ocsp-unmaintained",
                f"{self.unmaintained} OCSP answers missing, behind or expired: nothing keeps "
                "this CA's answers signed (its key is offline, or the CA is not active)",
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
        except _BAD_SIGNATURE:
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
        full = self._load_crl(full_row, findings)
        if full is None:
            return None, findings
        listed: _Listed = dict(full)
        covered = full_row.epoch
        delta_row = latest(self.session, self.ca.id, CrlKind.DELTA)
        if delta_row is not None and delta_row.number > full_row.number:
            delta = self._load_crl(delta_row, findings)
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
                for serial, entry in delta:
                    listed[serial] = None if entry.reason is _REMOVE else entry
                covered = delta_row.epoch
        self.totals.crl_entries += len(listed)
        return _Crls(listed, covered, self._horizon(full_row)), findings

    def _horizon(self, full: Crl) -> dt.datetime:
        """The horizon ``ca.crl`` gave ``full``: one CRL validity back from its thisUpdate, or
        the previous full CRL's thisUpdate when earlier. With the previous one pruned, the
        validity alone (a later horizon: fewer entries required, none wrongly)."""
        horizon = full.this_update - (full.next_update - full.this_update)
        previous = self.session.scalar(
            select(Crl.this_update)
            .where(Crl.issuer_id == self.ca.id, Crl.kind == CrlKind.FULL, Crl.number < full.number)
            .order_by(Crl.number.desc())
            .limit(1)
        )
        return min(horizon, previous) if previous is not None else horizon

    def _load_crl(self, row: Crl, findings: list[Finding]) -> list[tuple[int, _Entry]] | None:
        kind = row.kind.value
        try:
            crl = x509.load_der_x509_crl(row.der)
            signed = crl.issuer == self.cert.subject and crl.is_signature_valid(
                self.public_key  # type: ignore[arg-type]
            )
            numbered = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            next_update = crl.next_update_utc
            entries = [(entry.serial_number, _entry(entry)) for entry in crl]
        except _UNREADABLE:
            findings.append(self.finding("", "crl-malformed", f"{kind} CRL {row.number}"))
            return None
        if not signed:
            findings.append(self.finding("", "crl-signature", f"{kind} CRL {row.number}"))
        if numbered != row.number:
            findings.append(
                self.finding("", "crl-number", f"{kind} CRL {row.number} says {numbered}")
            )
        if next_update is None or min(next_update, row.next_update) <= self.now:
            if self.cert.not_valid_after_utc > self.now and self.ca.active and not self.revoked:
                when = _iso(next_update) if next_update else "never"
                findings.append(
                    self.finding("", "crl-expired", f"{kind} CRL {row.number}: next update {when}")
                )
        return entries

    def _crl_entry(self, row: _Row, said: _Journalled, crls: _Crls) -> Iterator[Finding]:
        entry = crls.listed.pop(int(row.serial, 16), None)
        if row.status_epoch > crls.covered_epoch:  # changed since these CRLs
            if row.status is not CertStatus.FAILED and _changed_at(row, said) <= self.settled:
                yield self.finding(row.serial, "crl-behind", "its status change is on no CRL")
            return
        if row.status is not CertStatus.REVOKED:
            if entry is not None:
                yield self.finding(row.serial, "crl-extra", f"listed, but {row.status.value}")
            return
        if entry is None:
            if row.not_after >= crls.horizon:
                yield self.finding(row.serial, "crl-missing", "revoked, not on the CRL")
            return
        wanted = row.reason.flag if row.reason else x509.ReasonFlags.unspecified
        if entry != _Entry(wanted, _seconds(row.revoked_at), _seconds(row.invalidity_date)):
            yield self.finding(
                row.serial,
                "crl-entry",
                f"listed as {entry.reason.value} at {_iso(entry.revoked_at)} (invalid since "
                f"{_iso(entry.invalidity)}), the store says {row.reason or '-'} at "
                f"{_iso(row.revoked_at)} (invalid since {_iso(row.invalidity_date)})",
            )

    # -- the journal ----------------------------------------------------------------------------
    def _journalled(self, serials: list[str]) -> dict[str, _Journalled]:
        """serial -> what the successful ca.issue / ca.revoke / ca.release records of this
        CA say of it (in journal order: the newest revocation or release wins)."""
        said: dict[str, _Journalled] = {}
        for serial, action, detail, when in self.session.execute(
            select(
                JournalRecord.object_serial,
                JournalRecord.action,
                JournalRecord.detail,
                JournalRecord.time,
            )
            .where(
                JournalRecord.action.in_(("ca.issue", "ca.revoke", "ca.release")),
                JournalRecord.outcome == "success",
                JournalRecord.object_serial.in_(serials),
            )
            .order_by(JournalRecord.seq)
        ):
            try:
                doc = json.loads(detail)
            except ValueError:
                continue
            if not isinstance(doc, dict) or doc.get("ca") != self.ca.name:
                continue
            before = said.get(str(serial), _Journalled())
            if action == "ca.issue":
                fingerprint = doc.get("sha256")
                said[str(serial)] = dataclasses.replace(
                    before, fingerprint=fingerprint if isinstance(fingerprint, str) else None
                )
            else:
                reason = doc.get("reason") if action == "ca.revoke" else None
                said[str(serial)] = dataclasses.replace(
                    before,
                    last_change=str(action),
                    reason=reason if isinstance(reason, str) else None,
                    changed_at=when,
                )
        for serial in self.session.scalars(
            select(PurgedRecord.object_serial).where(
                PurgedRecord.action.in_(("ca.issue", "ca.revoke", "ca.release")),
                PurgedRecord.object_serial.in_(serials),
            )
        ):
            said[str(serial)] = dataclasses.replace(
                said.get(str(serial), _Journalled()), purged=True
            )
        return said

    def _status(self, row: _Row, said: _Journalled) -> Iterator[Finding]:
        """The row's status against the journal's newest revocation or release of it."""
        revoked_said = said.last_change == "ca.revoke"
        if row.status is CertStatus.REVOKED:
            if not revoked_said:
                if not said.purged:
                    yield self.finding(row.serial, "journal-status", "revoked, no ca.revoke record")
            elif said.reason != (row.reason.value if row.reason else None):
                yield self.finding(
                    row.serial,
                    "journal-status",
                    f"revoked for {row.reason or '-'}, the journal says {said.reason or '-'}",
                )
        elif revoked_said:
            yield self.finding(
                row.serial,
                "journal-status",
                f"{row.status.value}, but the journal revoked it ({said.reason or '-'}) "
                f"at {_iso(said.changed_at)} and never released it",
            )

    # -- the certificate ----------------------------------------------------------------------
    def _certificate(self, row: _Row, said: _Journalled) -> Iterator[Finding]:
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
        if said.fingerprint != row.fingerprint_sha256 and not (
            said.purged and said.fingerprint is None
        ):
            yield self.finding(
                row.serial,
                "journal",
                "no ca.issue record names it"
                if said.fingerprint is None
                else f"the ca.issue record names fingerprint {said.fingerprint[:16]}...",
            )
        try:
            cert = x509.load_der_x509_certificate(row.der)
            tbs = cert.tbs_certificate_bytes
            name = cert.subject
            name.rfc4514_string()
            spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            times = cert.not_valid_before_utc, cert.not_valid_after_utc
        except _UNREADABLE:
            yield self.finding(row.serial, "der-malformed", "the stored DER is not a certificate")
            return
        try:
            cert.verify_directly_issued_by(self.cert)
        except _BAD_SIGNATURE:
            yield self.finding(row.serial, "der-signature", "not signed by its CA")
        if hashlib.sha256(tbs).hexdigest() != row.tbs_sha256:
            yield self.finding(row.serial, "der-tbs", "not the TBS whose intent was committed")
        differs = [
            name
            for name, ours, theirs in (
                ("serial", cert.serial_number, int(row.serial, 16)),
                ("notBefore", times[0], row.not_before),
                ("notAfter", times[1], row.not_after),
                ("subject", _same_subject(name, row.subject_dn), True),
                ("key", hashlib.sha256(spki).hexdigest(), row.spki_sha256),
            )
            if ours != theirs
        ]
        if differs:
            yield self.finding(row.serial, "der-fields", "not the row's: " + ", ".join(differs))
        yield from self._weak_key(row, cert)

    def _weak_key(self, row: _Row, cert: x509.Certificate) -> Iterator[Finding]:
        """A valid certificate whose RSA key is a Debian weak key (CVE-2008-0166), certified
        before the lists were installed or by an earlier version: BR 4.9.1.1 wants it revoked
        for keyCompromise within 24 hours."""
        if row.reason is Reason.KEY_COMPROMISE or row.not_after <= self.now:
            return
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return
        try:
            weak = is_debian_weak(key.public_numbers().n)
        except PolicyViolation:
            self.totals.rsa_keys_unlisted += 1
            return
        if weak:
            yield self.finding(
                row.serial,
                "weak-key",
                "its RSA key is a Debian weak key (CVE-2008-0166), whose private key is "
                "public: revoke it for key_compromise",
            )

    # -- the stored OCSP answer ---------------------------------------------------------------
    def _responders(self) -> Iterator[Finding]:
        """Read this CA's responders (certificate DER -> revocation time, None: not revoked);
        one whose certificate is not a certificate is a finding."""
        for serial, der, status, revoked_at in self.session.execute(
            select(
                OcspResponder.serial,
                OcspResponder.certificate_der,
                type_coerce(Certificate.status, String),
                Certificate.revoked_at,
            )
            .join(Certificate, Certificate.id == OcspResponder.certificate_id)
            .where(OcspResponder.issuer_id == self.ca.id)
        ):
            if not isinstance(der, bytes):
                yield self.finding(str(serial), "responder-malformed", "its DER is not bytes")
                continue
            self.responders[der] = revoked_at if status == CertStatus.REVOKED.value else None

    def _orphans(self) -> Iterator[Finding]:
        """This CA's stored answers for a serial no certificates row of the CA has."""
        query = (
            select(_O.serial, _O.cert_status, _O.updated_at)
            .outerjoin(_C, _SAME_CERT)
            .where(_O.issuer_id == self.ca.id, _C.id.is_(None))
        )
        for batch in _batches(self.session, query, _O.serial):
            for serial, said, written in batch:
                self.totals.ocsp_answers += 1
                if written <= self.settled:
                    yield _orphan(
                        self.ca.name, serial, said, written, "no certificate has that serial"
                    )

    def _answer(self, row: _Row, said: _Journalled) -> Iterator[Finding]:
        answer = row.answer
        if row.not_after <= self.now or self.revoked or self.ca.kind is not CaKind.ISSUING:
            # Expired: answered no more. A revoked CA: its answers are withheld. A root:
            # its certificates' status is on its CRLs; no responder answers for it.
            return
        stale: str | None = None
        if answer is None:
            if row.status is not CertStatus.FAILED and row.created_at <= self.settled:
                stale = "no stored OCSP answer"
        elif answer.status_epoch < row.status_epoch:
            if _changed_at(row, said) <= self.settled:
                stale = "the answer predates its status"
        elif answer.next_update <= self.now:
            stale = f"the answer expired at {_iso(answer.next_update)}"
        if answer is not None:
            self.totals.ocsp_answers += 1
        if stale is not None:
            if not self.maintained:
                self.unmaintained += 1
            elif self.stale < MAX_STALE_LISTED:
                kind = "ocsp-missing" if answer is None else "ocsp-behind"
                yield self.finding(row.serial, kind, stale)
            self.stale += 1
            return
        if answer is None or answer.status_epoch < row.status_epoch:
            return  # on its way
        problem = self._answer_problem(row, answer)
        if problem is not None:
            yield self.finding(row.serial, "ocsp-answer", problem)

    def _answer_problem(self, row: _Row, answer: _Answer) -> str | None:
        reason_name = row.reason.value if row.reason else None
        wanted = status_label(status_of(row.status, reason_name, row.revoked_at))
        if answer.status_epoch > row.status_epoch:
            return f"it reflects epoch {answer.status_epoch}, the row is at {row.status_epoch}"
        if answer.cert_status != wanted:
            return f"stored as {answer.cert_status}, the row says {wanted}"
        try:
            response = ocsp.load_der_ocsp_response(answer.der)
            serial, key_hash = response.serial_number, response.issuer_key_hash
            said = _OCSP_STATUS[response.certificate_status]
            validity = response.this_update_utc, response.next_update_utc
            revoked = None
            if said == REVOKED:
                revoked = response.revocation_time_utc, response.revocation_reason
            signers = response.certificates
            signer = signers[0] if signers else self.cert  # a delegated responder, or the CA
            signer_ends = signer.not_valid_after_utc
            signature, tbs = response.signature, response.tbs_response_bytes
        except _UNREADABLE:
            return "the stored DER is not an OCSP response Sekisho can read"
        if (serial, key_hash) != (int(row.serial, 16), self.key_hash):
            return "the DER answers for another certificate"
        if said != wanted:
            return f"the DER says {said}, the row says {wanted}"
        if revoked is not None:
            unspecified = row.reason in (None, Reason.UNSPECIFIED)
            reason = None if unspecified or row.reason is None else row.reason.flag
            if revoked != (_seconds(row.revoked_at), reason):
                return "the DER's revocation time or reason is not the row's"
        if validity != (answer.this_update, answer.next_update):
            return "the DER's thisUpdate or nextUpdate is not the stored one"
        if signers:
            der = signer.public_bytes(Encoding.DER)
            if der not in self.responders:
                return "signed by a certificate that is not one of this CA's OCSP responders"
            revoked_at = self.responders[der]
            if revoked_at is not None and revoked_at <= self.settled:
                return f"signed by a responder revoked at {_iso(revoked_at)}"
        try:
            verify_signature(signer, signature, tbs)
        except _BAD_SIGNATURE:
            return "its signature does not verify"
        # Once its signer's certificate ends, a relying party rejects the answer, fresh as its
        # nextUpdate says it is; unless the certificate it answers for has ended by then too
        # (the answers of a CA in its last days: every certificate ends with the CA).
        if min(answer.next_update, row.not_after) > signer_ends:
            return (
                f"valid until {_iso(answer.next_update)}, after its signer's certificate ends "
                f"({_iso(signer_ends)}): relying parties reject it from then on"
            )
        return None


_REMOVE = x509.ReasonFlags.remove_from_crl
_OCSP_STATUS = {
    ocsp.OCSPCertStatus.GOOD: GOOD,
    ocsp.OCSPCertStatus.REVOKED: REVOKED,
    ocsp.OCSPCertStatus.UNKNOWN: UNKNOWN,
}


@dataclasses.dataclass(frozen=True)
class _Answer:
    der: bytes
    cert_status: str
    status_epoch: int
    this_update: dt.datetime
    next_update: dt.datetime


@dataclasses.dataclass(frozen=True)
class _Row:
    """A certificates row as the check reads it (status, reason and serial checked)."""

    serial: str
    status: CertStatus
    reason: Reason | None
    revoked_at: dt.datetime | None
    released_at: dt.datetime | None
    invalidity_date: dt.datetime | None
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
    number: int | None  # the serial as a number, when it is one
    why: str


_STATUSES = frozenset(s.value for s in CertStatus)
_REASONS = frozenset(r.value for r in Reason)
_C, _O = Certificate, OcspResponse
_SAME_CERT = and_(_O.issuer_id == _C.issuer_id, _O.serial == _C.serial)  # a row and its answer
# Status and reason as stored text: a value no enum member has is a finding, not a crash.
_COLUMNS = (
    _C.serial, type_coerce(_C.status, String), _C.revocation_reason, _C.revoked_at,
    _C.released_at, _C.invalidity_date, _C.created_at, _C.status_epoch, _C.der,
    _C.fingerprint_sha256, _C.tbs_sha256, _C.spki_sha256, _C.subject_dn, _C.not_before,
    _C.not_after,
    _O.id, _O.der, _O.cert_status, _O.status_epoch, _O.this_update, _O.next_update,
)  # fmt: skip


def _certificates(ca_id: int) -> Any:
    """The CA's certificates, each with its stored answer."""
    return select(*_COLUMNS).outerjoin(_O, _SAME_CERT).where(_C.issuer_id == ca_id)


def _batches(session: Session, query: Any, key: Any) -> Iterator[list[Any]]:
    """The rows of ``query`` BATCH at a time in the order of ``key``, a unique column it
    selects first: one statement per batch, no cursor left open while findings are read."""
    after = None
    while True:
        page = query if after is None else query.where(key > after)
        rows = list(session.execute(page.order_by(key).limit(BATCH)))
        if rows:
            yield rows
        if len(rows) < BATCH:
            return
        after = rows[-1][0]


def _orphan(ca: str, serial: object, said: object, written: dt.datetime, why: str) -> Finding:
    """An ``ocsp-orphan`` finding: a stored answer for no certificates row."""
    text = str(serial)
    if not _SERIAL.fullmatch(text):
        text, why = "", f"serial {shown(text)}: {why}"
    status = said if said in (GOOD, REVOKED, UNKNOWN) else shown(said)
    return Finding(
        ca, text, "ocsp-orphan", f"a stored {status} answer (written {_iso(written)}), but {why}"
    )


def _row(values: Any) -> _Row | _Unreadable:
    serial, status, reason = str(values[0]), values[1], values[2]
    if not _SERIAL.fullmatch(serial):
        return _Unreadable(serial, None, f"serial {shown(serial)} is not 40 hex digits")
    number = int(serial, 16)
    if status not in _STATUSES:
        return _Unreadable(serial, number, f"status {shown(status)} is not one Sekisho knows")
    if reason and reason not in _REASONS:
        return _Unreadable(serial, number, f"reason {shown(reason)} is not one Sekisho knows")
    if not isinstance(values[8], bytes | None):
        return _Unreadable(serial, number, "its DER is stored as text, not octets")
    answer = None if values[15] is None else _Answer(*values[16:21])
    (revoked_at, released_at, invalidity, created_at, epoch, der, fingerprint, tbs, spki,
     subject, not_before, not_after) = values[3:15]  # fmt: skip
    return _Row(
        serial, CertStatus(status), Reason(reason) if reason else None, revoked_at, released_at,
        invalidity, created_at, epoch, der, fingerprint, tbs, spki, subject, not_before,
        not_after, answer,
    )  # fmt: skip


def _entry(entry: x509.RevokedCertificate) -> _Entry:
    extensions = entry.extensions
    try:
        reason = extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = x509.ReasonFlags.unspecified
    try:
        invalidity = extensions.get_extension_for_class(x509.InvalidityDate).value
        invalid_since: dt.datetime | None = invalidity.invalidity_date_utc
    except x509.ExtensionNotFound:
        invalid_since = None
    return _Entry(reason, entry.revocation_date_utc, invalid_since)


def _rdns(name: x509.Name) -> list[frozenset[tuple[x509.ObjectIdentifier, object]]]:
    """A name's RDNs as sets of (type, value): a multi-valued RDN's order is the DER's SET OF
    order in the certificate, and whatever order the request gave in the row."""
    return [frozenset((a.oid, a.value) for a in rdn) for rdn in name.rdns]


def _same_subject(name: x509.Name, text: str) -> bool:
    """Whether the row's RFC 4514 ``text`` names ``name`` (a multi-valued RDN's attributes in
    any order: the row keeps the request's, the DER sorts them)."""
    if name.rfc4514_string() == text:
        return True
    try:
        return _rdns(name) == _rdns(x509.Name.from_rfc4514_string(text))
    except ValueError:
        return False


def _changed_at(row: _Row, said: _Journalled) -> dt.datetime:
    """When the row's status last changed: the newest of its own times and of the journal's
    records of it (a re-revocation keeps the first revocation's time in the row)."""
    times = (row.created_at, row.revoked_at, row.released_at, said.changed_at)
    return max(t for t in times if t is not None)


def _seconds(value: dt.datetime | None) -> dt.datetime | None:
    """As CRLs and OCSP answers carry times: whole seconds."""
    return value.replace(microsecond=0) if value is not None else None


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value is not None else "-"
