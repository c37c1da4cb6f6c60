"""OCSP request parsing (``ocsp.der``, ``ocsp.core``, the fast path ``ocsp.index.simple_request``
and both GET decoders): any octets either parse or raise ``MalformedRequest`` (answered
malformedRequest), quickly; whatever parses is answered without an exception."""

from __future__ import annotations

import base64
import datetime as dt
import time
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca import der as w
from ocsp import core, der
from ocsp.index import simple_request
from tests.fuzz import pki
from tests.fuzz.mutate import FUZZ, mutated

NOW = pki.START + dt.timedelta(days=1)
VALIDITY = dt.timedelta(hours=24)
STATUSES: tuple[core.Status, ...] = (
    core.GOOD,
    core.UNKNOWN,
    core.Revoked(pki.START, None),
)
SEEDS = pki.ocsp_requests()
requests = mutated(SEEDS, max_steps=3) | st.binary(max_size=256)


def _lookup(_issuer: core.Issuer, serial: int) -> core.Status:
    return STATUSES[serial % len(STATUSES)]


def parse(data: bytes) -> core.OcspRequest | None:
    """The contract: a request, or MalformedRequest (None); any other exception fails."""
    try:
        return core.parse_request(data)
    except core.MalformedRequest:
        return None


@FUZZ
@given(requests)
def test_any_octets_parse_or_are_malformed(data: bytes) -> None:
    request = parse(data)
    answer = core.respond(data, [pki.issuer()], _lookup, now=NOW, validity=VALIDITY)
    if request is None:
        assert answer == core.MALFORMED_REQUEST
    else:
        assert 1 <= len(request.cert_ids) <= core.MAX_CERT_IDS
        assert answer[:1] == b"\x30" and answer != core.MALFORMED_REQUEST


@FUZZ
@given(requests)
def test_the_fast_path_agrees_with_the_parser(data: bytes) -> None:
    """``ocsp serve`` answers a request ``simple_request`` accepts without ``parse_request``
    when its CertID is held (byte for byte, so valid DER): then both must read the same."""
    simple = simple_request(data)
    if simple is None or parse(w.sequence(w.sequence(w.sequence(w.sequence(simple[0]))))) is None:
        return
    request = parse(data)
    assert request is not None
    assert [c.der for c in request.cert_ids] == [simple[0]]
    assert request.nonce == simple[1]


@FUZZ
@given(
    st.text(max_size=300)
    | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/-_=% ", max_size=300)
)
def test_any_get_path_decodes_or_is_refused(text: str) -> None:
    der = core.decode_get_path(text)  # the web app's and ocsp serve's
    assert der is None or isinstance(der, bytes)
    if der is not None:
        parse(der)


@FUZZ
@given(
    st.sampled_from(SEEDS), st.booleans(), st.booleans(), st.sampled_from([0, 1, 2]), st.booleans()
)
def test_every_get_spelling_of_a_request_decodes_to_it(
    der: bytes, urlsafe: bool, unpadded: bool, percent: int, spaces: bool
) -> None:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(der).decode()
    if unpadded:
        text = text.rstrip("=")
    if spaces:  # a '+' that form decoding made a space
        text = text.replace("+", " ")
    for _ in range(percent):  # percent-encoded once, or twice by some clients
        text = quote(text, safe="")
    assert core.decode_get_path(text) == der


def _nested(depth: int, inner: bytes = b"") -> bytes:
    for _ in range(depth):
        inner = w.sequence(inner)
    return inner


# The worst shapes for the reader within the request limit (32 KiB): deep nesting, a flat
# run of tiny TLVs, long OIDs, many CertIDs; and a 64 KiB body, refused by its size.
_MANY = w.sequence(w.sequence(w.sequence(*([w.sequence(pki.issuer().cert_id(1).der)] * 500))))
WORST = {
    "deep": _nested(core.MAX_DEPTH + 1000),
    "flat": w.sequence(b"\x05\x00" * 16_000),
    "flat-ints": w.sequence(b"\x02\x01\x00" * 10_000),
    "oids": w.sequence(w.tlv(0x06, b"\x2a" + b"\x81" * 18 + b"\x01" * 44) * 400),
    "many-cert-ids": _MANY,
    "64k": b"\x30\x83\x01\x00\x00" + b"\x00" * (core.HTTP_MAX_BODY - 5),
}


@pytest.mark.parametrize("case", sorted(WORST))
def test_worst_inputs_are_refused_within_milliseconds(case: str) -> None:
    data = WORST[case]
    assert len(data) <= core.HTTP_MAX_BODY
    best = float("inf")
    for _ in range(3):  # CPU time, best of three: a busy CI host must not fail the test
        start = time.process_time()
        request = parse(data)
        best = min(best, time.process_time() - start)
    assert request is None
    assert best < 0.05, f"{case}: {best * 1000:.1f} ms"


# -- found by the fuzz campaign: the work to refuse a request grew with its TLV count -------------
# check_structure read every TLV, then _decode's children() read a level whole before counting
# it, and ocsp serve's simple_request did the same before parse_request: a 32 KiB SEQUENCE of
# 16,000 NULLs costs about 17 ms of CPU in parse_request and 25 ms in Responder.prepare (on the
# event loop), where the contract is a few ms. Now check_structure stops at der.MAX_TLVS and
# simple_request at the few fields it wants.
MAX_TLVS_READ = 4096


def test_regression_refusing_a_flat_request_reads_a_bounded_number_of_tlvs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = 0
    read_tlv = der.read_tlv

    def counting(data: bytes, pos: int, end: int) -> der.Tlv:
        nonlocal reads
        reads += 1
        return read_tlv(data, pos, end)

    monkeypatch.setattr(der, "read_tlv", counting)
    flat = bytes.fromhex("30827d00") + b"\x05\x00" * 16_000  # SEQUENCE of 16,000 NULLs
    assert simple_request(flat) is None
    assert parse(flat) is None
    assert reads <= MAX_TLVS_READ, f"{reads} TLVs read"
