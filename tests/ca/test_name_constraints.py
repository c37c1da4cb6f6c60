"""An issuing CA's name constraints (RFC 5280 4.2.1.10), enforced before signing: the names a
verifier would hold against them (SANs, a host-like or mailbox CN) are refused by name
(``name-constraints``) and journalled; the names they allow are issued and verify."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from cryptography import x509

from ca import rules
from ca.hierarchy import NameConstraintSpec, create_issuing
from ca.issuance import IssueRequest
from ca.tbs import SanEntry
from hsm.base import KeyType
from sekisho.errors import InputError, PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import ca_cert, der, name, request_for
from tests.ca.test_bad_input import _assert_refused
from tests.conftest import TEST_ACTOR
from tests.support import checkers

SPECS = {
    "mail-host": NameConstraintSpec(permitted_email=("example.com",)),
    "mail-domain": NameConstraintSpec(permitted_email=(".example.com",)),
    "mailbox": NameConstraintSpec(permitted_email=("alice@example.com",)),
    "tenant1": NameConstraintSpec(permitted_dns=("tenant1.example.com",)),
    "no-bank": NameConstraintSpec(excluded_dns=("bank.example",)),
    "no-secret": NameConstraintSpec(
        permitted_dns=("example.com",), excluded_dns=("secret.example.com",)
    ),
    "sub": NameConstraintSpec(permitted_dns=("sub.example.com",)),
    "mail-t1": NameConstraintSpec(permitted_email=("tenant1.example.com",)),
    "net": NameConstraintSpec(
        permitted_dns=("tenant1.example.com",),
        permitted_ip=("10.20.0.0/16", "2001:db8:20::/48"),
        excluded_ip=("10.20.99.0/24",),
    ),
    "no-net": NameConstraintSpec(excluded_ip=("192.168.0.0/16",)),
}


def _ca(services: Services, spec: str) -> str:
    """A new issuing CA (under the root) constrained by ``SPECS[spec]``."""
    ca = "nc-" + spec
    create_issuing(
        services.ca, ca, "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR, SPECS[spec]
    )
    services.registry.invalidate()
    return ca


def _request(
    services: Services, spec: str, profile: str, san: SanEntry, subject: x509.Name | None = None
) -> IssueRequest:
    request = request_for(profile)
    return dataclasses.replace(
        request, ca=_ca(services, spec), sans=(san,), subject=subject or request.subject
    )


def _chain(services: Services, ca: str) -> list[bytes]:
    return [der(ca_cert(services, "root")), der(ca_cert(services, ca))]


# (id, spec, profile, SAN, subject or None, whether OpenSSL and GnuTLS reject it too)
REFUSED = [
    # rfc822Name "host": mailboxes at that host only, not at its subdomains.
    ("mail-host-sub", "mail-host", "admin-client", SanEntry("email", "alice@sub.example.com"),
     None, True),
    # ".domain": mailboxes below the domain, not at the domain itself.
    ("mail-domain-apex", "mail-domain", "admin-client", SanEntry("email", "alice@example.com"),
     None, True),
    # A mailbox: its local part compared as written.
    ("mailbox-case", "mailbox", "admin-client", SanEntry("email", "ALICE@example.com"),
     None, True),
    # A host-like CN is held to the dNSName constraints (verifiers do so without a DNS SAN).
    ("cn-outside", "tenant1", "tls-server", SanEntry("ip", "10.0.0.7"),
     name(CN="www.bank.example"), True),
    ("cn-outside-device", "tenant1", "device", SanEntry("ip", "10.0.0.7"),
     name(CN="www.bank.example"), True),
    ("cn-excluded", "no-bank", "tls-server", SanEntry("ip", "10.0.0.7"),
     name(CN="www.bank.example"), True),
    ("cn-ip-looks-like-host", "tenant1", "tls-server", SanEntry("ip", "10.0.0.7"),
     name(CN="10.0.0.7"), True),
    # Stricter than the verifiers, which skip the CN once there is a dNSName SAN: clients that
    # still read the CN would take this certificate for www.bank.example.
    ("cn-outside-beside-dns", "tenant1", "tls-server", SanEntry("dns", "a.tenant1.example.com"),
     name(CN="www.bank.example"), False),
    # A mailbox CN is held to the rfc822Name constraints (OpenSSL and GnuTLS do not look).
    ("cn-mailbox", "mail-t1", "admin-client", SanEntry("email", "alice@tenant1.example.com"),
     name(O="Tenant One", CN="alice@evil.example"), False),
    # A wildcard stands for secret.example.com, excluded; the verifiers compare the string.
    ("wildcard-over-excluded", "no-secret", "tls-server", SanEntry("dns", "*.example.com"),
     None, False),
    ("wildcard-in-excluded", "no-secret", "tls-server", SanEntry("dns", "*.secret.example.com"),
     None, True),
    # A URI's host is held to the dNSName constraints (verifiers check URIs only against
    # uniformResourceIdentifier subtrees, which these CAs lack).
    ("uri-host-outside", "tenant1", "connector",
     SanEntry("uri", "https://gw.bank.example/id/connector/t1/1"), None, False),
    ("uri-host-excluded", "no-secret", "connector",
     SanEntry("uri", "https://a.secret.example.com/id/connector/t1/1"), None, False),
    # Permitted sub.example.com: *.example.com also stands for names outside it.
    ("wildcard-above-permitted", "sub", "tls-server", SanEntry("dns", "*.example.com"),
     None, True),
    # iPAddress subtrees (--permit-ip, --exclude-ip): outside every permitted network, in an
    # excluded one, of the other IP version than any permitted network.
    ("ip-outside", "net", "device", SanEntry("ip", "10.30.0.1"), None, True),
    ("ip-excluded", "net", "device", SanEntry("ip", "10.20.99.5"), None, True),
    ("ip-v6-outside", "net", "device", SanEntry("ip", "2001:db8:21::1"), None, True),
    ("ip-excluded-only", "no-net", "device", SanEntry("ip", "192.168.1.1"), None, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "profile", "san", "subject", "verifiers_reject"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_name_outside_the_constraints_is_refused(
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    spec: str,
    profile: str,
    san: SanEntry,
    subject: x509.Name | None,
    verifiers_reject: bool,
) -> None:
    request = _request(services, spec, profile, san, subject)
    _assert_refused(
        services,
        lambda: services.ca.issue(request, TEST_ACTOR),
        PolicyViolation,
        "name-constraints",
    )
    if not verifiers_reject:
        return
    # Signed without the rule, the certificate is one OpenSSL and GnuTLS reject: the refusal
    # spares its holder a certificate that does not work.
    monkeypatch.setattr(
        rules,
        "check",
        lambda tbs: [
            rule(tbs) for rule in rules.RULES if rule is not rules.within_name_constraints
        ],
    )
    cert = services.ca.issue(request, TEST_ACTOR)
    chain = _chain(services, request.ca)
    res = checkers._openssl_verify_run(der(cert), chain, None, None)
    assert res.returncode != 0 and "subtree violation" in res.stdout + res.stderr
    assert "violates the signer's constraints" in checkers.gnutls_verify(der(cert), chain)


ISSUED = [
    ("mail-host", "mail-host", "admin-client", SanEntry("email", "alice@example.com"), None),
    ("mail-host-case", "mail-host", "admin-client", SanEntry("email", "alice@EXAMPLE.com"),
     None),
    ("mail-domain", "mail-domain", "admin-client", SanEntry("email", "alice@sub.example.com"),
     None),
    ("mailbox-host-case", "mailbox", "admin-client", SanEntry("email", "alice@Example.COM"),
     None),
    ("cn-mailbox", "mail-t1", "admin-client", SanEntry("email", "alice@tenant1.example.com"),
     name(O="Tenant One", CN="alice@tenant1.example.com")),
    ("cn-inside", "tenant1", "tls-server", SanEntry("ip", "10.0.0.7"),
     name(CN="a.tenant1.example.com")),
    ("cn-not-a-host", "tenant1", "device", SanEntry("dns", "d.tenant1.example.com"),
     name(CN="Radius One", serialNumber="SN1")),
    ("cn-not-excluded", "no-bank", "tls-server", SanEntry("ip", "10.0.0.7"),
     name(CN="www.bank.example.org")),
    ("not-excluded", "no-secret", "tls-server", SanEntry("dns", "notsecret.example.com"), None),
    ("wildcard-beside-excluded", "no-secret", "tls-server",
     SanEntry("dns", "*.www.example.com"), None),
    ("uri-host-inside", "tenant1", "connector",
     SanEntry("uri", "https://gw.tenant1.example.com/id/connector/t1/1"), None),
    ("uri-ip-host", "tenant1", "connector",
     SanEntry("uri", "https://10.0.0.7/id/connector/t1/1"), None),
    ("wildcard-in-permitted", "sub", "tls-server", SanEntry("dns", "*.sub.example.com"),
     name(CN="*.sub.example.com")),
    ("ip-inside", "net", "device", SanEntry("ip", "10.20.0.7"), None),
    ("ip-v6-inside", "net", "device", SanEntry("ip", "2001:db8:20::7"), None),
    ("ip-not-excluded", "no-net", "device", SanEntry("ip", "10.0.0.7"), None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "profile", "san", "subject"),
    [case[1:] for case in ISSUED],
    ids=[case[0] for case in ISSUED],
)
def test_name_within_the_constraints_is_issued_and_verifies(
    services: Services, spec: str, profile: str, san: SanEntry, subject: x509.Name | None
) -> None:
    request = _request(services, spec, profile, san, subject)
    cert = services.ca.issue(request, TEST_ACTOR)
    chain = _chain(services, request.ca)
    if not san.value.startswith("*."):
        # pkilint's RFC 5280 linter takes any wildcard for bad dNSName syntax (RFC 5280 does
        # not define them; the CA/B profiles do).
        checkers.pkilint_cert(der(cert))
        checkers.pkilint_chain(chain[1], der(cert))
    checkers.openssl_verify(der(cert), chain)
    assert checkers.gnutls_verify(der(cert), chain) == "ok"


@pytest.mark.parametrize(
    "network", ["10.20.0.1/16", "10.20.0.0", "10.020.0.0/16", "fe80::%eth0/64", " 10.0.0.0/8", ""]
)
def test_an_ip_constraint_that_is_not_a_network_is_refused(network: str) -> None:
    """Host bits set (10.20.0.1/16 would be read as 10.20.0.0/16), no prefix length, leading
    zeros, a zone, spaces: refused before any key exists, saying what is wanted."""
    with pytest.raises(InputError, match="IP name constraint"):
        NameConstraintSpec(permitted_ip=(network,))
    with pytest.raises(InputError, match="IP name constraint"):
        NameConstraintSpec(excluded_ip=(network,))


def test_ip_constraints_are_in_the_ca_certificate(services: Services) -> None:
    ca = _ca(services, "net")
    cert = ca_cert(services, ca)
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert [g for g in nc.value.permitted_subtrees or () if isinstance(g, x509.IPAddress)] == [
        x509.IPAddress(ipaddress.ip_network("10.20.0.0/16")),
        x509.IPAddress(ipaddress.ip_network("2001:db8:20::/48")),
    ]
    assert nc.value.excluded_subtrees == [x509.IPAddress(ipaddress.ip_network("10.20.99.0/24"))]
    checkers.pkilint_cert(der(cert))
    checkers.pkilint_chain(der(ca_cert(services, "root")), der(cert))


def test_constraints_of_a_type_not_checked_refuse_everything(services: Services) -> None:
    """``ca create-issuing`` makes DNS, email and IP subtrees only; a CA certificate with any other
    kind (here directoryName) is refused from, not signed past: the rules cannot tell what a
    verifier would make of it."""
    request = _request(services, "tenant1", "device", SanEntry("dns", "d.tenant1.example.com"))
    tbs = services.ca.prepare(request)  # every rule passes with the CA's own constraints
    issuer = dataclasses.replace(tbs.issuer)
    issuer.__dict__["name_constraints"] = x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(name(O="Tenant One"))], excluded_subtrees=None
    )
    with pytest.raises(PolicyViolation) as info:
        rules.within_name_constraints(dataclasses.replace(tbs, issuer=issuer))
    assert info.value.rule == "name-constraints" and "DirectoryName" in info.value.message
