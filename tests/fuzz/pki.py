"""A small deterministic PKI for the fuzz tests' seeds: Ed25519 and deterministic ECDSA, fixed
keys and dates, so that every run builds the same bytes (Hypothesis derandomized needs the
same seeds to draw the same examples)."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ocsp
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from ca import der as w
from ocsp import core

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CA_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
EC_KEY = ec.derive_private_key(0x5EC1_5E0_F022, ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
ED_SPKI = ED_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz Issuing CA")])


@functools.cache
def ca_certificate() -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(CA_NAME)
        .issuer_name(CA_NAME)
        .public_key(CA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(CA_KEY, None)
    )


@functools.cache
def issuer() -> core.Issuer:
    """The CA signing its own OCSP answers."""
    return core.Issuer.create(ca_certificate(), CA_KEY)


def leaf(serial: int) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"leaf {serial}")]))
        .issuer_name(CA_NAME)
        .public_key(EC_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(START)
        .not_valid_after(START + dt.timedelta(days=30))
        .sign(CA_KEY, None)
    )


def _nonce(value: bytes) -> bytes:
    return w.extension(core.OID_NONCE, w.octet_string(value))


@functools.cache
def ocsp_requests() -> tuple[bytes, ...]:
    """Valid requests for the issuer above: as cryptography (and so OpenSSL) writes them, and
    by hand with every optional field (version, requestorName, several CertIDs, request and
    single extensions, optionalSignature)."""
    ca = ca_certificate()
    out = []
    for serial in (2, 0x7F, 0x80, 2**158 + 12345):
        cert = leaf(serial)
        for algorithm in (hashes.SHA1(), hashes.SHA256()):  # noqa: S303 - RFC 5019 CertIDs
            builder = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, algorithm)
            out.append(builder.build().public_bytes(serialization.Encoding.DER))
            with_nonce = builder.add_extension(x509.OCSPNonce(b"\x5a" * 16), critical=False)
            out.append(with_nonce.build().public_bytes(serialization.Encoding.DER))
    ids = [issuer().cert_id(s, h).der for s in (1, 2, 3) for h in core.SERVED_HASHES]
    locator = w.extension(core.OID_SERVICE_LOCATOR, w.octet_string(b"\x30\x00"))
    single = w.sequence(ids[0], w.explicit(0, w.sequence(locator)))
    requestor = w.explicit(1, w.tlv(0xA4, w.sequence()))  # [1] GeneralName directoryName
    acceptable = w.octet_string(w.sequence(w.oid(core.OID_BASIC)))
    extensions = w.explicit(
        2,
        w.sequence(
            _nonce(b"\x01" * 32),
            w.extension(core.OID_ACCEPTABLE_RESPONSES, acceptable, critical=True),
        ),
    )
    ed25519_algorithm = w.sequence(w.oid("1.3.101.112"))
    signature = w.explicit(0, w.sequence(ed25519_algorithm, w.bit_string(b"\x00" * 64)))
    tbs = w.sequence(
        w.explicit(0, w.integer(0)),
        requestor,
        w.sequence(*(w.sequence(i) for i in ids), single),
        extensions,
    )
    out.append(w.sequence(tbs, signature))
    out.append(w.sequence(w.sequence(w.sequence(w.sequence(ids[1])))))
    return tuple(out)


_SANS: tuple[x509.GeneralName, ...] = (
    x509.DNSName("device-1.tenant1.example.com"),
    x509.RFC822Name("alice@tenant1.example.com"),
    x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
    x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
    x509.UniformResourceIdentifier("https://pki.example.com/id/1"),
    x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dir")])),
    x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
    x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03abc"),
)


def _csr(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    subject: str,
    sans: tuple[x509.GeneralName, ...] = (),
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name.from_rfc4514_string(subject)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)


@functools.cache
def csrs() -> tuple[x509.CertificateSigningRequest, ...]:
    """CSRs signed with ``ED_KEY`` (and one with ``EC_KEY``): plain, every SAN form the
    library reads, extension requests critical and not, a multi-valued RDN."""
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    return (
        _csr(EC_KEY, "CN=Alice Admin,O=Tenant One,C=JP", _SANS[:5]),
        _csr(ED_KEY, "CN=device-1,2.5.4.5=SN01+OU=x", _SANS[:1], ((unknown, False),)),
        _csr(ED_KEY, "", _SANS, ((usage, True),)),
        _csr(
            ED_KEY, "CN=c,DC=example,1.2.840.113549.1.9.1=a@example.com", _SANS[5:], ((eku, True),)
        ),
    )


def csr_seeds() -> tuple[bytes, ...]:
    """Each CSR as DER and PEM, plus a certificate and a bare public key (``public_key_of``
    takes those too)."""
    out: list[bytes] = []
    for csr in csrs():
        out += [
            csr.public_bytes(serialization.Encoding.DER),
            csr.public_bytes(serialization.Encoding.PEM),
        ]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    out.append(ca_certificate().public_bytes(serialization.Encoding.PEM))
    out.append(EC_KEY.public_key().public_bytes(serialization.Encoding.DER, spki))
    out.append(ED_KEY.public_key().public_bytes(serialization.Encoding.PEM, spki))
    return tuple(out)


def sign_request_info(info: bytes) -> bytes:
    """A CSR whose CertificationRequestInfo is ``info`` (taken as it is), signed by ``ED_KEY``:
    a mutated info still proves possession when its key is ``ED_KEY``'s."""
    algorithm = w.sequence(w.oid("1.3.101.112"))
    return w.sequence(info, algorithm, w.bit_string(ED_KEY.sign(info)))
