"""The subject as the certificate carries it: each attribute in the string type RFC 5280 (and
the CA/Browser Forum's practice) expects, whatever type the CSR or the caller used.

A CSR's attributes come with the requester's string types: a ``countryName`` or
``serialNumber`` as UTF8String, a CN as BMPString. Copied into the certificate they break
X.520's syntax (pkilint: ``itu.invalid_asn1_syntax``), and a value the type cannot carry
(``serialNumber=SN_01@x`` as PrintableString) only failed inside the signature, reported as a
key-backend error. ``encode_subject`` rebuilds the name from its (OID, value) pairs:

- countryName, jurisdictionCountryName, serialNumber, dnQualifier: PrintableString (X.520);
  a value outside its alphabet is refused, and a country must be two capital letters;
- emailAddress, domainComponent: IA5String (ASCII only);
- every other attribute (CN, O, OU, L, ST, UID, title, ...): UTF8String (RFC 5280 4.1.2.4).

It refuses, as ``PolicyViolation("subject-value")`` (the name ``ca/rules.py`` gives the same
kind of refusal), a value that is not a character string, empty, longer than the attribute's
upper bound (RFC 5280 Appendix A, counted in characters), or holding a control character (C0,
DEL, C1), a bidirectional formatting character (embedding, override, isolate: the "Trojan
Source" set) or a lone surrogate. RDNs stay in their order, multi-valued ones as they are.
"""

from __future__ import annotations

import re
import unicodedata

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from ca.profiles import SUBJECT_ATTRS
from sekisho.errors import PolicyViolation, shown

SUBJECT_VALUE = "subject-value"

# X.520 attributes whose syntax is PrintableString or IA5String; all others are
# DirectoryString, which RFC 5280 4.1.2.4 wants as UTF8String.
_PRINTABLE = frozenset(
    {
        NameOID.COUNTRY_NAME,
        NameOID.JURISDICTION_COUNTRY_NAME,
        NameOID.SERIAL_NUMBER,
        NameOID.DN_QUALIFIER,
    }
)
_IA5 = frozenset({NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT})
_COUNTRIES = frozenset({NameOID.COUNTRY_NAME, NameOID.JURISDICTION_COUNTRY_NAME})

# RFC 5280 Appendix A upper bounds (ub-*), in characters. X520name (name, surname, givenName,
# initials, generationQualifier) is bounded by ub-name; so is any attribute without a bound of
# its own (dnQualifier, domainComponent, UID, ...): the profile rules bound those further.
UB_NAME = 32768
UPPER_BOUNDS: dict[x509.ObjectIdentifier, int] = {
    NameOID.COMMON_NAME: 64,  # ub-common-name
    NameOID.ORGANIZATION_NAME: 64,  # ub-organization-name
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,  # ub-organizational-unit-name
    NameOID.LOCALITY_NAME: 128,  # ub-locality-name
    NameOID.STATE_OR_PROVINCE_NAME: 128,  # ub-state-name
    NameOID.TITLE: 64,  # ub-title
    NameOID.SERIAL_NUMBER: 64,  # ub-serial-number
    NameOID.PSEUDONYM: 128,  # ub-pseudonym
    NameOID.EMAIL_ADDRESS: 255,  # ub-emailaddress-length
    NameOID.COUNTRY_NAME: 2,  # ub-country-name-alpha-length
    NameOID.JURISDICTION_COUNTRY_NAME: 2,
}

# X.680 41.4 PrintableString: letters, digits, space and ' ( ) + , - . / : = ?
_PRINTABLE_CHARS = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]")
_COUNTRY = re.compile(r"[A-Z]{2}")
# C0 controls, DEL, C1 controls; lone surrogates (no UTF-8 encoding exists for them);
# LRE RLE PDF LRO RLO and LRI RLI FSI PDI, which reorder how the text around them is shown.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")

# Format characters (Cf: zero-width space, LRM/RLM, soft hyphen, word joiner, invisible
# operators, tag characters, the byte order mark...), line and paragraph separators and
# private-use characters: a name holding one shows as another name (audit output escapes
# them). Zero-width non-joiner and joiner stay: Persian and Indic names need them.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp", "Co"})
_NAME_JOINERS = frozenset("\u200c\u200d")


