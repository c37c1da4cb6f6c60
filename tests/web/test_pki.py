"""Public PKI endpoints through Flask's test client: /healthz, /ca/<ca>.crt, /crl/<ca>.crl and
the delta CRL; caching headers and conditional GETs; RFC 9457 problems for anything unknown;
security headers everywhere; never a 500.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import hashlib
import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from ca.crl import latest_by_name
from ca.hierarchy import create_issuing, create_root, take_offline
from ca.models import CertificateAuthority, CrlKind
from ca.revocation import Reason
from hsm.base import KeyType
from hsm.secrets import read_secret
from hsm.software import SoftwareBackend
from ocsp import core, store
from ocsp.signers import active_responders, ensure_responders
from sekisho.errors import InputError
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import ca_cert, der, issue, request_for
from tests.conftest import TEST_ACTOR, FakeClock, RecordingBackend, make_settings
from tests.ocsp.test_store import issuer_for, request_der, stored
from tests.support.checkers import (
    openssl_crl_verify,
    openssl_verify_revoked,
    pkilint_cert,
    pkilint_crl,
)
from web import create_app

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
}


@pytest.fixture
def app(services: Services) -> Flask:
    app = create_app(services)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def assert_security_headers(response: TestResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert len(response.headers["X-Request-Id"]) == 16


def assert_problem(response: TestResponse, status: int) -> dict[str, object]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    doc = response.get_json(force=True)
    assert isinstance(doc, dict)
    assert doc["status"] == status
    assert str(doc["type"]).startswith("urn:sekisho:error:")
    assert doc["detail"] and doc["title"]
    assert doc["request_id"] == response.headers["X-Request-Id"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert response.headers["Cache-Control"] == "no-store"  # an error is never served again
    return doc


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok"}
    assert_security_headers(response)


def test_healthz_reports_a_broken_database(services: Services, app: Flask) -> None:
    broken = build_services(
        make_settings(services.settings.data_dir, database_url="sqlite:////nonexistent/dir/x.db"),
        backend=services.backend,
        migrate=False,
    )
    try:
        response = create_app(broken).test_client().get("/healthz")
    finally:
        broken.db.dispose()
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "database": "down"}


def test_healthz_says_when_the_audit_key_is_missing(services: Services, tmp_path: Path) -> None:
    """Without its audit key the journal still takes every operation, but signs none:
    /healthz says so (degraded, still 200), where it said "ok"."""
    if services.settings.key_backend != "software":
        pytest.skip("the audit key is taken away as a file")
    (services.settings.data_dir / "keys" / "audit.key").rename(tmp_path / "audit.key.away")
    keyless = build_services(services.settings)
    try:
        assert keyless.journal.signer is None
        response = create_app(keyless).test_client().get("/healthz")
    finally:
        keyless.close()
    assert response.status_code == 200
    assert response.get_json() == {"status": "degraded", "database": "ok", "audit_key": "missing"}


def _health(client: FlaskClient) -> dict[str, object]:
    """/healthz's document (always 200 here: the store is up)."""
    response = client.get("/healthz")
    assert response.status_code == 200
    doc = response.get_json()
    assert isinstance(doc, dict)
    return doc


