"""Which CAs exist, and the URLs certificates point at (CDP, AIA) for each."""

from __future__ import annotations

import dataclasses
import threading

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.models import CertificateAuthority
from ca.tbs import IssuerContext
from hsm.base import KeyType
from sekisho.errors import NotFound


@dataclasses.dataclass(frozen=True)
class Urls:
    base_url: str

    def _join(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def crl(self, ca: str) -> str:
        return self._join(f"/crl/{ca}.crl")

    def delta_crl(self, ca: str) -> str:
        return self._join(f"/crl/{ca}-delta.crl")

    def ca_cert(self, ca: str) -> str:
        return self._join(f"/ca/{ca}.crt")

    def ocsp(self) -> str:
        return self._join("/ocsp")


def context_for(row: CertificateAuthority, urls: Urls) -> IssuerContext:
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
    )


class CaRegistry:
    """CA contexts cached per process; CA rows change only through ``ca.hierarchy``."""

    def __init__(self, urls: Urls) -> None:
        self.urls = urls
        self._cache: dict[str, IssuerContext] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, name: str) -> IssuerContext:
        with self._lock:
            ctx = self._cache.get(name)
        if ctx is not None:
            return ctx
        row = session.scalar(select(CertificateAuthority).where(CertificateAuthority.name == name))
        if row is None or not row.active:
            raise NotFound(f"unknown certificate authority {name!r}")
        ctx = context_for(row, self.urls)
        with self._lock:
            self._cache[name] = ctx
        return ctx

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()


def all_cas(session: Session) -> list[CertificateAuthority]:
    return list(session.scalars(select(CertificateAuthority).order_by(CertificateAuthority.id)))


def ca_row(session: Session, name: str) -> CertificateAuthority:
    row = session.scalar(select(CertificateAuthority).where(CertificateAuthority.name == name))
    if row is None:
        raise NotFound(f"unknown certificate authority {name!r}")
    return row
