"""OCSP over HTTP through Flask's test client: POST and GET give the same answer, the cache
headers follow the response, bad requests get 413/415/malformedRequest, never a 500."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, run_wsgi_app

from ca.revocation import Reason
from ocsp import core
from sekisho.services import Services
from tests.ca.helpers import issue
from tests.conftest import TEST_ACTOR
from tests.ocsp.test_store import issuer_for, openssl_status, request_der, stored
from tests.support.checkers import pkilint_ocsp_response
from web import create_app

OCSP_REQUEST = "application/ocsp-request"


@pytest.fixture
def client(services: Services) -> FlaskClient:
    return create_app(services).test_client()


def post(client: FlaskClient, body: bytes) -> bytes:
    res = client.post("/ocsp", data=body, content_type=OCSP_REQUEST)
    assert res.status_code == 200 and res.mimetype == "application/ocsp-response"
    return res.data


def test_get_and_post_equivalent(services: Services, client: FlaskClient, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    ca_id, issuer = issuer_for(services)
    req = request_der(issuer, [leaf.serial_number])
    by_post = post(client, req)
    res = client.post("/ocsp", data=req, content_type=OCSP_REQUEST)  # as `ocsp serve` answers
    assert res.headers["Cache-Control"] == "no-store" and "ETag" not in res.headers
    row = stored(services, ca_id, leaf.serial_number)
    assert by_post == row.der
    for encoded in (
        base64.b64encode(req).decode(),
        quote(base64.b64encode(req).decode(), safe=""),
        base64.urlsafe_b64encode(req).decode().rstrip("="),
    ):
        res = client.get(f"/ocsp/{encoded}")
        assert res.status_code == 200, encoded
        assert res.mimetype == "application/ocsp-response"
        assert res.data == by_post
        # the standalone server's tag for the same bytes: one cache may front both
        assert res.headers["ETag"] == f'"{hashlib.sha256(res.data).hexdigest()[:32]}"'
        cache = res.headers["Cache-Control"]
        assert "public" in cache and "no-transform" in cache and "must-revalidate" in cache
        max_age = int(cache.split("max-age=")[1].split(",")[0])
        assert 0 < max_age <= 300
        assert res.headers["Expires"] == row.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
        assert res.headers["Last-Modified"] == row.this_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
    pkilint_ocsp_response(by_post)
    assert ": good" in openssl_status(tmp_path, services, by_post, leaf)


def test_revocation_over_http(services: Services, client: FlaskClient, tmp_path: Path) -> None:
    leaf = issue(services, "admin-client")
    _, issuer = issuer_for(services)
    req = request_der(issuer, [leaf.serial_number])
    assert ": good" in openssl_status(tmp_path, services, post(client, req), leaf)
    services.revoker.revoke("admin", leaf.serial_number, Reason.AFFILIATION_CHANGED, TEST_ACTOR)
    resp = client.get("/ocsp/" + base64.b64encode(req).decode()).data
    out = openssl_status(tmp_path, services, resp, leaf)
    assert ": revoked" in out and "Reason: affiliationChanged" in out


def test_nonce_over_post(services: Services, client: FlaskClient) -> None:
    leaf = issue(services, "admin-client")
    _, issuer = issuer_for(services)
    resp = x509_ocsp.load_der_ocsp_response(
        post(client, request_der(issuer, [leaf.serial_number], nonce=b"\x01" * 20))
    )
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"\x01" * 20
    # Over GET too, and never kept by a cache: made for that one request (as `ocsp serve`).
    nonce_get = base64.b64encode(request_der(issuer, [leaf.serial_number], nonce=b"\x02" * 20))
    res = client.get("/ocsp/" + nonce_get.decode())
    loaded = x509_ocsp.load_der_ocsp_response(res.data)
    assert loaded.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"\x02" * 20
    assert res.headers["Cache-Control"] == "no-store" and "ETag" not in res.headers


def test_bad_requests(services: Services, client: FlaskClient) -> None:
    res = client.post("/ocsp", data=b"\x30\x00", content_type="application/octet-stream")
    assert res.status_code == 415 and res.mimetype == "application/problem+json"
    res = client.post("/ocsp", data=b"\x30" * (64 * 1024 + 1), content_type=OCSP_REQUEST)
    assert res.status_code == 413
    for bad in ("!!!!", "a", "%ZZ", "QUJD$"):
        res = client.get(f"/ocsp/{bad}")
        assert res.status_code == 400, bad
        assert res.mimetype == "application/ocsp-response"
        assert res.data == bytes.fromhex("3003 0a01 01")
    # valid base64, not a request: an OCSP malformedRequest, not an HTTP error page
    assert post(client, b"\x04\x00") == core.MALFORMED_REQUEST
    res = client.get("/ocsp/" + base64.b64encode(b"junk").decode())
    assert res.data == core.MALFORMED_REQUEST and res.headers["Cache-Control"] == "no-store"


def test_413_without_reading_the_body(client: FlaskClient) -> None:
    def never() -> bytes:
        raise AssertionError("body read")

    class Stream(io.BytesIO):
        def read(self, *_a: object) -> bytes:  # type: ignore[override]
            return never()

    environ = EnvironBuilder(path="/ocsp", method="POST", content_type=OCSP_REQUEST).get_environ()
    environ["CONTENT_LENGTH"] = str(10 * 1024 * 1024)
    environ["wsgi.input"] = Stream()
    _body, status, _headers = run_wsgi_app(client.application, environ)
    assert status.startswith("413")


def test_the_operators_smaller_body_limit_applies(services: Services) -> None:
    """max_request_bytes below the OCSP limit wins, with a Content-Length and chunked."""
    app = create_app(services)
    app.config["MAX_CONTENT_LENGTH"] = 1024  # as max_request_bytes = 1024 would set it
    client = app.test_client()
    body = b"\x30" * 5000
    assert client.post("/ocsp", data=body, content_type=OCSP_REQUEST).status_code == 413
    environ = EnvironBuilder(path="/ocsp", method="POST", content_type=OCSP_REQUEST).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    environ["wsgi.input"] = io.BytesIO(body)
    _body, status, _headers = run_wsgi_app(app, environ)
    assert status.startswith("413")


def test_crash_is_internal_error_not_500(
    services: Services, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(_der: bytes, _now: dt.datetime) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(services.ocsp, "answer", boom)
    res = client.post("/ocsp", data=b"\x30\x00", content_type=OCSP_REQUEST)
    assert res.status_code == 200 and res.data == core.INTERNAL_ERROR