def test_healthz_alarms_on_crls(settings: Settings) -> None:
    """Security target 17: an alarm once a CRL is past half its validity (the refresher
    re-signs it then: past that and the grace, it could not), and for an expired one, and
    for status changes an offline key leaves unsigned."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, clock=clock)  # (software keys: one goes offline)
    try:
        client = create_app(services).test_client()

        def health() -> dict[str, object]:
            return _health(client)

        assert health() == {"status": "ok", "database": "ok"}
        clock.advance(days=3.5, minutes=6)  # the 7-day CRLs of init, past half and the grace
        everyone = ("root", "admin", "device")
        assert health() == {
            "status": "degraded",
            "database": "ok",
            "crl": dict.fromkeys(everyone, "stale"),
        }
        for ca in everyone:
            services.crls.generate(ca, clock(), actor=TEST_ACTOR)
        assert health()["status"] == "ok"
        clock.advance(days=8)
        assert health()["crl"] == dict.fromkeys(everyone, "expired")
        for ca in everyone:
            services.crls.generate(ca, clock(), actor=TEST_ACTOR)
        # The root's key offline, then a revocation under it: nothing can sign it yet.
        take_offline(services.ca, "root", TEST_ACTOR)
        assert health()["status"] == "ok"
        services.revoker.revoke(
            "root", ca_cert(services, "device").serial_number, Reason.SUPERSEDED, TEST_ACTOR
        )
        assert health()["crl"] == {"root": "pending"}
    finally:
        services.close()


@pytest.mark.parametrize("ca", ["root", "admin", "device"])
def test_ca_certificate_is_der(client: FlaskClient, services: Services, ca: str) -> None:
    response = client.get(f"/ca/{ca}.crt")
    assert response.status_code == 200
    assert response.mimetype == "application/pkix-cert"
    cert = x509.load_der_x509_certificate(response.data)
    assert cert == ca_cert(services, ca)
    assert response.headers["ETag"] == f'"{hashlib.sha256(response.data).hexdigest()}"'
    assert "max-age=86400" in response.headers["Cache-Control"]
    assert_security_headers(response)
    pkilint_cert(response.data)
    again = client.get(f"/ca/{ca}.crt", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


def _crl_headers_ok(response: TestResponse, now: dt.datetime) -> x509.CertificateRevocationList:
    assert response.status_code == 200
    assert response.mimetype == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.data)
    assert response.headers["ETag"] == f'"{hashlib.sha256(response.data).hexdigest()}"'
    last_modified = email.utils.parsedate_to_datetime(response.headers["Last-Modified"])
    assert last_modified == crl.last_update_utc.replace(microsecond=0)
    expires = email.utils.parsedate_to_datetime(response.headers["Expires"])
    assert crl.next_update_utc is not None
    assert expires == crl.next_update_utc.replace(microsecond=0)
    cache = response.headers["Cache-Control"]
    assert cache.startswith("public, max-age=") and "no-transform" in cache
    max_age = int(cache.split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 300
    assert expires > now
    assert_security_headers(response)
    return crl


def test_full_crl_with_caching_headers_and_conditional_get(
    client: FlaskClient, services: Services
) -> None:
    response = client.get("/crl/admin.crl")
    crl = _crl_headers_ok(response, services.clock())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1
    pkilint_crl(response.data)
    openssl_crl_verify(response.data, der(ca_cert(services, "admin")))
    etag = response.headers["ETag"]
    cached = client.get("/crl/admin.crl", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.data == b""
    assert cached.headers["ETag"] == etag
    since = client.get(
        "/crl/admin.crl", headers={"If-Modified-Since": response.headers["Last-Modified"]}
    )
    assert since.status_code == 304
    stale = client.get("/crl/admin.crl", headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200 and stale.data == response.data
    head = client.head("/crl/admin.crl")
    assert head.status_code == 200 and head.data == b""
    assert head.headers["ETag"] == etag


def test_if_modified_since_never_hides_a_crl_of_the_same_second(
    settings: Settings, recording_backend: RecordingBackend
) -> None:
    """Two CRLs whose thisUpdate is the same second carry the same Last-Modified: a client
    holding the older one and revalidating with If-Modified-Since alone gets the newer one
    (only the ETag tells them apart), not a 304 that keeps the revocation from it. A CRL that
    has its second to itself is still answered 304."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    services = build_services(settings, backend=recording_backend, clock=clock)
    try:
        app = create_app(services)
        app.config["TESTING"] = True
        client = app.test_client()
        clock.advance(seconds=5)
        services.crls.generate("device", clock(), actor=TEST_ACTOR)
        old = client.get("/crl/device.crl")
        leaf = issue(services, "device")
        services.revoker.revoke("device", leaf.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        services.crls.generate("device", clock(), actor=TEST_ACTOR)  # the same second
        since = {"If-Modified-Since": old.headers["Last-Modified"]}
        new = client.get("/crl/device.crl", headers=since)
        assert new.headers["Last-Modified"] == old.headers["Last-Modified"]
        assert new.status_code == 200, "a 304 would keep the revocation from the client"
        assert new.headers["ETag"] != old.headers["ETag"]
        crl = x509.load_der_x509_crl(new.data)
        assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
        match = {"If-None-Match": new.headers["ETag"]}
        assert client.get("/crl/device.crl", headers=match).status_code == 304
        clock.advance(seconds=2)
        services.crls.generate("device", clock(), actor=TEST_ACTOR)
        newest = client.get("/crl/device.crl")
        again = {"If-Modified-Since": newest.headers["Last-Modified"]}
        assert client.get("/crl/device.crl", headers=again).status_code == 304
        assert client.get("/crl/device.crl", headers=since).status_code == 200
    finally:
        services.close()


def test_a_304_for_a_crl_reads_no_der(client: FlaskClient, services: Services) -> None:
    """Devices poll the CRL with If-None-Match: the validators come from the CRL's row, and
    its DER (50 MB at 10^6 entries) is read from the store only when it is sent."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", seen)
    try:
        sent = client.get("/crl/admin.crl")
        reads_der = [s for s in statements if re.search(r"crls\.der\b", s)]
        assert sent.status_code == 200 and len(reads_der) == 1
        statements.clear()
        cached = client.get("/crl/admin.crl", headers={"If-None-Match": sent.headers["ETag"]})
        assert cached.status_code == 304 and cached.data == b""
        assert statements and not [s for s in statements if re.search(r"crls\.der\b", s)]
        statements.clear()
        since = client.get(
            "/crl/admin.crl", headers={"If-Modified-Since": sent.headers["Last-Modified"]}
        )
        assert since.status_code == 304
        assert not [s for s in statements if re.search(r"crls\.der\b", s)]
    finally:
        event.remove(services.db.engine, "before_cursor_execute", seen)
    x509.load_der_x509_crl(sent.data)  # the body sent is the CRL
    assert hashlib.sha256(sent.data).hexdigest() == sent.headers["ETag"].strip('"')


def test_new_crl_after_revocation_is_served_with_a_new_etag(
    client: FlaskClient, services: Services
) -> None:
    first = client.get("/crl/device.crl")
    leaf = issue(services, "device")
    services.revoker.revoke("device", leaf.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    services.crls.generate("device", services.clock(), actor=TEST_ACTOR)
    second = client.get("/crl/device.crl", headers={"If-None-Match": first.headers["ETag"]})
    crl = _crl_headers_ok(second, services.clock())
    assert second.headers["ETag"] != first.headers["ETag"]
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    root_crl = client.get("/crl/root.crl").data
    chain = [der(ca_cert(services, "root")), der(ca_cert(services, "device"))]
    openssl_verify_revoked(der(leaf), chain, [root_crl, second.data])


def test_delta_crl_endpoint(client: FlaskClient, services: Services) -> None:
    leaf = issue(services, "admin-client")
    services.revoker.revoke("admin", leaf.serial_number, Reason.CERTIFICATE_HOLD, TEST_ACTOR)
    services.crls.generate("admin", services.clock(), delta=True, actor=TEST_ACTOR)
    full = x509.load_der_x509_crl(client.get("/crl/admin.crl").data)
    response = client.get("/crl/admin-delta.crl")
    delta = _crl_headers_ok(response, services.clock())
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
    base_number = full.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert indicator.crl_number == base_number
    assert delta.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    # The full CRL points at the delta (RFC 5280 5.2.6 Freshest CRL).
    freshest = full.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert any(
        n.value.endswith("/crl/admin-delta.crl") for dp in freshest for n in dp.full_name or []
    )
    pkilint_crl(response.data, delta=True)
    openssl_crl_verify(response.data, der(ca_cert(services, "admin")))
    assert response.headers["ETag"] != client.get("/crl/admin.crl").headers["ETag"]


@pytest.mark.parametrize(
    "path",
    [
        "/crl/nope.crl",
        "/crl/nope-delta.crl",
        "/ca/nope.crt",
        "/crl/admin.crt",
        "/ca/admin.crl",
        "/crl/admin",
        "/crl/.crl",
        "/crl/-delta.crl",
        "/crl/ADMIN.crl",
        "/crl/..%2f..%2fetc%2fpasswd.crl",
        "/crl/%00.crl",
        "/crl/admin%00.crl",
        "/crl/" + "a" * 500 + ".crl",
        "/crl/%C3%A9.crl",
        "/crl/admin.crl/extra",
        "/crl/",
        "/ca/",
        "/",
        "/favicon.ico",
        "/healthz/",
        "/ca/admin.crt.crt",
        "/crl/admin-delta-delta.crl",
    ],
)
def test_unknown_paths_are_404_problems(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert_problem(response, 404)
    assert_security_headers(response)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/healthz", "/crl/admin.crl", "/ca/root.crt"])
def test_other_methods_are_405_problems(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method, data=b"x" * 10)
    doc = assert_problem(response, 405)
    assert doc["title"] == "method not allowed"
    assert "GET" in response.headers["Allow"]
    assert_security_headers(response)


def test_options_and_odd_requests_never_500(client: FlaskClient) -> None:
    odd = [
        client.options("/crl/admin.crl"),
        client.get("/crl/admin.crl", headers={"If-None-Match": 'garbage, *, ""'}),
        client.get("/crl/admin.crl", headers={"If-Modified-Since": "yesterday-ish"}),
        client.get("/crl/admin.crl", headers={"Range": "bytes=0-10"}),
        client.get("/crl/admin.crl", headers={"Range": "bytes=999999-"}),
        client.get("/crl/admin.crl?x=" + "y" * 2000),
        client.post("/crl/admin.crl", data=b"z" * (1024 * 1024)),  # over MAX_CONTENT_LENGTH
        client.open("/crl/admin.crl", method="TRACE"),
        client.open("/crl/admin.crl", method="BREW"),
    ]
    for response in odd:
        assert response.status_code < 500, (response.status_code, response.data[:200])
        assert_security_headers(response)
        if response.status_code >= 400:
            assert_problem(response, response.status_code)


def test_unexpected_exception_is_a_bare_500_problem(app: Flask) -> None:
    @app.get("/boom-for-test")
    def boom() -> str:
        raise RuntimeError("secret internals /etc/shadow")

    response = app.test_client().get("/boom-for-test")
    doc = assert_problem(response, 500)
    assert "secret internals" not in response.get_data(as_text=True)
    assert "request ID" in str(doc["detail"])


def test_request_ids_differ(client: FlaskClient) -> None:
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


def test_hsts_only_over_https(client: FlaskClient) -> None:
    assert "Strict-Transport-Security" not in client.get("/healthz").headers
    secure = client.get("/healthz", base_url="https://pki.example.com")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")


@pytest.fixture
def second_deployment(settings: Settings, tmp_path: Path) -> Iterator[Services]:
    """A copy of this deployment as another app in the same process (SQLite only)."""
    if settings.database_url:
        pytest.skip("the copy is made at the file level: SQLite only")
    other = tmp_path / "other"
    shutil.copytree(settings.data_dir, other)
    services = build_services(make_settings(other))
    yield services
    services.close()


def test_two_apps_in_one_process_serve_their_own_crls(
    services: Services, second_deployment: Services
) -> None:
    """Both deployments publish CRL number N+1 for "admin"; each app must serve its own."""
    clients = [create_app(s).test_client() for s in (services, second_deployment)]
    for svc in (services, second_deployment):
        svc.crls.generate("admin", svc.clock(), actor=TEST_ACTOR)
    bodies = []
    for client, svc in zip(clients, (services, second_deployment), strict=True):
        response = client.get("/crl/admin.crl")
        assert response.headers["ETag"] == f'"{hashlib.sha256(response.data).hexdigest()}"'
        openssl_crl_verify(response.data, der(ca_cert(svc, "admin")))
        bodies.append(response.data)
    numbers = {
        x509.load_der_x509_crl(b)
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
        for b in bodies
    }
    assert len(numbers) == 1  # same number on both sides: the case a number-keyed cache gets wrong
    assert bodies[0] != bodies[1]


def _uri_paths(points: x509.CRLDistributionPoints | x509.FreshestCRL) -> list[str]:
    return [
        urllib.parse.urlsplit(str(n.value)).path
        for dp in points
        for n in dp.full_name or []
        if isinstance(n, x509.UniformResourceIdentifier)
    ]


def test_a_new_ca_is_served_at_the_urls_its_certificates_carry(
    client: FlaskClient, services: Services
) -> None:
    create_issuing(services.ca, "ops-x_1", "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR)
    services.registry.invalidate()
    now = services.clock()
    full = services.crls.generate("ops-x_1", now, actor=TEST_ACTOR)
    delta = services.crls.generate("ops-x_1", now, delta=True, actor=TEST_ACTOR)
    request = dataclasses.replace(request_for("device"), ca="ops-x_1")
    leaf = services.ca.issue(request, TEST_ACTOR)
    issuer = der(ca_cert(services, "ops-x_1"))
    (cdp,) = _uri_paths(leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
    # The full CRL names its delta (RFC 5280 5.2.6).
    full_crl = x509.load_der_x509_crl(full.der)
    (freshest,) = _uri_paths(full_crl.extensions.get_extension_for_class(x509.FreshestCRL).value)
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    (ca_issuers,) = [
        urllib.parse.urlsplit(str(d.access_location.value)).path
        for d in aia
        if d.access_method == x509.AuthorityInformationAccessOID.CA_ISSUERS
    ]
    for path, row in ((cdp, full), (freshest, delta)):
        response = client.get(path)
        _crl_headers_ok(response, now)
        assert response.data == row.der, path
        pkilint_crl(response.data, delta=row is delta)
        openssl_crl_verify(response.data, issuer)
    assert client.get(ca_issuers).data == issuer


@pytest.mark.parametrize(
    "bad", ["ops-delta", "ops.x", "Ops", "-ops", "_ops", "", "a" * 64, "ops\n", "ops/x", "é"]
)
def test_ca_names_the_urls_cannot_carry_are_refused(services: Services, bad: str) -> None:
    """``ops-delta`` would be served as the delta CRL of ``ops``; ``ops.x`` not at all."""
    with services.db.scope() as session:
        before = session.scalars(select(CertificateAuthority.name)).all()
    for create in (
        lambda: create_issuing(
            services.ca, bad, "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR
        ),
        lambda: create_root(services.ca, bad, "Example Corp", KeyType.EC_P256, TEST_ACTOR),
    ):
        with pytest.raises(InputError, match="CA name") as info:
            create()
        assert info.value.exit_code == 65
    with services.db.scope() as session:
        assert session.scalars(select(CertificateAuthority.name)).all() == before


# -- paths no route takes: never a redirect, never a Location from the Host header ------------
EVIL_HOST = "evil.example"


def _path_variants(path: str) -> set[str]:
    """``path`` with a slash added, removed or doubled at each of its slashes."""
    variants = {path, path + "/", path.rstrip("/") or "/", path + "//"}
    for i, char in enumerate(path):
        if char == "/":
            variants.add(path[:i] + "/" + path[i:])
    return variants


def test_no_path_is_redirected_to_the_host_header(app: Flask, client: FlaskClient) -> None:
    """Werkzeug answered "/crl//admin.crl" with a cacheable 308 to http://<Host>/crl/admin.crl
    (an open redirect, or a poisoned cache sending every client to the attacker). Every
    route of the app, and slash variants of each, with a hostile Host: no 3xx, no Location."""
    samples = {"filename": ["admin.crl", "admin-delta.crl", "root.crt"], "encoded": ["MEIwQDA-"]}
    paths = {"/crl//admin.crl", "/crl//admin-delta.crl", "/ca//root.crt", "/healthz/"}
    for rule in app.url_map.iter_rules():
        (name,) = rule.arguments or {""}  # each route has at most one variable part
        for sample in samples.get(name, [""]):
            paths |= _path_variants(re.sub(r"<[^>]*>", sample, rule.rule))
    for path in sorted(paths):
        for method in ("GET", "HEAD", "POST", "OPTIONS", "DELETE"):
            response = client.open(path, method=method, headers={"Host": EVIL_HOST})
            assert not 300 <= response.status_code < 400, (method, path, response.status_code)
            assert "Location" not in response.headers, (method, path)
            assert EVIL_HOST.encode() not in response.data, (method, path)


@pytest.mark.parametrize(
    "path", ["/crl//admin.crl", "/crl//admin-delta.crl", "/ca//root.crt", "/crl/admin.crl/"]
)
def test_double_and_trailing_slashes_are_404_problems(client: FlaskClient, path: str) -> None:
    response = client.get(path, headers={"Host": EVIL_HOST})
    assert_problem(response, 404)
    assert_security_headers(response)


# -- conditional requests (RFC 9110 section 13) -----------------------------------------------
EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"
# (request fields, status); {etag} is the current strong tag, {weak} the same as a weak one,
# {lm} the Last-Modified date, {before}/{after} a day either side of it.
CONDITIONAL_CASES: list[tuple[dict[str, str], int]] = [
    ({}, 200),
    # If-Match: strong comparison, "*", lists; first in precedence (13.2.2 step 1)
    ({"If-Match": "{etag}"}, 200),
    ({"If-Match": "*"}, 200),
    ({"If-Match": '"nope", {etag}'}, 200),
    ({"If-Match": '"a,b" ,, {etag}'}, 200),  # a comma inside a tag; empty list members
    ({"If-Match": '"nope"'}, 412),
    ({"If-Match": "{weak}"}, 412),
    ({"If-Match": "unquoted"}, 412),
    ({"If-Match": " , "}, 412),
    ({"If-Match": "{etag}", "If-Unmodified-Since": EPOCH}, 200),  # If-Unmodified-Since ignored
    ({"If-Match": '"nope"', "If-Unmodified-Since": "{after}"}, 412),
    ({"If-Match": "{etag}", "If-None-Match": "{etag}"}, 304),  # both evaluated: not modified
    ({"If-Match": '"nope"', "If-None-Match": "{etag}"}, 412),  # If-Match first
    # If-Unmodified-Since (step 2): the resource is newer than the date -> 412
    ({"If-Unmodified-Since": EPOCH}, 412),
    ({"If-Unmodified-Since": "{before}"}, 412),
    ({"If-Unmodified-Since": "{lm}"}, 200),
    ({"If-Unmodified-Since": "{after}"}, 200),
    ({"If-Unmodified-Since": "Sunday, 06-Nov-94 08:49:37 GMT"}, 412),  # rfc850: 1994, not 2094
    ({"If-Unmodified-Since": "Sun Nov  6 08:49:37 1994"}, 412),  # asctime
    ({"If-Unmodified-Since": EPOCH, "If-None-Match": "{etag}"}, 412),  # before If-None-Match
    ({"If-Unmodified-Since": "{after}", "If-Modified-Since": "{lm}"}, 304),
    # invalid dates are ignored (13.1.3, 13.1.4)
    ({"If-Unmodified-Since": "yesterday-ish"}, 200),
    ({"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 +0000"}, 200),
    ({"If-Unmodified-Since": "thu, 01 jan 1970 00:00:00 gmt"}, 200),
    ({"If-Unmodified-Since": "Thu, 31 Feb 1970 00:00:00 GMT"}, 200),
    ({"If-Unmodified-Since": EPOCH + ", " + EPOCH}, 200),
    ({"If-Modified-Since": "yesterday-ish"}, 200),
    ({"If-Modified-Since": "{after}, {after}"}, 200),
    # If-None-Match (step 3): weak comparison, "*", lists
    ({"If-None-Match": "{etag}"}, 304),
    ({"If-None-Match": "{weak}"}, 304),
    ({"If-None-Match": "*"}, 304),
    ({"If-None-Match": '"nope", {weak}'}, 304),
    ({"If-None-Match": '"nope"'}, 200),
    ({"If-None-Match": '""'}, 200),
    ({"If-None-Match": 'garbage, *, ""'}, 200),
    ({"If-None-Match": "{etag}", "If-Modified-Since": EPOCH}, 304),  # If-Modified-Since ignored
    ({"If-None-Match": '"nope"', "If-Modified-Since": "{after}"}, 200),
    # If-Modified-Since (step 4)
    ({"If-Modified-Since": "{lm}"}, 304),
    ({"If-Modified-Since": "{after}"}, 304),
    ({"If-Modified-Since": "{before}"}, 200),
    ({"If-Modified-Since": EPOCH}, 200),
]


def _ocsp_path(services: Services) -> str:
    leaf = issue(services, "admin-client")
    _, issuer = issuer_for(services)
    return "/ocsp/" + base64.b64encode(request_der(issuer, [leaf.serial_number])).decode()


@pytest.mark.parametrize("resource", ["crl", "ca", "ocsp"])
def test_conditional_requests_follow_rfc_9110(
    client: FlaskClient, services: Services, resource: str
) -> None:
    path = {"crl": "/crl/admin.crl", "ca": "/ca/root.crt"}.get(resource) or _ocsp_path(services)
    full = client.get(path)
    assert full.status_code == 200
    etag, lm = full.headers["ETag"], full.headers["Last-Modified"]
    modified = email.utils.parsedate_to_datetime(lm)
    values = {
        "etag": etag,
        "weak": "W/" + etag,
        "lm": lm,
        "before": email.utils.format_datetime(modified - dt.timedelta(days=1), usegmt=True),
        "after": email.utils.format_datetime(modified + dt.timedelta(days=1), usegmt=True),
    }
    for fields, wanted in CONDITIONAL_CASES:
        headers = {name: value.format(**values) for name, value in fields.items()}
        expected = wanted
        if resource == "ocsp" and wanted == 304 and "If-None-Match" not in fields:
            expected = 200  # /ocsp does not read If-Modified-Since (next test)
        for method in ("GET", "HEAD"):
            response = client.open(path, method=method, headers=headers)
            assert response.status_code == expected, (method, headers, response.status_code)
            assert_security_headers(response)
            if expected == 412:  # a problem document, never stored by a cache
                if method == "GET":
                    assert_problem(response, 412)
                assert response.headers["Cache-Control"] == "no-store"
                assert "ETag" not in response.headers and response.data != full.data
                continue
            # 304 (RFC 9110 15.4.5): the 200's validators and caching fields, no content.
            for name in ("ETag", "Last-Modified", "Cache-Control", "Expires"):
                assert response.headers.get(name) == full.headers.get(name), (name, headers)
            body = full.data if expected == 200 and method == "GET" else b""
            assert response.data == body, (method, headers)


def test_ocsp_get_is_revalidated_by_its_entity_tag_only(
    client: FlaskClient, services: Services
) -> None:
    """A cache holding a "good" answer revalidates with If-Modified-Since alone, after the
    certificate was revoked: it gets the "revoked" answer, never a 304. thisUpdate names a
    second, and the revoked answer may have the same one as the good answer (a revocation
    in the second of the issuance, or of a refresh): a date cannot tell them apart. Before,
    a 304 kept "good" in the cache until the revoked answer was next re-signed (36 h)."""
    leaf = issue(services, "admin-client")
    _, issuer = issuer_for(services)
    path = "/ocsp/" + base64.b64encode(request_der(issuer, [leaf.serial_number])).decode()
    good = client.get(path)
    assert x509_ocsp.load_der_ocsp_response(good.data).certificate_status is (
        x509_ocsp.OCSPCertStatus.GOOD
    )
    services.revoker.revoke("admin", leaf.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    held = email.utils.parsedate_to_datetime(good.headers["Last-Modified"])
    for since in (held, held + dt.timedelta(days=1)):
        header = email.utils.format_datetime(since, usegmt=True)
        again = client.get(path, headers={"If-Modified-Since": header})
        assert again.status_code == 200, header
        status = x509_ocsp.load_der_ocsp_response(again.data).certificate_status
        assert status is x509_ocsp.OCSPCertStatus.REVOKED
    revalidated = client.get(path, headers={"If-None-Match": again.headers["ETag"]})
    assert revalidated.status_code == 304  # the entity-tag still saves the bytes


def _ocsp_status(der: bytes) -> x509_ocsp.OCSPResponseStatus:
    return x509_ocsp.load_der_ocsp_response(der).response_status


def _signer_key_hash(der: bytes) -> bytes:
    loaded = x509_ocsp.load_der_ocsp_response(der)
    assert loaded.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL, der.hex()
    return loaded.responder_key_hash


def test_ocsp_endpoint_loads_each_cas_signer_on_its_own(
    services: Services, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The web app's OCSP endpoint decides who signs CA by CA, as `ocsp serve` does: the
    device CA's new responder key is out of reach of this process, so the device CA keeps its
    last good responder and the admin CA is answered as usual (before, the one failing key
    turned every answer of every CA into internalError). Once that last good responder is
    revoked, the device CA's live answers are tryLater while its pre-signed ones are served;
    an app that never loaded the device CA's signer does not serve it."""
    admin_id, admin = issuer_for(services, "admin")
    device_id, device = issuer_for(services, "device")
    admin_leaf = issue(services, "admin-client")
    device_leaf = issue(services, "device")
    client = create_app(services).test_client()

    def get(issuer: core.Issuer, serial: int, on: FlaskClient = client) -> bytes:
        encoded = base64.b64encode(request_der(issuer, [serial])).decode()
        response = on.get(f"/ocsp/{encoded}")
        assert response.status_code == 200 and response.mimetype == "application/ocsp-response"
        return response.data

    def live(issuer: core.Issuer, serial: int, on: FlaskClient = client) -> bytes:
        response = on.post(
            "/ocsp",
            data=request_der(issuer, [serial], nonce=os.urandom(16)),
            content_type="application/ocsp-request",
        )
        assert response.status_code == 200 and response.mimetype == "application/ocsp-response"
        return response.data

    assert _signer_key_hash(live(device, device_leaf.serial_number)) == device.responder_key_id

    # Both responders rotate; only the admin CA's new key reaches this process's key store.
    elsewhere = tmp_path / "elsewhere-keys"
    shutil.copytree(settings.keys_dir, elsewhere)
    passphrase = read_secret(settings.passphrase_path, settings.key_passphrase_env)
    other = build_services(settings, backend=SoftwareBackend(elsewhere, passphrase))
    try:
        ensure_responders(other, other.clock(), rotate=True)
        label = active_responders(other)[admin_id].key_ref.removeprefix("file:")
        shutil.copy2(elsewhere / f"{label}.key", settings.keys_dir / f"{label}.key")
        admin = store.load_issuers(other)[admin_id]
        services.ocsp.invalidate_issuers()
        with caplog.at_level("WARNING", logger="sekisho.ocsp"):
            answer = live(admin, admin_leaf.serial_number)
            assert _signer_key_hash(answer) == admin.responder_key_id  # the new one
            assert (
                get(admin, admin_leaf.serial_number)
                == stored(services, admin_id, admin_leaf.serial_number).der
            )
            # The device CA: its last good responder signs on.
            answer = live(device, device_leaf.serial_number)
            assert _signer_key_hash(answer) == device.responder_key_id
            assert x509_ocsp.load_der_ocsp_response(answer).certificate_status is (
                x509_ocsp.OCSPCertStatus.GOOD
            )

            # That responder revoked: no live answer, the pre-signed one is still served.
            other.revoker.revoke(
                "device",
                device.responder_certificate.serial_number,
                Reason.KEY_COMPROMISE,
                TEST_ACTOR,
            )
            services.ocsp.invalidate_issuers()
            assert live(device, device_leaf.serial_number) == core.TRY_LATER
            presigned = stored(services, device_id, device_leaf.serial_number).der
            assert get(device, device_leaf.serial_number) == presigned
            assert _signer_key_hash(live(admin, admin_leaf.serial_number)) == (
                admin.responder_key_id
            )
        troubles = [
            r for r in caplog.records if r.getMessage() == "OCSP signer of a CA unavailable"
        ]
        assert [getattr(r, "ca_id", None) for r in troubles] == [device_id, device_id]
        assert "revoked" in getattr(troubles[1], "detail", "")
        assert passphrase.decode() not in caplog.text

        # An app that never had the device CA's signer: that CA is not served, admin is.
        fresh = build_services(settings)
        try:
            on = create_app(fresh).test_client()
            assert _ocsp_status(live(device, device_leaf.serial_number, on)) is (
                x509_ocsp.OCSPResponseStatus.UNAUTHORIZED
            )
            assert _signer_key_hash(live(admin, admin_leaf.serial_number, on)) == (
                admin.responder_key_id
            )
        finally:
            fresh.close()
    finally:
        other.close()


def test_healthz_alarms_on_what_the_refresher_keeps_failing_to_do(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA's CRL that cannot be published (pkilint refuses it here; a token that will not
    sign does the same) and a refresher step that keeps failing were only logged: /healthz
    called the CRL stale days later, and the step never. Under `serve` the refresher's
    heartbeat now carries what fails and since when; /healthz names what has failed for half
    `refresher_stuck_seconds` (degraded, error codes only), and forgets it once it works."""
    from ca import crl as crl_module
    from sekisho import workers
    from sekisho.errors import StoreError

    beat = workers.heartbeat_file(services.settings, os.getppid())
    beat.parent.mkdir(mode=0o700, exist_ok=True)
    refresher = workers.CrlRefresher(services, debounce=0.0)
    refresher.heartbeat = workers.HeartbeatWriter(beat)
    client = create_app(services).test_client()

    def health() -> dict[str, object]:
        return _health(client)

    def tick() -> None:
        for _ in range(2):  # the first sees the change, the second publishes (debounce 0)
            refresher._run_step("crl refresh", refresher.run_once)
        refresher._beat()

    tick()
    assert health() == {"status": "ok", "database": "ok", "refresher": "ok"}
    with monkeypatch.context() as fault:
        fault.setattr(crl_module, "OID_AKI", "2.5.29.99")  # what pkilint refuses
        cert = issue(services, "admin-client")
        services.revoker.revoke("admin", cert.serial_number, Reason.SUPERSEDED, TEST_ACTOR)

        def audit_down(_now: dt.datetime) -> None:
            raise StoreError("database error: OperationalError")

        fault.setattr(refresher.audit, "run_once", audit_down)
        began = time.time()
        tick()
        refresher._run_step("audit checkpoint", refresher.audit.run_once)
        refresher._beat()
        assert health()["status"] == "ok", "a failure younger than the grace alarmed"
        said = json.loads(beat.read_bytes())
        assert set(said["crls"]) == {"admin"} and set(said["steps"]) == {"audit checkpoint"}
        for failure in (*said["crls"].values(), *said["steps"].values()):
            assert began <= failure["since"] <= time.time()
            failure["since"] -= services.settings.refresher_stuck_seconds / 2  # as time passed
        beat.write_text(json.dumps(said))
        doc = health()
        assert doc == {
            "status": "degraded",
            "database": "ok",
            "refresher": "ok",
            "refresher_failing": {"audit checkpoint": StoreError("x").code},
            "crl": {"admin": "failing"},
        }, doc
        assert "OperationalError" not in beat.read_text()  # codes only: /healthz is public
    refresher._ca_retry.clear()  # as CRL_RETRY (30 s) later
    tick()  # the fault gone: the CRL is published
    refresher._run_step("audit checkpoint", refresher.audit.run_once)
    refresher._beat()
    assert health() == {"status": "ok", "database": "ok", "refresher": "ok"}
    with services.db.scope() as session:
        row = latest_by_name(session, "admin", CrlKind.FULL)
        assert row is not None
        assert x509.load_der_x509_crl(row.der).get_revoked_certificate_by_serial_number(
            cert.serial_number
        )


def test_a_server_side_failure_tells_the_client_its_kind_not_its_internals(
    app: Flask, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """A store or key failure's message is for the operator: a key file's or a database's
    path, a driver's error. The problem document says what kind of failure and the request
    ID; the log has the message."""
    from sekisho.errors import StoreError, WrongPassphrase

    @app.get("/key-trouble-for-test")
    def trouble() -> str:
        raise WrongPassphrase("cannot decrypt key file '/srv/sekisho/keys/ca-admin.key'")

    class Detailed(StoreError):  # an error that adds its own fields (as a rule's name)
        def as_problem(self) -> dict[str, object]:
            return {**super().as_problem(), "database": "/srv/sekisho/sekisho.db"}

    @app.get("/store-trouble-for-test")
    def store_trouble() -> str:
        raise Detailed("database is locked")

    response = app.test_client().get("/key-trouble-for-test")
    doc = assert_problem(response, 503)
    assert "/srv/sekisho" not in response.get_data(as_text=True)
    assert "wrong-passphrase" in str(doc["detail"]) and "request ID" in str(doc["detail"])
    assert doc["type"] == "urn:sekisho:error:wrong-passphrase"
    assert set(doc) == {"type", "title", "status", "detail", "request_id"}  # nothing else
    logged = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert logged and "/srv/sekisho" in getattr(logged[-1], "detail", "")
    assert getattr(logged[-1], "request_id", None) == doc["request_id"]

    response = app.test_client().get("/store-trouble-for-test")
    doc = assert_problem(response, 503)
    assert "database" not in doc and "/srv/sekisho" not in response.get_data(as_text=True)
