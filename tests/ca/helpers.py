"""Requests for every profile, built the way real callers build them."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.issuance import IssueRequest
from ca.tbs import SanEntry
from hsm.base import KeyType
from hsm.software import generate_private_key
from sekisho.services import Services
from tests.conftest import TEST_ACTOR


def name(**attrs: str) -> x509.Name:
    oids = {
        "CN": NameOID.COMMON_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "UID": NameOID.USER_ID,
        "serialNumber": NameOID.SERIAL_NUMBER,
    }
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


# profile -> (issuing CA, subject, SANs)
PROFILE_REQUESTS: dict[str, tuple[str, x509.Name, tuple[SanEntry, ...]]] = {
    "admin-client": (
        "admin",
        name(O="Tenant One", UID="alice", CN="Alice Admin"),
        (SanEntry("email", "alice@tenant1.example.com"),),
    ),
    "device": (
        "device",
        name(O="Tenant One", CN="radius-1.tenant1.example.com", serialNumber="SN0001"),
        (
            SanEntry("dns", "radius-1.tenant1.example.com"),
            SanEntry("ip", str(ipaddress.ip_address("10.0.0.7"))),
        ),
    ),
    "connector": (
        "device",
        name(O="Tenant One", CN="connector-1"),
        (
            SanEntry("dns", "connector-1.tenant1.example.com"),
            SanEntry("uri", "https://pki.example.com/id/connector/tenant1/1"),
        ),
    ),
    "ocsp-signer": ("admin", name(O="Example Corp", CN="Admin OCSP Responder"), ()),
    "tls-server": (
        "device",
        name(CN="portal.example.com"),
        (SanEntry("dns", "portal.example.com"),),
    ),
}


def request_for(profile: str, key_type: KeyType = KeyType.EC_P256) -> IssueRequest:
    ca, subject, sans = PROFILE_REQUESTS[profile]
    key = generate_private_key(key_type)
    return IssueRequest(
        ca=ca, profile=profile, subject=subject, public_key=key.public_key(), sans=sans
    )


def issue(
    services: Services, profile: str, key_type: KeyType = KeyType.EC_P256
) -> x509.Certificate:
    return services.ca.issue(request_for(profile, key_type), TEST_ACTOR)


def make_csr(
    subject: x509.Name,
    sans: list[x509.GeneralName] | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def ca_cert(services: Services, ca: str) -> x509.Certificate:
    from ca.registry import ca_row

    with services.db.scope() as session:
        return x509.load_der_x509_certificate(ca_row(session, ca).certificate_der)


def ca_key_ref(services: Services, ca: str) -> str:
    """The key backend's reference of CA ``ca``'s signing key (as ``RecordingBackend`` logs it)."""
    from ca.registry import ca_row

    with services.db.scope() as session:
        return ca_row(session, ca).key_ref


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
