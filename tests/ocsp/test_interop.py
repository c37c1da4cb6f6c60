"""Other OCSP clients against ``sekisho ocsp serve``: GnuTLS ``ocsptool --ask`` and
pyhanko-certvalidator following the certificates' own AIA OCSP URL (the deployment's
``base_url`` is the server's address when they are issued)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import RevokedError
from pyhanko_certvalidator.fetchers.aiohttp_fetchers import AIOHttpFetcherBackend
from pyhanko_certvalidator.policy_decl import (
    CertRevTrustPolicy,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)

from ca.revocation import Reason
from sekisho.services import Services, build_services
from tests.ca.helpers import ca_cert, issue
from tests.conftest import TEST_ACTOR, Deployment, make_settings
from tests.ocsp.test_server import Pki, free_port, make_pki, run, running


@pytest.fixture
def pki(services: Services, tmp_path: Path) -> Pki:
    return make_pki(services, tmp_path)


def ocsptool(pki: Pki, url: str, cert: str) -> str:
    # The responder is either the CA itself (--load-signer) or a delegated responder the CA
    # issued (then the CA is the trust anchor for the signer certificate in the response).
    trust = "--load-trust" if pki.issuer().delegated else "--load-signer"
    res = run(
        [
            "ocsptool", f"--ask={url}", "--load-issuer", str(pki.dir / "ca.pem"),
            "--load-cert", str(pki.dir / f"{cert}.pem"), trust, str(pki.dir / "ca.pem"),
        ]
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_gnutls_ocsptool(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    with running(data_dir, tmp_path) as server:
        out = ocsptool(pki, server.url, "good")
        assert "Certificate Status: good" in out and "Verifying OCSP Response: Success" in out, out
        out = ocsptool(pki, server.url, "revoked")
        assert "Certificate Status: revoked" in out and "Verifying OCSP Response: Success" in out, (
            out
        )
        assert "Certificate Status: good" not in out


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


async def _validate(leaf: x509.Certificate, root: x509.Certificate, ca: x509.Certificate) -> None:
    policy = CertRevTrustPolicy(
        RevocationCheckingPolicy(
            ee_certificate_rule=RevocationCheckingRule.OCSP_REQUIRED,
            intermediate_ca_cert_rule=RevocationCheckingRule.NO_CHECK,
        )
    )
    backend = AIOHttpFetcherBackend()  # closed here: no session left open
    try:
        context = ValidationContext(
            trust_roots=[_asn1(root)],
            other_certs=[_asn1(ca)],
            allow_fetching=True,
            revinfo_policy=policy,
            fetcher_backend=backend,
        )
        validator = CertificateValidator(_asn1(leaf), [_asn1(ca)], validation_context=context)
        await validator.async_validate_path()
    finally:
        await backend.close()


def test_pyhanko_certvalidator_follows_aia(
    deployment: Deployment, services: Services, tmp_path: Path
) -> None:
    port = free_port()
    overrides: dict[str, object] = {"base_url": f"http://127.0.0.1:{port}"}
    if deployment.database_url:
        overrides["database_url"] = deployment.database_url
    local = build_services(make_settings(deployment.data_dir, **overrides))
    try:
        good = issue(local, "admin-client")
        revoked = issue(local, "admin-client")
        aia = good.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert next(d.access_location.value for d in aia) == f"http://127.0.0.1:{port}/ocsp"
        local.revoker.revoke("admin", revoked.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
        root, ca = ca_cert(local, "root"), ca_cert(local, "admin")
        with running(deployment.data_dir, tmp_path, port=port):
            asyncio.run(_validate(good, root, ca))
            with pytest.raises(RevokedError):
                asyncio.run(_validate(revoked, root, ca))
    finally:
        local.close()
