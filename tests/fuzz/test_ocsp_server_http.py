"""``ocsp serve``'s own HTTP/1.1 parser (``ocsp.server.HttpProtocol``), in process over a fake
transport: whatever octets arrive, in whatever pieces, nothing is raised into the event loop,
every answer is a well-formed HTTP/1.1 response with a status the server defines, and nothing
is written after the connection is closed."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocsp.index import ResponseIndex
from ocsp.server import _REASONS, HttpProtocol, Responder, Server
from tests.fuzz import pki
from tests.fuzz.mutate import FUZZ, mutated


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0  # written at once

    def get_extra_info(self, name: str) -> object:
        return ("192.0.2.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _request(method: str, target: str, *fields: str, body: bytes = b"") -> bytes:
    head = "\r\n".join([f"{method} {target} HTTP/1.1", "Host: x", *fields])
    return (head + "\r\n\r\n").encode("latin-1") + body


def _seeds() -> list[bytes]:
    der = pki.ocsp_requests()[1]
    post = ("Content-Type: application/ocsp-request", f"Content-Length: {len(der)}")
    return [
        _request("GET", "/ocsp/" + base64.b64encode(der).decode(), 'If-None-Match: W/"a", "b"'),
        _request("POST", "/ocsp", *post, "Expect: 100-continue", body=der)
        + _request("HEAD", "/healthz", "Connection: close"),
        _request("GET", "/ocsp/" + base64.urlsafe_b64encode(der).decode().rstrip("=")),
        _request("POST", "/", *post, body=der) + b"GET /x HTTP/1.0\r\n\r\n",
    ]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    served = Server(Responder(ResponseIndex({1: pki.issuer()}), None))
    yield served
    served.close()


def _responses(data: bytes) -> None:
    """Each response: a status line with a status the server defines, header fields, and as
    many body octets as Content-Length says (none for a HEAD)."""
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, "response head without its end"
        lines = head.split(b"\r\n")
        version, status, _ = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1"
        if status == b"100":
            continue
        assert int(status) in _REASONS
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        rest = data[int(fields.get(b"Content-Length", b"0")) :]
        # The answer to a HEAD has the fields of its GET and no body: what follows is the next
        # answer (no body here begins like a status line).
        data = data if rest and not rest.startswith(b"HTTP/1.1 ") else rest


@FUZZ
@given(
    mutated(_seeds(), max_steps=4) | st.binary(max_size=300),
    st.lists(st.integers(0, 600), max_size=3),
)
def test_any_octets_get_http_answers(server: Server, data: bytes, cuts: list[int]) -> None:
    transport = Transport()
    protocol = HttpProtocol(server)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if start < cut <= len(data):
            protocol.data_received(data[start:cut])
            start = cut
    protocol.check_deadline(float("inf"))  # what is left unanswered times out: 408
    protocol.connection_lost(None)
    _responses(b"".join(transport.written))
    assert not server.connections
