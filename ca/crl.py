"""CRL building (RFC 5280 section 5): full and delta CRLs, encoded by hand, signed through
the key backend.

Numbers: full and delta CRLs share one strictly increasing sequence per CA (5.2.3). A higher
number never carries older revocation state, nor an earlier thisUpdate: the number is
allocated under the CA row lock, in a short transaction that also reads the CA's revocation
epoch (every revocation and release bumps it under the same lock); the revocation state is
then read in a snapshot, without the lock, and used only if the snapshot's epoch is still the
allocated one (nothing changed in between, so the CRL says what was true at allocation, and
allocations are ordered). Otherwise the number is left unused (numbers may have gaps; RFC
5280 asks only that they increase) and the generator tries again; after OPTIMISTIC_READS
tries it reads under the lock, as every generator did before. Reading 10^6 entries takes
seconds: under the lock, every revocation of the CA (and on SQLite every write) waited that
long. Signing happens outside any transaction.

nextUpdate is capped at the CA certificate's notAfter; a CA whose certificate ends less than
MIN_VALIDITY after thisUpdate signs no more CRLs (``check_can_publish``), so no CRL ever has
a nextUpdate at or before its thisUpdate (5.1.2.5).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from sqlalchemy import Executable, Table, bindparam, delete, select, text, update
from sqlalchemy.orm import Session, defer

from audit.events import Category, Outcome, by_actor, refused
from audit.journal import Journal
from ca import der
from ca.lint import CRL_LINT_ENTRIES, Linter, lint_unreadable
from ca.models import Certificate, CertificateAuthority, CertStatus, Crl, CrlKind
from ca.revocation import Reason
from hsm.base import KeyBackend, KeyType, sign_bytes, verify_bytes
from sekisho.clock import CLOCK_AHEAD, as_utc
from sekisho.context import SYSTEM, Actor
from sekisho.db import Database, Prepared, stream_raw
from sekisho.errors import Conflict, KeyBackendError, NotFound, PolicyViolation, shown

# AlgorithmIdentifier DER per CA key type (RFC 5758 3.2, RFC 4055/8017, RFC 8410 3).
SIGNATURE_ALGORITHM: dict[KeyType, bytes] = {
    KeyType.EC_P256: der.sequence(der.oid("1.2.840.10045.4.3.2")),
    KeyType.EC_P384: der.sequence(der.oid("1.2.840.10045.4.3.3")),
    KeyType.RSA_2048: der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00"),
    KeyType.RSA_3072: der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00"),
    KeyType.RSA_4096: der.sequence(der.oid("1.2.840.113549.1.1.12"), b"\x05\x00"),
    KeyType.ED25519: der.sequence(der.oid("1.3.101.112")),
}
OID_AKI = "2.5.29.35"
OID_CRL_NUMBER = "2.5.29.20"
OID_DELTA_INDICATOR = "2.5.29.27"
OID_FRESHEST_CRL = "2.5.29.46"
OID_REASON = "2.5.29.21"
OID_INVALIDITY = "2.5.29.24"
REMOVE_FROM_CRL = 8
# The shortest validity a CRL is issued with: the shortest full CRL validity an operator can
# set (``crl_next_update_days``). Below it, the CA's last CRL (nextUpdate at notAfter) stays.
MIN_VALIDITY = dt.timedelta(hours=1)
STREAM_BATCH = 10_000  # rows fetched per round trip when streaming revocations
SORT_WORK_MEM = "256MB"  # PostgreSQL work_mem for sorting a full CRL's serials in memory
_CERTS = cast(Table, Certificate.__table__)
# Snapshot reads of a CA's revocation state before a generator reads it under the CA row lock.
OPTIMISTIC_READS = 3
# CRLs deleted per transaction by ``CrlPublisher.prune``: at most this many, and at most this
# many entries together (about 10 MB of CRL) unless one CRL alone has more.
PRUNE_BATCH_ROWS = 100
PRUNE_BATCH_ENTRIES = 200_000
log = logging.getLogger("sekisho.crl")

_REASON_CODE = {
    Reason.KEY_COMPROMISE: 1,
    Reason.CA_COMPROMISE: 2,
    Reason.AFFILIATION_CHANGED: 3,
    Reason.SUPERSEDED: 4,
    Reason.CESSATION_OF_OPERATION: 5,
    Reason.CERTIFICATE_HOLD: 6,
    Reason.PRIVILEGE_WITHDRAWN: 9,
    Reason.AA_COMPROMISE: 10,
}


def _reason_ext(code: int) -> bytes:
    return der.extension(OID_REASON, der.tlv(0x0A, bytes((code,))))


_REASON_EXT = {code: _reason_ext(code) for code in (*_REASON_CODE.values(), REMOVE_FROM_CRL)}


@dataclasses.dataclass(frozen=True)
class Entry:
    serial: int
    revoked_at: dt.datetime
    reason_code: int | None  # None for unspecified (RFC 5280 5.3.1: omit the extension)
    invalidity_date: dt.datetime | None = None


def entry_der(entry: Entry) -> bytes:
    exts: list[bytes] = []
    if entry.reason_code is not None:
        exts.append(_REASON_EXT[entry.reason_code])
    if entry.invalidity_date is not None:
        exts.append(der.extension(OID_INVALIDITY, der.generalized_time(entry.invalidity_date)))
    parts = [der.integer(entry.serial), der.time(entry.revoked_at)]
    if exts:
        parts.append(der.sequence(*exts))
    return der.sequence(*parts)


def encode_entries(entries: Iterable[Entry]) -> bytes:
    return b"".join(map(entry_der, entries))


# crlEntryExtensions (the SEQUENCE) by stored reason name, for entries without an invalidity
# date; b"" where the reason adds no extension (unspecified, RFC 5280 5.3.1).
_ENTRY_EXTS_BY_REASON: dict[str | None, bytes] = {None: b"", "": b""}
for _reason in Reason:
    _code = _REASON_CODE.get(_reason)
    _ENTRY_EXTS_BY_REASON[_reason.value] = (
        b"" if _code is None else der.sequence(_REASON_EXT[_code])
    )


# The full CRL's entries on SQLite: the revoked rows found through the status index (in
# rowid order, so the table is read nearly in order), then sorted by serial. Left to itself,
# SQLite walked the (issuer, serial) index to spare the sort, and read the row of every
# certificate of the CA, revoked or not, in the random order of the serials: at 10^6 revoked
# entries the read took 4.4-6.4 s, through the status index 2.3-3.0 s; with few of many
# certificates revoked, the common case, it now reads only theirs. Times come as stored.
def _full_entries(dialect: str) -> Executable:
    """The full CRL's read (``stream_raw``: the values as stored, no column processing)."""
    if dialect == "sqlite":
        return text(
            "SELECT serial, revocation_reason, revoked_at, invalidity_date "
            "FROM certificates INDEXED BY ix_certificates_status "
            "WHERE status = :status AND issuer_id = :issuer_id AND not_after >= :horizon "
            "ORDER BY serial"
        ).bindparams(
            bindparam("status", CertStatus.REVOKED, type_=_CERTS.c.status.type),
            bindparam("issuer_id", type_=_CERTS.c.issuer_id.type),
            bindparam("horizon", type_=_CERTS.c.not_after.type),
        )
    return (
        select(
            _CERTS.c.serial,
            _CERTS.c.revocation_reason,
            _CERTS.c.revoked_at,
            _CERTS.c.invalidity_date,
        )
        .where(
            _CERTS.c.issuer_id == bindparam("issuer_id"),
            _CERTS.c.status == CertStatus.REVOKED,
            _CERTS.c.not_after >= bindparam("horizon"),
        )
        # Byte order, which for the stored form (40 lower-case hex digits) is the serials'
        # order: under a database's linguistic collation (en_US.UTF-8, C.UTF-8) the same
        # order cost 2.7-3.3 s to sort at 10^6 rows, 1.05 s in "C".
        .order_by(_CERTS.c.serial.collate("C"))
    )


