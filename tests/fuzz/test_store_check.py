"""``cert check`` reads what the store holds without trusting it: whatever DER a certificate
row, a stored OCSP answer, a CRL or a CA row holds (mutated certificates, CRLs and answers of
another PKI), the check never raises and reports the disagreement."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from ca.models import Certificate, CertificateAuthority, Crl, CrlKind
from ocsp import core
from ocsp.models import OcspResponse
from sekisho.check import StoreCheck
from sekisho.services import Services
from tests.ca.helpers import issue
from tests.fuzz import pki
from tests.fuzz.mutate import FUZZ, mutated

DER = serialization.Encoding.DER


@functools.cache
def seeds() -> list[bytes]:
    end = pki.START + dt.timedelta(days=1)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.CA_NAME)
        .last_update(pki.START)
        .next_update(end)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(7).revocation_date(pki.START).build()
        )
        .add_extension(x509.CRLNumber(3), critical=False)
        .sign(pki.CA_KEY, None)
    )
    return [
        pki.leaf(7).public_bytes(DER),
        pki.ca_certificate().public_bytes(DER),
        crl.public_bytes(DER),
        core.precompute(pki.issuer(), 7, core.Revoked(pki.START, None), pki.START, end),
    ]


@dataclasses.dataclass(frozen=True)
class Store:
    services: Services
    serial: str


@pytest.fixture
def store(services: Services) -> Store:
    cert = issue(services, "device")
    services.crls.publish("device", services.clock())
    return Store(services, f"{cert.serial_number:040x}")


@FUZZ
@given(st.sampled_from(["certificate", "answer", "crl", "ca"]), mutated(seeds(), max_steps=6))
def test_whatever_der_the_store_holds_is_reported_not_raised(
    store: Store, target: str, der: bytes
) -> None:
    with store.services.db.scope() as session:
        if target == "certificate":
            row = session.scalars(select(Certificate).where(Certificate.serial == store.serial))
            row.one().der = der
        elif target == "answer":
            answer = select(OcspResponse).where(OcspResponse.serial == store.serial)
            session.scalars(answer).one().der = der
        elif target == "crl":
            newest = select(Crl).where(Crl.kind == CrlKind.FULL).order_by(Crl.number.desc())
            session.scalars(newest.limit(1)).one().der = der
        else:
            ca = select(CertificateAuthority).where(CertificateAuthority.name == "device")
            session.scalars(ca).one().certificate_der = der
    with store.services.db.read_scope(snapshot=True) as session:
        run = StoreCheck(
            session, store.services.clock(), ca_names=("device",), grace=dt.timedelta(0)
        )
        findings = list(run.findings())
    # None of these is this deployment's: something must disagree.
    assert findings and run.totals.findings == len(findings)
