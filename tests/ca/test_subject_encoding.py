"""The subject's string types are the certificate's, not the CSR's (ca/subject.py).

``encode_subject`` rebuilds a name in the string types X.520 gives each attribute, whatever
types it came in, and refuses, as subject-value, what no type should carry.
"""

from __future__ import annotations

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from ca.subject import SUBJECT_VALUE, encode_subject
from sekisho.errors import PolicyViolation

# cryptography counts a CN's UTF-8 octets against 64 (X.520 counts characters) and a C's
# against 2; built unvalidated, such names only warn.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

# Universal tags of the string types (X.680).
UTF8, PRINTABLE, IA5, BMP = 12, 19, 22, 30


def attr(
    oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None
) -> x509.NameAttribute[str]:
    """An attribute as a requester's software may write it: any string type, no checks."""
    return x509.NameAttribute(oid, value, kind, _validate=False)


def string_tags(name_der: bytes) -> list[list[tuple[str, int]]]:
    """(attribute type, universal tag of its value) for each RDN of a DER Name, read by
    asn1crypto rather than by the library that wrote it."""
    parsed = asn1_x509.Name.load(name_der)
    out = []
    for rdn in parsed.chosen:
        row = []
        for atv in rdn:
            value = atv["value"]
            row.append((atv["type"].dotted, getattr(value, "chosen", value).tag))
        out.append(row)
    return out


# -- the function --------------------------------------------------------------------------
def test_each_attribute_gets_its_x520_string_type() -> None:
    given = x509.Name(
        [
            attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
            attr(NameOID.SERIAL_NUMBER, "SN-01", _ASN1Type.UTF8String),
            attr(NameOID.DN_QUALIFIER, "q1", _ASN1Type.BMPString),
            attr(NameOID.EMAIL_ADDRESS, "a@example.com", _ASN1Type.UTF8String),
            attr(NameOID.DOMAIN_COMPONENT, "example", _ASN1Type.PrintableString),
            attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
            attr(NameOID.ORGANIZATION_NAME, "Tenant One", _ASN1Type.PrintableString),
            attr(NameOID.LOCALITY_NAME, "Köln", _ASN1Type.UniversalString),
            attr(NameOID.USER_ID, "alice", _ASN1Type.IA5String),
        ]
    )
    encoded = encode_subject(given)
    assert encoded == given  # the same values, in the same order
    tags = [tag for rdn in string_tags(encoded.public_bytes()) for _, tag in rdn]
    assert tags == [PRINTABLE, PRINTABLE, PRINTABLE, IA5, IA5, UTF8, UTF8, UTF8, UTF8]


def test_multi_valued_rdns_and_order_are_kept() -> None:
    given = x509.Name(
        [
            x509.RelativeDistinguishedName([attr(NameOID.ORGANIZATION_NAME, "Tenant One")]),
            x509.RelativeDistinguishedName(
                [
                    attr(NameOID.SERIAL_NUMBER, "SN-02", _ASN1Type.UTF8String),
                    attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
                ]
            ),
        ]
    )
    encoded = encode_subject(given)
    assert [[(a.oid, a.value) for a in rdn] for rdn in encoded.rdns] == [
        [(a.oid, a.value) for a in rdn] for rdn in given.rdns
    ]
    assert [len(rdn) for rdn in string_tags(encoded.public_bytes())] == [1, 2]
    assert encode_subject(x509.Name([])) == x509.Name([])


@pytest.mark.parametrize(
    ("oid", "value", "why"),
    [
        (NameOID.SERIAL_NUMBER, "SN01@x", "'@', which a PrintableString cannot carry"),
        (NameOID.SERIAL_NUMBER, "SN_01", "'_', which a PrintableString cannot carry"),
        (NameOID.DN_QUALIFIER, "a*b", "'*', which a PrintableString cannot carry"),
        (NameOID.COUNTRY_NAME, "Ü1", "'Ü', which a PrintableString cannot carry"),
        (NameOID.COUNTRY_NAME, "de", "not a two-letter country code"),
        (NameOID.COUNTRY_NAME, "DEU", "has 3 characters: at most 2"),
        (NameOID.EMAIL_ADDRESS, "jörg@example.com", "not ASCII"),
        (NameOID.DOMAIN_COMPONENT, "bücher", "not ASCII"),
        (NameOID.COMMON_NAME, "", "is empty"),
        (NameOID.COMMON_NAME, "x" * 65, "has 65 characters: at most 64"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "x" * 65, "at most 64"),
        (NameOID.LOCALITY_NAME, "x" * 129, "at most 128"),
        (NameOID.SERIAL_NUMBER, "1" * 65, "at most 64"),
        (NameOID.COMMON_NAME, "a\x00b", "control character ('\\x00')"),
        (NameOID.COMMON_NAME, "Bob\x1b[31m", "control character ('\\x1b')"),
        (NameOID.COMMON_NAME, "a\x7fb", "control character ('\\x7f')"),
        (NameOID.ORGANIZATION_NAME, "a\x85b", "control character ('\\x85')"),
        (NameOID.COMMON_NAME, "a\u202eexe.txt", "bidirectional formatting character"),
        (NameOID.ORGANIZATION_NAME, "a\u2066b", "bidirectional formatting character"),
        (NameOID.ORGANIZATION_NAME, "a\ud800", "lone surrogate"),
    ],
)
def test_values_no_string_type_should_carry_are_refused(
    oid: x509.ObjectIdentifier, value: str, why: str
) -> None:
    with pytest.raises(PolicyViolation) as info:
        encode_subject(x509.Name([attr(NameOID.COMMON_NAME, "ok"), attr(oid, value)]))
    assert info.value.rule == SUBJECT_VALUE
    assert why in info.value.message, info.value.message


def test_a_value_that_is_not_a_string_is_refused() -> None:
    bits = x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01", _ASN1Type.BitString)
    with pytest.raises(PolicyViolation, match="not a character string"):
        encode_subject(x509.Name([bits]))


def test_bounds_are_counted_in_characters() -> None:
    """X.520 bounds count characters: a CN of 64 CJK characters (192 UTF-8 octets) fits;
    L and ST may have 128."""
    cjk = "山" * 64
    encoded = encode_subject(
        x509.Name(
            [
                attr(NameOID.COMMON_NAME, cjk, _ASN1Type.BMPString),
                attr(NameOID.LOCALITY_NAME, "l" * 128),
                attr(NameOID.STATE_OR_PROVINCE_NAME, "s" * 128),
            ]
        )
    )
    assert encoded.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cjk