_FULL_ENTRIES = Prepared(None, ["issuer_id", "horizon"], by_dialect=_full_entries)

# Taken out of SQLite's "YYYY-MM-DD HH:MM:SS" to leave the UTCTime's digits.
_TIME_SEPARATORS = b"-: "


def _integer_from_hex(serial: str) -> bytes:
    """DER INTEGER of a stored serial (hex text), as ``der.integer(int(serial, 16))``."""
    try:
        raw = bytes.fromhex(serial).lstrip(b"\x00")
    except ValueError:
        return der.integer(int(serial, 16))
    if not raw or raw[0] & 0x80:
        raw = b"\x00" + raw
    return b"\x02" + der.length(len(raw)) + raw


def stored_time(value: str) -> dt.datetime:
    """A time as SQLite holds it (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC, no zone), as
    ``sekisho.db.UTCDateTime`` reads it: aware, in UTC."""
    return as_utc(dt.datetime.fromisoformat(value))


def encode_revoked_rows(
    rows: Iterable[tuple[str, str | None, dt.datetime | str | None, dt.datetime | str | None]],
    default_time: dt.datetime,
    out: bytearray,
) -> int:
    """Append the DER of each (serial hex, reason name, revoked_at, invalidity_date) row to
    ``out``, byte for byte what ``entry_der`` gives; return the number of rows. The times may
    be the text SQLite stores.

    The common case (UTC time before 2050, no invalidity date) is encoded inline: this loop
    runs once per revoked certificate, 10^6 times for a large CRL. Its UTCTime digits are cut
    out of SQLite's text once that is known to be a naive time in the stored shape, and its
    serial's INTEGER made from the hex without an int in between (5.7 us a row became about
    3 us); anything else (an offset in the text, another shape, an invalidity date, a year
    outside 1950-2049) goes through :func:`stored_time` and :func:`entry_der`.
    """
    exts_by_reason = _ENTRY_EXTS_BY_REASON
    utc = dt.UTC
    drop = _TIME_SEPARATORS
    from_iso = dt.datetime.fromisoformat
    count = 0
    for serial, reason, stored_at, stored_invalidity in rows:
        count += 1
        exts = exts_by_reason.get(reason)
        digits = b""  # the UTCTime's YYMMDDHHMMSS, when this entry takes the common path
        if exts is not None and stored_invalidity is None:
            if isinstance(stored_at, str):
                # SQLite's text, "YYYY-MM-DD HH:MM:SS[.ffffff]" in UTC: once it is known to be
                # that (the separators in place, and a datetime without an offset, so digits
                # and a real date and time between them), the UTCTime's digits are cut out of
                # it as they stand. Making a UTC datetime of it and formatting that cost a
                # third of the loop. Anything else takes the general path, which converts
                # offsets and refuses what is not a time.
                if (
                    (len(stored_at) == 19 or (len(stored_at) == 26 and stored_at[19] == "."))
                    and stored_at[4] == "-"
                    and stored_at[7] == "-"
                    and stored_at[10] == " "
                    and stored_at[13] == ":"
                    and stored_at[16] == ":"
                ):
                    try:
                        parsed = from_iso(stored_at)
                    except ValueError:
                        parsed = None
                    if parsed is not None and parsed.tzinfo is None and 1950 <= parsed.year < 2050:
                        digits = stored_at[2:19].encode("ascii").translate(None, drop)
            elif (
                stored_at is not None and stored_at.tzinfo is utc and 1950 <= stored_at.year < 2050
            ):
                digits = b"%02d%02d%02d%02d%02d%02d" % (
                    stored_at.year % 100,
                    stored_at.month,
                    stored_at.day,
                    stored_at.hour,
                    stored_at.minute,
                    stored_at.second,
                )
        if not digits:
            revoked_at = stored_time(stored_at) if isinstance(stored_at, str) else stored_at
            invalidity = (
                stored_time(stored_invalidity)
                if isinstance(stored_invalidity, str)
                else stored_invalidity
            )
            r = Reason(reason) if reason else Reason.UNSPECIFIED
            when = revoked_at or default_time
            out += entry_der(Entry(int(serial, 16), when, _REASON_CODE.get(r), invalidity))
            continue
        body = _integer_from_hex(serial) + b"\x17\x0d" + digits + b"Z" + (exts or b"")
        n = len(body)
        out += (b"\x30" + bytes((n,)) if n < 0x80 else b"\x30" + der.length(n)) + body
    return count


