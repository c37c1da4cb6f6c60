"""Which CAs exist, and the URLs certificates point at (CDP, AIA) for each."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import weakref
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, event, select, update
from sqlalchemy.orm import Session, object_session

from ca.models import Certificate, CertificateAuthority, CertStatus
from ca.tbs import IssuerContext, serial_hex
from hsm.base import KeyType
from sekisho.errors import InputError, NotFound, shown

# A CA's name is the last path segment of its URLs (/crl/<name>.crl, /crl/<name>-delta.crl,
# /ca/<name>.crt) and of the file public/<name>.crt: one rule, checked when a CA is created and
# by the web routes, so every name a CA can have is served, and served as itself. A name ending
# in the delta suffix is reserved: the full CRL of "ops-delta" would sit at the URL of the delta
# CRL of "ops".
CA_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DELTA_SUFFIX = "-delta"


def is_ca_name(name: str) -> bool:
    """Whether ``name`` can be a CA's name (the web routes answer 404 for anything else)."""
    return CA_NAME.fullmatch(name) is not None and not name.endswith(DELTA_SUFFIX)


def check_ca_name(name: str) -> None:
    """Refuse a new CA's name that its CRL and certificate URLs could not carry."""
    if not is_ca_name(name):
        raise InputError(
            f"CA name {shown(name)} refused: 1 to 63 of a-z, 0-9, '-' and '_', starting with a "
            f"letter or digit, and not ending in {DELTA_SUFFIX!r} (reserved for delta CRL URLs)"
        )


@dataclasses.dataclass(frozen=True)
class Urls:
    base_url: str

    def _join(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def crl(self, ca: str) -> str:
        return self._join(f"/crl/{ca}.crl")

    def delta_crl(self, ca: str) -> str:
        return self._join(f"/crl/{ca}{DELTA_SUFFIX}.crl")

    def ca_cert(self, ca: str) -> str:
        return self._join(f"/ca/{ca}.crt")

    def ocsp(self) -> str:
        return self._join("/ocsp")


def context_for(row: CertificateAuthority, urls: Urls, *, revoked: bool = False) -> IssuerContext:
    return IssuerContext(
        id=row.id,
        name=row.name,
        certificate=x509.load_der_x509_certificate(row.certificate_der),
        key_ref=row.key_ref,
        key_type=KeyType(row.key_type),
        crl_url=urls.crl(row.name),
        delta_crl_url=urls.delta_crl(row.name),
        ocsp_url=urls.ocsp(),
        ca_issuers_url=urls.ca_cert(row.name),
        key_online=row.key_online,
        revoked=revoked,
    )


def ca_revocation(session: Session, row: CertificateAuthority) -> Certificate | None:
    """The parent's record of this CA's own certificate while the parent has revoked it or put
    it on hold (its reason and time), else None."""
    if row.parent_id is None:
        return None
    serial = serial_hex(x509.load_der_x509_certificate(row.certificate_der).serial_number)
    cert = session.scalar(
        select(Certificate).where(
            Certificate.issuer_id == row.parent_id, Certificate.serial == serial
        )
    )
    return cert if cert is not None and cert.status == CertStatus.REVOKED else None


def ca_revoked(session: Session, row: CertificateAuthority) -> bool:
    """Whether the parent has revoked (or put on hold) this CA's own certificate."""
    return ca_revocation(session, row) is not None


# How long a cached CA context is used before the row is read again: the bound on how late a
# process sees a change another process made (a CA key taken offline with the CLI while
# `serve` runs). Changes made in this process are seen at once (the ORM events below).
REFRESH_SECONDS = 2.0


class CaRegistry:
    """CA contexts cached per process; CA rows change only through ``ca.hierarchy``.

    Any ORM insert, update or delete of a CA row in this process drops every registry's cache
    (at flush, and again once that transaction commits), so the next ``get`` re-reads the row
    and sees ``active`` (and the certificate, key reference, key_online) as committed. A
    context older than REFRESH_SECONDS is read again, for changes made by other processes.
    """

    def __init__(self, urls: Urls) -> None:
        self.urls = urls
        self._cache: dict[str, tuple[float, IssuerContext]] = {}
        self._lock = threading.Lock()
        _REGISTRIES.add(self)

    def cached(self, name: str) -> IssuerContext | None:
        """The cached context of ``name`` while it is fresh, or None (then call ``get`` in a
        transaction)."""
        with self._lock:
            entry = self._cache.get(name)
        if entry is None or time.monotonic() - entry[0] >= REFRESH_SECONDS:
            return None
        return entry[1]

    def get(self, session: Session, name: str) -> IssuerContext:
        ctx = self.cached(name)
        if ctx is not None:
            return ctx
        loaded = time.monotonic()
        row = session.scalar(select(CertificateAuthority).where(CertificateAuthority.name == name))
        if row is None or not row.active:
            with self._lock:
                self._cache.pop(name, None)
            raise NotFound(f"unknown certificate authority {shown(name)}")
        ctx = context_for(row, self.urls, revoked=ca_revoked(session, row))
        with self._lock:
            self._cache[name] = (loaded, ctx)
        return ctx

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()


_REGISTRIES: weakref.WeakSet[CaRegistry] = weakref.WeakSet()
_CA_CHANGED = "sekisho.ca_rows_changed"


def _invalidate_all() -> None:
    for registry in list(_REGISTRIES):
        registry.invalidate()


@event.listens_for(CertificateAuthority, "after_insert")
@event.listens_for(CertificateAuthority, "after_update")
@event.listens_for(CertificateAuthority, "after_delete")
def _ca_row_flushed(_mapper: Any, _connection: Any, target: CertificateAuthority) -> None:
    _contexts_changed(target)


@event.listens_for(Certificate, "after_update")
def _certificate_flushed(_mapper: Any, _connection: Any, target: Certificate) -> None:
    # A CA's own certificate revoked, put on hold or released by its parent (revocation goes
    # through the ORM): the CA's "revoked" flag changes with it.
    if target.owner_kind == "ca":
        _contexts_changed(target)


def _contexts_changed(target: object) -> None:
    """Drop every cached context now, and again when ``target``'s transaction commits."""
    session = object_session(target)
    if session is not None:
        session.info[_CA_CHANGED] = True
    _invalidate_all()


@event.listens_for(Session, "after_commit")
def _ca_rows_committed(session: Session) -> None:
    # A context re-read between the flush and the commit saw the old row: drop it again.
    if session.info.pop(_CA_CHANGED, False):
        _invalidate_all()


def all_cas(session: Session) -> list[CertificateAuthority]:
    return list(session.scalars(select(CertificateAuthority).order_by(CertificateAuthority.id)))


def bump_revocation_epoch(executor: Session | Connection, ca_id: int) -> tuple[int, str]:
    """The CA's revocation epoch one up, in the caller's transaction (an ORM session or a
    Core connection): (the new epoch, the CA's name). Every status change of a certificate
    (a revocation, a release, a signing that failed) takes one."""
    executor.execute(
        update(CertificateAuthority)
        .where(CertificateAuthority.id == ca_id)
        .values(revocation_epoch=CertificateAuthority.revocation_epoch + 1)
    )
    row = executor.execute(
        select(CertificateAuthority.revocation_epoch, CertificateAuthority.name).where(
            CertificateAuthority.id == ca_id
        )
    ).one()
    return int(row[0]), str(row[1])


def ca_row(session: Session, name: str) -> CertificateAuthority:
    row = session.scalar(select(CertificateAuthority).where(CertificateAuthority.name == name))
    if row is None:
        raise NotFound(f"unknown certificate authority {shown(name)}")
    return row
