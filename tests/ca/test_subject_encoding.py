"""The subject's string types are the certificate's, not the CSR's (ca/subject.py).

A CSR whose countryName and serialNumber were UTF8String and whose CN was BMPString was
issued as it was (pkilint: itu.invalid_asn1_syntax, FATAL); a serialNumber PrintableString
cannot carry failed inside the signature, as a key-backend error (exit 69). Now the subject is
rebuilt in the types X.520 gives each attribute, and what no type can carry is refused by
name, journalled, with nothing written to the certificates table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from ca.subject import SUBJECT_VALUE, encode_subject
from ca.tbs import SanEntry
from sekisho.cli import main
from sekisho.errors import PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import ca_cert, der, make_csr, name, request_for
from tests.ca.test_bad_input import _assert_refused
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support import checkers

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
        (NameOID.COMMON_NAME, "Alice Admin\U000e0001\U000e0058", "invisible character (U+E0001)"),
        (NameOID.COMMON_NAME, "Alice\u200bAdmin", "invisible character (U+200B)"),
        (NameOID.COMMON_NAME, "Alice\u200eAdmin", "invisible character (U+200E)"),
        (NameOID.COMMON_NAME, "Ali\u00adce", "invisible character (U+00AD)"),
        (NameOID.ORGANIZATION_NAME, "Corp\u2064", "invisible character (U+2064)"),
        (NameOID.ORGANIZATION_NAME, "Corp\u180e", "invisible character (U+180E)"),
        (NameOID.ORGANIZATION_NAME, "\ufeffCorp", "invisible character (U+FEFF)"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "a\u2028b", "invisible character (U+2028)"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "a\ue000b", "invisible character (U+E000)"),
    ],
)
def test_values_no_string_type_should_carry_are_refused(
    oid: x509.ObjectIdentifier, value: str, why: str
) -> None:
    with pytest.raises(PolicyViolation) as info:
        encode_subject(x509.Name([attr(NameOID.COMMON_NAME, "ok"), attr(oid, value)]))
    assert info.value.rule == SUBJECT_VALUE
    assert why in info.value.message, info.value.message


def test_names_with_joiners_ideographic_spaces_and_variation_selectors_are_kept() -> None:
    """What real names hold is not refused: the zero-width non-joiner of a Persian name, the
    ideographic space of a Japanese one, an ideographic variation selector (葛 + VS17)."""
    for value in (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        "山田\u3000太郎",
        "葛\U000e0100西",
    ):
        name_ = encode_subject(x509.Name([attr(NameOID.COMMON_NAME, value)]))
        assert name_.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == value


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


# -- issuance ------------------------------------------------------------------------------
def cert_subject_tags(cert: x509.Certificate) -> dict[str, int]:
    tbs = asn1_x509.Certificate.load(der(cert))["tbs_certificate"]
    return {oid: tag for rdn in string_tags(tbs["subject"].dump()) for oid, tag in rdn}


def _refused(services: Services, call: object) -> PolicyViolation:
    """``call`` is refused as subject-value: no certificate row, one rejection journalled."""
    exc = _assert_refused(services, call, PolicyViolation, SUBJECT_VALUE)
    assert isinstance(exc, PolicyViolation)
    return exc


def _device_csr(*attributes: x509.NameAttribute[str]) -> bytes:
    return make_csr(x509.Name(list(attributes)), [x509.DNSName("d.example.com")])


def _csr_issue(services: Services, csr: bytes):  # type: ignore[no-untyped-def]
    return lambda: services.ca.issue_from_csr(csr, ca="device", profile="device", actor=TEST_ACTOR)


def test_csr_string_types_are_not_copied_into_the_certificate(services: Services) -> None:
    csr = _device_csr(
        attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
        attr(NameOID.SERIAL_NUMBER, "SN-01", _ASN1Type.UTF8String),
        attr(NameOID.ORGANIZATION_NAME, "Tenant One", _ASN1Type.PrintableString),
        attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
    )
    request_subject = x509.load_pem_x509_csr(csr).subject
    assert [t for rdn in string_tags(request_subject.public_bytes()) for _, t in rdn] == [
        UTF8,
        UTF8,
        PRINTABLE,
        BMP,
    ]
    cert = _csr_issue(services, csr)()
    assert cert.subject == request_subject
    assert cert_subject_tags(cert) == {
        NameOID.COUNTRY_NAME.dotted_string: PRINTABLE,
        NameOID.SERIAL_NUMBER.dotted_string: PRINTABLE,
        NameOID.ORGANIZATION_NAME.dotted_string: UTF8,
        NameOID.COMMON_NAME.dotted_string: UTF8,
    }
    issuer, root = ca_cert(services, "device"), ca_cert(services, "root")
    checkers.pkilint_cert(der(cert))
    checkers.pkilint_chain(der(issuer), der(cert))
    checkers.openssl_verify(der(cert), [der(root), der(issuer)])


def test_the_reviews_csr_is_refused_as_input_not_as_a_signing_failure(
    services: Services,
) -> None:
    """The review's repro/enc.csr: serialNumber ``SN_01@x`` in UTF8String."""
    csr = _device_csr(
        attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
        attr(NameOID.SERIAL_NUMBER, "SN_01@x", _ASN1Type.UTF8String),
        attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
    )
    exc = _refused(services, _csr_issue(services, csr))
    assert "serialNumber 'SN_01@x'" in exc.message and "PrintableString" in exc.message