@dataclasses.dataclass(frozen=True)
class CrlParams:
    issuer_name_der: bytes
    issuer_ski: bytes
    key_type: KeyType
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    base_number: int | None = None  # set for a delta CRL
    freshest_url: str | None = None  # full CRLs point at their delta (5.2.6)


def build_crl(
    params: CrlParams,
    entries_der: bytes | bytearray,
    key: CertificateIssuerPrivateKeyTypes,
    lint: Linter | None = None,
    verify_with: CertificateIssuerPublicKeyTypes | None = None,
) -> bytes:
    """Encode TBSCertList, sign it with ``key`` (through the backend), return the CRL DER.
    With ``lint`` (the lint gate), pkilint reads the TBSCertList first, cut to its first
    ``CRL_LINT_ENTRIES`` entries when longer; a finding refuses it (PolicyViolation, rule
    ``pkilint``) before anything is signed. With ``verify_with`` (the CA certificate's public
    key) the signature is checked: a key backend holding another key under the CA's reference
    (a token swapped or restored under the same label and id) is a KeyBackendError, and the
    CRL it signed is never published."""
    if not 0 < params.number < 1 << 159:
        raise ValueError("CRL number out of range (RFC 5280 5.2.3: at most 20 octets)")
    tbs = encode_tbs(params, entries_der)
    if lint is not None:
        try:
            head = der.leading(entries_der, CRL_LINT_ENTRIES)
        except ValueError as exc:  # our own encoding, unreadable: the gate stays shut
            raise lint_unreadable(exc, "CRL") from exc
        linted = tbs if head is entries_der else encode_tbs(params, head)
        lint.check_crl_tbs(linted, params.key_type)
    signature = sign_bytes(key, params.key_type, tbs)
    if verify_with is not None and not verify_bytes(verify_with, params.key_type, signature, tbs):
        raise KeyBackendError(
            "the CA key signed a CRL that does not verify under the CA's certificate: the key "
            "backend holds another key under its reference"
        )
    return der.sequence(tbs, SIGNATURE_ALGORITHM[params.key_type], der.bit_string(signature))


