"""``sekisho ocsp serve`` as a real process on loopback: real clients (openssl), caching
headers, the store followed within one second, several servers on one database, and hostile
input answered quickly with the right error while ``/healthz`` keeps answering.

Each test runs on SQLite and PostgreSQL (the ``services`` fixture); the server is started as
a subprocess on a port it picks itself (``--port 0``, reported on stdout) and stopped by PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import http.client
import itertools
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from sqlalchemy import insert

from ca.hierarchy import create_issuing
from ca.issuance import IssueRequest
from ca.registry import ca_row
from ca.revocation import Reason, Revoker
from ca.tbs import SanEntry, serial_hex
from hsm.base import KeyType
from hsm.secrets import read_secret
from hsm.software import SoftwareBackend, generate_private_key
from ocsp import core, store
from ocsp.index import (
    CHUNK,
    DER,
    ISSUER_ID,
    NEXT_UPDATE,
    NEXT_UPDATE_TS,
    CaEntries,
    EntryBuilder,
    ResponseIndex,
    rfc5019_request,
)
from ocsp.models import OcspResponse
from ocsp.server import Responder, Server, initial_index
from ocsp.signers import active_responders, ensure_responders, replace_revoked_responders
from sekisho.clock import utcnow
from sekisho.errors import KeyBackendError, StoreError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import ca_cert, issue
from tests.conftest import TEST_ACTOR

MALFORMED = bytes.fromhex("3003 0a01 01")
OCSP_CT = {"Content-Type": "application/ocsp-request"}
TRY_LATER = bytes.fromhex("3003 0a01 03")
UNAUTHORIZED = bytes.fromhex("3003 0a01 06")
ROOT = Path(__file__).resolve().parents[2]


# -- a server process -------------------------------------------------------------------------
@dataclasses.dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ocsp"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_server(data_dir: Path, log: Path, *extra: str, port: int = 0) -> ServerProc:
    cmd = [
        sys.executable, "-c", "import sys; from sekisho.cli import main; sys.exit(main())",
        "--data-dir", str(data_dir), "--json",
        "ocsp", "serve", "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")
            if sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
                line += chunk
    except BaseException:
        ServerProc(proc, 0, log).stop()
        raise
    finally:
        sel.close()
    doc = json.loads(line.decode())
    assert doc["pid"] == proc.pid
    return ServerProc(proc, int(doc["port"]), log)


@contextlib.contextmanager
def following(server: Server) -> Iterator[asyncio.AbstractEventLoop]:
    """An in-process ``Server`` on a new loop, its follower thread started (with no store to
    follow, the loop is still the server's); stopped, joined and closed afterwards."""
    loop = asyncio.new_event_loop()
    try:
        server.start_follower(loop)
        yield loop
    finally:
        server.close()
        if server.follower is not None:
            server.follower.join(timeout=5)
        loop.close()


@contextlib.contextmanager
def running(data_dir: Path, tmp_path: Path, *extra: str, port: int = 0) -> Iterator[ServerProc]:
    server = start_server(
        data_dir, tmp_path / f"server-{time.monotonic_ns()}.log", *extra, port=port
    )
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the PKI ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Pki:
    dir: Path
    services: Services
    ca: x509.Certificate
    good: x509.Certificate
    revoked: x509.Certificate

    def pem(self, name: str, cert: x509.Certificate) -> Path:
        path = self.dir / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issuer(self) -> core.Issuer:
        return store.load_issuers(self.services)[self.ca_id()]

    def ca_id(self) -> int:
        for ca_id, issuer in store.load_issuers(self.services).items():
            if issuer.certificate == self.ca:
                return ca_id
        raise AssertionError("admin CA not served")

    def get_path(self, cert: x509.Certificate) -> str:
        return base64.b64encode(rfc5019_request(self.issuer(), cert.serial_number)).decode()


def make_pki(services: Services, tmp_path: Path) -> Pki:
    pki = Pki(
        dir=tmp_path,
        services=services,
        ca=ca_cert(services, "admin"),
        good=issue(services, "admin-client"),
        revoked=issue(services, "admin-client"),
    )
    services.revoker.revoke("admin", pki.revoked.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    pki.pem("root", ca_cert(services, "root"))
    pki.pem("ca", pki.ca)
    pki.pem("good", pki.good)
    pki.pem("revoked", pki.revoked)
    return pki


@pytest.fixture
def pki(services: Services, tmp_path: Path) -> Pki:
    return make_pki(services, tmp_path)


# -- clients ----------------------------------------------------------------------------------
def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def openssl_ask(pki: Pki, server: ServerProc, *args: str) -> str:
    res = run(
        [
            "openssl", "ocsp", "-issuer", str(pki.dir / "ca.pem"), *args, "-url", server.url,
            "-CAfile", str(pki.dir / "root.pem"), "-verify_other", str(pki.dir / "ca.pem"),
            "-timeout", "10",
        ]
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Response verify OK" in res.stderr, res.stdout + res.stderr
    return res.stdout


def fetch(
    server: ServerProc,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def healthy(server: ServerProc) -> None:
    status, _, body = fetch(server, "GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def status_of(der: bytes) -> x509_ocsp.OCSPCertStatus:
    loaded = x509_ocsp.load_der_ocsp_response(der)
    assert loaded.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    return loaded.certificate_status


# -- tests ------------------------------------------------------------------------------------
def test_openssl_good_revoked_unknown_and_two_certs(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    with running(data_dir, tmp_path) as server:
        # With a nonce (openssl's default): signed on the fly from the in-memory status.
        out = openssl_ask(pki, server, "-cert", str(pki.dir / "good.pem"))
        assert f"{pki.dir / 'good.pem'}: good" in out
        out = openssl_ask(pki, server, "-cert", str(pki.dir / "revoked.pem"))
        assert f"{pki.dir / 'revoked.pem'}: revoked" in out and "Reason: keyCompromise" in out
        # Without a nonce: the pre-signed response, byte for byte.
        resp_file = pki.dir / "resp.der"
        out = openssl_ask(
            pki, server, "-cert", str(pki.dir / "revoked.pem"), "-no_nonce",
            "-respout", str(resp_file),
        )  # fmt: skip
        assert "Reason: keyCompromise" in out
        stored = {(r.issuer_id, r.serial): r for r in store.snapshot(pki.services.db)[0]}
        assert resp_file.read_bytes() == stored[(pki.ca_id(), pki.revoked.serial_number)].der
        # SHA-256 CertIDs, two certificates in one request.
        out = openssl_ask(
            pki, server, "-sha256", "-cert", str(pki.dir / "good.pem"),
            "-cert", str(pki.dir / "revoked.pem"),
        )  # fmt: skip
        assert f"{pki.dir / 'good.pem'}: good" in out
        assert f"{pki.dir / 'revoked.pem'}: revoked" in out
        # A serial the CA never issued: unknown (from the database, off the event loop).
        out = openssl_ask(pki, server, "-serial", "0x1234567890abcdef")
        assert "unknown" in out and ": good" not in out
        healthy(server)


def test_get_forms_and_caching_headers(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    stored = {(r.issuer_id, r.serial): r for r in store.snapshot(pki.services.db)[0]}
    want = stored[(pki.ca_id(), pki.good.serial_number)]
    b64 = pki.get_path(pki.good)
    forms = {
        b64,
        urllib.parse.quote(b64, safe=""),  # percent-encoded (Firefox)
        b64.replace("+", "-").replace("/", "_"),  # URL-safe alphabet
        b64.rstrip("="),  # padding dropped
    }
    with running(data_dir, tmp_path) as server:
        for form in forms:
            status, headers, body = fetch(server, "GET", f"/ocsp/{form}")
            assert status == 200, form
            assert body == want.der, form
            assert headers["content-type"] == "application/ocsp-response"
        # RFC 5019 6.2 caching headers on the pre-signed answer.
        now = dt.datetime.now(dt.UTC)
        cache = headers["cache-control"]
        assert "public" in cache and "no-transform" in cache
        max_age = int(cache.split("max-age=")[1].split(",")[0])
        assert 0 < max_age <= (want.next_update - now).total_seconds() + 1
        assert max_age <= core.CACHE_MAX_AGE  # a shared cache re-checks within 5 minutes
        assert headers["expires"] == want.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
        assert headers["last-modified"] == want.this_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
        etag = headers["etag"]
        status, _, body = fetch(server, "GET", f"/ocsp/{b64}", headers={"If-None-Match": etag})
        assert status == 304 and body == b""
        # POST of the same request: same bytes.
        request = base64.b64decode(b64)
        status, headers, body = fetch(
            server, "POST", "/ocsp", request, {"Content-Type": "application/ocsp-request"}
        )
        assert status == 200 and body == want.der
        # Keep-alive: several requests on one connection, pipelined.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            one = f"GET /ocsp/{b64} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            sock.sendall(one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 4 and data.count(want.der) == 3


def test_changes_visible_within_one_second(
    pki: Pki, data_dir: Path, tmp_path: Path, db_backend: str
) -> None:
    extra_servers = 1 if db_backend == "postgres" else 0  # side by side on one PostgreSQL
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running(data_dir, tmp_path)) for _ in range(1 + extra_servers)
        ]
        b64 = pki.get_path(pki.good)
        for server in servers:
            assert (
                status_of(fetch(server, "GET", f"/ocsp/{b64}")[2]) is x509_ocsp.OCSPCertStatus.GOOD
            )
        pki.services.revoker.revoke("admin", pki.good.serial_number, Reason.SUPERSEDED, TEST_ACTOR)
        revoked_at = time.monotonic()
        for server in servers:
            while True:
                der = fetch(server, "GET", f"/ocsp/{b64}")[2]
                if status_of(der) is x509_ocsp.OCSPCertStatus.REVOKED:
                    break
                assert time.monotonic() - revoked_at < 1.0, "revocation not visible within 1 s"
                time.sleep(0.02)
            assert time.monotonic() - revoked_at < 1.0
            loaded = x509_ocsp.load_der_ocsp_response(der)
            assert loaded.revocation_reason is x509.ReasonFlags.superseded
        # A certificate issued while the servers run is answered from memory soon after.
        fresh = issue(pki.services, "admin-client")
        issued_at = time.monotonic()
        path = pki.get_path(fresh)
        presigned = store.stored_response(pki.services.db, pki.ca_id(), fresh.serial_number)
        assert presigned is not None
        for server in servers:
            while True:
                _, _, der = fetch(server, "GET", f"/ocsp/{path}")
                if der == presigned.der:
                    break  # the pre-signed answer (before: signed live)
                assert time.monotonic() - issued_at < 1.0
                time.sleep(0.02)
            assert status_of(der) is x509_ocsp.OCSPCertStatus.GOOD


def _nonce_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A request as cryptography writes it: one SHA-1 CertID and a 16-octet nonce."""
    sha1 = hashes.SHA1()  # noqa: S303 - the CertID hash RFC 5019 clients send
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, sha1)
    builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _pass_the_lint_gate(responder: Responder, request: bytes) -> None:
    """Have the lint gate pass the shape of ``request``'s answer: its first answer is linted
    and signed in the thread pool (here: at once), the later ones on the loop."""
    job = responder.prepare(request)
    if callable(job):
        assert job().startswith(b"\x30"), "the first answer of the shape was not signed"


def _signed_by(der: bytes) -> bytes | None:
    """The responder key hash (responderID byKey) of a successful answer, None if
    unsuccessful; ``_verify_with`` checks the signature."""
    loaded = x509_ocsp.load_der_ocsp_response(der)
    if loaded.response_status is not x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        return None
    return loaded.responder_key_hash


def _wait_for(what: str, check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def _verify_with(der: bytes, responder: x509.Certificate) -> None:
    loaded = x509_ocsp.load_der_ocsp_response(der)
    public = responder.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(loaded.signature, loaded.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


def _new_ca_with_a_device(
    services: Services, name: str, dns: str
) -> tuple[x509.Certificate, x509.Certificate]:
    """A new issuing CA under the root, with its responder, and one device certificate."""
    create_issuing(services.ca, name, "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR)
    ensure_responders(services, services.clock())
    services.registry.invalidate()
    leaf = services.ca.issue(
        IssueRequest(
            ca=name,
            profile="device",
            subject=x509.Name.from_rfc4514_string(f"CN={dns}"),
            public_key=generate_private_key(KeyType.EC_P256).public_key(),
            sans=(SanEntry("dns", dns),),
        ),
        TEST_ACTOR,
    )
    return ca_cert(services, name), leaf


def test_server_follows_rotated_responders_new_cas_and_cas_taken_offline(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """The standalone server reloads who signs: after a responder rotation its live answers
    are signed by the new responder (the old one's certificate expires about ten days after
    rotation); a CA created while it runs is served; a CA taken offline no longer is."""
    services = pki.services
    with running(data_dir, tmp_path, "--poll", "0.1", "--issuers-every", "0.3") as server:
        ca_id = pki.ca_id()
        before = store.load_issuers(services)[ca_id]
        first = fetch(server, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)[2]
        assert _signed_by(first) == before.responder_key_id
        _verify_with(first, before.responder_certificate)

        ensure_responders(services, services.clock(), rotate=True)
        after = store.load_issuers(services)[ca_id]
        assert after.responder_key_id != before.responder_key_id
        answers: list[bytes] = []

        def rotated() -> bool:
            answers.append(
                fetch(server, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)[2]
            )
            return _signed_by(answers[-1]) == after.responder_key_id

        _wait_for("the rotated responder signs", rotated)
        _verify_with(answers[-1], after.responder_certificate)
        assert status_of(answers[-1]) is x509_ocsp.OCSPCertStatus.GOOD

        # A CA created while the server runs: its pre-signed answers are served.
        extra_ca, leaf = _new_ca_with_a_device(services, "extra", "dev.example.com")
        extra_id = next(
            i for i, x in store.load_issuers(services).items() if x.certificate == extra_ca
        )
        extra_path = base64.b64encode(
            rfc5019_request(store.load_issuers(services)[extra_id], leaf.serial_number)
        ).decode()
        extra_stored = store.stored_response(services.db, extra_id, leaf.serial_number)
        assert extra_stored is not None
        _wait_for(
            "the new CA's stored answer is served",
            lambda: fetch(server, "GET", f"/ocsp/{extra_path}")[2] == extra_stored.der,
        )
        assert status_of(fetch(server, "GET", f"/ocsp/{extra_path}")[2]) is (
            x509_ocsp.OCSPCertStatus.GOOD
        )

        # The CA taken offline (as `sekisho ca offline` records it): no longer served.
        with services.db.scope() as session:
            ca_row(session, "extra").key_online = False
        unauthorized = bytes.fromhex("3003 0a01 06")
        _wait_for(
            "the offline CA is no longer served",
            lambda: (
                fetch(server, "POST", "/ocsp", _nonce_request(leaf, extra_ca), OCSP_CT)[2]
                == unauthorized
            ),
        )
        assert fetch(server, "GET", f"/ocsp/{extra_path}")[2] == unauthorized
        # The other CA is still answered, by its current responder.
        last = fetch(server, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)[2]
        assert _signed_by(last) == after.responder_key_id
        healthy(server)


def _log_records(server: ServerProc, message: str) -> list[dict[str, object]]:
    """The server's JSON log records with this message."""
    records = []
    for line in server.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("msg") == message:
                records.append(doc)
    return records


def test_a_signer_that_cannot_be_loaded_stops_only_its_own_ca(
    pki: Pki, data_dir: Path, tmp_path: Path, settings: Settings
) -> None:
    """Both issuing CAs rotate their responders; the device CA's new key reaches the server,
    the admin CA's does not. The server picks up the device CA's new responder; the admin CA
    keeps its last good responder until that one is revoked, then its live answers are
    tryLater while its pre-signed answers are still served. Each trouble is logged once."""
    services = pki.services
    # Keys generated from here on land in a copy of the key store the server does not read:
    # a responder key on a token the OCSP host cannot reach.
    elsewhere = tmp_path / "elsewhere-keys"
    shutil.copytree(settings.keys_dir, elsewhere)
    passphrase = read_secret(settings.passphrase_path, settings.key_passphrase_env)
    other = build_services(settings, backend=SoftwareBackend(elsewhere, passphrase))
    admin_id = pki.ca_id()
    device_ca = ca_cert(services, "device")
    device_leaf = issue(services, "device")
    before = store.load_issuers(services)
    device_id = next(i for i, x in before.items() if x.certificate == device_ca)
    good_path = pki.get_path(pki.good)
    stored_good = {(r.issuer_id, r.serial): r for r in store.snapshot(services.db)[0]}[
        (admin_id, pki.good.serial_number)
    ]

    def admin_live() -> bytes:
        return fetch(server, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)[2]

    def device_live() -> bytes:
        return fetch(server, "POST", "/ocsp", _nonce_request(device_leaf, device_ca), OCSP_CT)[2]

    try:
        with running(data_dir, tmp_path, "--poll", "0.1", "--issuers-every", "0.3") as server:
            assert _signed_by(admin_live()) == before[admin_id].responder_key_id

            ensure_responders(other, other.clock(), rotate=True)
            rotated = active_responders(other)
            label = rotated[device_id].key_ref.removeprefix("file:")
            shutil.copy2(elsewhere / f"{label}.key", settings.keys_dir / f"{label}.key")
            device_responder = x509.load_der_x509_certificate(rotated[device_id].certificate_der)
            device_key_id = x509.SubjectKeyIdentifier.from_public_key(
                device_responder.public_key()
            ).digest
            assert device_key_id != before[device_id].responder_key_id

            _wait_for(
                "the device CA's rotated responder signs",
                lambda: _signed_by(device_live()) == device_key_id,
            )
            _verify_with(device_live(), device_responder)
            # The admin CA's new key is out of reach: its last good responder signs on.
            answer = admin_live()
            assert _signed_by(answer) == before[admin_id].responder_key_id
            _verify_with(answer, before[admin_id].responder_certificate)
            assert status_of(answer) is x509_ocsp.OCSPCertStatus.GOOD

            # That responder's certificate revoked: it signs no more, whatever else is known.
            other.revoker.revoke(
                "admin",
                before[admin_id].responder_certificate.serial_number,
                Reason.KEY_COMPROMISE,
                TEST_ACTOR,
            )
            _wait_for("the revoked responder stops signing", lambda: admin_live() == TRY_LATER)
            status, headers, body = fetch(server, "GET", f"/ocsp/{good_path}")
            assert status == 200 and body == stored_good.der  # pre-signed: still served
            assert "public" in headers["cache-control"]
            assert _signed_by(device_live()) == device_key_id
            healthy(server)
            time.sleep(1.0)  # a few more reloads: nothing more to report
        # A server started now never had a signer for the admin CA: it serves the others.
        with running(data_dir, tmp_path) as restarted:
            answer = fetch(restarted, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)
            assert answer[2] == UNAUTHORIZED
            answer = fetch(
                restarted, "POST", "/ocsp", _nonce_request(device_leaf, device_ca), OCSP_CT
            )
            assert _signed_by(answer[2]) == device_key_id
        (not_served,) = _log_records(restarted, "OCSP signer of a CA unavailable")
        assert not_served["ca_id"] == admin_id and "not served" in str(not_served["action"])
    finally:
        other.close()
    troubles = [
        r for r in _log_records(server, "OCSP signer of a CA unavailable") if r["ca_id"] == admin_id
    ]
    assert len(troubles) == 2, troubles  # once per streak, not once per reload
    assert "is not in the online store" in str(troubles[0]["detail"])
    assert "last good responder" in str(troubles[0]["action"])
    assert "revoked" in str(troubles[1]["detail"])
    assert "tryLater" in str(troubles[1]["action"])
    assert troubles[0]["ca"] == pki.ca.subject.rfc4514_string()
    assert passphrase.decode() not in server.log.read_text()


def test_revoking_the_active_responder_puts_its_successor_to_work(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """The admin CA's active responder is revoked with the CLI, while the server runs. The CLI
    replaces it before it returns; the server's live answers are signed by the successor from
    its next poll on, with no issuer reload due for an hour (before: tryLater until the next
    reload, and before that for good), and its pre-signed answers once the refresher has
    re-signed what the revoked responder signed."""
    from sekisho.workers import OcspRefresher

    services = pki.services
    revoked = pki.issuer()
    stored_good = {(r.issuer_id, r.serial): r.der for r in store.snapshot(services.db)[0]}[
        (pki.ca_id(), pki.good.serial_number)
    ]
    assert _signed_by(stored_good) == revoked.responder_key_id
    good_path = pki.get_path(pki.good)

    def live() -> bytes:
        return fetch(server, "POST", "/ocsp", _nonce_request(pki.good, pki.ca), OCSP_CT)[2]

    with running(data_dir, tmp_path, "--poll", "0.1", "--issuers-every", "3600") as server:
        assert _signed_by(live()) == revoked.responder_key_id
        cli = [
            sys.executable, "-c", "import sys; from sekisho.cli import main; sys.exit(main())",
            "--data-dir", str(data_dir), "revoke", "--ca", "admin",
            f"{revoked.responder_certificate.serial_number:x}", "--reason", "key_compromise",
        ]  # fmt: skip
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        successor = pki.issuer()  # the active responder now
        assert successor.responder_key_id != revoked.responder_key_id
        answers: list[bytes] = []

        def signed_by_successor() -> bool:
            answers.append(live())
            return _signed_by(answers[-1]) == successor.responder_key_id

        _wait_for("the successor signs live answers", signed_by_successor, seconds=5.0)
        # Until the server's next poll the revoked responder may still sign; then tryLater
        # until a poll finds the successor; never back again.
        phases = [
            0 if _signed_by(a) == revoked.responder_key_id else 1 if a == TRY_LATER else 2
            for a in answers
        ]
        assert phases == sorted(phases), phases
        _verify_with(answers[-1], successor.responder_certificate)
        assert status_of(answers[-1]) is x509_ocsp.OCSPCertStatus.GOOD

        OcspRefresher(services).run_once(services.clock())
        _wait_for(
            "the re-signed answer is served",
            lambda: (
                _signed_by(fetch(server, "GET", f"/ocsp/{good_path}")[2])
                == successor.responder_key_id
            ),
        )
        body = fetch(server, "GET", f"/ocsp/{good_path}")[2]
        _verify_with(body, successor.responder_certificate)
        assert (
            body
            == {(r.issuer_id, r.serial): r.der for r in store.snapshot(services.db)[0]}[
                (pki.ca_id(), pki.good.serial_number)
            ]
        )
        healthy(server)


BIG_CA_RESPONSES = 20_000


def _kind(body: bytes, presigned: bytes) -> str:
    """unauthorized, pre-signed (the stored bytes), live (signed now) or other."""
    if body == UNAUTHORIZED:
        return "unauthorized"
    if body == presigned:
        return "pre-signed"
    if _signed_by(body) is not None:
        return "live" if status_of(body) is x509_ocsp.OCSPCertStatus.GOOD else "other"
    return "other"


def test_other_cas_are_answered_while_a_big_ca_is_loaded(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """A CA with many stored responses comes into service while the server runs. Its
    responses are read and made into entries off the event loop, then swapped in a bounded
    step at a time: meanwhile the other CAs' requests are answered, and the new CA's own are
    signed live from the database, until its pre-signed answers are in memory."""
    services = pki.services
    big_ca, probe = _new_ca_with_a_device(services, "big", "probe.example.com")
    big_id, big = next(
        (i, x) for i, x in store.load_issuers(services).items() if x.certificate == big_ca
    )
    # A CA with a history: many more stored responses, signed by its responder an hour ago.
    written = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    expires = written + dt.timedelta(hours=72)
    rows = [
        {
            "issuer_id": big_id,
            "serial": serial_hex(serial),
            "der": core.precompute(big, serial, core.GOOD, written, expires),
            "cert_status": "good",
            "status_epoch": 0,
            "this_update": written,
            "next_update": expires,
            "updated_at": written,
        }
        for serial in range(1 << 100, (1 << 100) + BIG_CA_RESPONSES)
    ]
    with services.db.scope() as session:
        session.execute(insert(OcspResponse), rows)
        ca_row(session, "big").active = False  # it comes into service once the server runs
    big_path = base64.b64encode(rfc5019_request(big, probe.serial_number)).decode()
    admin_path = pki.get_path(pki.good)
    stored = {(r.issuer_id, r.serial): r.der for r in store.snapshot(services.db)[0]}
    admin_der = stored[(pki.ca_id(), pki.good.serial_number)]
    assert stored[(big_id, probe.serial_number)]

    with running(data_dir, tmp_path, "--poll", "0.1", "--issuers-every", "0.3") as server:
        assert fetch(server, "GET", f"/ocsp/{big_path}")[2] == UNAUTHORIZED
        with services.db.scope() as session:
            ca_row(session, "big").active = True
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + 60
        while ("big", "pre-signed") not in seen:
            assert time.monotonic() < deadline, f"the new CA is not served: {seen[-4:]}"
            _, _, body = fetch(server, "GET", f"/ocsp/{big_path}")
            seen.append(("big", _kind(body, stored[(big_id, probe.serial_number)])))
            status, _, body = fetch(server, "GET", f"/ocsp/{admin_path}")
            seen.append(("admin", "pre-signed" if status == 200 and body == admin_der else "other"))
        assert fetch(server, "GET", f"/ocsp/{big_path}")[2] == stored[(big_id, probe.serial_number)]
        healthy(server)
    order = ["unauthorized", "live", "pre-signed"]
    big_kinds = [kind for who, kind in seen if who == "big"]
    assert big_kinds == sorted(big_kinds, key=order.index), big_kinds  # never back
    # Served (signed live from the database) as soon as it is known, while its stored
    # responses are being loaded ...
    assert "live" in big_kinds, big_kinds
    # ... and the other CA answered all along, also while that load went on.
    loading = [kind for who, kind in seen[seen.index(("big", "live")) :] if who == "admin"]
    assert len(loading) >= 3, seen
    assert {kind for who, kind in seen if who == "admin"} == {"pre-signed"}


def _raw(server: ServerProc, data: bytes, *, wait: float = 5.0) -> tuple[bytes, float, bool]:
    """Send ``data``, read until the server closes or ``wait`` passes:
    (bytes received, seconds taken, whether the server closed)."""
    start = time.monotonic()
    received = b""
    closed = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(data)
        sock.settimeout(wait)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return received, time.monotonic() - start, closed


def _post(body: bytes, content_type: str = "application/ocsp-request", close: bool = True) -> bytes:
    head = (
        f"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{'Connection: close' if close else ''}\r\n\r\n"
    )
    return head.replace("\r\n\r\n\r\n", "\r\n\r\n").encode() + body


def _nested(depth: int) -> bytes:
    """``depth`` SEQUENCEs inside one another, proper DER (minimal lengths)."""
    data = b""
    for _ in range(depth):
        n = len(data)
        length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        if n >= 0x80:
            length += n.to_bytes((n.bit_length() + 7) // 8, "big")
        data = b"\x30" + length + data
    return data


def _body(reply: bytes) -> bytes:
    return reply.split(b"\r\n\r\n", 1)[1]


def test_hostile_input(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    good_request = base64.b64decode(pki.get_path(pki.good))
    nested = {depth: _nested(depth) for depth in (1_000, 10_000)}
    with running(data_dir, tmp_path, "--request-timeout", "1.5") as server:
        # Malformed OCSP in a well-formed HTTP request: HTTP 200 + malformedRequest, fast.
        for body in (b"", good_request[:-3], *nested.values(), b"\x30\x03\x02\x01"):
            reply, took, _ = _raw(server, _post(body))
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
            assert _body(reply) == MALFORMED and took < 2.0
            healthy(server)
        # Bad base64 in GET: 400 with the malformedRequest answer, as on the web app.
        for path in ("/ocsp/%%%", "/ocsp/abc$", "/ocsp/" + "A" * 5):
            status, headers, body = fetch(server, "GET", path)
            assert status == 400 and body == MALFORMED, path
            assert headers["cache-control"] == "no-store"
        # 10 MB body: 413 from Content-Length alone, without reading it, connection closed.
        head = b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
        reply, took, closed = _raw(
            server, head + b"Content-Length: 10485760\r\n\r\n" + b"0" * 65536
        )
        assert reply.startswith(b"HTTP/1.1 413 ") and closed and took < 2.0, reply[:200]
        healthy(server)
        # Wrong content type: 415; no Content-Length: 411; chunked: 501; other method: 405.
        reply, _, closed = _raw(server, _post(good_request, "application/octet-stream"))
        assert reply.startswith(b"HTTP/1.1 415 ") and closed
        reply, _, _ = _raw(server, head + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 411 ")
        reply, _, _ = _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 501 ")
        reply, _, _ = _raw(server, b"DELETE /ocsp HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 405 ")
        # Unknown path: 404; garbage request line: 400; head over 8 KiB: 431.
        assert fetch(server, "GET", "/nope")[0] == 404
        reply, _, closed = _raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ") and closed
        reply, took, closed = _raw(server, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000)
        assert reply.startswith(b"HTTP/1.1 431 ") and closed and took < 2.0
        healthy(server)
        # Slow sender: half a request, then silence: 408 and closed after the timeout.
        reply, took, closed = _raw(server, head + b"Content-Length: 100\r\n\r\nabc", wait=8.0)
        assert reply.startswith(b"HTTP/1.1 408 ") and closed and 1.0 < took < 4.0
        reply, took, closed = _raw(server, b"GET /ocsp/MEIw", wait=8.0)
        assert reply.startswith(b"HTTP/1.1 408 ") and closed and took < 4.0
        healthy(server)
        # Still answering real clients.
        out = openssl_ask(pki, server, "-cert", str(pki.dir / "revoked.pem"))
        assert "Reason: keyCompromise" in out


def test_store_outage_answers_try_later(pki: Pki) -> None:
    """A serial not in memory needs the database; when that fails: tryLater, never good."""
    issuers = store.load_issuers(pki.services)
    index = ResponseIndex(issuers)

    def down(_issuer: core.Issuer, _serial: int) -> core.Status:
        raise StoreError("database unreachable")

    responder = Responder(index, down, validity=dt.timedelta(hours=24))
    request = rfc5019_request(pki.issuer(), pki.good.serial_number)
    assert responder.cached(request, time.time()) is None
    job = responder.prepare(request)
    assert callable(job) and job() == TRY_LATER
    # With the stored responses in memory the same request is answered from them.
    index.apply(store.snapshot(pki.services.db)[0])
    entry = responder.cached(request, time.time())
    assert entry is not None and status_of(entry[DER]) is x509_ocsp.OCSPCertStatus.GOOD
    # An expired stored response is not served as is: re-signed from the stored status.
    assert responder.cached(request, entry[NEXT_UPDATE_TS] + 1) is None
    nonce_request = (
        x509_ocsp.OCSPRequestBuilder()
        .add_certificate(pki.revoked, pki.ca, hashes.SHA1())  # noqa: S303
        .add_extension(x509.OCSPNonce(b"n" * 16), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    _pass_the_lint_gate(responder, nonce_request)
    answer = responder.prepare(nonce_request)
    assert isinstance(answer, bytes)  # no database needed: status in memory
    assert status_of(answer) is x509_ocsp.OCSPCertStatus.REVOKED
    # Not following the store: the held status is vouched for until its stored nextUpdate.
    held = index.by_serial[pki.ca_id()][pki.revoked.serial_number]
    parsed = x509_ocsp.load_der_ocsp_response(answer)
    assert parsed.next_update_utc is not None and parsed.next_update_utc <= held[NEXT_UPDATE]
    # Less than the minimum validity (8 h) left: the database must answer, and it is down.
    serial = pki.revoked.serial_number
    soon = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
    signed = soon - dt.timedelta(hours=72)
    der = core.precompute(pki.issuer(), serial, index.status(held), signed, soon)
    assert index.apply([store.StoredResponse(pki.ca_id(), serial, der, signed, soon, signed)])
    job = responder.prepare(nonce_request)
    assert callable(job) and job() == TRY_LATER
    # While the index follows the store, its statuses are current: the full validity.
    responder.store_fresh = lambda: True
    answer = responder.prepare(nonce_request)
    assert isinstance(answer, bytes)
    parsed = x509_ocsp.load_der_ocsp_response(answer)
    assert parsed.next_update_utc is not None and parsed.this_update_utc is not None
    assert parsed.next_update_utc - parsed.this_update_utc == dt.timedelta(hours=24)


class _TokenKey(ec.EllipticCurvePrivateKey):
    """A PKCS#11 token's key, as far as the server can tell (its class lives in hsm.pkcs11):
    each signature is a call into the token, which may take long (a network HSM, a
    re-initialisation after a device error)."""

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        self.inner = inner
        self.signed_on: list[str] = []

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        self.signed_on.append(threading.current_thread().name)
        return self.inner.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.inner.curve

    @property
    def key_size(self) -> int:
        return self.inner.key_size

    def exchange(self, *args: Any) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, *args: Any) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> _TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenKey:
        return self


_TokenKey.__module__ = "hsm.pkcs11"


def test_a_token_key_signs_held_statuses_off_the_loop(pki: Pki) -> None:
    """An answer from a status held in memory (a nonce) is signed on the loop only with
    ``cryptography``'s own EC or EdDSA keys; a token's key signs in the thread pool, so that
    a slow signature does not hold up every other answer (pre-signed ones, /healthz)."""
    loaded = store.load_issuers(pki.services)
    key = _TokenKey(cast(ec.EllipticCurvePrivateKey, loaded[pki.ca_id()].key))
    ca_id = pki.ca_id()
    issuers = dict(loaded)
    issuers[ca_id] = dataclasses.replace(loaded[ca_id], key=key, verify_each=True)
    index = ResponseIndex(issuers)
    index.apply(store.snapshot(pki.services.db)[0])
    responder = Responder(index, None, validity=dt.timedelta(hours=24))
    responder.store_fresh = lambda: True
    job = responder.prepare(_nonce_request(pki.revoked, pki.ca))
    assert callable(job) and key.signed_on == []  # nothing signed on the loop
    assert status_of(job()) is x509_ocsp.OCSPCertStatus.REVOKED
    # cryptography's own key: signed at once, on the loop.
    responder = Responder(ResponseIndex(loaded), None, validity=dt.timedelta(hours=24))
    responder.index.apply(store.snapshot(pki.services.db)[0])
    responder.store_fresh = lambda: True
    assert isinstance(responder.prepare(_nonce_request(pki.revoked, pki.ca)), bytes)


def test_an_answer_whose_shape_the_lint_gate_has_not_passed_is_signed_off_the_loop(
    pki: Pki,
) -> None:
    """The first answer of a shape is linted by pkilint (milliseconds; its import 0.3 s the
    first time): in the thread pool, not on the loop. Once the shape passed, answers of that
    shape with cryptography's own key are signed on the loop again."""
    loaded = store.load_issuers(pki.services)
    assert all(issuer.lint is not None and not issuer.linted for issuer in loaded.values())
    responder = Responder(ResponseIndex(loaded), None, validity=dt.timedelta(hours=24))
    responder.index.apply(store.snapshot(pki.services.db)[0])
    responder.store_fresh = lambda: True
    job = responder.prepare(_nonce_request(pki.revoked, pki.ca))
    assert callable(job), "linted on the loop"
    assert status_of(job()) is x509_ocsp.OCSPCertStatus.REVOKED
    assert len(loaded[pki.ca_id()].linted) == 1
    answered = responder.prepare(_nonce_request(pki.revoked, pki.ca))
    assert isinstance(answered, bytes)
    assert status_of(answered) is x509_ocsp.OCSPCertStatus.REVOKED
    assert callable(responder.prepare(_nonce_request(pki.good, pki.ca))), "another shape"


def test_index_takes_a_snapshot_in_bounded_steps(pki: Pki) -> None:
    """A CA's entries built off the loop are installed with its statuses at once and its
    request keys ``CHUNK`` at a time; an answer applied between two steps is not overwritten
    by the older snapshot. A CA dropped stops being looked up at once; its keys go step by
    step, all of them."""
    services = pki.services
    issuers = store.load_issuers(services)
    admin_id = pki.ca_id()
    admin = issuers[admin_id]
    others = {i: x for i, x in issuers.items() if i != admin_id}
    rows = store.snapshot(services.db)[0]
    index = ResponseIndex(others)
    index.apply(rows)
    held_before = (len(index), len(index.by_request), len(index.by_cert_id))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    later = now + dt.timedelta(hours=72)
    serials = range(1 << 90, (1 << 90) + CHUNK * 5 // 2)
    synthetic = [
        store.StoredResponse(
            admin_id, s, core.precompute(admin, s, core.GOOD, now, later), now, later, now
        )
        for s in serials
    ]
    admin_rows = [r for r in rows if r.issuer_id == admin_id] + synthetic

    assert list(index.set_issuers(issuers)) == []  # a new CA: nothing to drop
    assert index.apply(admin_rows[:1]) == 0  # its snapshot is not installed: skipped
    building = EntryBuilder(admin_id, admin)
    building.add(admin_rows)
    steps = index.install(building.done())
    last = serials[-1]
    last_request = rfc5019_request(admin, last)
    held = index.entry(admin, last)
    assert held is not None and held[DER] == synthetic[-1].der  # statuses: at once
    assert last_request not in index.by_request  # request keys: step by step
    next(steps)
    revoked = core.Revoked(now, x509.ReasonFlags.key_compromise)
    newer = store.StoredResponse(
        admin_id, last, core.precompute(admin, last, revoked, now, later), now, later, now
    )
    assert index.apply([newer]) == 1  # between two steps, as the follower's batches come
    assert sum(1 for _ in steps) >= 1
    assert index.by_request[last_request][DER] == newer.der
    assert status_of(index.by_request[last_request][DER]) is x509_ocsp.OCSPCertStatus.REVOKED
    sha256_id = admin.cert_id(last, "sha256").der
    assert index.by_cert_id[sha256_id][1][DER] == newer.der
    assert all(rfc5019_request(admin, s) in index.by_request for s in serials)
    assert len(index) == held_before[0] + len(admin_rows)

    steps = index.set_issuers(others)
    assert index.entry(admin, last) is None  # no longer served: at once
    assert sum(1 for _ in steps) >= 2
    assert (len(index), len(index.by_request), len(index.by_cert_id)) == held_before
    assert all(e[ISSUER_ID] != admin_id for e in index.by_request.values())


def _signed_rows(
    issuer_id: int, issuer: core.Issuer, serials: range, at: dt.datetime
) -> list[store.StoredResponse]:
    """Stored responses of ``serials`` signed at ``at`` (a later ``at``: other bytes)."""
    later = at + dt.timedelta(hours=72)
    return [
        store.StoredResponse(
            issuer_id, s, core.precompute(issuer, s, core.GOOD, at, later), at, later, at
        )
        for s in serials
    ]


def test_the_stores_changes_are_made_into_entries_off_the_loop(pki: Pki) -> None:
    """A mass re-sign reaches the follower as one big batch: the follower thread makes it into
    entries and the loop applies them ``CHUNK`` per step, going round (answering requests)
    between two steps; before, the whole batch was made into entries and applied in one
    callback."""
    services = pki.services
    admin_id = pki.ca_id()
    admin = pki.issuer()
    index, cursor = initial_index(store.load_issuers(services), lambda: store.snapshot(services.db))
    serials = range(1 << 90, (1 << 90) + CHUNK * 5 // 2)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    assert index.apply(_signed_rows(admin_id, admin, serials, now - dt.timedelta(hours=1)))
    resigned = _signed_rows(admin_id, admin, serials, now)
    new_der = {r.serial: r.der for r in resigned}
    pending = [resigned]

    def changes(since: object) -> tuple[list[store.StoredResponse], object]:
        return (pending.pop() if pending else []), since

    responder = Responder(index, None)
    server = Server(responder, changes_since=changes, cursor=cursor, poll=0.02)
    requests = {s: rfc5019_request(admin, s) for s in serials}

    async def watch() -> list[int]:
        seen = []
        while True:
            held = index.by_serial[admin_id]
            applied = sum(1 for s in serials if held[s][DER] == new_der[s])
            seen.append(applied)
            # Every request is answered from memory meanwhile, by the old or the new answer.
            answered = {s: responder.cached(requests[s], time.time()) for s in serials}
            assert all(e is not None and e is held[s] for s, e in answered.items())
            if applied == len(serials):
                return seen
            await asyncio.sleep(0)

    with following(server) as loop:
        seen = loop.run_until_complete(asyncio.wait_for(watch(), 60))
    steps = [b - a for a, b in itertools.pairwise(seen) if b != a]
    assert len(steps) >= 3 and max(steps) <= CHUNK, steps  # the loop went round in between


def test_changes_are_applied_in_the_order_the_store_gave_them(pki: Pki) -> None:
    """Batches handed over one after the other are applied one after the other, even when the
    first takes several steps: a change that came later is never overwritten by an earlier
    one. A CA's snapshot installed while a batch is being applied wins over the rest of it."""
    services = pki.services
    admin_id = pki.ca_id()
    admin = pki.issuer()
    index, _ = initial_index(store.load_issuers(services), lambda: store.snapshot(services.db))
    serials = range(1 << 91, (1 << 91) + CHUNK * 5 // 2)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def built(rows: list[store.StoredResponse]) -> CaEntries:
        building = EntryBuilder(admin_id, admin)
        building.add(rows)
        return building.done()

    older = _signed_rows(admin_id, admin, serials, now - dt.timedelta(minutes=2))
    newer = _signed_rows(admin_id, admin, serials[-1:], now - dt.timedelta(minutes=1))
    server = Server(Responder(index, None))

    async def settled() -> None:
        for _ in range(10 * len(serials)):
            if not server.updates:
                break
            await asyncio.sleep(0)
        for _ in range(10):  # and the steps of an install
            await asyncio.sleep(0)

    with following(server) as loop:  # no store to follow: the loop is the server's
        loop.call_soon(server.update, [built(older)])
        loop.call_soon(server.update, [built(newer)])
        loop.run_until_complete(settled())
        held = index.by_serial[admin_id]
        assert held[serials[-1]][DER] == newer[0].der
        assert all(held[r.serial][DER] == r.der for r in older[:-1])
        assert index.by_request[rfc5019_request(admin, serials[-1])][DER] == newer[0].der

        # A batch read before the CA's snapshot was read again: the snapshot wins.
        stale = _signed_rows(admin_id, admin, serials, now - dt.timedelta(minutes=3))
        snapshot = _signed_rows(admin_id, admin, serials, now)
        loop.call_soon(server.update, [built(stale)])
        loop.call_soon(
            server.install, built([*store.snapshot(services.db, [admin_id])[0], *snapshot])
        )
        loop.run_until_complete(settled())
        held = index.by_serial[admin_id]
        assert all(held[r.serial][DER] == r.der for r in snapshot)
        assert all(
            index.by_request[rfc5019_request(admin, r.serial)][DER] == r.der for r in snapshot
        )


def test_a_change_read_while_a_snapshot_is_built_is_not_undone_by_it(pki: Pki) -> None:
    """The follower reads the store's changes between two slices of a CA's snapshot and puts
    them into the build; the slices after that were read before those changes and must not
    put the older answers back. Before: a certificate revoked meanwhile (its change in the
    last slice's range) was held with its older "good" answer, and the next poll, seeing the
    same change again, skipped it as handed over already."""
    from ocsp.server import Server, _call_now

    services = pki.services
    admin_id = pki.ca_id()
    admin = pki.issuer()
    index, cursor = initial_index(store.load_issuers(services), lambda: store.snapshot(services.db))
    serials = range(1 << 92, (1 << 92) + CHUNK * 5 // 2)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    read_first = _signed_rows(admin_id, admin, serials, now - dt.timedelta(hours=1))
    later = now + dt.timedelta(hours=72)
    revoked = core.Revoked(now - dt.timedelta(minutes=1), None)
    last = serials[-1]  # in the snapshot's last slice, read before the change
    change = store.StoredResponse(
        admin_id, last, core.precompute(admin, last, revoked, now, later), now, later, now
    )
    polls: list[int] = []

    def changes(since: object) -> tuple[list[store.StoredResponse], object]:
        # One poll during the build, after the first slice, reads the change (the next is
        # due after the build); the one after the build reads it again (windows overlap).
        polls.append(1)
        server.poll = 3600.0
        return [change], since

    server = Server(
        Responder(index, None),
        changes_since=changes,
        cursor=cursor,
        poll=0.0,  # follow the store after the first slice
        snapshot=lambda _ids: list(read_first),
    )
    # The admin CA comes into service: not held yet, its snapshot is read and built.
    server.loaded.pop(admin_id)
    index.by_serial.pop(admin_id)
    loop = asyncio.new_event_loop()
    try:
        server.loop = loop
        assert server._load_responses(admin_id, admin, _call_now, follow=True)
        assert len(polls) == 1  # the change was read before the snapshot's last slice
        server.loaded[admin_id] = admin.certificate  # as _reload_issuers does
        server._follow_store()  # the next poll sees the same change again

        async def settled() -> None:
            for _ in range(100):
                await asyncio.sleep(0)

        loop.run_until_complete(settled())
        entry = index.by_serial[admin_id][last]
        assert entry[DER] == change.der, "the snapshot put the older answer back"
        assert index.by_request[rfc5019_request(admin, last)][DER] == change.der
        assert isinstance(index.status(entry), core.Revoked)
    finally:
        server.close()
        loop.close()


def _held(index: ResponseIndex) -> list[object]:
    """Every entry the index holds, and every (hash, entry) pair of ``by_cert_id``."""
    by_serial = [e for held in index.by_serial.values() for e in held.values()]
    return [*by_serial, *index.by_request.values(), *index.by_cert_id.values()]


def test_the_index_leaves_the_cycle_collector_nothing_to_walk(pki: Pki) -> None:
    """What the index holds is out of the cycle collector's way: the index ``ocsp serve``
    starts with is frozen as it is built, and the entries the store's changes bring later
    (a mass re-sign replaces them all within a day) are plain tuples a young collection stops
    tracking. A full collection walking 10^6 held responses stops the event loop for over a
    second (numbers in docs/decisions.md; no timing here), and would come back as they are
    replaced."""
    import gc

    from ocsp.server import initial_index

    services = pki.services
    index, cursor = initial_index(store.load_issuers(services), lambda: store.snapshot(services.db))
    first = _held(index)
    assert len(index) >= 4 and len(first) == 4 * len(index)
    walked = {id(o) for o in gc.get_objects()}  # every generation a collection walks
    assert not [x for x in first if id(x) in walked]

    store.resign_all(services, services.clock())
    changed, _ = store.changes_since(services.db, cursor)  # type: ignore[arg-type]
    assert index.apply(changed) == len(index)  # every entry replaced
    gc.collect(0)  # a young collection, as one comes every few hundred allocations
    walked = {id(o) for o in gc.get_objects()}
    replaced = _held(index)
    assert not {id(x) for x in replaced} & {id(x) for x in first}
    assert not [x for x in replaced if id(x) in walked]


def test_simple_request_shape_agrees_with_core(pki: Pki) -> None:
    """The fast matcher takes only what ``core.parse_request`` accepts, with the same CertID
    and nonce; mutated requests either fall back (None) or still agree."""
    import random

    from ocsp.index import simple_request

    issuer = pki.issuer()
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(pki.good, pki.ca, hashes.SHA256())
    with_nonce = (
        builder.add_extension(x509.OCSPNonce(b"\x07" * 20), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    plain = rfc5019_request(issuer, pki.good.serial_number)
    for request in (with_nonce, plain):
        cert_id, nonce = simple_request(request) or (b"", b"")
        parsed = core.parse_request(request)
        assert cert_id == parsed.cert_ids[0].der and nonce == parsed.nonce
    critical = (
        x509_ocsp.OCSPRequestBuilder()
        .add_certificate(pki.good, pki.ca, hashes.SHA256())
        .add_extension(x509.OCSPNonce(b"\x07" * 20), critical=True)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert simple_request(critical) is None  # not the simple shape: the core decides
    rng = random.Random(5019)
    for _ in range(3000):
        data = bytearray(with_nonce)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        simple = simple_request(bytes(data))
        if simple is None:
            continue
        try:
            parsed = core.parse_request(bytes(data))
        except core.MalformedRequest:
            # Only acceptable when the CertID is not one we would look up (then the fast
            # path never uses it and the general path answers malformedRequest).
            assert simple[0] not in {
                issuer.cert_id(pki.good.serial_number, h).der for h in ("sha1", "sha256")
            }
            continue
        assert parsed.cert_ids[0].der == simple[0] and parsed.nonce == simple[1]


def test_a_signer_past_its_validity_never_signs(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """The server's clock a month ahead: every responder's certificate (30 days at most) has
    expired. Before the server listens it decides who signs: nobody; live answers are
    tryLater, pre-signed answers are still served."""
    services = pki.services
    loaded, down = store.load_issuers_each(services)
    assert loaded and not down
    index = ResponseIndex(loaded)
    index.apply(store.snapshot(services.db)[0])
    responder = Responder(index, store.lookup(services.db))
    nonce_request = _nonce_request(pki.good, pki.ca)
    _pass_the_lint_gate(responder, nonce_request)
    answer = responder.prepare(nonce_request)
    assert isinstance(answer, bytes) and status_of(answer) is x509_ocsp.OCSPCertStatus.GOOD

    month = 31 * 24 * 3600.0
    server = Server(
        responder,
        load_issuers=lambda: store.load_issuers_each(services),
        refused_signers=lambda issuers: store.refused_signers(services.db, issuers),
        clock=lambda: time.time() + month,
    )
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("WARNING", logger="ocsp.server"):
            server.start_follower(loop)
    finally:
        server.close()
        loop.close()
    assert responder.prepare(nonce_request) == TRY_LATER
    unknown = (
        x509_ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(
            pki.issuer().name_hashes["sha1"],
            pki.issuer().key_hashes["sha1"],
            0x1234567890ABCDEF,
            hashes.SHA1(),  # noqa: S303 - the CertID hash RFC 5019 clients send
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert responder.prepare(unknown) == TRY_LATER  # not even from the database
    request = rfc5019_request(pki.issuer(), pki.good.serial_number)
    entry = responder.cached(request, time.time())
    assert entry is not None and status_of(entry[DER]) is x509_ocsp.OCSPCertStatus.GOOD
    troubles = [r for r in caplog.records if r.getMessage() == "OCSP signer of a CA unavailable"]
    assert {getattr(r, "ca_id", None) for r in troubles} == set(loaded)
    assert all("its certificate expired at" in getattr(r, "detail", "") for r in troubles)


def test_a_revoked_responder_stops_signing_at_the_next_poll(pki: Pki) -> None:
    """The admin CA's responder is revoked (by another process, say) long before the server's
    next issuer reload: from the follower's next poll on, no live answer is signed with it,
    and from the poll that finds its successor in the store on, the successor signs them
    (tryLater in between). Before: the revoked responder signed nonce answers until that
    reload (10 s by default); then tryLater until the reload after the replacement."""
    services = pki.services
    loaded, _ = store.load_issuers_each(services)
    index, cursor = initial_index(loaded, lambda: store.snapshot(services.db))
    responder = Responder(index, store.lookup(services.db))
    revoked = pki.issuer()
    nonce_request = _nonce_request(pki.good, pki.ca)

    def changes(since: object) -> tuple[list[store.StoredResponse], object]:
        assert isinstance(since, store.FollowCursor)
        return store.changes_since(services.db, since)

    server = Server(
        responder,
        changes_since=changes,
        cursor=cursor,
        poll=0.05,
        load_issuers=lambda: store.load_issuers_each(services),
        refused_signers=lambda issuers: store.refused_signers(services.db, issuers),
        chosen_responders=lambda ids: store.chosen_responders(services.db, ids),
        issuers_every=3600.0,
    )

    def live() -> bytes:
        answer = responder.prepare(nonce_request)
        return answer if isinstance(answer, bytes) else answer()

    async def until(done: Callable[[bytes], bool]) -> list[bytes]:
        answers = [live()]
        for _ in range(500):
            if done(answers[-1]):
                break
            await asyncio.sleep(0.01)
            answers.append(live())
        return answers

    bare = Revoker(services.db, services.journal, services.clock)  # its successor: later
    with following(server) as loop:
        assert _signed_by(live()) == revoked.responder_key_id
        bare.revoke(
            "admin", revoked.responder_certificate.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
        )
        withheld = loop.run_until_complete(until(lambda a: a == TRY_LATER))
        assert withheld[-1] == TRY_LATER, "signed live by the revoked responder"
        assert {_signed_by(a) for a in withheld[:-1]} <= {revoked.responder_key_id}
        request = rfc5019_request(revoked, pki.good.serial_number)
        assert responder.cached(request, time.time()) is not None  # pre-signed: still served

        replace_revoked_responders(services, services.clock(), ca_id=pki.ca_id())
        successor = pki.issuer()
        assert successor.responder_key_id != revoked.responder_key_id
        after = loop.run_until_complete(
            until(lambda a: _signed_by(a) == successor.responder_key_id)
        )
    assert _signed_by(after[-1]) == successor.responder_key_id, "not within 5 s"
    assert set(after[:-1]) <= {TRY_LATER}
    _verify_with(after[-1], successor.responder_certificate)


def test_follower_failure_marks_the_index_stale() -> None:
    """The server's follower thread: while ``changes_since`` fails the index is not "fresh"
    (held statuses fall back to their stored nextUpdate); once it works again it is."""
    outage = {"down": True}

    def changes(cursor: object) -> tuple[list[store.StoredResponse], object]:
        if outage["down"]:
            raise StoreError("database unreachable")
        return [], cursor

    server = Server(Responder(ResponseIndex({}), None), changes_since=changes, poll=0.05)
    with following(server):
        deadline = time.monotonic() + 5
        while server.store_ok and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.store_ok and not server.responder.store_fresh()
        assert json.loads(server.health())["store"] == "unreachable"
        outage["down"] = False
        deadline = time.monotonic() + 5
        while not server.responder.store_fresh() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.responder.store_fresh()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_is_throttled(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    """Pipelined requests from a client that never reads its answers: the server stops reading
    from it (back-pressure) instead of buffering answers without bound, and keeps serving
    everyone else."""
    request = f"GET /ocsp/{pki.get_path(pki.good)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with running(data_dir, tmp_path) as server:
        healthy(server)
        before = _rss_kib(server.proc.pid)
        sent = 0
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            chunk = request * 256
            deadline = time.monotonic() + 20
            stalled_since: float | None = None
            # Push until the server stops taking requests for a second (or 200 MB: a fail).
            while time.monotonic() < deadline and sent < 200 * 1024 * 1024:
                try:
                    sent += sock.send(chunk)
                    stalled_since = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled_since = stalled_since or now
                    if now - stalled_since > 1.0:
                        break
                    time.sleep(0.01)
            assert stalled_since is not None, f"the server kept reading ({sent} bytes)"
            # Answers to what it read are at most ~10x the requests; it stopped well short.
            grown = _rss_kib(server.proc.pid) - before
            assert grown < 64 * 1024, f"server grew {grown} KiB for {sent} bytes sent"
            healthy(server)  # others are still served while that client hangs
        healthy(server)


def _following_server(services: Services) -> tuple[Server, Responder]:
    """A server over ``services``' store, its follower polling every 20 ms."""
    loaded, _ = store.load_issuers_each(services)
    index, cursor = initial_index(loaded, lambda: store.snapshot(services.db))
    responder = Responder(index, store.lookup(services.db))
    server = Server(
        responder,
        changes_since=lambda since: store.changes_since(services.db, since),  # type: ignore[arg-type]
        cursor=cursor,
        poll=0.02,
        load_issuers=lambda: store.load_issuers_each(services),
        refused_signers=lambda issuers: store.refused_signers(services.db, issuers),
        chosen_responders=lambda ids: store.chosen_responders(services.db, ids),
        issuers_every=3600.0,
    )
    return server, responder


def _answered(responder: Responder, request: bytes) -> bytes:
    answer = responder.prepare(request)
    return answer if isinstance(answer, bytes) else answer()


def _until_not_good(
    loop: asyncio.AbstractEventLoop, responder: Responder, requests: Sequence[bytes]
) -> list[bytes]:
    async def poll() -> list[bytes]:
        answers = [_answered(responder, r) for r in requests]
        for _ in range(300):  # 3 s at most; the follower polls every 20 ms
            if all(_status_or_error(a) != "GOOD" for a in answers):
                break
            await asyncio.sleep(0.01)
            answers = [_answered(responder, r) for r in requests]
        return answers

    return loop.run_until_complete(poll())


def _status_or_error(der: bytes) -> str:
    parsed = x509_ocsp.load_der_ocsp_response(der)
    if parsed.response_status != x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        return parsed.response_status.name
    return parsed.certificate_status.name


def test_a_revocation_written_behind_the_followers_cursor_is_still_followed(
    pki: Pki, settings: Settings
) -> None:
    """Another host, its clock 8 s ahead, writes an answer: the follower's cursor (the newest
    updated_at seen) moves 8 s ahead. A revocation written here then has an updated_at more
    than the 5 s overlap behind it. The follower still finds it, by the CA's revocation epoch.
    Before: the server kept answering "good" from memory, pre-signed and live (with a nonce),
    until that answer was next re-signed (36 h)."""
    services = pki.services
    victim = issue(services, "admin-client")
    server, responder = _following_server(services)
    issuer = pki.issuer()
    requests = [
        rfc5019_request(issuer, victim.serial_number),
        _nonce_request(victim, pki.ca),
    ]
    skew = dt.timedelta(seconds=8)
    ahead = build_services(settings, clock=lambda: utcnow() + skew, migrate=False)
    try:
        with following(server) as loop:
            assert [_status_or_error(_answered(responder, r)) for r in requests] == ["GOOD"] * 2
            issue(ahead, "admin-client")
            loop.run_until_complete(asyncio.sleep(0.3))
            cursor = getattr(server.cursor, "updated_at", server.cursor)
            assert cursor > utcnow() + store.CHANGES_OVERLAP  # type: ignore[operator]
            services.revoker.revoke(
                "admin", victim.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
            )
            answers = _until_not_good(loop, responder, requests)
    finally:
        ahead.close()
    assert [_status_or_error(a) for a in answers] == ["REVOKED"] * 2


def test_a_revocation_the_withheld_signer_cannot_sign_is_not_answered_good(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA's responder is revoked and its successor cannot be made (key backend away), so
    nothing of that CA is re-signed; then a subscriber certificate is revoked. Its stored
    "good" answer is withdrawn: the web endpoint and the standalone server answer tryLater
    (no signer) instead. Before: both served the stored "good" until its nextUpdate (72 h)."""
    services = pki.services
    victim = issue(services, "admin-client")
    issuer = pki.issuer()
    request = rfc5019_request(issuer, victim.serial_number)
    server, responder = _following_server(services)

    def away(*_args: object, **_kwargs: object) -> str:
        raise KeyBackendError("token away")

    with following(server) as loop:
        assert _status_or_error(_answered(responder, request)) == "GOOD"
        monkeypatch.setattr(services.backend.inner, "generate", away)  # type: ignore[attr-defined]
        services.revoker.revoke(
            "admin", issuer.responder_certificate.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR
        )
        services.ocsp.invalidate_issuers()
        services.revoker.revoke("admin", victim.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        services.ocsp.refresh_due(services.clock())  # a refresher tick: it cannot sign either
        assert not services.ocsp.issuers().get(pki.ca_id()), "the signer was not withheld"
        web = services.ocsp.answer(request, services.clock())
        served = _until_not_good(loop, responder, [request])
    assert _status_or_error(web) == "TRY_LATER"
    assert [_status_or_error(a) for a in served] == ["TRY_LATER"]


@dataclasses.dataclass(frozen=True)
class _FakeStored:
    issuer_id: int
    serial: int
    der: bytes
    this_update: dt.datetime
    next_update: dt.datetime


def test_a_mass_withdrawal_is_applied_a_chunk_per_loop_step(pki: Pki) -> None:
    """Thousands of answers withdrawn at once (a compromised key's certificates, before their
    re-sign): the loop applies them CHUNK per step, answering requests in between, like any
    other change. Before: all in one step (0.65 s for 10^5 on a busy host)."""
    issuer, ca_id = pki.issuer(), pki.ca_id()
    now = dt.datetime.now(dt.UTC)
    count = 3 * CHUNK + 5
    rows = [
        _FakeStored(ca_id, serial, b"x%d" % serial, now, now + dt.timedelta(days=3))
        for serial in range(1, count + 1)
    ]
    index = ResponseIndex({ca_id: issuer})
    index.apply(rows)
    assert len(index) == count
    builder = EntryBuilder(ca_id, issuer)
    builder.follow(dataclasses.replace(r, der=store.WITHDRAWN) for r in rows)
    built = builder.done()
    assert len(built.withdrawn) == count and not built.by_serial
    steps = index.update([built])
    left = []
    for _ in steps:
        left.append(len(index))
    assert left[0] == count - (CHUNK - 1)  # one chunk per step, not all at once
    assert len(left) >= 3 and left == sorted(left, reverse=True)
    assert len(index) == 0 and not index.by_request
    assert not any(hit[1][0] == ca_id for hit in index.by_cert_id.values())


def test_a_certificate_twice_in_a_batch_is_judged_by_its_last_row(pki: Pki) -> None:
    """A batch may bring one certificate twice (its stored answer, then its withdrawal: the
    status changed again and is not re-signed yet). The server ends where the last row says,
    even when the previous batch also ended withdrawn. Before: each row was compared with the
    previous batch alone, the withdrawal dropped as seen already, and the answer before it
    stayed in memory: a stale "good" for a certificate on hold."""
    services = pki.services
    victim = issue(services, "admin-client")
    ca_id, serial = pki.ca_id(), victim.serial_number
    good = store.stored_response(services.db, ca_id, serial)
    assert good is not None
    withdrawn = dataclasses.replace(good, der=store.WITHDRAWN)
    batches = [[withdrawn], [good, withdrawn], [withdrawn]]
    loaded, _ = store.load_issuers_each(services)
    index, cursor = initial_index(loaded, lambda: store.snapshot(services.db))
    responder = Responder(index, store.lookup(services.db))

    def changes(since: object) -> tuple[list[store.StoredResponse], object]:
        return batches.pop(0), since

    server = Server(responder, changes_since=changes, cursor=cursor, poll=3600.0)
    loop = asyncio.new_event_loop()
    server.loop = loop
    try:
        assert index.entry(loaded[ca_id], serial) is not None
        held = []
        for _ in range(3):
            server._follow_store()
            for _ in range(20):  # bounded: let the loop apply what was handed to it
                loop.run_until_complete(asyncio.sleep(0))
            held.append(index.entry(loaded[ca_id], serial) is not None)
    finally:
        loop.close()
    assert held == [False, False, False]
