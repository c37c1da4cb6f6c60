"""SAN syntax: DNS names, URIs and email addresses that are not what RFC 5280 4.2.1.6 (with
RFC 1123, RFC 5890, RFC 3986 and RFC 5321) lets a certificate carry are refused by name and
journalled; the forms that are allowed are issued and pass pkilint, OpenSSL and GnuTLS."""

from __future__ import annotations

import dataclasses

import pytest

from ca.issuance import IssueRequest
from ca.tbs import SanEntry
from sekisho.errors import PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import PROFILE_REQUESTS, ca_cert, der, name, request_for
from tests.ca.test_bad_input import _assert_refused
from tests.conftest import TEST_ACTOR
from tests.support import checkers

CONNECTOR_DNS = SanEntry("dns", "connector-1.tenant1.example.com")

REFUSED = [
    # device: DNS names
    ("device", SanEntry("dns", "*.com"), "san-dns-syntax"),
    ("device", SanEntry("dns", "*.*.example.com"), "san-dns-syntax"),
    ("device", SanEntry("dns", "10.0.0.1"), "san-dns-syntax"),
    ("device", SanEntry("dns", "foo.123"), "san-dns-syntax"),
    ("device", SanEntry("dns", "host.b2"), "san-dns-syntax"),  # no top-level domain: pkilint
    ("device", SanEntry("dns", "a.b"), "san-dns-syntax"),  # refused them only with the gate on
    ("device", SanEntry("dns", "xn--zzzzzz.example.com"), "san-dns-syntax"),
    ("device", SanEntry("dns", "xn--.example.com"), "san-dns-syntax"),
    ("device", SanEntry("dns", "ab--cd.example.com"), "san-dns-syntax"),
    # connector: URIs
    ("connector", SanEntry("uri", "https://x\x00y/"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://a b/c"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/a b"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/\x1b[31m"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/caf\u00e9"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/%zz"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/" + "a" * 1024), "san-uri-syntax"),
    ("connector", SanEntry("uri", "http://c.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "HTTPS://c.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
     "san-uri-syntax"),
    ("connector", SanEntry("uri", "spiffe://tenant1.example.com/connector/1"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https:/c.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https:///id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://connector/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://C.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://*.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://user:pw@c.example.com/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com:0/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com:99999/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://[fe80::1%25eth0]/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://[2001:DB8::1]/id"), "san-uri-syntax"),
    ("connector", SanEntry("uri", "https://c.example.com/[x]"), "san-uri-syntax"),
    # admin-client: email addresses (dot-atom local parts; quoted ones are refused)
    ("admin-client", SanEntry("email", ".a..b.@example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", ".alice@tenant1.example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", "alice.@tenant1.example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", "al..ice@tenant1.example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", '"al ice"@tenant1.example.com'), "san-email-syntax"),
    ("admin-client", SanEntry("email", "a" * 65 + "@tenant1.example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", "alice@10.0.0.1"), "san-email-syntax"),
    ("admin-client", SanEntry("email", "alice@xn--zzzzzz.example.com"), "san-email-syntax"),
    ("admin-client", SanEntry("email", "alice@tenant1.co1"), "san-email-syntax"),
]  # fmt: skip


def _request(profile: str, san: SanEntry) -> IssueRequest:
    request = request_for(profile)
    sans = (CONNECTOR_DNS, san) if profile == "connector" else (san,)
    subject = name(CN="d.example.com") if profile == "device" else request.subject
    return dataclasses.replace(request, sans=sans, subject=subject)


@pytest.mark.parametrize(
    ("profile", "san", "rule"), REFUSED, ids=[repr(str(case[1]))[:48] for case in REFUSED]
)
def test_bad_san_is_refused(services: Services, profile: str, san: SanEntry, rule: str) -> None:
    request = _request(profile, san)
    exc = _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, rule
    )
    assert "\n" not in exc.message and "\x00" not in exc.message


ISSUED = [
    ("device", SanEntry("dns", "*.tenant1.example.com")),
    ("device", SanEntry("dns", "xn--bcher-kva.example")),
    ("device", SanEntry("dns", "123.tenant1.example.com")),
    ("device", SanEntry("dns", "a-b.tenant1.example.com")),
    ("device", SanEntry("dns", "router.lan")),
    ("connector", SanEntry("uri", "https://pki.example.com/id/connector/tenant1/1")),
    ("connector", SanEntry("uri", "https://pki.example.com:8443/id/connector?n=1&t=a%20b#x")),
    ("connector", SanEntry("uri", "https://10.0.0.1/id/connector/tenant1/1")),
    ("connector", SanEntry("uri", "https://[2001:db8::1]/id/connector/tenant1/1")),
    ("connector", SanEntry("uri", "https://xn--bcher-kva.example/id")),
    ("admin-client", SanEntry("email", "alice.admin+pki@tenant1.example.com")),
    ("admin-client", SanEntry("email", "o'brien@tenant1.example.com")),
]


@pytest.mark.parametrize(("profile", "san"), ISSUED, ids=[str(case[1]) for case in ISSUED])
def test_good_san_is_issued_and_verifies(services: Services, profile: str, san: SanEntry) -> None:
    cert = services.ca.issue(_request(profile, san), TEST_ACTOR)
    ca = PROFILE_REQUESTS[profile][0]
    chain = [der(ca_cert(services, "root")), der(ca_cert(services, ca))]
    if not san.value.startswith("*."):
        # pkilint's RFC 5280 linter takes any wildcard for bad dNSName syntax.
        checkers.pkilint_cert(der(cert))
    checkers.pkilint_chain(chain[1], der(cert))
    checkers.openssl_verify(der(cert), chain)
    assert checkers.gnutls_verify(der(cert), chain) == "ok"


def test_a_dns_name_given_twice_in_other_cases_is_a_duplicate(services: Services) -> None:
    """DNS names compare without case (RFC 4343): the same name twice, refused as such."""
    sans = (SanEntry("dns", "radius-1.tenant1.example.com"),
            SanEntry("dns", "RADIUS-1.tenant1.example.com"))  # fmt: skip
    _assert_refused(
        services,
        lambda: services.ca.issue(
            dataclasses.replace(_request("device", sans[0]), sans=sans), TEST_ACTOR
        ),
        PolicyViolation,
        "san-duplicate",
    )