def encode_tbs(params: CrlParams, entries_der: bytes | bytearray) -> bytes:
    """TBSCertList (RFC 5280 5.1.2) with the revokedCertificates ``entries_der`` (DER of each
    entry, concatenated, in order)."""
    aki = der.sequence(der.tlv(0x80, params.issuer_ski))
    exts = [der.extension(OID_AKI, aki), der.extension(OID_CRL_NUMBER, der.integer(params.number))]
    if params.base_number is not None:
        exts.append(
            der.extension(OID_DELTA_INDICATOR, der.integer(params.base_number), critical=True)
        )
    elif params.freshest_url:
        uri = der.tlv(0x86, params.freshest_url.encode("ascii"))
        # DistributionPoint { distributionPoint [0] { fullName [0] GeneralNames } }
        dp = der.sequence(der.explicit(0, der.tlv(0xA0, uri)))
        exts.append(der.extension(OID_FRESHEST_CRL, der.sequence(dp)))
    parts = [
        der.integer(1),  # v2
        SIGNATURE_ALGORITHM[params.key_type],
        params.issuer_name_der,
        der.time(params.this_update),
        der.time(params.next_update),
    ]
    if entries_der:
        parts.append(b"\x30" + der.length(len(entries_der)))
        parts.append(entries_der)  # type: ignore[arg-type]  # join() takes a bytearray
    parts.append(der.explicit(0, der.sequence(*exts)))
    return der.sequence(*parts)


def _entry_for(cert: Certificate) -> Entry:
    reason = Reason(cert.revocation_reason) if cert.revocation_reason else Reason.UNSPECIFIED
    assert cert.revoked_at is not None
    return Entry(
        int(cert.serial, 16), cert.revoked_at, _REASON_CODE.get(reason), cert.invalidity_date
    )


def check_can_publish(ca_name: str, ca_not_after: dt.datetime, this_update: dt.datetime) -> None:
    """Refuse a CRL from a CA whose certificate ends less than MIN_VALIDITY after
    ``this_update``: capped at notAfter, its nextUpdate would be at or before thisUpdate once the
    certificate has expired (RFC 5280 5.1.2.5; pkilint: negative validity period), or stale
    within minutes before that. The CA's last CRL, valid until notAfter, stays published."""
    if ca_not_after <= this_update:
        raise Conflict(
            f"the certificate of CA {ca_name} expired at {ca_not_after.isoformat()}: "
            "it signs no more CRLs"
        )
    if ca_not_after - this_update < MIN_VALIDITY:
        raise Conflict(
            f"the certificate of CA {ca_name} expires at {ca_not_after.isoformat()}, within "
            f"{MIN_VALIDITY}: no new CRL; its last one is valid until then"
        )


