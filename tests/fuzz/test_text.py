"""Text parsers of the command line and the audit search: serials, subjects (RFC 4514), SAN
entries, and the audit filters. Bad text is a ``MalformedInput`` (exit 65 naming it) or, for
the subject's values, a ``PolicyViolation``; the audit filters never raise (a value they cannot
normalise is searched for as it is)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.events import normalise_mac
from audit.query import _ip, _serial
from ca.subject import encode_subject
from ca.tbs import SanEntry, parse_serial, parse_subject
from sekisho.errors import MalformedInput, PolicyViolation
from tests.fuzz.mutate import FUZZ

# Text in the shapes each parser expects, mutated, and any text at all.
HEX = "0123456789abcdefABCDEF:xX \t"
SUBJECT_SEEDS = [
    "CN=Alice Admin,O=Tenant One,UID=alice",
    "CN=a\\,b+O=c,2.5.4.5=#1304534e3031",
    'CN="quoted",OU=\\23x,C=JP',
    "1.2.840.113549.1.9.1=alice@example.com,DC=example",
]
SAN_SEEDS = ["dns:", "email:", "ip:", "uri:", "ip:fe80::1%eth0", "ip:::ffff:192.0.2.1"]


@st.composite
def edited(draw: st.DrawFn, seeds: list[str]) -> str:
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=4)) + text[at + draw(st.integers(0, 3)) :]
    return text


def texts(seeds: list[str], alphabet: str | None = None) -> st.SearchStrategy[str]:
    shaped = st.text(alphabet, max_size=60) if alphabet else st.nothing()
    return edited(seeds) | shaped | st.text(max_size=60)


@FUZZ
@given(texts(["0x01:ab:CD", "7f" * 20, "00" * 21], HEX))
def test_a_serial_is_in_range_or_malformed(text: str) -> None:
    try:
        value = parse_serial(text)
    except MalformedInput:
        return
    assert 0 < value < 1 << 160


@FUZZ
@given(texts(SUBJECT_SEEDS, 'CNOU=,+\\#"<>; 0123456789abcdef.'))
def test_a_subject_parses_or_is_malformed(text: str) -> None:
    try:
        name = parse_subject(text)
    except MalformedInput:
        return
    try:
        encode_subject(name)
    except PolicyViolation:
        pass


@FUZZ
@given(
    st.sampled_from(SAN_SEEDS).flatmap(lambda p: st.builds(lambda t: p + t, st.text(max_size=40)))
    | texts(SAN_SEEDS)
)
def test_a_san_entry_parses_or_is_malformed(text: str) -> None:
    try:
        entry = SanEntry.parse(text)
    except MalformedInput:
        return
    assert entry.kind in {"dns", "email", "ip", "uri"}
    try:
        entry.general_name()
    except MalformedInput:
        pass


@FUZZ
@given(
    texts(
        ["0x01:ab", "00-1A-2b-3C-4d-5E", "001a.2b3c.4d5e", "2001:DB8::1", "::ffff:1.2.3.4"],
        HEX + ".-",
    )
)
def test_audit_filters_never_raise(text: str) -> None:
    assert isinstance(_serial(text), str)
    assert isinstance(_ip(text), str)
    assert isinstance(normalise_mac(text), str)


@pytest.mark.parametrize("text", ["18_0d", "0x0x1f", "+1f", "1f ab", "-1", "0x", "", "1g"])
def test_a_serial_is_hex_digits_only(text: str) -> None:
    """``int(text, 16)`` alone took "18_0d", "+1f" and (once "0x" was cut) "0x0x1f"."""
    with pytest.raises(MalformedInput, match="not hexadecimal"):
        parse_serial(text)
    assert parse_serial(" 0x00:1F ") == parse_serial("1f") == 0x1F
