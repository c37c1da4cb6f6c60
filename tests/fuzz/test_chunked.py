"""Chunked request bodies as the web server reads them: gunicorn's request parser with our
:class:`web.worker.StrictChunkedReader`, fed in arbitrary pieces. Whatever arrives, the read
ends with the body or with one of gunicorn's framing errors (which ``web.body`` turns into a
400); a body it returns is the one RFC 9112 section 7.1 reads from those octets (an
independent decoder below), within our limits on chunk-size digits and extension octets."""

from __future__ import annotations

import itertools
import re

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import InvalidChunkSize, NoMoreData, ParseException
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.mutate import FUZZ, mutated
from web.worker import CHUNK_EXTENSION_OCTETS, CHUNK_SIZE_DIGITS, StrictChunkedReader

HEAD = b"POST /est/simpleenroll HTTP/1.1\r\nHost: pki\r\nTransfer-Encoding: chunked\r\n\r\n"

# RFC 9112 7.1.1 / RFC 9110 5.6: chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXT = re.compile(rb"(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (_TOKEN, _TOKEN, _QUOTED))
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)(.*)", re.DOTALL)


def rfc9112_body(data: bytes) -> bytes | None:
    """The body of a chunked message body ``data`` (trailer lines read as lines only), or
    None when its framing is not RFC 9112's or passes our limits."""
    body = bytearray()
    at = 0
    extension_octets = 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        size_line = _SIZE_LINE.fullmatch(data[at:end])
        if size_line is None or not _EXT.fullmatch(size_line[2]):
            return None
        digits, extension = size_line[1], size_line[2]
        extension_octets += len(extension)
        if len(digits) > CHUNK_SIZE_DIGITS or extension_octets > CHUNK_EXTENSION_OCTETS:
            return None
        size = int(digits, 16)
        at = end + 2
        if size == 0:
            break
        if len(data) < at + size + 2 or data[at + size : at + size + 2] != b"\r\n":
            return None
        body += data[at : at + size]
        at += size + 2
    while True:  # trailer section: lines up to an empty one
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        if end == at:
            return bytes(body)
        at = end + 2


def read_chunked(pieces: list[bytes]) -> bytes:
    """Read the body as the worker does: gunicorn's Request, the reader replaced."""
    unreader = IterUnreader([HEAD, *pieces])
    request = Request(Config(), unreader, ("127.0.0.1", 40000), 1)
    request.body.reader = StrictChunkedReader(request, request.unreader)
    out = bytearray()
    for _ in range(len(b"".join(pieces)) + 2):  # each read returns at least one octet
        piece = request.body.read(8192)
        if not piece:
            return bytes(out)
        out += piece
    raise AssertionError("the body read did not end")


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    """A well-formed chunked body: chunks with leading zeros, extensions, trailer fields."""
    out = bytearray()
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5)):
        zeros = b"0" * draw(st.integers(0, 3))
        size = draw(st.sampled_from((b"%x", b"%X"))) % len(data)
        out += zeros + size + draw(extensions()) + b"\r\n" + data + b"\r\n"
    out += b"0" + draw(extensions()) + b"\r\n"
    for name in draw(st.lists(st.sampled_from((b"X-Digest", b"X-Note")), max_size=2)):
        out += name + b": " + draw(st.binary(max_size=6).map(lambda v: v.hex().encode())) + b"\r\n"
    return bytes(out + b"\r\n")


def extensions() -> st.SearchStrategy[bytes]:
    return st.sampled_from((b"", b";a", b" ; n=v", b';q="x \\" y"', b";a;b=1"))


def pieces_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


SEEDS = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b'000a;ext=1\r\n0123456789\r\n3 ; q="x"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n',
    b"1\r\n\x00\r\nF\r\n" + b"f" * 15 + b"\r\n0;end\r\n\r\n",
]


@FUZZ
@given(chunked(), st.lists(st.integers(0, 10_000), max_size=8))
def test_well_formed_bodies_are_read_whole_in_any_pieces(data: bytes, cuts: list[int]) -> None:
    expected = rfc9112_body(data)
    assert expected is not None
    assert read_chunked(pieces_of(data, cuts)) == expected


@FUZZ
@given(mutated(SEEDS, max_steps=6) | chunked(), st.lists(st.integers(0, 10_000), max_size=6))
def test_any_octets_end_in_the_body_or_a_framing_error(data: bytes, cuts: list[int]) -> None:
    try:
        body = read_chunked(pieces_of(data, cuts))
    except (ParseException, NoMoreData):
        return
    assert body == rfc9112_body(data), "a body read from framing RFC 9112 does not allow"


@pytest.mark.parametrize("crlf", [b"\r\n", b""])
def test_a_size_of_too_many_digits_is_refused_before_its_line_ends(crlf: bytes) -> None:
    size = b"0" * CHUNK_SIZE_DIGITS + b"1"
    pieces = [size[:5], size[5:], crlf]
    with pytest.raises(InvalidChunkSize):
        read_chunked([p for p in pieces if p])