@dataclasses.dataclass(frozen=True)
class _Base:
    """The full CRL a delta CRL is based on."""

    number: int
    epoch: int
    this_update: dt.datetime


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A CRL number allocated for one CA, and what the CRL will say besides its entries."""

    ca_id: int
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    epoch: int  # the CA's revocation epoch when the number was allocated
    base: _Base | None  # delta CRLs only
    horizon: dt.datetime  # full CRLs list revoked certificates expiring at or after this
    cert: x509.Certificate
    key_ref: str
    key_type: KeyType


class CrlPublisher:
    """Generates and stores CRLs for one deployment; safe across processes."""

    def __init__(
        self,
        db: Database,
        backend: KeyBackend,
        journal: Journal,
        next_update: dt.timedelta,
        delta_next_update: dt.timedelta,
        delta_url_for: Callable[[str], str],
        *,
        deltas: bool = True,
        linter: Linter | None = None,
    ) -> None:
        self.db = db
        self.deltas = deltas  # setting crl_deltas: off, full CRLs only, with no pointer
        # The lint gate (``lint_before_signing``): each TBSCertList linted before it is signed.
        self.linter = linter
        self.backend = backend
        self.journal = journal
        self.next_update = next_update
        self.delta_next_update = delta_next_update
        self.delta_url_for = delta_url_for

    def _plan(
        self, session: Session, ca_name: str, now: dt.datetime, delta: bool, lasting: bool = False
    ) -> _Plan:
        """Allocate the next CRL number and its thisUpdate under the CA row lock (an UPDATE):
        ``now``, or the previous number's thisUpdate if that is later. ``now`` is read before
        the lock: a generator that waited for another one would otherwise give a higher
        number an earlier time. But a previous thisUpdate more than CLOCK_AHEAD
        ahead came from a clock that ran ahead: carried forward, it would make every later
        CRL "not yet valid" to relying parties until real time caught up, so ``now`` is
        taken (logged as an error) and ``due`` has the full CRL rebuilt. Nothing is
        allocated (the caller's transaction rolls back) when the CA cannot sign a CRL now."""
        ca_id = session.scalars(
            select(CertificateAuthority.id).where(CertificateAuthority.name == ca_name)
        ).one_or_none()
        if ca_id is None:
            raise NotFound(f"unknown certificate authority {shown(ca_name)}")
        # The CA's newest full CRL: a delta's base; for a full CRL, where its horizon lies.
        base: Crl | None = latest(session, ca_id, CrlKind.FULL, der=False)
        if delta and base is None:
            raise Conflict(f"CA {ca_name} has no full CRL yet to base a delta on")
        session.execute(
            update(CertificateAuthority)
            .where(CertificateAuthority.id == ca_id)
            .values(crl_number=CertificateAuthority.crl_number + 1)
        )
        ca = session.scalars(
            select(CertificateAuthority).where(CertificateAuthority.id == ca_id)
        ).one()
        session.refresh(ca)
        previous = ca.crl_this_update or now
        if previous > now + CLOCK_AHEAD:
            log.error(
                "the previous CRL's thisUpdate is ahead of this clock: a clock ran ahead; "
                "this CRL takes the present time",
                extra={"ca": ca_name, "previous": previous.isoformat(), "now": now.isoformat()},
            )
            previous = now
        this_update = max(now, previous)
        ca.crl_this_update = this_update
        if not ca.key_online:
            raise Conflict(f"the key of CA {ca_name} is offline; bring it online to sign")
        cert = x509.load_der_x509_certificate(ca.certificate_der)
        check_can_publish(ca_name, cert.not_valid_after_utc, this_update)
        next_update = this_update + (self.delta_next_update if delta else self.next_update)
        if delta and lasting and base is not None:
            next_update = max(next_update, base.next_update)
        # RFC 5280 3.3 / 5.1.2.6: an entry leaves only after a full CRL issued after the
        # certificate's expiry listed it. The newest full CRL listed every entry expiring at
        # or after its own horizon, so one that expired before its thisUpdate may go. One
        # CRL validity back, as before, when that is earlier: never fewer entries than that.
        horizon = this_update - self.next_update
        if base is not None:
            horizon = min(horizon, base.this_update)
        return _Plan(
            ca_id=ca_id,
            number=int(ca.crl_number),
            this_update=this_update,
            next_update=min(next_update, cert.not_valid_after_utc),
            epoch=int(ca.revocation_epoch),
            base=_Base(base.number, base.epoch, base.this_update) if delta and base else None,
            horizon=horizon,
            cert=cert,
            key_ref=ca.key_ref,
            key_type=KeyType(ca.key_type),
        )

    def _read_entries(self, session: Session, plan: _Plan) -> tuple[bytearray, int]:
        """The DER of the CRL's revokedCertificates entries, and their count."""
        base = plan.base
        if base is not None:
            rows = session.execute(
                select(
                    Certificate.serial,
                    Certificate.status,
                    Certificate.revocation_reason,
                    Certificate.revoked_at,
                    Certificate.invalidity_date,
                    Certificate.released_at,
                )
                .where(Certificate.issuer_id == plan.ca_id, Certificate.status_epoch > base.epoch)
                .order_by(Certificate.serial)
            )
            entries = []
            for serial, status, reason, revoked_at, invalidity, released_at in rows:
                if status is CertStatus.FAILED or (
                    status is not CertStatus.REVOKED and released_at is None
                ):
                    # Changed since the base but never on a CRL: a serial whose signing
                    # failed (its epoch moved so that OCSP stops serving its "good").
                    continue
                if status is CertStatus.REVOKED:
                    r = Reason(reason) if reason else Reason.UNSPECIFIED
                    entries.append(
                        Entry(
                            int(serial, 16),
                            revoked_at or plan.this_update,
                            _REASON_CODE.get(r),
                            invalidity,
                        )
                    )
                else:  # released from hold since the base CRL
                    entries.append(Entry(int(serial, 16), base.this_update, REMOVE_FROM_CRL))
            return bytearray(encode_entries(entries)), len(entries)
        horizon = plan.horizon
        # Streamed (server-side cursor on PostgreSQL) and encoded straight to DER: no
        # per-entry objects, so 10^6 entries take seconds and little memory.
        # The rows as the driver gives them (``stream_raw``), read by encode_revoked_rows
        # (SQLite's text, or psycopg's datetimes, in UTC for this transaction): the column
        # types' processing cost about 2 us a row, a sixth of the whole build, and
        # SQLAlchemy's result streaming another tenth.
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL TimeZone = 'UTC'"))
            # Serials are random: walking the (issuer, serial) index reads the heap in random
            # order, a page per row (2.4 s at 10^6). A sequential scan and an in-memory sort
            # of the serials take 1.1 s. This transaction only.
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text(f"SET LOCAL work_mem = '{SORT_WORK_MEM}'"))
        entries_der = bytearray()
        entry_count = 0
        values = {"issuer_id": plan.ca_id, "horizon": horizon}
        for batch in stream_raw(session.connection(), _FULL_ENTRIES, values, STREAM_BATCH):
            entry_count += encode_revoked_rows(batch, plan.this_update, entries_der)
        return entries_der, entry_count

    def _plan_and_read(
        self, ca_name: str, now: dt.datetime, delta: bool, lasting: bool = False
    ) -> tuple[_Plan, bytearray, int]:
        """A CRL number and the revocation state it publishes, read without holding up
        revocations (see the module docstring)."""
        for _attempt in range(OPTIMISTIC_READS):
            with self.db.scope() as session:
                plan = self._plan(session, ca_name, now, delta, lasting)
            with self.db.read_scope(snapshot=True) as session:
                seen = session.scalar(
                    select(CertificateAuthority.revocation_epoch).where(
                        CertificateAuthority.id == plan.ca_id
                    )
                )
                if seen == plan.epoch:
                    return plan, *self._read_entries(session, plan)
            log.info(
                "CRL number left unused: revocations landed while it was read",
                extra={"ca": ca_name, "number": plan.number, "delta": delta},
            )
        # Revocations keep landing: this time read while holding the CA row.
        with self.db.scope() as session:
            plan = self._plan(session, ca_name, now, delta, lasting)
            return plan, *self._read_entries(session, plan)

    def publish(
        self,
        ca_name: str,
        now: dt.datetime,
        *,
        actor: Actor = SYSTEM,
        closing: bool = False,
        journal_refusal: bool = True,
    ) -> tuple[Crl, Crl | None]:
        """A full CRL, then a delta against it: every full CRL points to the delta (Freshest
        CRL), and a delta numbered below the full CRL served beside it, or naming an older
        base, is discarded by RFC 5280 5.2.4 clients (OpenSSL's check_delta_base). With
        delta CRLs turned off, the full CRL alone (and None).

        ``closing``: the CA's key is about to leave the store, and nothing will renew the
        delta: it lasts as long as the full CRL (otherwise a client following the pointer
        finds an expired delta for most of the full CRL's life)."""
        full = self.generate(ca_name, now, actor=actor, journal_refusal=journal_refusal)
        if not self.deltas:
            return full, None
        return full, self.generate(
            ca_name, now, delta=True, actor=actor, lasting=closing, journal_refusal=journal_refusal
        )

    def generate(
        self,
        ca_name: str,
        now: dt.datetime,
        *,
        delta: bool = False,
        actor: Actor = SYSTEM,
        lasting: bool = False,
        journal_refusal: bool = True,
    ) -> Crl:
        """Build, sign and store a full (or delta) CRL for ``ca_name``. ``lasting`` (delta):
        valid until its base CRL's nextUpdate, not for the delta validity only.

        A CRL the lint gate refuses (PolicyViolation) is neither signed nor stored, and is
        journalled (``ca.crl``, failure, with the rule and the findings) unless
        ``journal_refusal`` is false: the refresher, trying again every CRL_RETRY, journals
        the first refusal of a run of them only."""
        if delta and not self.deltas:
            raise Conflict("delta CRLs are turned off on this deployment (setting crl_deltas)")
        plan, entries_der, entry_count = self._plan_and_read(ca_name, now, delta, lasting)
        base_number = plan.base.number if plan.base is not None else None
        params = CrlParams(
            issuer_name_der=plan.cert.subject.public_bytes(),
            issuer_ski=plan.cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest,
            key_type=plan.key_type,
            number=plan.number,
            this_update=plan.this_update,
            next_update=plan.next_update,
            base_number=base_number,
            freshest_url=self.delta_url_for(ca_name) if self.deltas and not delta else None,
        )
        try:
            crl_der = build_crl(
                params,
                entries_der,
                self.backend.signing_key(plan.key_ref),
                self.linter,
                verify_with=plan.cert.public_key(),  # type: ignore[arg-type]
            )
        except PolicyViolation as exc:
            if journal_refusal:
                dn = plan.cert.subject.rfc4514_string()
                detail = {
                    "ca": ca_name,
                    "number": plan.number,  # allocated, left unused
                    "kind": (CrlKind.DELTA if delta else CrlKind.FULL).value,
                    "entries": entry_count,
                    "base": base_number,
                }
                self.journal.append_alone(
                    self.db,
                    refused(actor, Category.CA, "ca.crl", exc, object_dn=dn, detail=detail),
                    now,
                )
            raise
        del entries_der
        with self.db.scope() as session:
            row = Crl(
                issuer_id=plan.ca_id,
                number=plan.number,
                kind=CrlKind.DELTA if delta else CrlKind.FULL,
                base_number=base_number,
                this_update=plan.this_update,
                next_update=plan.next_update,
                epoch=plan.epoch,
                entries=entry_count,
                sha256=hashlib.sha256(crl_der).hexdigest(),
                der=crl_der,
            )
            session.add(row)
            self.journal.append(
                session,
                by_actor(
                    actor,
                    Category.CA,
                    "ca.crl",
                    Outcome.SUCCESS,
                    object_dn=plan.cert.subject.rfc4514_string(),
                    detail={
                        "ca": ca_name,
                        "number": plan.number,
                        "kind": row.kind.value,
                        "entries": entry_count,
                        "base": base_number,
                        "next_update": plan.next_update.isoformat(),
                    },
                ),
                now,
            )
        return row

    def prune(self, now: dt.datetime, keep: dt.timedelta, actor: Actor = SYSTEM) -> int:
        """Delete the CRLs whose nextUpdate passed more than ``keep`` ago, but never a CA's
        newest full or delta CRL (served, whatever their age), a few at a time: one
        transaction and one journal entry (how many, the numbers) per batch of at most
        PRUNE_BATCH_ROWS CRLs or PRUNE_BATCH_ENTRIES entries, so that writers wait for one
        batch at most (on SQLite, deleting 8 CRLs of 50 MB held the write lock for 2.5 s).
        Every CRL stays whole in the store until then, and its SHA-256 in its ``ca.crl``
        journal entry for good. Returns how many were deleted."""
        cutoff = now - keep
        with self.db.read_scope() as session:
            ca_ids = sorted(
                session.scalars(select(Crl.issuer_id).where(Crl.next_update < cutoff).distinct())
            )
        return sum(self._prune_ca(ca_id, cutoff, now, actor) for ca_id in ca_ids)

    def _prune_ca(self, ca_id: int, cutoff: dt.datetime, now: dt.datetime, actor: Actor) -> int:
        with self.db.read_scope() as session:
            newest = [
                crl.number
                for kind in CrlKind
                if (crl := latest(session, ca_id, kind, der=False)) is not None
            ]
            # Older than the newest of their kind now, so never the newest later either.
            doomed = session.execute(
                select(Crl.id, Crl.entries)
                .where(Crl.issuer_id == ca_id, Crl.next_update < cutoff, Crl.number.not_in(newest))
                .order_by(Crl.number)
            ).all()
            if not doomed:
                return 0
            ca_name, ca_der = session.execute(
                select(CertificateAuthority.name, CertificateAuthority.certificate_der).where(
                    CertificateAuthority.id == ca_id
                )
            ).one()
        ca_dn = x509.load_der_x509_certificate(ca_der).subject.rfc4514_string()
        total = 0
        for ids in _batches([(int(i), int(n)) for i, n in doomed]):
            with self.db.scope() as session:
                gone = sorted(
                    session.scalars(delete(Crl).where(Crl.id.in_(ids)).returning(Crl.number))
                )
                if not gone:
                    continue  # another process pruned them meanwhile
                self.journal.append(
                    session,
                    by_actor(
                        actor,
                        Category.CA,
                        "ca.crl.prune",
                        Outcome.SUCCESS,
                        object_dn=ca_dn,
                        detail={
                            "ca": ca_name,
                            "deleted": len(gone),
                            "numbers": _ranges(gone),
                            "next_update_before": cutoff.isoformat(),
                        },
                    ),
                    now,
                )
            total += len(gone)
        return total


