"""The to-be-signed certificate as a frozen value, and its deterministic build.

Rules (``ca/rules.py``) inspect a ``Tbs`` before anything is signed; ``builder()`` then turns
the same value into a ``cryptography`` builder, so what was checked is what gets signed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import secrets
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from ca.profiles import Profile
from hsm.base import KeyType
from sekisho.errors import InputError, MalformedInput, shown

# RFC 5280 4.1.2.2 allows 20 octets; BR 7.1 wants 0 < serial < 2^159 with >= 64 CSPRNG bits.
# We draw 159 random bits: always positive, always fits in 20 DER octets.
SERIAL_BITS = 159


def new_serial() -> int:
    while True:
        value = secrets.randbits(SERIAL_BITS)
        if value >= 1 << 128:  # at least 129 significant bits: never a short serial
            return value


def serial_hex(value: int) -> str:
    return f"{value:040x}"


def parse_serial(text: str) -> int:
    cleaned = text.strip().lower().replace(":", "")
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    # Hex digits only: int(..., 16) also takes "1_f", "+1f", " 1f" and, after one "0x" was
    # cut, "0x0x1f".
    if not cleaned or cleaned.strip("0123456789abcdef"):
        raise MalformedInput(f"serial {shown(text)} is not hexadecimal")
    value = int(cleaned, 16)
    if value <= 0 or value >= 1 << 160:
        raise MalformedInput(f"serial {shown(text)} is out of range")
    return value


@dataclasses.dataclass(frozen=True)
class SanEntry:
    """One subjectAltName: ``kind`` is email, dns, ip or uri."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> SanEntry:
        """``dns:host.example.com``, ``email:a@example.com``, ``ip:192.0.2.1``, ``uri:...``."""
        kind, sep, value = text.partition(":")
        if not sep or kind not in {"dns", "email", "ip", "uri"} or not value:
            raise MalformedInput(f"SAN {shown(text)}: expected dns:|email:|ip:|uri: and a value")
        if kind == "ip":
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                pass  # the rules refuse it, by name (san-ip-syntax)
            else:
                if getattr(address, "scope_id", None) is None:
                    value = str(address)  # canonical, as the certificate will carry it
        return cls(kind, value)

    @classmethod
    def from_general_name(cls, name: x509.GeneralName) -> SanEntry:
        if isinstance(name, x509.DNSName):
            return cls("dns", name.value)
        if isinstance(name, x509.RFC822Name):
            return cls("email", name.value)
        if isinstance(name, x509.IPAddress):
            return cls("ip", str(name.value))
        if isinstance(name, x509.UniformResourceIdentifier):
            return cls("uri", name.value)
        raise InputError(f"SAN type {type(name).__name__} is not supported")

    def general_name(self) -> x509.GeneralName:
        try:
            if self.kind == "dns":
                return x509.DNSName(self.value)
            if self.kind == "email":
                return x509.RFC822Name(self.value)
            if self.kind == "ip":
                return x509.IPAddress(ipaddress.ip_address(self.value))
            return x509.UniformResourceIdentifier(self.value)
        except ValueError as exc:
            raise MalformedInput(f"SAN {shown(self)}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclasses.dataclass(frozen=True)
class IssuerContext:
    """What issuance needs to know about a CA (cached per process by ``CaRegistry``)."""

    id: int
    name: str
    certificate: x509.Certificate
    key_ref: str
    key_type: KeyType
    crl_url: str
    delta_crl_url: str
    ocsp_url: str
    ca_issuers_url: str
    key_online: bool = True
    # The CA's own certificate is revoked (or on hold) by its parent: it issues nothing.
    revoked: bool = False

    @cached_property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    @cached_property
    def is_root(self) -> bool:
        """Self-issued and self-signed: the trust anchor (its certificate names itself)."""
        return self.certificate.issuer == self.certificate.subject

    @cached_property
    def ski(self) -> bytes:
        return self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest

    @cached_property
    def aki(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier(self.ski, None, None)

    @cached_property
    def name_constraints(self) -> x509.NameConstraints | None:
        try:
            return self.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None

    @cached_property
    def path_length(self) -> int | None:
        return self.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


@dataclasses.dataclass(frozen=True)
class Tbs:
    serial: int
    issuer: IssuerContext
    profile: Profile
    subject: x509.Name
    public_key: CertificateIssuerPublicKeyTypes
    key_type: KeyType
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[SanEntry, ...]
    name_constraints: x509.NameConstraints | None = None
    key_generated_here: bool = False  # by this process or its key backend (ca.rules)

    @cached_property
    def extensions(self) -> list[x509.Extension[x509.ExtensionType]]:
        return build_extensions(self)

    def builder(self) -> x509.CertificateBuilder:
        return x509.CertificateBuilder(
            issuer_name=self.issuer.subject,
            subject_name=self.subject,
            public_key=self.public_key,
            serial_number=self.serial,
            not_valid_before=self.not_before,
            not_valid_after=self.not_after,
            extensions=self.extensions,
        )


def _ext(value: x509.ExtensionType, critical: bool = False) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, value)


# Key usages that only make sense for RSA keys (RFC 8813 2, RFC 8410 5): a profile may list
# them for RSA subjects; for EC and EdDSA keys they are dropped, never asserted.
RSA_ONLY_USAGES = frozenset({"key_encipherment", "data_encipherment"})


def key_usage(names: frozenset[str], public_key: object = None) -> x509.KeyUsage:
    if public_key is not None and not isinstance(public_key, rsa.RSAPublicKey):
        names = names - RSA_ONLY_USAGES
    return x509.KeyUsage(
        digital_signature="digital_signature" in names,
        content_commitment="content_commitment" in names,
        key_encipherment="key_encipherment" in names,
        data_encipherment="data_encipherment" in names,
        key_agreement="key_agreement" in names,
        key_cert_sign="key_cert_sign" in names,
        crl_sign="crl_sign" in names,
        encipher_only=False,
        decipher_only=False,
    )


def build_extensions(tbs: Tbs) -> list[x509.Extension[x509.ExtensionType]]:
    """The extensions a profile prescribes, in a fixed order (deterministic TBS)."""
    profile, issuer = tbs.profile, tbs.issuer
    exts: list[x509.Extension[x509.ExtensionType]] = [
        _ext(
            x509.BasicConstraints(
                ca=profile.ca, path_length=profile.path_length if profile.ca else None
            ),
            critical=True,
        ),
        _ext(key_usage(profile.key_usage, tbs.public_key), critical=True),
    ]
    if profile.extended_key_usage:
        exts.append(_ext(x509.ExtendedKeyUsage(list(profile.extended_key_usage))))
    exts.append(_ext(x509.SubjectKeyIdentifier.from_public_key(tbs.public_key)))
    exts.append(_ext(issuer.aki))
    if tbs.sans:
        # RFC 5280 4.2.1.6: critical only when the subject is empty.
        exts.append(
            _ext(
                x509.SubjectAlternativeName([s.general_name() for s in tbs.sans]),
                critical=len(tbs.subject) == 0,
            )
        )
    if profile.crl_distribution_point:
        exts.append(
            _ext(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier(issuer.crl_url)],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                    ]
                )
            )
        )
    if profile.authority_info_access:
        access = [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(issuer.ca_issuers_url),
            )
        ]
        if not profile.ca:
            # CA certificates are signed by the root, whose status answers come from its CRL
            # only (the root is offline; the responder serves the issuing CAs): pointing at
            # /ocsp would send clients to an "unauthorized".
            access.insert(
                0,
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(issuer.ocsp_url),
                ),
            )
        exts.append(_ext(x509.AuthorityInformationAccess(access)))
    if profile.ocsp_no_check:
        exts.append(_ext(x509.OCSPNoCheck()))
    if tbs.name_constraints is not None:
        exts.append(_ext(tbs.name_constraints, critical=True))
    return exts


def subject_attr_names(name: x509.Name) -> list[str]:
    from ca.profiles import SUBJECT_ATTRS

    by_oid = {oid: short for short, oid in SUBJECT_ATTRS.items()}
    return [by_oid.get(attr.oid, attr.oid.dotted_string) for attr in name]


def parse_subject(text: str) -> x509.Name:
    """RFC 4514 string (``CN=alice,O=Tenant``) to a Name, with a clear error."""
    try:
        return x509.Name.from_rfc4514_string(text, {"UID": NameOID.USER_ID})
    except ValueError as exc:
        # The library's message is empty for most mistakes: say what the form is.
        why = str(exc).strip() or "not an RFC 4514 name"
        raise MalformedInput(
            f"subject {shown(text)}: {why} (write it as ATTR=value pairs joined by commas, "
            "e.g. 'CN=Alice Admin,O=Tenant One')"
        ) from None


def tbs_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spki_sha256(key: CertificateIssuerPublicKeyTypes) -> str:
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo DER: how a key is known to the
    blocklist and found in every certificate that carries it."""
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()
