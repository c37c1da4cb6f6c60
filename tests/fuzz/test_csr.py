"""CSR intake (``ca.csr``): whatever octets arrive, ``load_csr``, ``parse_csr`` and
``public_key_of`` return or raise an ``InputError`` (MalformedInput, BadSignature, TooLarge,
PolicyViolation): never another exception, which the web app would answer 500 and the CLI
exit 70 (a bug)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca import der as w
from ca.csr import MAX_CSR_BYTES, load_csr, parse_csr, public_key_of
from ca.subject import encode_subject
from sekisho.errors import InputError
from tests.fuzz import pki
from tests.fuzz.mutate import FUZZ, mutated

# cryptography warns of an attribute longer or shorter than X.520 allows; encode_subject refuses it.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

SEEDS = pki.csr_seeds()
INFOS = tuple(csr.tbs_certrequest_bytes for csr in pki.csrs()[1:])  # the ED_KEY ones


def _intake(data: bytes) -> None:
    """Every intake function, then what issuance does with what the CSR asks for; an
    ``InputError`` anywhere is a refusal, anything else escapes and fails the test."""
    for read in (load_csr, public_key_of):
        with contextlib.suppress(InputError):
            read(data)
    try:
        request = parse_csr(data)
    except InputError:
        return
    with contextlib.suppress(InputError):
        encode_subject(request.subject)
    for san in request.sans:
        with contextlib.suppress(InputError):
            san.general_name()


@FUZZ
@given(mutated(SEEDS, max_steps=3) | st.binary(max_size=256))
def test_any_octets_are_a_csr_or_an_input_error(data: bytes) -> None:
    _intake(data)


@FUZZ
@given(mutated(INFOS, max_steps=3))
def test_a_mutated_request_signed_again_is_a_csr_or_an_input_error(info: bytes) -> None:
    """The mutation is signed again, so that it gets past the proof of possession (when the
    key itself is intact) to the subject, attribute and extension decoding."""
    _intake(pki.sign_request_info(info))


@FUZZ
@given(
    st.sampled_from(SEEDS[1::2][:4]),
    st.sampled_from([b"", b"\n", b"text before\n", b"\x00", b"\r\n" * 3]),
    st.sampled_from([b"", b"\n", b"junk", b"\n-----BEGIN X-----\n-----END X-----\n"]),
)
def test_pem_framing_is_a_csr_or_an_input_error(pem: bytes, before: bytes, after: bytes) -> None:
    _intake(before + pem + after)


def test_the_size_limit_is_an_input_error() -> None:
    for fn in (load_csr, parse_csr):
        try:
            fn(b"\x30" * (MAX_CSR_BYTES + 1))
        except InputError as exc:
            assert exc.http_status == 413
        else:
            raise AssertionError("a CSR over the limit was read")


# -- regressions: found by the fuzz campaign ------------------------------------------------------
# A Name attribute other than x500UniqueIdentifier whose value is a BIT STRING: cryptography's
# NameAttribute raises TypeError while decoding the name, which parse_csr let out (exit 70
# instead of a journalled input error). Both
# CSRs are signed (Ed25519, a valid proof of possession): the subject is CN as BIT STRING 00,
# or the subject is CN=x and the subjectAltName holds a directoryName with that attribute.
_BIT_STRING_CN_SUBJECT = bytes.fromhex(
    "30818b303f020100300c310a30080603550403030100302a300506032b657003210029acbae141bccaf0b2"
    "2e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7a000300506032b65700341003abf28dc3cc87279"
    "2be7454ada72de17042a12b9ce30770b58755645ff27c55a5d9651a66cfc6e04cad01ca77e078b8789de0f"
    "705b68fbeb3fdccd9b2ad52307"
)
_BIT_STRING_CN_IN_SAN = bytes.fromhex(
    "3081b7306b020100300c310a300806035504030c0178302a300506032b657003210029acbae141bccaf0b2"
    "2e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7a02c302a06092a864886f70d01090e311d301b30"
    "190603551d1104123010a40e300c310a30080603550403030100300506032b65700341000fcd8da7712b06"
    "62194169008759a1830213d51ad1dafb6f9ef58d44586dc6c315e48af5b4de66baa7c30f991accbfe861a3"
    "ecfecdb5d80ff0e1b70641388607"
)


def test_regression_subject_attribute_as_bit_string() -> None:
    with pytest.raises(InputError):
        parse_csr(_BIT_STRING_CN_SUBJECT)


def test_regression_san_directory_name_attribute_as_bit_string() -> None:
    with pytest.raises(InputError):
        parse_csr(_BIT_STRING_CN_IN_SAN)


# -- structured: names and extension requests of any shape, in a validly signed CSR ---------------
_ATTRIBUTE_OIDS: tuple[str, ...] = (
    "2.5.4.3",
    "2.5.4.6",
    "2.5.4.5",
    "2.5.4.45",
    "0.9.2342.19200300.100.1.1",
)
_ATTRIBUTE_OIDS += ("1.2.840.113549.1.9.1", "0.9.2342.19200300.100.1.25", "1.2.3.4")
# Universal string types and others a value should not be (BIT STRING: the regressions above).
_VALUE_TAGS = (0x0C, 0x13, 0x16, 0x1E, 0x1C, 0x14, 0x12, 0x1A, 0x02, 0x03, 0x04, 0x05, 0x30)
_EXTENSION_OIDS = ("2.5.29.17", "2.5.29.15", "2.5.29.37", "2.5.29.19", "2.5.29.14", "1.2.3.4")


@st.composite
def names(draw: st.DrawFn) -> bytes:
    rdns = []
    for _ in range(draw(st.integers(0, 3))):
        attributes = [
            w.sequence(
                w.oid(draw(st.sampled_from(_ATTRIBUTE_OIDS))),
                w.tlv(draw(st.sampled_from(_VALUE_TAGS)), draw(st.binary(max_size=12))),
            )
            for _ in range(draw(st.integers(1, 2)))
        ]
        rdns.append(w.tlv(0x31, b"".join(attributes)))
    return w.sequence(*rdns)


@st.composite
def general_names(draw: st.DrawFn) -> bytes:
    form = draw(st.integers(0, 8))
    if form == 4:  # directoryName: EXPLICIT
        return w.tlv(0xA4, draw(names()))
    if form in (0, 3, 5):  # otherName, x400Address, ediPartyName: constructed
        return w.tlv(0xA0 | form, draw(st.binary(max_size=12)))
    return w.tlv(0x80 | form, draw(st.binary(max_size=16)))


@st.composite
def extension_requests(draw: st.DrawFn) -> bytes:
    extensions: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        oid = draw(st.sampled_from(_EXTENSION_OIDS))
        if oid == "2.5.29.17" and draw(st.booleans()):
            value = w.sequence(*draw(st.lists(general_names(), max_size=3)))
        else:
            value = draw(st.binary(max_size=12))
        critical = b"\x01\x01\xff" if draw(st.booleans()) else b""
        extensions.append(w.sequence(w.oid(oid), critical, w.octet_string(value)))
    request = w.sequence(w.oid("1.2.840.113549.1.9.14"), w.tlv(0x31, w.sequence(*extensions)))
    empty_attributes = not extensions and draw(st.booleans())
    return w.tlv(0xA0, b"" if empty_attributes else request)


@FUZZ
@given(names(), extension_requests())
def test_any_subject_and_extension_requests_are_a_csr_or_an_input_error(
    subject: bytes, attributes: bytes
) -> None:
    info = w.sequence(w.integer(0), subject, pki.ED_SPKI, attributes)
    _intake(pki.sign_request_info(info))
