"""The lint gate: every to-be-signed certificate is checked by pkilint before the CA signs it.

Security target 1 and CA/B Forum BR 4.3.1.2 (every TBS certificate SHALL be linted before
issuance). Sekisho's own rules (``ca.rules``) already decide what may be issued; pkilint is
someone else's reading of RFC 5280, so a fault in our rules, our profiles or our encoders is
caught before a signature exists, not after.

What is linted is the exact TBS the CA key is about to sign (the bytes the signing hook
receives), wrapped with the same signature algorithm and a signature by a throwaway key of
the issuer's key type: the linted and the signed TBS cannot differ (Boulder lints a second
TBS and compares the two); a self-signed root alone is linted once signed
(``Linter.check_certificate``). A finding of NOTICE or above refuses the issuance (rule
``pkilint``: nothing reserved, nothing signed, the refusal journalled); INFO findings (such
as "the SKI is the SHA-1 of the key") pass. A linter that fails on the structure refuses
too: a gate that cannot look does not open.

CRLs go through the same gate (``Linter.check_crl_tbs``, pkilint's ``lint_crl -p PKIX``
checks) before the CA key signs them: the exact TBSCertList when it has at most
``CRL_LINT_ENTRIES`` entries, else the same TBSCertList cut to its first ``CRL_LINT_ENTRIES``
entries (pkilint takes about 0.2 ms per entry: minutes over 10^6): the header, the
extensions and the entries of the lowest serials are linted, the others (written by the same
encoder) are not.

OCSP responses go through it too (``Linter.check_ocsp_tbs``, pkilint's ``lint_ocsp_response``
checks): the first response of each *shape* an issuer signs (the kinds of status it carries,
with or without a revocation reason, one CertID or more, a nonce or none; ``ocsp.core``)
is linted before it is signed, the later ones of that shape are not: thousands are signed in
a re-signing batch, and responses of one shape differ only in values the encoder writes the
same way (serials, times, hashes, the nonce's bytes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from ca import der
from ca.rules import dns_name_problem
from hsm.base import KeyType, sign_bytes
from hsm.software import generate_private_key
from sekisho.errors import PolicyViolation

LINT_RULE = "pkilint"
# pkilint's RFC 5280 linter takes a wildcard dNSName for bad syntax: RFC 5280 does not define
# wildcards, RFC 6125 / 9525 and the CA/B Forum profiles (whose pkilint linter accepts them)
# do. The tls-server and device profiles issue them (ca.rules: "*" as the whole first label,
# two labels after it), so this one finding is let through for such a name, and only for it.
WILDCARD_FINDING = "pkix.invalid_domain_name_syntax"
# pkilint takes a URI whose host is one label (http://localhost:8080/..., a container's name)
# for bad URI syntax; RFC 3986 allows it, and private PKIs publish under such names. Our own
# CRL and AIA URLs (under base_url, which the settings check) are let through that finding;
# any other URI (a connector's URI SAN) is not.
URI_FINDING = "pkix.invalid_uri_syntax"
MAX_FINDINGS_SHOWN = 5
# Entries of a CRL linted: all of them up to this many (about 50 ms), else the first this many.
CRL_LINT_ENTRIES = 256


class Linter:
    """pkilint's RFC 5280 certificate and CRL checks (those of its ``lint_pkix_cert`` and
    ``lint_crl -t CRL -p PKIX``), one set of validators per thread (pkilint does not say its
    validators may be shared), loaded on first use (importing pkilint costs about 0.3 s)."""

    def __init__(self, base_url: str | None = None) -> None:
        # Where our own CRL and AIA URLs start ("<base_url>/"), or None.
        self._own = base_url.rstrip("/") + "/" if base_url else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._keys: dict[KeyType, CertificateIssuerPrivateKeyTypes] = {}

    def warm(self) -> None:
        """Import pkilint and build this thread's validators now (about 0.45 s here), not in
        the first request that needs them: ``ocsp serve`` calls it before it listens (its
        first nonce answers waited for the import, and wrk's p99 over 5 s went from 18 ms to
        290 ms). Other threads then build theirs in under a millisecond."""
        from pkilint import loader, validation  # noqa: F401  (the imports are the point)

        self._validator()
        self._crl_validator()
        self._ocsp_validator()

    def check_tbs(self, tbs: bytes, key_type: KeyType) -> None:
        """Refuse (PolicyViolation, rule ``pkilint``) the TBS certificate ``tbs`` that a CA
        key of ``key_type`` is about to sign, if pkilint finds anything of NOTICE or above."""
        certificate = self._signed(asn1_x509.TbsCertificate, tbs, key_type, "certificate")
        self.check_certificate(certificate)

    def check_crl_tbs(self, tbs: bytes, key_type: KeyType) -> None:
        """Refuse (PolicyViolation, rule ``pkilint``) the TBSCertList ``tbs`` that a CA key of
        ``key_type`` is about to sign, if pkilint's RFC 5280 CRL checks find anything of
        NOTICE or above. The caller cuts a long list (``CRL_LINT_ENTRIES``)."""
        crl = self._signed(asn1_crl.TbsCertList, tbs, key_type, "CRL")
        self._check(crl, "CRL")

    def check_ocsp_tbs(self, tbs: bytes, key_type: KeyType, wrap: Callable[[bytes], bytes]) -> None:
        """Refuse (PolicyViolation, rule ``pkilint``) the ResponseData ``tbs`` that a key of
        ``key_type`` is about to sign, if pkilint's OCSP response checks find anything of
        NOTICE or above. ``wrap`` makes the whole OCSPResponse of a signature over ``tbs``
        (the signer's algorithm and certificates, as the signed response will carry them)."""
        try:
            response = wrap(sign_bytes(self._throwaway(key_type), key_type, tbs))
        except Exception as exc:
            raise lint_unreadable(exc, "OCSP response") from exc
        self._check(response, "OCSP response")

    def _signed(self, spec: Any, tbs: bytes, key_type: KeyType, what: str) -> bytes:
        """``tbs`` (parsed as ``spec``) signed by a throwaway key of ``key_type`` under its own
        signature algorithm: what pkilint reads."""
        try:
            algorithm = spec.load(tbs)["signature"].dump()
            signature = sign_bytes(self._throwaway(key_type), key_type, tbs)
            return der.sequence(tbs, algorithm, der.tlv(0x03, b"\x00" + signature))
        except Exception as exc:
            raise lint_unreadable(exc, what) from exc

    def check_certificate(self, certificate: bytes) -> None:
        """Refuse a signed certificate (DER) as :meth:`check_tbs` refuses a TBS. For a
        self-signed root only: pkilint knows a certificate for self-signed by its signature
        verifying under its own key, so a root's TBS under a throwaway signature would be
        judged as a certificate some other CA issued (and its AKI found missing). The root is
        linted once signed, before anything records it; refused, its signature and its new
        key are thrown away (``ca.hierarchy.create_root``)."""
        self._check(certificate, "certificate")

    def _check(self, signed: bytes, what: str) -> None:
        try:
            findings = self._findings(signed, what)
        except Exception as exc:  # pkilint or the parser choking: the gate stays shut
            raise lint_unreadable(exc, what) from exc
        if findings:
            shown = "; ".join(findings[:MAX_FINDINGS_SHOWN])
            more = len(findings) - MAX_FINDINGS_SHOWN
            raise PolicyViolation(
                LINT_RULE,
                f"pkilint found {shown}{f' and {more} more' if more > 0 else ''} in the {what}: "
                "not signed",
            )

    def _throwaway(self, key_type: KeyType) -> CertificateIssuerPrivateKeyTypes:
        with self._lock:
            key = self._keys.get(key_type)
            if key is None:
                key = self._keys[key_type] = generate_private_key(key_type)
            return key

    def _validator(self) -> Any:
        validator = getattr(self._local, "validator", None)
        if validator is None:
            from pkilint.pkix import certificate, extension, name

            validator = certificate.create_pkix_certificate_validator_container(
                certificate.create_decoding_validators(
                    name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
                ),
                [
                    certificate.create_issuer_validator_container([]),
                    certificate.create_validity_validator_container(),
                    certificate.create_subject_validator_container([]),
                    certificate.create_extensions_validator_container([]),
                    certificate.create_spki_validator_container([]),
                ],
            )
            self._local.validator = validator
        return validator

    def _crl_validator(self) -> Any:
        validator = getattr(self._local, "crl_validator", None)
        if validator is None:
            from pkilint import pkix
            from pkilint.pkix import crl, extension, name

            # What ``lint_crl -t CRL -p PKIX`` runs (the tests run that command on every CRL).
            validator = crl.create_pkix_crl_validator_container(
                [
                    pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
                    pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
                ],
                [
                    crl.create_issuer_validator_container([]),
                    crl.create_validity_validator_container([]),
                    crl.create_extensions_validator_container([]),
                ],
            )
            self._local.crl_validator = validator
        return validator

    def _ocsp_validator(self) -> Any:
        validator = getattr(self._local, "ocsp_validator", None)
        if validator is None:
            from pkilint import pkix
            from pkilint.pkix import extension, name, ocsp

            # What ``lint_ocsp_response`` runs (the tests run that command on responses).
            validator = ocsp.create_pkix_ocsp_response_validator_container(
                [
                    ocsp.create_response_decoder(),
                    pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
                    pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
                ],
                [],
            )
            self._local.ocsp_validator = validator
        return validator

    def _findings(self, signed: bytes, what: str) -> list[str]:
        from pkilint import loader
        from pkilint.validation import ValidationFindingSeverity

        if what == "CRL":
            document = loader.load_der_crl(signed, "to-be-signed")
            validator = self._crl_validator()
        elif what == "OCSP response":
            document = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(
                signed, "to-be-signed"
            )
            validator = self._ocsp_validator()
        else:
            document = loader.load_der_certificate(signed, "to-be-signed")
            validator = self._validator()
        found = []
        for result in validator.validate(document.root):
            for description in result.finding_descriptions:
                severity, code = description.finding.severity, description.finding.code
                if severity > ValidationFindingSeverity.NOTICE:
                    continue
                if code == WILDCARD_FINDING and _wildcard(str(result.node.pdu)):
                    continue
                if code == URI_FINDING and self._own and str(result.node.pdu).startswith(self._own):
                    continue
                found.append(f"{code} ({severity}) at {result.node.path}")
        return found


def _wildcard(value: str) -> bool:
    """A wildcard dNSName our rules would issue: ``*`` as the whole first label, over a name
    that is itself good preferred name syntax, by our rules and by pkilint's own reading (the
    one pkilint applies to the name alone: else "*.host.b2" passed where "host.b2" did not)."""
    from pkilint.pkix import general_name

    base = value[2:]
    return (
        value.startswith("*.")
        and dns_name_problem(base, wildcard=False) is None
        and bool(general_name.validators_predicate(general_name.validators.domain, base))
    )


def lint_unreadable(exc: Exception, what: str) -> PolicyViolation:
    return PolicyViolation(
        LINT_RULE, f"the {what} could not be linted ({exc.__class__.__name__}): not signed"
    )
