"""The lint gate on OCSP responses: the first response of each shape an issuer signs is linted
by pkilint (its ``lint_ocsp_response`` checks) under a throwaway signature, before the
responder's key signs anything; a finding refuses it. Pre-signing at issuance then leaves the
response to the refresher (the issuance goes on), and a live answer is ``internalError``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ca.lint import LINT_RULE, Linter
from ca.revocation import Reason
from ocsp import core, store
from ocsp.index import ResponseIndex
from ocsp.server import Responder
from sekisho.errors import PolicyViolation
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import issue
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.ocsp.test_store import issuer_for, openssl_status, request_der, stored
from tests.support.checkers import pkilint_ocsp_response
from web import create_app

WEEK = dt.timedelta(days=7)


@pytest.fixture
def long_key_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """responderID byKey becomes a SHA-256 of the key (RFC 6960 4.2.1: SHA-1): a fault in our
    encoder that pkilint finds (ERROR) and none of our own checks does."""

    def sha256_of_key(certificate: x509.Certificate) -> bytes:
        spki = certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).digest()

    monkeypatch.setattr(core, "responder_key_hash", sha256_of_key)


def test_a_response_pkilint_finds_wrong_is_refused_before_it_is_signed(
    services: Services, recording_backend: RecordingBackend, long_key_hash: None
) -> None:
    _, issuer = issuer_for(services)
    assert issuer.lint is not None
    leaf = issue(services, "admin-client")
    now = services.clock()
    signatures = len(recording_backend.signatures_but_checkpoints())
    with pytest.raises(PolicyViolation) as info:
        core.precompute(issuer, leaf.serial_number, core.GOOD, now, now + WEEK)
    assert info.value.rule == LINT_RULE
    assert "pkix.ocsp_responderid_keyhash_is_not_sha1 (ERROR)" in info.value.message
    assert "in the OCSP response: not signed" in info.value.message
    assert recording_backend.signatures_but_checkpoints()[signatures:] == []
    # Refused again: a shape is marked passed only once the gate passed it.
    with pytest.raises(PolicyViolation):
        core.precompute(issuer, leaf.serial_number, core.GOOD, now, now + WEEK)
    assert issuer.linted == set()


def test_with_the_gate_off_the_same_fault_is_signed(
    settings: Settings, long_key_hash: None
) -> None:
    """The control: what refused the response above is the gate."""
    off = build_services(dataclasses.replace(settings, lint_before_signing=False))
    try:
        assert off.ocsp.linter is None
        _, issuer = issuer_for(off)
        assert issuer.lint is None
        now = off.clock()
        der = core.precompute(issuer, 1, core.GOOD, now, now + WEEK)
        assert len(issuer.responder_id_der) == 2 + 2 + 32
        assert der.startswith(b"\x30")
    finally:
        off.close()


def test_a_refused_presign_leaves_the_issuance_and_a_live_answer_is_internal_error(
    services: Services, long_key_hash: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate is issued (the pre-signed response is the refresher's to repair) but
    no response is stored for it; asked live over HTTP, or of the standalone server's
    responder, the answer is the unsigned internalError, never a 500 and never an unlinted
    response, and the log says why (not as a crash)."""
    ca_id, issuer = issuer_for(services)
    leaf = issue(services, "admin-client")
    assert store.stored_response(services.db, ca_id, leaf.serial_number) is None
    client = create_app(services).test_client()
    request = request_der(issuer, [leaf.serial_number], nonce=b"n" * 16)
    caplog.clear()
    res = client.post("/ocsp", data=request, content_type="application/ocsp-request")
    assert res.status_code == 200 and res.data == core.INTERNAL_ERROR
    responder = Responder(ResponseIndex({}), services.ocsp.lookup)
    assert (
        responder._answer(issuer, core.parse_request(request), services.ocsp.lookup, WEEK)
        == core.INTERNAL_ERROR
    )
    refusals = [r for r in caplog.records if "not signed" in r.getMessage()]
    assert len(refusals) == 2 and all(r.exc_info is None for r in refusals), caplog.text
    assert all(getattr(r, "code", None) == "policy-violation" for r in refusals)
    assert "crashed" not in caplog.text and "answer failed" not in caplog.text


