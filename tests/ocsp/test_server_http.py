"""``ocsp serve``'s HTTP handling: a request that crashes the answering (a bug) or carries an
absurd OID never costs the connection its pipelined requests, and conditional GETs follow
RFC 9110 (If-None-Match lists, weak comparison and ``*``; a 304 with the 200's ETag,
Cache-Control and Expires, and no Content-Length).

Each test on a deployment runs on SQLite and PostgreSQL (the ``services`` fixture); the server
is a subprocess on loopback, stopped by PID (``tests.ocsp.test_server.running``).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.x509 import ocsp as x509_ocsp

from ocsp import core
from ocsp.index import ResponseIndex
from ocsp.server import HttpProtocol, Responder, Server
from sekisho.services import Services
from tests.ocsp.test_der_limits import huge_arc_request
from tests.ocsp.test_server import MALFORMED, Pki, _raw, make_pki, running, status_of

INTERNAL_ERROR = bytes.fromhex("3003 0a01 02")
Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
def pki(services: Services, tmp_path: Path) -> Pki:
    return make_pki(services, tmp_path)


def replies(data: bytes, methods: list[str]) -> list[Reply]:
    """The responses in ``data``, one per request method sent: (status, fields by lower-case
    name, body). A body is as long as Content-Length says; none for HEAD and 304 (a body a 304
    carried by mistake would break the parsing of the next response)."""
    out = []
    for method in methods:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"response to {method} missing"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in fields, f"{name} sent twice"
            fields[name.lower()] = value.strip()
        length = 0 if method == "HEAD" or status == 304 else int(fields["content-length"])
        out.append((status, fields, data[:length]))
        data = data[length:]
    assert data == b"", "more bytes than responses"
    return out


def request(method: str, path: str, *fields: str, body: bytes = b"", last: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *fields]
    if method == "POST":
        lines += ["Content-Type: application/ocsp-request", f"Content-Length: {len(body)}"]
    if last:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- a request that cannot be decoded, a request that crashes ----------------------------------
def test_a_huge_oid_arc_is_malformed_and_the_pipeline_goes_on(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    bad = huge_arc_request()  # 1.2.<an arc of 2,101 octets>: str() of it raised ValueError
    b64 = base64.b64encode(bad).decode()
    with running(data_dir, tmp_path) as server:
        sent = (
            request("POST", "/ocsp", body=bad)
            + request("GET", f"/ocsp/{b64}")
            + request("GET", f"/ocsp/{pki.get_path(pki.good)}")
            + request("GET", "/healthz", last=True)
        )
        data, _, closed = _raw(server, sent)
        assert closed
        post, get, good, health = replies(data, ["POST", "GET", "GET", "GET"])
        for status, fields, body in (post, get):
            assert status == 200 and body == MALFORMED
            assert fields["cache-control"] == "no-store"
        assert good[0] == 200 and len(good[2]) > 5
        assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
        log = server.log.read_text()
        assert "Fatal error" not in log and '"level": "error"' not in log, log[-2000:]


class _Transport:
    """What HttpProtocol writes to; nothing else."""

    def __init__(self, peer: str = "192.0.2.1") -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.peer = peer

    def get_write_buffer_size(self) -> int:
        return 0  # written at once

    def get_extra_info(self, name: str) -> object:
        return (self.peer, 40000) if name == "peername" else None

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_crash_answers_internal_error_and_the_pipeline_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(Responder(ResponseIndex({}), None))
    try:

        def crash(request_der: bytes) -> bytes:
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.responder, "prepare", crash)
        transport = _Transport()
        protocol = HttpProtocol(server)
        protocol.connection_made(cast(Any, transport))
        with caplog.at_level(logging.ERROR, logger="ocsp.server"):
            protocol.data_received(
                request("POST", "/ocsp", body=b"\x30\x00")
                + request("GET", "/ocsp/MAA=")
                + request("GET", "/healthz", last=True)
            )
        post, get, health = replies(bytes(transport.written), ["POST", "GET", "GET"])
        for status, fields, body in (post, get):
            assert status == 200 and body == INTERNAL_ERROR  # as the web endpoint answers
            assert fields["content-type"] == "application/ocsp-response"
            assert fields["cache-control"] == "no-store"
            assert b"a bug" not in body
        assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
        assert transport.closed  # by the last request's Connection: close, not by the crash
        failed = [r for r in caplog.records if r.name == "ocsp.server"]
        assert [r.getMessage() for r in failed] == ["OCSP request failed"] * 2
        assert {(r.__dict__["method"], r.__dict__["error"]) for r in failed} == {
            ("POST", "RuntimeError"),
            ("GET", "RuntimeError"),
        }
    finally:
        server.close()


# -- conditional GETs ---------------------------------------------------------------------------
def test_if_none_match_lists_weak_tags_and_star_get_a_complete_304(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    path = f"/ocsp/{pki.get_path(pki.good)}"
    with running(data_dir, tmp_path) as server:
        data, _, _ = _raw(server, request("GET", path, last=True))
        [(status, full, der)] = replies(data, ["GET"])
        assert status == 200 and int(full["content-length"]) == len(der) > 5
        etag = full["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        matching = [
            ("GET", [f"If-None-Match: {etag}"]),
            ("GET", [f'If-None-Match: "nope", {etag}']),
            ("GET", [f'If-None-Match: "nope",W/{etag} , "other"']),
            ("GET", [f"If-None-Match: W/{etag}"]),
            ("GET", ["If-None-Match: *"]),
            ("GET", ['If-None-Match: "nope"', f"If-None-Match: {etag}"]),  # one list (5.3)
            ("HEAD", [f"If-None-Match: {etag}"]),
        ]
        not_matching = [
            ("GET", ['If-None-Match: "nope", W/"other"']),
            ("GET", [f"If-None-Match: {etag[1:-1]}"]),  # not an entity-tag: matches nothing
            ("GET", [f"If-None-Match: {etag} junk"]),
            ("POST", [f"If-None-Match: {etag}"]),  # conditional GETs only
        ]
        cases = matching + not_matching
        sent = b"".join(
            request(
                method,
                "/ocsp" if method == "POST" else path,
                *fields,
                body=base64.b64decode(pki.get_path(pki.good)) if method == "POST" else b"",
                last=i == len(cases) - 1,
            )
            for i, (method, fields) in enumerate(cases)
        )
        data, _, closed = _raw(server, sent)
        assert closed
        got = replies(data, [method for method, _ in cases])
    for (method, fields), (status, headers, body) in zip(matching, got, strict=False):
        assert status == 304, (method, fields)
        assert body == b""
        # RFC 9110 15.4.5: the fields the 200 would have carried; 8.6: no Content-Length
        assert headers["etag"] == etag
        assert headers["expires"] == full["expires"]
        assert headers["last-modified"] == full["last-modified"]
        assert headers["cache-control"].split(",")[1:] == full["cache-control"].split(",")[1:]
        assert headers["cache-control"].startswith("public, max-age=")
        assert "content-length" not in headers and "content-type" not in headers
        assert "date" in headers
    for (method, fields), (status, headers, body) in zip(
        not_matching, got[len(matching) :], strict=True
    ):
        assert status == 200 and body == der, (method, fields)
        assert headers["content-length"] == str(len(der))
        if method == "POST":  # not stored by caches, nor tagged
            assert headers["cache-control"] == "no-store" and "etag" not in headers
        else:
            assert headers["etag"] == etag


def test_preconditions_are_evaluated_as_on_the_web_endpoint(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """If-Match and If-Unmodified-Since too, in the order of RFC 9110 13.2.2, by the web
    endpoint's code: the web app's table of cases gets the web app's answers (If-Modified-Since
    is read by neither on /ocsp). Before, `If-Match: "nope"` was 200 here and 412 there."""
    from tests.web.test_pki import CONDITIONAL_CASES

    path = f"/ocsp/{pki.get_path(pki.good)}"
    with running(data_dir, tmp_path) as server:
        data, _, _ = _raw(server, request("GET", path, last=True))
        [(status, full, der)] = replies(data, ["GET"])
        assert status == 200
        modified = email.utils.parsedate_to_datetime(full["last-modified"])
        values = {
            "etag": full["etag"],
            "weak": "W/" + full["etag"],
            "lm": full["last-modified"],
            "before": email.utils.format_datetime(modified - dt.timedelta(days=1), usegmt=True),
            "after": email.utils.format_datetime(modified + dt.timedelta(days=1), usegmt=True),
        }
        cases = [
            (method, [f"{name}: {value.format(**values)}" for name, value in fields.items()],
             200 if wanted == 304 and "If-None-Match" not in fields else wanted)
            for fields, wanted in CONDITIONAL_CASES
            for method in ("GET", "HEAD")
        ]  # fmt: skip
        sent = b"".join(
            request(method, path, *lines, last=i == len(cases) - 1)
            for i, (method, lines, _) in enumerate(cases)
        )
        data, _, closed = _raw(server, sent)
        assert closed
        got = replies(data, [method for method, _, _ in cases])
    for (method, lines, wanted), (status, headers, body) in zip(cases, got, strict=True):
        assert status == wanted, (method, lines, status)
        if wanted == 412:  # never stored by a cache, no validators of the answer
            assert headers["cache-control"] == "no-store" and "etag" not in headers
            assert body != der
        elif wanted == 304:
            for name in ("etag", "last-modified", "expires"):
                assert headers[name] == full[name], (name, lines)
        else:
            assert headers["etag"] == full["etag"]
            assert body == (der if method == "GET" else b""), (method, lines)


def test_an_answer_to_a_post_is_not_stored_by_caches(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """A POST for a pre-signed answer got `public, max-age=300` and an ETag here and no-store
    on the web app. no-store is right: the answer depends on the body, which no cache key
    holds (RFC 9110 9.3.3), and RFC 5019 leaves caching to GET. The GET keeps its fields."""
    der = base64.b64decode(pki.get_path(pki.good))
    with running(data_dir, tmp_path) as server:
        sent = request("POST", "/ocsp", body=der) + request(
            "GET", f"/ocsp/{pki.get_path(pki.good)}", last=True
        )
        data, _, _ = _raw(server, sent)
    (post_status, post, answer), (get_status, get, same) = replies(data, ["POST", "GET"])
    assert post_status == get_status == 200 and answer == same and len(answer) > 5
    assert post["cache-control"] == "no-store"
    for name in ("etag", "last-modified", "expires"):
        assert name not in post and name in get, name
    assert get["cache-control"].startswith("public, max-age=")


def _directives(cache_control: str) -> set[str]:
    """The Cache-Control directives but max-age, in any order."""
    return {d.strip() for d in cache_control.split(",") if not d.strip().startswith("max-age=")}


def test_an_answer_signed_live_for_a_get_is_cached_as_on_the_web_app(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """A GET answered live (a SHA-256 CertID, signed on the loop; a serial never issued,
    looked up in the database) is as cacheable as a pre-signed answer, with its own ETag,
    Last-Modified and Expires and preconditions evaluated: the web app gave it max-age up to
    300 s, `ocsp serve` no-store. An answer with a nonce is no-store on both."""
    from tests.ocsp.test_store import request_der
    from web import create_app

    issuer = pki.issuer()
    paths = {
        "sha256": request_der(issuer, [pki.good.serial_number], hash_algorithm="sha256"),
        "never issued": request_der(issuer, [0x12345]),
        "nonce": request_der(issuer, [pki.good.serial_number], nonce=b"\x01" * 16),
    }
    paths = {k: "/ocsp/" + base64.b64encode(v).decode() for k, v in paths.items()}
    web = create_app(pki.services).test_client()
    with running(data_dir, tmp_path) as server:
        for label, path in paths.items():
            cases = [
                ("GET", []),
                ("HEAD", []),
                ("GET", ["If-None-Match: *"]),
                ("GET", ['If-Match: "nope"']),
                ("GET", ["If-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT"]),
            ]
            sent = b"".join(
                request(method, path, *lines, last=i == len(cases) - 1)
                for i, (method, lines) in enumerate(cases)
            )
            data, _, _ = _raw(server, sent)
            got = replies(data, [method for method, _ in cases])
            (status, fields, der), (head_status, head, _), star, match, unmodified = got
            assert status == head_status == 200 and len(der) > 5, label
            from_web = web.get(path)
            assert from_web.status_code == 200, label
            if label == "nonce":
                for answer in (fields, head, from_web.headers):
                    assert answer.get("cache-control", answer.get("Cache-Control")) == "no-store"
                assert "etag" not in fields and "ETag" not in from_web.headers
                # nothing a precondition is evaluated against, as on the web app
                assert (star[0], match[0], unmodified[0]) == (200, 200, 200)
                continue
            assert fields["etag"] == f'"{hashlib.sha256(der).hexdigest()[:32]}"', label
            loaded = x509_ocsp.load_der_ocsp_response(der)
            this, next_ = loaded.this_update_utc, loaded.next_update_utc
            assert next_ is not None and core.response_times(der) == (this, next_)
            assert fields["last-modified"] == email.utils.format_datetime(this, usegmt=True)
            assert fields["expires"] == email.utils.format_datetime(next_, usegmt=True)
            assert fields["cache-control"].startswith("public, max-age=")
            max_age = int(fields["cache-control"].split("max-age=")[1].split(",")[0])
            assert 290 <= max_age <= core.CACHE_MAX_AGE, label
            assert _directives(from_web.headers["Cache-Control"]) == _directives(
                fields["cache-control"]
            ), label
            assert head["etag"].startswith('"') and head["cache-control"].startswith("public")
            assert star[0] == 304 and star[1]["etag"].startswith('"'), label
            assert match[0] == unmodified[0] == 412, label
            assert match[1]["cache-control"] == unmodified[1]["cache-control"] == "no-store"


def test_a_get_path_that_is_not_base64_is_400_as_on_the_web_app(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """Text that is not base64 is no OCSP request at all: the web app answers 400 with the
    malformedRequest answer, `ocsp serve` answered 200. Both now 400, no-store, and the
    connection goes on; base64 of something that is not a request stays 200 malformedRequest
    (an OCSP-level error) on both."""
    from web import create_app

    bad = ["!!!!", "a", "%ZZ", "QUJD$", "%%%", "abc$", "A" * 5]
    junk = base64.b64encode(b"junk").decode()
    web = create_app(pki.services).test_client()
    with running(data_dir, tmp_path) as server:
        sent = b"".join(request("GET", f"/ocsp/{path}") for path in [*bad, junk])
        data, _, _ = _raw(server, sent + request("GET", "/healthz", last=True))
    *answers, health = replies(data, ["GET"] * (len(bad) + 2))
    assert health[0] == 200  # the connection went on
    for path, (status, fields, body) in zip([*bad, junk], answers, strict=True):
        from_web = web.get(f"/ocsp/{path}")
        assert status == from_web.status_code == (200 if path == junk else 400), path
        assert body == from_web.data == MALFORMED, path
        assert fields["content-type"] == from_web.mimetype == "application/ocsp-response"
        assert fields["cache-control"] == from_web.headers["Cache-Control"] == "no-store"


def test_get_of_the_post_resource_is_405_as_on_the_web_app(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """`GET /ocsp` and `GET /ocsp/` carry no request: the resource takes POST only. The web
    app answers 405 with Allow; `ocsp serve` answered 404 (`/ocsp`) or 200 malformedRequest
    (`/ocsp/`). Both now 405, Allow naming POST, no-store, the connection kept."""
    from web import create_app

    web = create_app(pki.services).test_client()
    cases = [("GET", "/ocsp"), ("GET", "/ocsp/"), ("HEAD", "/ocsp"), ("GET", "/ocsp?x=1")]
    with running(data_dir, tmp_path) as server:
        sent = b"".join(request(method, path) for method, path in cases)
        data, _, _ = _raw(server, sent + request("GET", "/healthz", last=True))
    *answers, health = replies(data, [method for method, _ in cases] + ["GET"])
    assert health[0] == 200  # the connection went on
    for (method, path), (status, fields, _body) in zip(cases, answers, strict=True):
        from_web = web.open(path, method=method)
        assert status == from_web.status_code == 405, (method, path)
        assert "POST" in fields["allow"].split(", ")
        assert "POST" in from_web.headers["Allow"].split(", ")
        assert "GET" not in fields["allow"] and "GET" not in from_web.headers["Allow"]
        assert fields["cache-control"] == from_web.headers["Cache-Control"] == "no-store"


# -- a client that half-closes ------------------------------------------------------------------
def test_requests_sent_before_a_half_close_are_all_answered(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """A client sends its requests, then shuts its sending side (shutdown(SHUT_WR)) and
    reads. An answer looked up in the database (a serial the server holds nothing for) and
    the requests pipelined behind it are all sent before the server closes. Before, the
    server closed the connection at the half-close: no answer from the database arrived."""
    from ocsp.index import rfc5019_request

    unknown = base64.b64encode(rfc5019_request(pki.issuer(), 0x12345)).decode()
    sent = (
        request("POST", "/ocsp", body=rfc5019_request(pki.issuer(), 0x54321))
        + request("GET", f"/ocsp/{unknown}")
        + request("GET", "/healthz")
    )
    with running(data_dir, tmp_path) as server:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(sent)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(65536):  # bounded by the socket timeout
                    data += chunk
            post, get, health = replies(data, ["POST", "GET", "GET"])
            for status, _fields, der in (post, get):
                assert status == 200 and status_of(der) is x509_ocsp.OCSPCertStatus.UNKNOWN
            assert health[0] == 200


# -- connection limits ---------------------------------------------------------------------------
def test_at_the_limit_a_new_connection_takes_an_idle_ones_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One client's idle sockets filled every place and every new client was refused; now
    the idle connection nearest its deadline gives way, one address holds at most
    MAX_PER_CLIENT places, and a connection that is answering is never evicted."""
    from ocsp import server as server_module

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(server_module, "MAX_PER_CLIENT", 3)
    server = Server(Responder(ResponseIndex({}), None))
    try:

        def connect(peer: str) -> tuple[HttpProtocol, _Transport]:
            transport, protocol = _Transport(peer), HttpProtocol(server)
            protocol.connection_made(cast(Any, transport))
            return protocol, transport

        hog = [connect("192.0.2.66") for _ in range(3)]
        assert connect("192.0.2.66")[1].aborted  # a fourth from that address: refused
        busy, _ = connect("198.51.100.1")
        busy.data_received(b"GET /ocsp/MAA= HTTP/1.1\r\nHost: x\r\n")  # a request under way
        assert len(server.connections) == 4
        newcomer, transport = connect("203.0.113.9")  # full: an idle one gives way
        assert not transport.aborted and newcomer in server.connections
        assert sum(t.closed for _, t in hog) == 1 and busy in server.connections
        assert len(server.connections) == 4 and server.per_client["192.0.2.66"] == 2
        for protocol, _ in hog:
            protocol.connection_lost(None)
        assert "192.0.2.66" not in server.per_client
        # The first byte is due within the request timeout, not the idle one.
        assert newcomer.deadline <= time.monotonic() + server.request_timeout
    finally:
        server.close()
    behind_proxy = Server(Responder(ResponseIndex({}), None), max_per_client=0)
    try:  # --max-per-client 0: one address (a proxy's) may hold every place
        for _ in range(4):
            transport = _Transport("127.0.0.1")
            HttpProtocol(behind_proxy).connection_made(cast(Any, transport))
            assert not transport.aborted
        assert behind_proxy.per_client["127.0.0.1"] == 4
    finally:
        behind_proxy.close()