def _invisible(ch: str) -> bool:
    if ch.isascii() or ch.isprintable():
        return False  # (every category above is non-printable)
    return unicodedata.category(ch) in _INVISIBLE_CATEGORIES and ch not in _NAME_JOINERS


_SHORT_NAMES = {oid: short for short, oid in SUBJECT_ATTRS.items()}


def attribute_label(oid: x509.ObjectIdentifier) -> str:
    """The name an error message gives an attribute: the profile's short name (``CN``,
    ``serialNumber``), else cryptography's, else the dotted OID."""
    label = _SHORT_NAMES.get(oid) or oid._name
    return label if label and label != "Unknown OID" else oid.dotted_string


def string_type(oid: x509.ObjectIdentifier) -> _ASN1Type:
    """The string type the certificate carries attribute ``oid`` in."""
    if oid in _PRINTABLE:
        return _ASN1Type.PrintableString
    if oid in _IA5:
        return _ASN1Type.IA5String
    return _ASN1Type.UTF8String


def _refuse(oid: x509.ObjectIdentifier, value: str, why: str) -> PolicyViolation:
    return PolicyViolation(SUBJECT_VALUE, f"{attribute_label(oid)} {shown(value)} {why}")


def check_value(oid: x509.ObjectIdentifier, value: object) -> str:
    """``value`` if the certificate can carry it for attribute ``oid``; else
    ``PolicyViolation("subject-value")`` saying why."""
    if not isinstance(value, str):
        raise PolicyViolation(SUBJECT_VALUE, f"{attribute_label(oid)} is not a character string")
    if not value:
        raise _refuse(oid, value, "is empty")
    for pattern, what in (
        (_CONTROL, "a control character"),
        (_BIDI, "a bidirectional formatting character"),
        (_SURROGATE, "a lone surrogate"),
    ):
        found = pattern.search(value)
        if found:
            raise _refuse(oid, value, f"holds {what} ({shown(found.group())})")
    hidden = next((c for c in value if _invisible(c)), None)
    if hidden is not None:
        raise _refuse(oid, value, f"holds an invisible character (U+{ord(hidden):04X})")
    bound = UPPER_BOUNDS.get(oid, UB_NAME)
    if len(value) > bound:
        raise _refuse(oid, value, f"has {len(value)} characters: at most {bound}")
    kind = string_type(oid)
    if kind == _ASN1Type.PrintableString:
        bad = next((c for c in value if not _PRINTABLE_CHARS.fullmatch(c)), None)
        if bad is not None:
            raise _refuse(
                oid,
                value,
                f"holds {shown(bad)}, which a PrintableString cannot carry (letters, digits,"
                " space and ' ( ) + , - . / : = ? only)",
            )
        if oid in _COUNTRIES and not _COUNTRY.fullmatch(value):
            raise _refuse(oid, value, "is not a two-letter country code in capitals")
    elif kind == _ASN1Type.IA5String and not value.isascii():
        raise _refuse(oid, value, "is not ASCII, which an IA5String needs")
    return value


def encode_subject(name: x509.Name) -> x509.Name:
    """``name`` rebuilt with every value in the string type ``string_type`` gives its
    attribute, each value checked by ``check_value``; RDN order, and the order within a
    multi-valued RDN, kept."""
    rdns = []
    for rdn in name.rdns:
        attributes = []
        for attr in rdn:
            value = check_value(attr.oid, attr.value)
            # The bounds were checked above, in characters as X.520 counts them. cryptography
            # counts a CN's UTF-8 octets (64 at most), which would refuse a CN of 22 to 64
            # CJK characters; unvalidated, it only warns, as it does parsing such a CSR.
            attributes.append(
                x509.NameAttribute(attr.oid, value, string_type(attr.oid), _validate=False)
            )
        rdns.append(x509.RelativeDistinguishedName(attributes))
    return x509.Name(rdns)
