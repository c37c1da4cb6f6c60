"""OBJECT IDENTIFIER bounds in the strict DER reader: an OID over 63 octets or an arc over 19
octets is refused by the structure check, before any arc is decoded, and a request carrying
one is malformedRequest (from ``parse_request`` and from the web endpoint), never a crash.

Without the bounds, one 2,100-octet arc made ``str()`` of a 14,700-bit integer raise
ValueError (Python's 4,300-digit limit): ``parse_request`` let it out, the web endpoint
answered internalError and ``ocsp serve`` dropped the connection (tests/ocsp/test_server_http).
"""

from __future__ import annotations

import base64

import pytest
from cryptography import x509

from ca import der as w
from ocsp import core, der
from sekisho.services import Services
from web import create_app

MALFORMED = bytes.fromhex("3003 0a01 01")
UUID_ARC = 2**128 - 1  # the largest arc in real use: 2.25.<UUID> (X.667), 19 octets


def cert_id_request(oid_contents: bytes) -> bytes:
    """An OCSP request of one CertID whose hashAlgorithm OID has ``oid_contents``."""
    cert_id = w.sequence(
        w.sequence(w.tlv(0x06, oid_contents), b"\x05\x00"),
        w.octet_string(b"\0" * 20),
        w.octet_string(b"\0" * 20),
        w.integer(1),
    )
    return w.sequence(w.sequence(w.sequence(w.sequence(cert_id))))


def huge_arc_request(octets: int = 2100) -> bytes:
    """The reviewer's request: 1.2.<one arc of ``octets`` + 1 octets>."""
    return cert_id_request(b"\x2a" + b"\xff" * octets + b"\x01")


def _contents(dotted: str) -> bytes:
    return w.oid(dotted)[2:]


def check(contents: bytes) -> None:
    """The structure check of an OID with ``contents`` (inside a SEQUENCE: the check reads
    the contents of the primitives inside the outer element)."""
    der.check_structure(w.sequence(w.tlv(0x06, contents)), max_depth=2)


def test_the_longest_oids_cryptography_takes_are_read() -> None:
    longest = "1.2." + ".".join(["268435455"] * 15) + ".1.1"  # 1 + 15 * 4 + 2 = 63 octets
    uuid = f"2.25.{UUID_ARC}"
    for dotted in (longest, uuid):
        x509.ObjectIdentifier(dotted)  # the library that reads our certificates takes it
        contents = _contents(dotted)
        check(contents)
        assert der.oid_dotted(contents) == dotted
    assert len(_contents(longest)) == der.MAX_OID_OCTETS == 63
    assert len(_contents(uuid)) == 1 + der.MAX_ARC_OCTETS


@pytest.mark.parametrize("octets", [64, 65, 2102, 32_000])
def test_an_oid_over_63_octets_is_refused_by_its_length(octets: int) -> None:
    # Every octet 0x80 (padding, refused octet by octet) but the last: only the length is read.
    contents = b"\x80" * (octets - 1) + b"\x01"
    with pytest.raises(der.DerError, match="over 63 octets"):
        check(contents)
    with pytest.raises(der.DerError, match="over 63 octets"):
        der.oid_dotted(contents)  # nor decoded by a caller that skipped the check


def test_an_arc_over_19_octets_is_refused() -> None:
    twenty = b"\x2a" + b"\xff" * 19 + b"\x01"  # 1.2.<an arc of 20 octets, 140 bits>
    for contents in (twenty, b"\x2a\x01" + twenty[1:]):
        with pytest.raises(der.DerError, match="arc over 19 octets"):
            check(contents)
        with pytest.raises(der.DerError, match="arc over 19 octets"):
            der.oid_dotted(contents)
    check(b"\x2a" + b"\xff" * 18 + b"\x01")  # an arc of 19 octets


def test_oid_padding_and_truncation_still_refused() -> None:
    for contents in (b"", b"\x2a\x80\x01", b"\x2a\x81"):
        with pytest.raises(der.DerError):
            check(contents)


@pytest.mark.parametrize("octets", [19, 62, 2100, 32_000 - 20])
def test_a_request_with_a_huge_oid_arc_is_malformed(octets: int) -> None:
    request = huge_arc_request(octets)
    assert len(request) <= core.MAX_REQUEST_SIZE
    with pytest.raises(core.MalformedRequest, match="not DER: OBJECT IDENTIFIER"):
        core.parse_request(request)


def test_a_value_error_while_decoding_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    request = cert_id_request(_contents("1.3.14.3.2.26"))
    assert core.parse_request(request).cert_ids[0].hash_algorithm == "sha1"

    def fails(content: bytes) -> str:
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(der, "oid_dotted", fails)
    with pytest.raises(core.MalformedRequest, match="not an OCSP request: Exceeds"):
        core.parse_request(request)


def test_the_web_endpoint_answers_a_huge_arc_malformed(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    request = huge_arc_request()
    assert services.ocsp.answer(request, services.clock()) == MALFORMED
    client = create_app(services).test_client()
    res = client.post("/ocsp", data=request, content_type="application/ocsp-request")
    assert res.status_code == 200 and res.data == MALFORMED
    res = client.get("/ocsp/" + base64.b64encode(request).decode())
    assert res.status_code == 200 and res.data == MALFORMED
    assert res.headers["Cache-Control"] == "no-store"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