def test_one_address_holds_at_most_max_per_client_connections(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """On a real server: 128 idle connections from 127.0.0.1, the next from there is closed
    at once, and a client at another loopback address is answered."""
    from ocsp import server as server_module

    with running(data_dir, tmp_path) as server:
        held = []
        try:
            for _ in range(server_module.MAX_PER_CLIENT):
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            time.sleep(0.2)  # every one accepted and counted
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
                extra.sendall(request("GET", "/healthz", last=True))
                try:
                    refused = extra.recv(100)
                except ConnectionResetError:
                    refused = b""
            assert refused == b""
            other = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                             source_address=("127.0.0.2", 0))  # fmt: skip
            with other:
                other.sendall(request("GET", "/healthz", last=True))
                data = b""
                while chunk := other.recv(65536):
                    data += chunk
            assert replies(data, ["GET"])[0][0] == 200
        finally:
            for sock in held:
                sock.close()


def test_request_heads_as_rfc_9112_wants_them() -> None:
    """Exactly one Host in HTTP/1.1 (3.2); a bare CR inside a field line is refused (2.2),
    and lines ended by a bare LF as soon as one arrives; an absolute-form target is accepted
    (3.2.2). All were taken as they came, or (bare LF) waited for the 408."""
    server = Server(Responder(ResponseIndex({}), None))
    try:

        def answer(head: bytes) -> tuple[int, bool]:
            transport, protocol = _Transport(), HttpProtocol(server)
            protocol.connection_made(cast(Any, transport))
            protocol.data_received(head)
            status = int(bytes(transport.written).split(b" ", 2)[1])
            return status, transport.closed

        assert answer(b"GET /healthz HTTP/1.1\r\n\r\n") == (400, True)
        assert answer(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == (400, True)
        assert answer(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n") == (400, True)
        assert answer(b"GET /healthz HTTP/1.0\r\n\r\n") == (200, True)  # 1.0 needs none
        assert answer(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n") == (200, False)
        absolute = b"GET http://ocsp.example.com/healthz HTTP/1.1\r\nHost: ocsp.example.com\r\n\r\n"
        assert answer(absolute) == (200, False)
        bare = b"GET HTTPS://ocsp.example.com HTTP/1.1\r\nHost: ocsp.example.com\r\n\r\n"
        assert answer(bare)[0] == 404  # its path is "/": no such resource, not a 400
        # Lines ended by LF alone: refused at once, not left to wait for the 408 (10 s later).
        assert answer(b"GET /healthz HTTP/1.1\nHost: a\n\n") == (400, True)
        assert answer(b"GET /healthz HTTP/1.1\nHo") == (400, True)
        assert answer(b"GET /healthz HTTP/1.1\r\nHost: a\n\r\n") == (400, True)
        # Empty lines before a request line are ignored (2.2), at the start and between
        # pipelined requests (a client that ends a POST body with CRLF).
        assert answer(b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n") == (200, False)
        transport, protocol = _Transport(), HttpProtocol(server)
        protocol.connection_made(cast(Any, transport))
        one = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        protocol.data_received(one + b"\r\n" + one)
        assert bytes(transport.written).count(b"HTTP/1.1 200 ") == 2, bytes(transport.written)
        transport, protocol = _Transport(), HttpProtocol(server)
        protocol.connection_made(cast(Any, transport))
        for piece in (b"GET /healthz HTTP/1.1\r", b"\nHost: a\r", b"\n\r", b"\n"):
            assert not transport.written and not transport.closed  # CRLF split across reads
            protocol.data_received(piece)
        assert bytes(transport.written).startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()


def test_control_characters_and_spaced_field_names_are_400() -> None:
    """RFC 9110 5.5 and RFC 9112 5.1: a field value holds no control character but HTAB, a
    field name is a token. A NUL or DEL in a value and a space inside a name were taken as
    they came; gunicorn refuses them on the web app (tests/test_serve.py)."""
    server = Server(Responder(ResponseIndex({}), None))
    try:

        def answer(*fields: bytes) -> tuple[int, bool]:
            transport, protocol = _Transport(), HttpProtocol(server)
            protocol.connection_made(cast(Any, transport))
            protocol.data_received(b"\r\n".join([b"GET /healthz HTTP/1.1", b"Host: a", *fields]))
            protocol.data_received(b"\r\n\r\n")
            status = int(bytes(transport.written).split(b" ", 2)[1])
            return status, transport.closed

        for bad in (
            b"X-A: a\x00b",
            b"X-A: \x00",
            b"X-A: a\x01b",
            b"X-A: a\x1fb",
            b"X-A: a\x7fb",
            b"X-A: a\x0bb",
            b"X A: b",
            b"X-A\t: b",
            b"X-A : b",
            b"X\x00A: b",
            b"X(A): b",
            b"\tX-A: b",
        ):
            assert answer(bad) == (400, True), bad
        for good in (b"X-A: a\tb\x80\xff", b"X-A:", b"X-A:\t b \t", b"X_!#$%&'*+-.^`|~9: b"):
            assert answer(good) == (200, False), good
    finally:
        server.close()


def test_an_http_1_0_connection_kept_alive_says_so() -> None:
    """RFC 9112 9.3: an HTTP/1.0 connection persists only when the client asks with
    "keep-alive" and the answer says "keep-alive" too (as gunicorn answers on the web app).
    `ocsp serve` kept it open without saying so: the client could not know it persisted.
    Connection options are a list, every field line counts, and "close" wins."""
    server = Server(Responder(ResponseIndex({}), None))
    try:

        def answer(version: bytes, *fields: bytes) -> tuple[list[str], bool]:
            transport, protocol = _Transport(), HttpProtocol(server)
            protocol.connection_made(cast(Any, transport))
            head = b"\r\n".join([b"GET /healthz HTTP/" + version, b"Host: a", *fields])
            protocol.data_received(head + b"\r\n\r\n")
            if not transport.closed:  # a second request on it is answered too
                protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            data = bytes(transport.written)
            assert data.count(b"HTTP/1.1 200 OK\r\n") == (1 if transport.closed else 2)
            first = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
            said = [line.split(": ", 1)[1] for line in first if line.startswith("Connection:")]
            return said, transport.closed

        assert answer(b"1.0", b"Connection: keep-alive") == (["keep-alive"], False)
        assert answer(b"1.0", b"Connection: Keep-Alive , x") == (["keep-alive"], False)
        assert answer(b"1.0") == (["close"], True)
        assert answer(b"1.0", b"Connection: keep-alive-ish") == (["close"], True)
        assert answer(b"1.0", b"Connection: keep-alive", b"Connection: close") == (["close"], True)
        assert answer(b"1.1") == ([], False)
        assert answer(b"1.1", b"Connection: keep-alive") == ([], False)
        assert answer(b"1.1", b"Connection: x, close") == (["close"], True)
        assert answer(b"1.1", b"Connection: close", b"Connection: keep-alive") == (["close"], True)
    finally:
        server.close()


def test_100_continue_is_sent_to_http_1_1_clients_only() -> None:
    """A POST with "Expect: 100-continue" whose body has not arrived: an HTTP/1.1 client is
    told to go on; an HTTP/1.0 one is not (RFC 9110 10.1.1: the expectation MUST be ignored;
    it was answered "HTTP/1.1 100 Continue")."""
    server = Server(Responder(ResponseIndex({}), None))
    try:
        for version, told in ((b"1.1", True), (b"1.0", False)):
            transport, protocol = _Transport(), HttpProtocol(server)
            protocol.connection_made(cast(Any, transport))
            head = b"\r\n".join([
                b"POST /ocsp HTTP/" + version, b"Host: a", b"Expect: 100-continue",
                b"Content-Type: application/ocsp-request", b"Content-Length: 5",
            ])  # fmt: skip
            protocol.data_received(head + b"\r\n\r\n")
            assert (bytes(transport.written) == b"HTTP/1.1 100 Continue\r\n\r\n") is told
            assert told or bytes(transport.written) == b""
            protocol.data_received(b"\x30\x03\x02\x01\x00")
            assert MALFORMED in bytes(transport.written)
    finally:
        server.close()


def test_a_connection_whose_last_answers_are_never_taken_is_dropped() -> None:
    """A connection closed after its answers (Connection: close, an error, a half-close)
    whose client reads nothing: asyncio's close() waits for it forever. It keeps its place
    until the request timeout, then is dropped (RST) and its place freed; closing one that
    has unsent bytes at once (a deadline, an eviction) drops it at once. A review saw such
    sockets leak past every limit, uncounted."""

    class Stuck(_Transport):
        def get_write_buffer_size(self) -> int:
            return 4096  # the client reads nothing

    server = Server(Responder(ResponseIndex({}), None), request_timeout=1.0)
    try:
        transport, protocol = Stuck("192.0.2.7"), HttpProtocol(server)
        protocol.connection_made(cast(Any, transport))
        protocol.data_received(request("GET", "/healthz", last=True))
        assert transport.closed and not transport.aborted  # close() asked, never completes
        assert protocol in server.connections and server.per_client["192.0.2.7"] == 1
        protocol.check_deadline(time.monotonic())  # not yet
        assert not transport.aborted
        protocol.check_deadline(time.monotonic() + 1.5)
        assert transport.aborted and protocol not in server.connections
        assert "192.0.2.7" not in server.per_client

        halved, halved_transport = HttpProtocol(server), Stuck("192.0.2.9")
        halved.connection_made(cast(Any, halved_transport))
        halved.data_received(request("GET", "/healthz"))  # answered, kept alive
        assert halved.eof_received() is True  # then the half-close: closed once sent
        assert halved_transport.closed and halved in server.connections
        halved.check_deadline(time.monotonic() + 1.5)
        assert halved_transport.aborted and halved not in server.connections

        other, pending = HttpProtocol(server), Stuck("192.0.2.8")
        other.connection_made(cast(Any, pending))
        other.abort()  # unsent bytes: dropped at once, not left waiting
        assert pending.aborted and other not in server.connections
    finally:
        server.close()


def test_both_servers_read_a_get_path_the_same_way(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """Percent-encoded twice, or with '+' turned into a space: the web app read these and
    `ocsp serve` answered malformedRequest; one decoder (core.decode_get_path) now serves
    both, so one URL gets one answer behind either."""
    from urllib.parse import quote

    b64 = pki.get_path(pki.good)
    spellings = [quote(quote(b64, safe=""), safe=""), b64.replace("+", " ").replace(" ", "%20")]
    with running(data_dir, tmp_path) as server:
        for path in spellings:
            data, _, _ = _raw(server, request("GET", f"/ocsp/{path}", last=True))
            [(status, _fields, der)] = replies(data, ["GET"])
            assert status == 200 and der != MALFORMED, path
            assert status_of(der) is x509_ocsp.OCSPCertStatus.GOOD