def _batches(rows: Sequence[tuple[int, int]]) -> Iterable[list[int]]:
    """The ids of (id, entries) rows in runs of at most PRUNE_BATCH_ROWS rows and, unless a
    single row has more, PRUNE_BATCH_ENTRIES entries."""
    batch: list[int] = []
    entries = 0
    for row_id, count in rows:
        if batch and (len(batch) >= PRUNE_BATCH_ROWS or entries + count > PRUNE_BATCH_ENTRIES):
            yield batch
            batch, entries = [], 0
        batch.append(row_id)
        entries += count
    if batch:
        yield batch


def _ranges(numbers: Sequence[int]) -> str:
    """Sorted numbers as runs: ``1-4,7,9-10``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def latest(session: Session, ca_id: int, kind: CrlKind, *, der: bool = True) -> Crl | None:
    """The CA's newest CRL of ``kind``. ``der=False``: without its DER (50 MB at 10^6
    entries), for callers that look at its number, epoch and times (the refresher, every
    tick); reading ``der`` then raises."""
    stmt = select(Crl).where(Crl.issuer_id == ca_id, Crl.kind == kind)
    if not der:
        stmt = stmt.options(defer(Crl.der, raiseload=True))
    return session.scalars(stmt.order_by(Crl.number.desc()).limit(1)).first()


def latest_by_name(
    session: Session, ca_name: str, kind: CrlKind, *, der: bool = True
) -> Crl | None:
    ca_id = session.scalar(
        select(CertificateAuthority.id).where(CertificateAuthority.name == ca_name)
    )
    return None if ca_id is None else latest(session, ca_id, kind, der=der)


def freshness(session: Session, now: dt.datetime, grace: dt.timedelta) -> dict[str, str]:
    """What is wrong with each active CA's newest full CRL, by CA name; a CA whose CRL is
    fine is not named. ``missing``: none yet. ``expired``: past its nextUpdate (relying
    parties refuse it). ``stale``: half its validity passed more than ``grace`` ago, so the
    refresher, which re-signs it then, could not (security target 17: the alarm). ``pending``:
    status changes no CRL carries, while the CA's key is offline (nothing signs them until it
    is brought back). A CA whose certificate has ended publishes no CRL and is left out."""
    problems: dict[str, str] = {}
    cas = session.execute(
        select(
            CertificateAuthority.id,
            CertificateAuthority.name,
            CertificateAuthority.not_after,
            CertificateAuthority.key_online,
            CertificateAuthority.revocation_epoch,
        )
        .where(CertificateAuthority.active)
        .order_by(CertificateAuthority.id)
    ).all()
    for ca_id, name, not_after, key_online, epoch in cas:
        if not_after <= now:
            continue
        crl = latest(session, ca_id, CrlKind.FULL, der=False)
        if crl is None:
            problems[name] = "missing"
        elif now >= crl.next_update:
            problems[name] = "expired"
        elif now >= crl.this_update + (crl.next_update - crl.this_update) / 2 + grace:
            problems[name] = "stale"
        elif epoch > crl.epoch and not key_online:
            problems[name] = "pending"
    return problems


def due(crl: Crl | None, epoch: int, now: dt.datetime) -> bool:
    """A CRL is due when missing, stale (revocations since), half its validity has passed,
    or it starts further ahead than CLOCK_AHEAD (made by a clock that ran ahead:
    relying parties take it as not yet valid)."""
    if crl is None or epoch > crl.epoch or crl.this_update > now + CLOCK_AHEAD:
        return True
    half = crl.this_update + (crl.next_update - crl.this_update) / 2
    return now >= half


__all__: Sequence[str] = (
    "CrlPublisher",
    "Entry",
    "build_crl",
    "check_can_publish",
    "due",
    "encode_tbs",
    "freshness",
    "latest",
)