def test_the_first_response_of_each_shape_is_linted_and_the_rest_are_not(
    services: Services, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    linter = services.ocsp.linter
    assert isinstance(linter, Linter)
    seen: list[bytes] = []
    real: Callable[..., None] = linter.check_ocsp_tbs

    def counted(tbs: bytes, *args: object) -> None:
        seen.append(tbs)
        real(tbs, *args)

    monkeypatch.setattr(linter, "check_ocsp_tbs", counted)
    services.ocsp.invalidate_issuers()
    ca_id, issuer = issuer_for(services)
    leaves = [issue(services, "admin-client") for _ in range(3)]
    assert len(seen) == 1, "one lint for the three pre-signed 'good' answers"
    for leaf in leaves:
        pkilint_ocsp_response(stored(services, ca_id, leaf.serial_number).der)
    services.revoker.revoke("admin", leaves[0].serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    services.revoker.revoke("admin", leaves[1].serial_number, Reason.SUPERSEDED, TEST_ACTOR)
    assert len(seen) == 2, "revoked with a reason: one more shape, linted once"
    services.revoker.revoke("admin", leaves[2].serial_number, Reason.UNSPECIFIED, TEST_ACTOR)
    assert len(seen) == 3, "revoked without a reason code: another shape"
    revoked = stored(services, ca_id, leaves[2].serial_number).der
    assert ": revoked" in openssl_status(tmp_path, services, revoked, leaves[2])
    # Live answers: a nonce and two CertIDs are shapes of their own.
    client = create_app(services).test_client()

    def ask(serials: list[int], nonce: bytes | None) -> bytes:
        res = client.post(
            "/ocsp",
            data=request_der(issuer, serials, nonce=nonce),
            content_type="application/ocsp-request",
        )
        assert res.status_code == 200
        return bytes(res.data)

    with_nonce = ask([leaves[0].serial_number], b"a" * 32)
    assert len(seen) == 4
    ask([leaves[1].serial_number], b"b" * 32)
    assert len(seen) == 4, "the same shape (revoked with a reason, a nonce): not linted again"
    pair = ask([leaves[0].serial_number, leaves[2].serial_number], b"c" * 32)
    assert len(seen) == 5
    for der in (with_nonce, pair):
        pkilint_ocsp_response(der)
    # The linted bytes are the signed ones: the ResponseData of the answer sent.
    assert seen[-1] in pair
    services.ocsp.invalidate_issuers()


def test_warm_builds_the_validators_before_the_first_lint() -> None:
    """``ocsp serve`` warms the gate before it listens: pkilint's import (0.45 s here) was
    paid inside the first nonce answers, and the benchmark's p99 went from 18 ms to 290 ms
    (bench.ocsp). Once warm, this thread's validators exist, and a lint uses them."""
    linter = Linter()
    assert getattr(linter._local, "ocsp_validator", None) is None
    linter.warm()
    built = linter._local.ocsp_validator
    assert built is not None and linter._local.validator is not None
    assert linter._local.crl_validator is not None
    assert linter._ocsp_validator() is built


def test_a_signer_reloaded_keeps_the_shapes_the_gate_passed(services: Services) -> None:
    """Signers are reloaded every 10 s: the same signer keeps the shapes its predecessor
    object passed (each reload had every shape's first answer linted again)."""
    _, issuer = issuer_for(services)
    now = services.clock()
    core.precompute(issuer, 1, core.GOOD, now, now + WEEK)
    assert issuer.linted
    services.ocsp.invalidate_issuers()
    _, again = issuer_for(services)
    assert again is not issuer and again.responder_certificate == issuer.responder_certificate
    assert again.linted == issuer.linted