def test_a_programmatic_serial_number_outside_printable_string_is_refused(
    services: Services, recording_backend: RecordingBackend
) -> None:
    """It raised ValueError inside sign(), reported as KeyBackendError."""
    request = dataclasses.replace(
        request_for("device"), subject=name(CN="d.example.com", serialNumber="SN01@x")
    )
    signatures = len(recording_backend.signatures_but_checkpoints())
    exc = _refused(services, lambda: services.ca.issue(request, TEST_ACTOR))
    assert "serialNumber 'SN01@x' holds '@'" in exc.message, exc.message
    assert len(recording_backend.signatures_but_checkpoints()) == signatures  # none signed


@pytest.mark.parametrize(
    "cn",
    ["d\x7f.example.com", "d\x9b31m.example.com", "moc.elpmaxe\u202e.d", "d\u2067.example.com"],
    ids=["del", "c1-csi", "rlo", "rli"],
)
def test_control_and_bidi_characters_are_refused(services: Services, cn: str) -> None:
    request = dataclasses.replace(request_for("device"), subject=name(CN=cn))
    _refused(services, lambda: services.ca.issue(request, TEST_ACTOR))


def test_a_csr_with_a_too_long_cn_is_refused(services: Services) -> None:
    csr = _device_csr(attr(NameOID.COMMON_NAME, "d" * 65))
    exc = _refused(services, _csr_issue(services, csr))
    assert "65 characters: at most 64" in exc.message


def test_a_cjk_cn_within_the_bound_is_issued(services: Services) -> None:
    """64 characters, 192 UTF-8 octets: within ub-common-name, which counts characters."""
    cn = "装置" * 32
    request = dataclasses.replace(
        request_for("device"),
        subject=x509.Name([attr(NameOID.COMMON_NAME, cn, _ASN1Type.BMPString)]),
        sans=(SanEntry("dns", "d.example.com"),),
    )
    cert = services.ca.issue(request, TEST_ACTOR)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    assert cert_subject_tags(cert) == {NameOID.COMMON_NAME.dotted_string: UTF8}
    checkers.pkilint_cert(der(cert))


# -- the command line (the review's cli_repro.sh, step 4) -----------------------------------
def test_cli_issues_a_csr_with_wrong_string_types_and_refuses_one_it_cannot_carry(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    def issue(csr: bytes) -> tuple[int, str, str]:
        path = tmp_path / "enc.csr"
        path.write_bytes(csr)
        capsys.readouterr()
        code = main(["--data-dir", str(data_dir), "issue", "--ca", "device", "--profile",
                     "device", "--csr", str(path)])  # fmt: skip
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = issue(
        _device_csr(
            attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
            attr(NameOID.SERIAL_NUMBER, "SN-01", _ASN1Type.UTF8String),
            attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
        )
    )
    assert code == 0, err
    cert = x509.load_pem_x509_certificate(out.encode())
    checkers.pkilint_cert(der(cert))
    assert cert_subject_tags(cert)[NameOID.SERIAL_NUMBER.dotted_string] == PRINTABLE

    code, out, err = issue(
        _device_csr(
            attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
            attr(NameOID.SERIAL_NUMBER, "SN_01@x", _ASN1Type.UTF8String),
            attr(NameOID.COMMON_NAME, "d.example.com", _ASN1Type.BMPString),
        )
    )
    assert code == 65, (code, err)  # an input error, not the key backend's 69
    assert "subject-value" in err and "Traceback" not in err and out == ""
