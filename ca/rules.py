"""Issuance rules: one small function per rule, composed per profile.

Each rule inspects the to-be-signed certificate (``Tbs``) and raises
``PolicyViolation(rule_name, why)``; none returns a bool. ``check(tbs)`` runs them all before
anything is signed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
from collections.abc import Callable, Sequence

import idna
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ca.subject import attribute_label, check_value
from ca.tbs import SanEntry, Tbs, subject_attr_names
from ca.weakkeys import is_debian_weak
from sekisho.errors import PolicyViolation, shown

Rule = Callable[[Tbs], None]

# Used with fullmatch: "$" also matches before a final newline, and passed "example.com\n".
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 5321 4.1.2 Dot-string: atoms joined by single dots. A quoted local part is refused.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EMAIL = re.compile(rf"(?=[^@]{{1,64}}@){_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9.-]{{1,253}}")
MAX_SUBJECT_VALUE = 64  # RFC 5280 upper bounds (ub-common-name etc.)


def serial_in_range(tbs: Tbs) -> None:
    # RFC 5280 4.1.2.2: positive, at most 20 octets (159 bits keeps the sign bit clear).
    if not 0 < tbs.serial < 1 << 159:
        raise PolicyViolation("serial", "serial must be positive and fit in 20 octets")


def key_type_allowed(tbs: Tbs) -> None:
    if tbs.key_type not in tbs.profile.key_types:
        allowed = ", ".join(sorted(k.value for k in tbs.profile.key_types))
        raise PolicyViolation(
            "key-type",
            f"{tbs.key_type.value} keys are not allowed for {tbs.profile.name}"
            f" (allowed: {allowed})",
        )


# ROCA (CVE-2017-15361; Nemec et al., "The Return of Coppersmith's Attack", CCS 2017):
# Infineon's RSALib drew its primes as p = k*M + (65537**a mod M), M a product of small primes,
# so for each small prime r the residues p mod r, q mod r and with them N mod r all lie in the
# subgroup of Z_r* that 65537 generates. The paper's detector tests the odd primes 3..167. For
# 21 of them 65537 generates all of Z_r* (3, 5, 7, 23, 29, 31, 41, 43, 47, 59, 67, 83, 89, 101,
# 113, 131, 137, 139, 149, 163, 167): every modulus passes there, so they tell nothing and are
# left out (the filter below computes this). The 17 kept (11, 13, 17, 19, 37, 53, 61, 71, 73, 79,
# 97, 103, 107, 109, 127, 151, 157) pass a random modulus with probability about 4e-9.
_ROCA_GENERATOR = 65537


def _subgroup_of(generator: int, r: int) -> frozenset[int]:
    """The residues mod prime ``r`` that ``generator`` generates (its powers)."""
    residues = {1}
    x = generator % r
    for _ in range(r):  # the subgroup has at most r - 1 elements
        if x in residues:
            break
        residues.add(x)
        x = x * generator % r
    return frozenset(residues)


def _roca_subgroups() -> tuple[tuple[int, frozenset[int]], ...]:
    primes = [r for r in range(3, 168, 2) if all(r % d for d in range(3, math.isqrt(r) + 1, 2))]
    subgroups = ((r, _subgroup_of(_ROCA_GENERATOR, r)) for r in primes)
    return tuple((r, group) for r, group in subgroups if len(group) < r - 1)


_ROCA_SUBGROUPS = _roca_subgroups()


def has_roca_fingerprint(n: int) -> bool:
    """True if ``n mod r`` lies in 65537's subgroup for every fingerprint prime ``r``: the
    structure of an Infineon RSALib modulus. One ``n % r`` and a set lookup per prime,
    stopping at the first miss (80% of moduli miss at 11): measured with timeit on the
    2-vCPU dev machine, about 1 us on average over 50 ordinary 2048-bit moduli and 7 us for
    a fingerprinted one (all 17 primes), against some 240 us for the Fermat loop below."""
    return all(n % r in group for r, group in _ROCA_SUBGROUPS)


# BR 6.1.6: the modulus should have no factors smaller than 752. The product of the primes
# below 752 (133 of them, 1,038 bits): one gcd tells whether the modulus has any.
SMALL_FACTOR_BOUND = 752
_SMALL_PRIMORIAL = math.prod(
    r for r in range(2, SMALL_FACTOR_BOUND) if all(r % d for d in range(2, math.isqrt(r) + 1))
)


def rsa_key_not_weak(tbs: Tbs) -> None:
    check_public_key(tbs.public_key, generated_here=tbs.key_generated_here)


# Ed25519 (RFC 8032 5.1): p = 2^255 - 19, d = -121665/121666. A public key of small order
# (the identity, the point of order 2, those of order 4 and 8) lets anyone make a signature
# that verifies for every message (R = A's encoding, S = 0 for the identity): such a key proves
# possession of nothing, and a certificate for it can be used by whoever holds the certificate.
_ED_P = 2**255 - 19
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P


def _ed25519_add(
    a: tuple[int, int], b: tuple[int, int]
) -> tuple[int, int]:  # affine, complete for a = -1 and non-square d
    (x1, y1), (x2, y2) = a, b
    t = _ED_D * x1 * x2 * y1 * y2 % _ED_P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, _ED_P) % _ED_P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, _ED_P) % _ED_P
    return x3, y3


def ed25519_key_problem(encoded: bytes) -> str | None:
    """Why the 32-octet Ed25519 public key ``encoded`` is unfit for a certificate, or None:
    a non-canonical encoding (y >= p), not a point of the curve, or a point of small order
    (its 8th multiple is the identity)."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    if y >= _ED_P:
        return "its encoding is not canonical (y >= p)"
    u, v = (y * y - 1) % _ED_P, (_ED_D * y * y + 1) % _ED_P
    x2 = u * pow(v, -1, _ED_P) % _ED_P
    x = pow(x2, (_ED_P + 3) // 8, _ED_P)
    if x * x % _ED_P != x2:
        x = x * pow(2, (_ED_P - 1) // 4, _ED_P) % _ED_P
    if x * x % _ED_P != x2:
        return "it is not a point of the curve"
    point = (x, y)
    for _ in range(3):
        point = _ed25519_add(point, point)
    if point == (0, 1):
        return "it is a point of small order, for which anyone can make a valid signature"
    return None


def check_public_key(key: object, *, generated_here: bool = False) -> None:
    """An RSA key: exponent 65537, no prime factor below 752, no ROCA fingerprint, not a
    Debian weak key, and no Fermat factorisation within 100 rounds (BR 6.1.1.3: keys known
    to be weak are refused). The Debian lists (``ca.weakkeys``; ``weak-key-list`` while one
    is missing) are not consulted for a key ``generated_here``, by this process or its key
    backend: Debian's OpenSSL of 2006-2008 made none of those. Also for a CA key adopted from
    a token (``ca.hierarchy.check_adoptable``), which no certificate rule sees for a root."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        problem = ed25519_key_problem(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
        if problem:
            raise PolicyViolation("weak-key", f"Ed25519 public key refused: {problem}")
        return
    if not isinstance(key, rsa.RSAPublicKey):
        return
    numbers = key.public_numbers()
    if numbers.e != 65537:
        raise PolicyViolation("weak-key", f"RSA public exponent must be 65537, not {numbers.e}")
    n = numbers.n
    factor = math.gcd(n, _SMALL_PRIMORIAL)
    if factor != 1:
        raise PolicyViolation(
            "weak-key",
            f"RSA modulus is divisible by"
            f" {min(r for r in range(2, SMALL_FACTOR_BOUND) if factor % r == 0)}"
            f" (BR 6.1.6: no factor below {SMALL_FACTOR_BOUND}): generate a new key",
        )
    if has_roca_fingerprint(n):
        raise PolicyViolation(
            "weak-key",
            "RSA modulus has the ROCA fingerprint of Infineon RSALib keys (CVE-2017-15361),"
            " which can be factored: generate a new key with unaffected software or firmware",
        )
    if not generated_here and is_debian_weak(n):
        raise PolicyViolation(
            "weak-key",
            "RSA key is a Debian weak key (CVE-2008-0166: made by Debian's OpenSSL of"
            " 2006-2008, whose generator was predictable), and its private key is public:"
            " generate a new key",
        )
    if not generated_here and pow(2, n - 1, n) == 1:
        # A prime modulus: phi(n) = n - 1, so anyone who sees the public key computes the
        # private exponent (a CSR for one passes the proof of possession). One Fermat test:
        # every prime passes it; an RSA modulus practically never does.
        raise PolicyViolation(
            "weak-key", "RSA modulus is prime: anyone can compute its private key"
        )
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    for _ in range(100):
        b2 = a * a - n
        b = math.isqrt(b2)
        if b * b == b2:
            raise PolicyViolation("weak-key", "RSA modulus factors by Fermat's method")
        a += 1


def validity_sane(tbs: Tbs) -> None:
    if tbs.not_after <= tbs.not_before:
        raise PolicyViolation("validity", "notAfter must be after notBefore")
    if tbs.not_before.microsecond or tbs.not_after.microsecond:
        raise PolicyViolation("validity", "validity times carry no fractions of a second")


# RFC 5280 4.1.2.5: the validity period runs from notBefore through notAfter, inclusive; CA/B
# BR 6.3.2 counts it so too. N days of validity end one second before notBefore + N days.
SECOND = dt.timedelta(seconds=1)


def validity_within_profile(tbs: Tbs) -> None:
    length = tbs.not_after - tbs.not_before + SECOND
    if length > tbs.profile.max_validity:
        raise PolicyViolation(
            "max-validity",
            f"{length.days} days exceeds the {tbs.profile.name} maximum of "
            f"{tbs.profile.max_validity.days} days",
        )


def validity_within_issuer(tbs: Tbs) -> None:
    if tbs.not_before < tbs.issuer.not_before or tbs.not_after > tbs.issuer.not_after:
        raise PolicyViolation(
            "validity-within-issuer",
            f"validity must lie within the issuing CA's ({tbs.issuer.not_after:%Y-%m-%d})",
        )


def subject_attributes(tbs: Tbs) -> None:
    names = subject_attr_names(tbs.subject)
    present = set(names)
    missing = tbs.profile.subject_required - present
    if missing:
        raise PolicyViolation("subject-required", f"subject lacks {sorted(missing)}")
    extra = present - tbs.profile.subject_allowed
    if extra:
        raise PolicyViolation("subject-allowed", f"subject attributes {sorted(extra)} not allowed")
    if len(names) != len(present):
        raise PolicyViolation("subject-allowed", "subject repeats an attribute")
    for attr in tbs.subject:
        # What the certificate can carry (ca.subject: empty, controls, bidi, string type, the
        # X.520 bound), then our own cap, tighter than X.520's for some attributes.
        value = check_value(attr.oid, attr.value)
        if len(value) > MAX_SUBJECT_VALUE:
            raise PolicyViolation(
                "subject-value",
                f"{attribute_label(attr.oid)} has {len(value)} characters: at most "
                f"{MAX_SUBJECT_VALUE} here",
            )


def is_dns_name(value: str) -> bool:
    """Lower-case LDH labels (IDNs as A-labels) joined by dots, at most 253 characters: no
    wildcard, no leading, trailing or doubled dot."""
    return len(value) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in value.split("."))


def is_mailbox(value: str) -> bool:
    """An email address as the SAN rules accept it (``local@domain``)."""
    return bool(_EMAIL.fullmatch(value)) and is_dns_name(value.rsplit("@", 1)[1].lower())


def _label_problem(label: str) -> str | None:
    if not _DNS_LABEL.fullmatch(label):
        return "has a bad label"
    if label[2:4] == "--":
        if not label.startswith("xn--"):
            # RFC 5890 2.3.1: "??--" labels are reserved; only "xn--" (an A-label) is assigned.
            return f"has a reserved label {shown(label)} (only xn-- may have -- there)"
        try:
            ok = idna.encode(idna.decode(label)).decode("ascii") == label
        except UnicodeError:  # idna.IDNAError is one
            ok = False
        if not ok:
            return f"has {shown(label)}, which is not a valid IDNA 2008 A-label"
    return None


def dns_name_problem(value: str, wildcard: bool = True) -> str | None:
    """Why ``value`` is not a DNS name a certificate may carry, or None: lower-case LDH labels,
    at least two, the last not all digits (then it is an IP address or nothing) and shaped as a
    top-level domain (two characters or more, ending in a letter), xn-- labels
    valid A-labels (they round-trip through ``idna``); with ``wildcard``, a first label "*"
    followed by at least two labels."""
    if len(value) > 253 or value != value.lower():
        return "must be lower case, <= 253"
    labels = value.split(".")
    if wildcard and labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            return "is a wildcard over a top-level domain"
    if len(labels) < 2:
        return "is not fully qualified"
    for label in labels:
        problem = _label_problem(label)
        if problem:
            return problem
    if labels[-1].isdigit():
        return "ends in an all-numeric label (an IP address belongs in an ip: SAN)"
    if not ends_in_top_level_domain(value):
        return "does not end in a top-level domain (2 characters or more, the last a letter)"
    return None


def ends_in_top_level_domain(name: str) -> bool:
    """Whether the last label of the DNS name ``name`` is shaped as a top-level domain: RFC
    3696 2 (not all-numeric), and every one delegated has two characters or more and ends in a
    letter, which pkilint's domain check (the lint gate) requires too. Refused by our rules
    with or without the gate."""
    last = name.rsplit(".", 1)[-1]
    return len(last) >= 2 and last[-1].isalpha()


def _check_dns(value: str) -> None:
    problem = dns_name_problem(value)
    if problem:
        raise PolicyViolation("san-dns-syntax", f"DNS name {shown(value)} {problem}")


# The URI schemes a SAN may carry. Connectors are named https://<host>/id/connector/... (see
# docs/decisions.md); pkilint and some TLS stacks refuse urn: names, and nothing here uses
# spiffe://. Every scheme listed must have an authority (a host).
URI_SCHEMES = frozenset({"https"})
MAX_URI = 1024
# RFC 3986 2: unreserved, reserved and "%" (followed by two hex digits, checked apart).
_URI_CHARS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")
_PCT_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 appendix B, the authority required.
_URI_PARTS = re.compile(r"(?P<scheme>[^:/?#]+)://(?P<authority>[^/?#]*)(?P<rest>[/?#].*)?")
_AUTHORITY = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?")


def uri_problem(value: str) -> str | None:
    """Why ``value`` is not a URI a SAN may carry (RFC 5280 4.2.1.6, RFC 3986), or None."""
    if len(value) > MAX_URI:
        return f"is longer than {MAX_URI} characters"
    if not _URI_CHARS.fullmatch(value) or _PCT_BAD.search(value):
        return "has a character a URI cannot hold (space, control, non-ASCII or a bare %)"
    parts = _URI_PARTS.fullmatch(value)
    if not parts:
        return "is not an absolute URI with a host (scheme://host/...)"
    scheme = parts["scheme"]
    if scheme not in URI_SCHEMES:
        return f"has scheme {shown(scheme)}; allowed: {', '.join(sorted(URI_SCHEMES))}"
    authority = _AUTHORITY.fullmatch(parts["authority"])
    if authority is None or "@" in parts["authority"]:
        # RFC 9110 4.2.4: a sender must not put userinfo in an https URI.
        return "has a malformed authority (or a user name in it)"
    host, port = authority["host"], authority["port"]
    if port is not None and not 0 < int(port) < 65536:
        return "has a port out of range"
    if "[" in (parts["rest"] or "") or "]" in (parts["rest"] or ""):
        return "has [ or ] outside an IPv6 host"
    if host.startswith("["):
        try:
            literal = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "has a host that is not an IPv6 address in brackets"
        if literal.scope_id is not None or f"[{literal}]" != host:
            return "has an IPv6 host not in canonical form or with a zone"
        return None
    try:
        return None if str(ipaddress.IPv4Address(host)) == host else "has a bad IPv4 host"
    except ValueError:
        pass
    problem = dns_name_problem(host, wildcard=False)
    return f"has a host that {problem}" if problem else None


def uri_dns_host(value: str) -> str | None:
    """The host of URI ``value`` when it is a DNS name (None for an IP literal or a URI the
    syntax rule refuses), lower-cased."""
    parts = _URI_PARTS.fullmatch(value)
    authority = _AUTHORITY.fullmatch(parts["authority"]) if parts else None
    if authority is None:
        return None
    host = authority["host"]
    if not host or host.startswith("["):
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return host.lower()
    return None


def _check_san(entry: SanEntry) -> None:
    if entry.kind == "dns":
        _check_dns(entry.value)
    elif entry.kind == "email":
        if not _EMAIL.fullmatch(entry.value):
            raise PolicyViolation(
                "san-email-syntax", f"{shown(entry.value)} is not an email address"
            )
        problem = dns_name_problem(entry.value.rsplit("@", 1)[1].lower(), wildcard=False)
        if problem:
            raise PolicyViolation(
                "san-email-syntax", f"the domain of {shown(entry.value)} {problem}"
            )
    elif entry.kind == "ip":
        try:
            address = ipaddress.ip_address(entry.value)
        except ValueError:
            raise PolicyViolation(
                "san-ip-syntax", f"{shown(entry.value)} is not an IP address"
            ) from None
        if getattr(address, "scope_id", None) is not None or str(address) != entry.value:
            # A zone (fe80::1%eth0) is not part of the octets a certificate carries, and any
            # other spelling than the canonical one would be recorded unlike the certificate.
            raise PolicyViolation(
                "san-ip-syntax",
                f"{shown(entry.value)} is not a canonical IP address without a zone",
            )
    elif entry.kind == "uri":
        problem = uri_problem(entry.value)
        if problem:
            raise PolicyViolation("san-uri-syntax", f"URI {shown(entry.value)} {problem}")


def _same_name(entry: SanEntry) -> tuple[str, str]:
    """What two SANs share when they name the same thing: a DNS name in any case, and a
    mailbox whose domain differs in case only (RFC 5321 2.4: the domain is case-insensitive;
    the local part is the receiving host's, kept as it is)."""
    if entry.kind == "dns":
        return entry.kind, entry.value.lower()
    if entry.kind == "email" and "@" in entry.value:
        local, domain = entry.value.rsplit("@", 1)
        return entry.kind, f"{local}@{domain.lower()}"
    return entry.kind, entry.value


def subject_alt_names(tbs: Tbs) -> None:
    if tbs.profile.san_required and not tbs.sans:
        raise PolicyViolation("san-required", f"{tbs.profile.name} needs a subjectAltName")
    if len(tbs.sans) > 100:
        raise PolicyViolation("san-count", "at most 100 subjectAltNames")
    if len({_same_name(entry) for entry in tbs.sans}) != len(tbs.sans):
        raise PolicyViolation("san-duplicate", "a subjectAltName appears twice")
    for entry in tbs.sans:
        if entry.kind not in tbs.profile.san_types:
            raise PolicyViolation(
                "san-type", f"{entry.kind} names are not allowed for {tbs.profile.name}"
            )
        _check_san(entry)


def _in_dns_subtree(name: str, base: str) -> bool:
    base = base.lower().rstrip(".").lstrip(".")
    return not base or name == base or name.endswith("." + base)


def _dns_within(name: str, base: str) -> bool:
    """Every name ``name`` stands for lies in dNSName subtree ``base``: for "*.parent", every
    "x.parent", so exactly when parent does."""
    name = name.lower().rstrip(".")
    return _in_dns_subtree(name.removeprefix("*."), base)


def _dns_meets(name: str, base: str) -> bool:
    """Some name ``name`` stands for lies in dNSName subtree ``base``: for "*.parent", also
    when ``base`` is one label below parent ("*.example.com" covers "secret.example.com")."""
    name = name.lower().rstrip(".")
    if name.startswith("*."):
        parent = name[2:]
        return _in_dns_subtree(parent, base) or base.lower().partition(".")[2] == parent
    return _in_dns_subtree(name, base)


def _mailbox_within(mailbox: str, base: str) -> bool:
    """RFC 5280 4.2.1.10 rfc822Name subtrees: "local@host" is that mailbox only (the local
    part compared as is, the host in any case), "host" every mailbox at exactly that host,
    ".domain" every mailbox at any host below domain, not at domain itself."""
    local, _, host = mailbox.rpartition("@")
    if "@" in base:
        base_local, _, base_host = base.rpartition("@")
        return local == base_local and host.lower() == base_host.lower()
    if base.startswith("."):
        return host.lower().endswith(base.lower())
    return host.lower() == base.lower()


def _matches(entry: SanEntry, subtree: x509.GeneralName, excluded: bool) -> bool | None:
    """Whether the name falls in the subtree (permitted: all of it; ``excluded``: any of it, as
    a wildcard stands for many names); None if the subtree does not speak to this name type."""
    if entry.kind == "dns" and isinstance(subtree, x509.DNSName):
        return (_dns_meets if excluded else _dns_within)(entry.value, subtree.value)
    if entry.kind == "email" and isinstance(subtree, x509.RFC822Name):
        return _mailbox_within(entry.value, subtree.value)
    if entry.kind == "ip" and isinstance(subtree, x509.IPAddress):
        net = subtree.value
        return (
            isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network)
            and ipaddress.ip_address(entry.value) in net
        )
    return None


# A CN written like a host name (letters, digits, "_" and "-" in dot-separated labels, perhaps
# after "*."): OpenSSL and GnuTLS hold such a CN to the dNSName constraints (when the
# certificate has no dNSName SAN), and clients that still read the CN take it as the host.
_HOST_LIKE_CN = re.compile(r"(?:\*\.)?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\.?")
_CHECKED_SUBTREES = (x509.DNSName, x509.RFC822Name, x509.IPAddress)


def _subject_names(subject: x509.Name) -> list[tuple[str, SanEntry]]:
    """The names a relying party may take from the subject: a host-like CN as a dNSName, a
    mailbox CN or emailAddress as an rfc822Name."""
    names: list[tuple[str, SanEntry]] = []
    for attr in subject:
        value = attr.value if isinstance(attr.value, str) else ""
        if attr.oid == x509.NameOID.COMMON_NAME and _HOST_LIKE_CN.fullmatch(value):
            names.append(("CN", SanEntry("dns", value.lower().rstrip("."))))
        elif attr.oid == x509.NameOID.COMMON_NAME and is_mailbox(value):
            names.append(("CN", SanEntry("email", value)))
        elif attr.oid == x509.NameOID.EMAIL_ADDRESS and is_mailbox(value):
            names.append(("emailAddress", SanEntry("email", value)))
    return names


def within_name_constraints(tbs: Tbs) -> None:
    """RFC 5280 4.2.1.10 for the SAN types we issue and the names in the subject, enforced
    before signing. Stricter than verifiers in two ways: a wildcard is refused when any name
    it covers is excluded, and a host-like CN is checked even beside dNSName SANs."""
    nc = tbs.issuer.name_constraints
    if nc is None:
        return
    permitted, excluded = nc.permitted_subtrees or (), nc.excluded_subtrees or ()
    unchecked = {type(s).__name__ for s in (*permitted, *excluded)} - {
        t.__name__ for t in _CHECKED_SUBTREES
    }
    if unchecked:
        # Not made by `ca create-issuing`; refuse rather than sign what verifiers may reject.
        raise PolicyViolation(
            "name-constraints",
            f"the CA's name constraints hold {', '.join(sorted(unchecked))} subtrees,"
            " which Sekisho does not check",
        )
    names = [(f"SAN {shown(entry)}", entry) for entry in tbs.sans]
    # A URI's host is the name a relying party connects to or authorises: held to the dNSName
    # constraints (RFC 5280 checks URIs only against uniformResourceIdentifier subtrees,
    # which no CA of ours has, so a verifier would let any host through).
    names += [
        (f"SAN {shown(entry)} (host {shown(host)})", SanEntry("dns", host))
        for entry in tbs.sans
        if entry.kind == "uri" and (host := uri_dns_host(entry.value)) is not None
    ]
    names += [
        (f"{attr} {shown(entry.value)}", entry) for attr, entry in _subject_names(tbs.subject)
    ]
    for what, entry in names:
        if any(_matches(entry, subtree, excluded=True) for subtree in excluded):
            raise PolicyViolation("name-constraints", f"{what} is excluded by the CA")
        relevant = [
            m for m in (_matches(entry, s, excluded=False) for s in permitted) if m is not None
        ]
        if relevant and not any(relevant):
            raise PolicyViolation("name-constraints", f"{what} is outside the CA's permitted names")


def root_issues_cas_only(tbs: Tbs) -> None:
    """The root certifies CAs, nothing else (CA/Browser Forum Baseline Requirements 6.1.7):
    an end-entity certificate under the root would have no OCSP answers (the root is not
    served) and would need the offline key online for its whole life."""
    if tbs.issuer.is_root and not tbs.profile.ca:
        raise PolicyViolation(
            "root-issues-cas-only",
            f"CA {tbs.issuer.name} is the root: it issues CA certificates only (profile "
            f"{tbs.profile.name} is for end entities; issue it under an issuing CA)",
        )


def ca_path_length(tbs: Tbs) -> None:
    if tbs.profile.ca and tbs.issuer.path_length == 0:
        raise PolicyViolation("path-length", f"CA {tbs.issuer.name} may not issue CA certificates")


RULES: Sequence[Rule] = (
    serial_in_range,
    key_type_allowed,
    rsa_key_not_weak,
    validity_sane,
    validity_within_profile,
    validity_within_issuer,
    subject_attributes,
    subject_alt_names,
    within_name_constraints,
    root_issues_cas_only,
    ca_path_length,
)


def check(tbs: Tbs, rules: Sequence[Rule] = RULES) -> None:
    for rule in rules:
        rule(tbs)


def clamp_validity(
    not_before: dt.datetime,
    requested: dt.timedelta | None,
    tbs_default: dt.timedelta,
    issuer_not_after: dt.datetime,
) -> dt.datetime:
    """notAfter for ``requested`` (or the default) validity, counted inclusively (``SECOND``).
    Default validity is clamped to the issuer's end; an explicit request is not (a rule
    refuses it instead, so the caller learns why)."""
    if requested is not None:
        return not_before + requested - SECOND
    return min(not_before + tbs_default - SECOND, issuer_not_after)
