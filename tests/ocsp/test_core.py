"""The pure OCSP core against real clients: requests from ``openssl ocsp`` and cryptography,
responses checked by ``openssl ocsp`` (signature, chain, nonce, statuses), cryptography and
pkilint; hostile requests get exactly malformedRequest.

The PKI is Sekisho's own (root, admin issuing CA, a delegated responder from the
``ocsp-signer`` profile, admin-client leaves), built once for the module on SQLite: the core
never touches the store.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import ocsp as x509_ocsp

from ca import der as w
from ca.registry import ca_row
from hsm.base import KeyType
from hsm.observed import _ObservedEC
from ocsp import core, der
from sekisho.errors import ConfigError, KeyBackendError, StoreError
from sekisho.services import Services, build_services
from tests.ca.helpers import ca_cert, issue, request_for
from tests.conftest import TEST_ACTOR, make_settings
from tests.support.checkers import pkilint_ocsp_response

# openssl checks the responses against its own clock: "now" is the real time, taken once, with
# microseconds the encoder must drop.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=654321)
VALIDITY = dt.timedelta(hours=12)
REVOKED_AT = (NOW - dt.timedelta(days=2, minutes=7)).replace(microsecond=999999)
UNKNOWN_SERIAL = 0x1234567890ABCDEF
MALFORMED = bytes.fromhex("3003 0a01 01")
UNAUTHORIZED = bytes.fromhex("3003 0a01 06")


@dataclasses.dataclass
class Pki:
    dir: Path
    root: x509.Certificate
    ca: x509.Certificate
    ca_key: CertificateIssuerPrivateKeyTypes
    other_ca: x509.Certificate
    responder: x509.Certificate
    responder_key: CertificateIssuerPrivateKeyTypes
    good: x509.Certificate
    revoked: x509.Certificate
    services: Services

    def issuer(self) -> core.Issuer:
        return core.Issuer.create(self.ca, self.responder_key, self.responder)

    def lookup(self, issuer: core.Issuer, serial: int) -> core.Status:
        assert issuer.certificate == self.ca
        if serial == self.good.serial_number:
            return core.GOOD
        if serial == self.revoked.serial_number:
            return core.Revoked(REVOKED_AT, x509.ReasonFlags.key_compromise)
        return core.UNKNOWN

    def pem(self, name: str, cert: x509.Certificate) -> str:
        path = self.dir / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)


@pytest.fixture(scope="module")
def pki(template_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    base = tmp_path_factory.mktemp("ocsp")
    data = base / "data"
    shutil.copytree(template_dir, data)
    services = build_services(make_settings(data))
    try:
        with services.db.scope() as session:
            ca_ref = ca_row(session, "admin").key_ref
        responder, responder_key = services.ca.issue_with_new_key(
            request_for("ocsp-signer"), KeyType.EC_P256, TEST_ACTOR
        )
        pki = Pki(
            dir=base,
            root=ca_cert(services, "root"),
            ca=ca_cert(services, "admin"),
            ca_key=services.backend.signing_key(ca_ref),
            other_ca=ca_cert(services, "device"),
            responder=responder,
            responder_key=responder_key,
            good=issue(services, "admin-client"),
            revoked=issue(services, "admin-client"),
            services=services,
        )
        for name in ("root", "ca", "other_ca", "good", "revoked", "responder"):
            pki.pem(name, getattr(pki, name))
        yield pki
    finally:
        services.close()


# -- helpers ----------------------------------------------------------------------------------
def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def openssl_request(pki: Pki, certs: list[str], *extra: str) -> bytes:
    out = pki.dir / "req.der"
    out.unlink(missing_ok=True)
    cmd = ["openssl", "ocsp", "-issuer", str(pki.dir / "ca.pem"), *extra]  # digest first
    for cert in certs:
        cmd += ["-cert", str(pki.dir / f"{cert}.pem")]
    res = run([*cmd, "-reqout", str(out)])
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def openssl_check(pki: Pki, req: bytes, resp: bytes) -> str:
    """Verify ``resp`` against ``req`` (signature, responder chain to the root, nonce) and
    return openssl's text of the response."""
    (pki.dir / "req.der").write_bytes(req)
    (pki.dir / "resp.der").write_bytes(resp)
    res = run(
        [
            "openssl", "ocsp", "-reqin", str(pki.dir / "req.der"),
            "-respin", str(pki.dir / "resp.der"), "-CAfile", str(pki.dir / "root.pem"),
            "-verify_other", str(pki.dir / "ca.pem"), "-resp_text",
        ]
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Response verify OK" in res.stderr, res.stdout + res.stderr
    assert "nonce" not in res.stderr.lower(), res.stderr  # no nonce warning or error
    return res.stdout


def openssl_summary(pki: Pki, resp: bytes, certs: list[str], *extra: str) -> str:
    """openssl's per-certificate status lines (it rebuilds the CertIDs from the files)."""
    (pki.dir / "resp.der").write_bytes(resp)
    cmd = [
        "openssl", "ocsp", "-respin", str(pki.dir / "resp.der"), "-issuer",
        str(pki.dir / "ca.pem"), "-CAfile", str(pki.dir / "root.pem"),
        "-verify_other", str(pki.dir / "ca.pem"), "-no_nonce", *extra,
    ]  # fmt: skip
    for cert in certs:
        cmd += ["-cert", str(pki.dir / f"{cert}.pem")]
    res = run(cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Response verify OK" in res.stderr, res.stdout + res.stderr
    return res.stdout


def respond(pki: Pki, req: bytes, issuers: list[core.Issuer] | None = None) -> bytes:
    return core.respond(
        req,
        issuers if issuers is not None else [pki.issuer()],
        pki.lookup,
        now=NOW,
        validity=VALIDITY,
    )


def basic_of(resp: bytes) -> asn1_ocsp.BasicOCSPResponse:
    parsed = asn1_ocsp.OCSPResponse.load(resp, strict=True)
    assert parsed["response_status"].native == "successful"
    return parsed["response_bytes"]["response"].parsed


def cert_id_der(issuer: core.Issuer, serial: int, algorithm: str = "sha1") -> bytes:
    return issuer.cert_id(serial, algorithm).der


def hand_request(
    cert_ids: list[bytes], extensions: list[bytes] | None = None, single_ext: bytes = b""
) -> bytes:
    singles = [
        w.sequence(cid, w.explicit(0, w.sequence(single_ext)) if single_ext else b"")
        for cid in cert_ids
    ]
    parts = [w.sequence(*singles)]
    if extensions is not None:
        parts.append(w.explicit(2, w.sequence(*extensions)))
    return w.sequence(w.sequence(*parts))


def nonce_ext(nonce: bytes) -> bytes:
    return w.extension(core.OID_NONCE, w.octet_string(nonce))


# -- real clients -----------------------------------------------------------------------------
def test_good_with_nonce_verified_by_openssl(pki: Pki) -> None:
    req = openssl_request(pki, ["good"])
    parsed = core.parse_request(req)
    assert parsed.nonce is not None and len(parsed.nonce) == 16  # openssl's default
    resp = respond(pki, req)
    text = openssl_check(pki, req, resp)
    assert "Cert Status: good" in text
    assert "Responder Id: " in text and "Responder Id: C =" not in text  # byKey
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    summary = openssl_summary(pki, resp, ["good"])
    assert f"{pki.dir / 'good.pem'}: good" in summary
    pkilint_ocsp_response(resp)

    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    assert loaded.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert loaded.serial_number == pki.good.serial_number
    assert loaded.responder_key_hash == (
        x509.SubjectKeyIdentifier.from_public_key(pki.responder.public_key()).digest
    )
    assert loaded.responder_name is None
    assert loaded.certificates == [pki.responder]
    assert loaded.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == parsed.nonce
    assert loaded.signature_hash_algorithm is not None
    assert loaded.signature_hash_algorithm.name == "sha256"


def test_revoked_key_compromise(pki: Pki) -> None:
    req = openssl_request(pki, ["revoked"])
    resp = respond(pki, req)
    text = openssl_check(pki, req, resp)
    assert "Cert Status: revoked" in text and "keyCompromise" in text
    summary = openssl_summary(pki, resp, ["revoked"])
    assert f"{pki.dir / 'revoked.pem'}: revoked" in summary
    assert "Reason: keyCompromise" in summary
    pkilint_ocsp_response(resp)
    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
    assert loaded.revocation_reason is x509.ReasonFlags.key_compromise
    assert loaded.revocation_time_utc == REVOKED_AT.replace(microsecond=0)


def test_unknown_serial(pki: Pki) -> None:
    (pki.dir / "req.der").unlink(missing_ok=True)
    res = run(
        [
            "openssl", "ocsp", "-issuer", str(pki.dir / "ca.pem"), "-serial",
            str(UNKNOWN_SERIAL), "-reqout", str(pki.dir / "req.der"),
        ]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    req = (pki.dir / "req.der").read_bytes()
    resp = respond(pki, req)
    text = openssl_check(pki, req, resp)
    assert "Cert Status: unknown" in text
    pkilint_ocsp_response(resp)
    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.certificate_status is x509_ocsp.OCSPCertStatus.UNKNOWN
    assert loaded.serial_number == UNKNOWN_SERIAL


def test_two_cert_ids_sha256_echoed_in_order(pki: Pki) -> None:
    req = openssl_request(pki, ["revoked", "good"], "-sha256")
    parsed = core.parse_request(req)
    assert [c.hash_algorithm for c in parsed.cert_ids] == ["sha256", "sha256"]
    assert [c.serial for c in parsed.cert_ids] == [
        pki.revoked.serial_number,
        pki.good.serial_number,
    ]
    resp = respond(pki, req)
    text = openssl_check(pki, req, resp)
    assert text.count("Cert Status: revoked") == 1 and text.count("Cert Status: good") == 1
    summary = openssl_summary(pki, resp, ["revoked", "good"], "-sha256")
    assert f"{pki.dir / 'revoked.pem'}: revoked" in summary
    assert f"{pki.dir / 'good.pem'}: good" in summary
    pkilint_ocsp_response(resp)
    # Each CertID echoed byte for byte, in request order.
    singles = basic_of(resp)["tbs_response_data"]["responses"]
    assert [s["cert_id"].dump() for s in singles] == [c.der for c in parsed.cert_ids]


def test_cryptography_request_sha256(pki: Pki) -> None:
    builder = x509_ocsp.OCSPRequestBuilder().add_certificate(pki.good, pki.ca, hashes.SHA256())
    builder = builder.add_extension(x509.OCSPNonce(bytes(range(32))), critical=False)
    req = builder.build().public_bytes(serialization.Encoding.DER)
    resp = respond(pki, req)
    openssl_check(pki, req, resp)
    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert loaded.hash_algorithm.name == "sha256"
    assert loaded.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == bytes(range(32))


def test_ca_signs_itself(pki: Pki) -> None:
    issuer = core.Issuer.create(pki.ca, pki.ca_key)
    assert not issuer.delegated
    req = openssl_request(pki, ["good"])
    resp = respond(pki, req, [issuer])
    openssl_check(pki, req, resp)
    pkilint_ocsp_response(resp)
    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.certificates == []
    assert loaded.responder_key_hash == (
        x509.SubjectKeyIdentifier.from_public_key(pki.ca.public_key()).digest
    )


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    [
        (KeyType.EC_P384, "ecdsa-with-SHA384"),
        (KeyType.RSA_3072, "sha256WithRSAEncryption"),
        (KeyType.ED25519, "ED25519"),
    ],
)
def test_responder_key_types(pki: Pki, key_type: KeyType, algorithm: str) -> None:
    responder, key = pki.services.ca.issue_with_new_key(
        request_for("ocsp-signer"), key_type, TEST_ACTOR
    )
    req = openssl_request(pki, ["revoked"])
    resp = respond(pki, req, [core.Issuer.create(pki.ca, key, responder)])
    text = openssl_check(pki, req, resp)
    assert f"Signature Algorithm: {algorithm}" in text
    pkilint_ocsp_response(resp)


def test_precompute_matches_rfc5019_client(pki: Pki) -> None:
    issuer = pki.issuer()
    this_update = NOW - dt.timedelta(minutes=5)
    resp = core.precompute(
        issuer, pki.revoked.serial_number, pki.lookup(issuer, pki.revoked.serial_number),
        this_update, this_update + dt.timedelta(days=3),
    )  # fmt: skip
    req = openssl_request(pki, ["revoked"], "-no_nonce")  # SHA-1 CertID, no nonce
    openssl_check(pki, req, resp)
    summary = openssl_summary(pki, resp, ["revoked"])
    assert "Reason: keyCompromise" in summary
    pkilint_ocsp_response(resp)
    loaded = x509_ocsp.load_der_ocsp_response(resp)
    assert loaded.hash_algorithm.name == "sha1"
    assert loaded.produced_at_utc == loaded.this_update_utc == this_update.replace(microsecond=0)
    assert loaded.next_update_utc == this_update.replace(microsecond=0) + dt.timedelta(days=3)
    assert len(loaded.extensions) == 0
    # The stored CertID is the one an RFC 5019 client sends.
    assert core.parse_request(req).cert_ids[0].der == issuer.cert_id(pki.revoked.serial_number).der


# -- response details -------------------------------------------------------------------------
def test_times_are_whole_second_generalized_time(pki: Pki) -> None:
    req = openssl_request(pki, ["revoked"])
    resp = respond(pki, req)
    data = basic_of(resp)["tbs_response_data"]
    produced = data["produced_at"]
    single = data["responses"][0]
    for value in (produced, single["this_update"], single["next_update"]):
        raw = value.contents if value.tag == 24 else value.chosen.contents  # [0] EXPLICIT
        assert len(raw) == 15 and raw.endswith(b"Z") and b"." not in raw, raw
    stamp = NOW.strftime("%Y%m%d%H%M%SZ").encode()
    assert produced.contents == stamp
    assert single["this_update"].contents == stamp
    assert single["next_update"].native == NOW.replace(microsecond=0) + VALIDITY
    revoked_stamp = REVOKED_AT.strftime("%Y%m%d%H%M%SZ").encode()
    assert single["cert_status"].chosen["revocation_time"].contents == revoked_stamp
    assert data["produced_at"].native >= single["this_update"].native
    # GeneralizedTime tag 0x18 for every time, no fractions anywhere in the DER.
    assert resp.count(b"\x18\x0f") >= 4


def test_revoked_without_reason_omits_it(pki: Pki) -> None:
    issuer = pki.issuer()
    for reason in (None, x509.ReasonFlags.unspecified):
        resp = core.precompute(issuer, 77, core.Revoked(REVOKED_AT, reason), NOW, NOW + VALIDITY)
        status = basic_of(resp)["tbs_response_data"]["responses"][0]["cert_status"]
        assert status.name == "revoked"
        assert status.chosen["revocation_reason"].native is None
        assert x509_ocsp.load_der_ocsp_response(resp).revocation_reason is None
        pkilint_ocsp_response(resp)


def test_never_sha1_signature(pki: Pki) -> None:
    resp = respond(pki, openssl_request(pki, ["good"]))
    basic = basic_of(resp)
    assert basic["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"
    sha1_with = ("1.2.840.10045.4.1", "1.2.840.113549.1.1.5")
    assert basic["signature_algorithm"]["algorithm"].dotted not in sha1_with


# -- who answers ------------------------------------------------------------------------------
def test_unknown_issuer_unauthorized(pki: Pki) -> None:
    req = openssl_request(pki, ["good"])
    assert core.respond(req, [], pki.lookup, now=NOW, validity=VALIDITY) == UNAUTHORIZED
    foreign = hand_request([w.sequence(
        w.sequence(w.oid("1.3.14.3.2.26"), b"\x05\x00"),
        w.octet_string(b"\x01" * 20), w.octet_string(b"\x02" * 20), w.integer(5),
    )])  # fmt: skip
    assert respond(pki, foreign) == UNAUTHORIZED


def test_mixed_issuers_unauthorized(pki: Pki) -> None:
    issuer = pki.issuer()
    foreign = w.sequence(
        w.sequence(w.oid("1.3.14.3.2.26"), b"\x05\x00"),
        w.octet_string(b"\x01" * 20), w.octet_string(b"\x02" * 20), w.integer(5),
    )  # fmt: skip
    served = cert_id_der(issuer, pki.good.serial_number)
    assert respond(pki, hand_request([served, foreign])) == UNAUTHORIZED
    assert respond(pki, hand_request([foreign, served])) == UNAUTHORIZED
    req = hand_request([served, served])
    assert basic_of(respond(pki, req))  # the same issuer twice is fine


def test_two_served_issuers_in_one_request_unauthorized(pki: Pki) -> None:
    admin = pki.issuer()
    with pki.services.db.scope() as session:
        device_key = pki.services.backend.signing_key(ca_row(session, "device").key_ref)
    device = core.Issuer.create(pki.other_ca, device_key)
    # Two CAs we both serve, one request: one signer cannot speak for both.
    req = hand_request([cert_id_der(admin, 1), cert_id_der(device, 2)])
    assert respond(pki, req, [admin, device]) == UNAUTHORIZED
    seen: list[core.Issuer] = []

    def lookup(issuer: core.Issuer, serial: int) -> core.Status:
        seen.append(issuer)
        return core.UNKNOWN

    alone = hand_request([cert_id_der(device, 2)])
    assert basic_of(core.respond(alone, [admin, device], lookup, now=NOW, validity=VALIDITY))
    assert seen == [device]


def test_unserved_hash_algorithm_unauthorized(pki: Pki) -> None:
    req = (
        x509_ocsp.OCSPRequestBuilder()
        .add_certificate(pki.good, pki.ca, hashes.SHA384())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert core.parse_request(req).cert_ids[0].hash_algorithm == "2.16.840.1.101.3.4.2.2"
    assert respond(pki, req) == UNAUTHORIZED


def test_store_failure_is_try_later(pki: Pki) -> None:
    def broken(issuer: core.Issuer, serial: int) -> core.Status:
        raise StoreError("database away")

    req = openssl_request(pki, ["good"])
    resp = core.respond(req, [pki.issuer()], broken, now=NOW, validity=VALIDITY)
    assert resp == bytes.fromhex("3003 0a01 03")


def test_issuer_refuses_bad_signers(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="does not match"):
        core.Issuer.create(pki.ca, pki.ca_key, pki.responder)
    with pytest.raises(ConfigError, match="does not match"):
        core.Issuer.create(pki.ca, pki.responder_key)
    with pytest.raises(ConfigError, match="not issued by this CA"):
        core.Issuer.create(pki.other_ca, pki.responder_key, pki.responder)
    leaf, leaf_key = pki.services.ca.issue_with_new_key(
        request_for("admin-client"), KeyType.EC_P256, TEST_ACTOR
    )
    with pytest.raises(ConfigError, match=r"OCSPSigning|extendedKeyUsage"):
        core.Issuer.create(pki.ca, leaf_key, leaf)


def test_issuer_hashes_follow_rfc6960(pki: Pki) -> None:
    issuer = pki.issuer()
    cert_id_hashes = (("sha1", hashes.SHA1()), ("sha256", hashes.SHA256()))  # noqa: S303
    for algorithm, hash_cls in cert_id_hashes:
        ref = x509_ocsp.OCSPRequestBuilder().add_certificate(pki.good, pki.ca, hash_cls).build()
        assert issuer.name_hashes[algorithm] == ref.issuer_name_hash
        assert issuer.key_hashes[algorithm] == ref.issuer_key_hash


def test_builder_guards(pki: Pki) -> None:
    issuer = pki.issuer()
    with pytest.raises(ValueError, match="validity"):
        core.precompute(issuer, 1, core.GOOD, NOW, NOW + dt.timedelta(days=11))
    with pytest.raises(ValueError, match="validity"):
        core.precompute(issuer, 1, core.GOOD, NOW, NOW + dt.timedelta(hours=1))
    with pytest.raises(ValueError, match="timezone"):
        core.precompute(issuer, 1, core.GOOD, NOW.replace(tzinfo=None), NOW + VALIDITY)
    with pytest.raises(ValueError, match="producedAt"):
        core.build_response(
            issuer, [(issuer.cert_id(1), core.GOOD)],
            produced_at=NOW - dt.timedelta(minutes=1), this_update=NOW, next_update=NOW + VALIDITY,
        )  # fmt: skip
    foreign = core.CertId("sha1", b"\x01" * 20, b"\x02" * 20, 5, b"")
    with pytest.raises(ValueError, match="does not serve"):
        core.build_response(
            issuer, [(foreign, core.GOOD)],
            produced_at=NOW, this_update=NOW, next_update=NOW + VALIDITY,
        )  # fmt: skip


# -- nonces -----------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 15, 16, 32, 33, 128])
def test_nonce_lengths_echoed(pki: Pki, length: int) -> None:
    nonce = random.Random(length).randbytes(length)
    issuer = pki.issuer()
    req = hand_request([cert_id_der(issuer, pki.good.serial_number)], [nonce_ext(nonce)])
    resp = respond(pki, req)
    extensions = basic_of(resp)["tbs_response_data"]["response_extensions"]
    assert len(extensions) == 1
    assert extensions[0]["extn_id"].dotted == core.OID_NONCE
    assert extensions[0]["extn_value"].contents == w.octet_string(nonce)
    assert openssl_check(pki, req, resp)


def test_no_nonce_no_extension(pki: Pki) -> None:
    req = openssl_request(pki, ["good"], "-no_nonce")
    assert core.parse_request(req).nonce is None
    resp = respond(pki, req)
    openssl_check(pki, req, resp)
    assert basic_of(resp)["tbs_response_data"]["response_extensions"].native is None


# -- hostile input ----------------------------------------------------------------------------
def _valid(pki: Pki) -> bytes:
    return hand_request([cert_id_der(pki.issuer(), 1)], [nonce_ext(b"n" * 16)])


def _hostile_requests(pki: Pki) -> dict[str, bytes]:
    cid = cert_id_der(pki.issuer(), pki.good.serial_number)
    valid = _valid(pki)
    unknown_critical = w.extension("1.2.3.4.5", w.octet_string(b"x"), critical=True)
    return {
        "empty": b"",
        "trailing garbage": valid + b"\x00",
        "trailing sequence": valid + w.sequence(),
        "not a sequence": b"\x04\x03abc",
        "empty request list": w.sequence(w.sequence(w.sequence())),
        "zero-length nonce": hand_request([cid], [nonce_ext(b"")]),
        "129-octet nonce": hand_request([cid], [nonce_ext(b"n" * 129)]),
        "duplicate nonce": hand_request([cid], [nonce_ext(b"a" * 16), nonce_ext(b"b" * 16)]),
        "nonce not wrapped": hand_request([cid], [w.extension(core.OID_NONCE, b"\x30\x00")]),
        "nonce with trailing": hand_request(
            [cid], [w.extension(core.OID_NONCE, w.octet_string(b"n" * 16) + b"\x00")]
        ),
        "unknown critical extension": hand_request([cid], [unknown_critical]),
        "unknown critical single extension": hand_request([cid], [], single_ext=unknown_critical),
        "indefinite length": b"\x30\x80" + valid[2:] + b"\x00\x00",
        "non-minimal length": b"\x30\x81" + bytes((len(valid) - 2,)) + valid[2:],
        "too many cert ids": hand_request([cid] * (core.MAX_CERT_IDS + 1)),
        "too large": w.sequence(w.octet_string(b"\x00" * core.MAX_REQUEST_SIZE)),
        "version 2": w.sequence(
            w.sequence(w.explicit(0, w.integer(1)), w.sequence(w.sequence(cid)))
        ),
        "bad boolean": hand_request(
            [cid], [w.sequence(w.oid("1.2.3.4.5"), b"\x01\x01\x01", w.octet_string(b"x"))]
        ),
        "hash parameters": hand_request(
            [
                w.sequence(
                    w.sequence(w.oid("1.3.14.3.2.26"), w.integer(1)),
                    w.octet_string(b"\x01" * 20),
                    w.octet_string(b"\x02" * 20),
                    w.integer(5),
                )
            ]
        ),
        "constructed octet string": hand_request(
            [
                w.sequence(
                    w.sequence(w.oid("1.3.14.3.2.26"), b"\x05\x00"),
                    w.tlv(0x24, w.octet_string(b"\x01" * 20)),
                    w.octet_string(b"\x02" * 20),
                    w.integer(5),
                )
            ]
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty", "trailing garbage", "trailing sequence", "not a sequence",
        "empty request list", "zero-length nonce", "129-octet nonce", "duplicate nonce",
        "nonce not wrapped", "nonce with trailing", "unknown critical extension",
        "unknown critical single extension", "indefinite length", "non-minimal length",
        "too many cert ids", "too large", "version 2", "bad boolean", "hash parameters",
        "constructed octet string",
    ],
)  # fmt: skip
def test_hostile_request_is_malformed(pki: Pki, case: str) -> None:
    req = _hostile_requests(pki)[case]
    with pytest.raises(core.MalformedRequest):
        core.parse_request(req)
    assert respond(pki, req) == MALFORMED


def test_every_truncation_is_malformed(pki: Pki) -> None:
    req = openssl_request(pki, ["good", "revoked"])
    assert basic_of(respond(pki, req))
    for cut in range(len(req)):
        assert respond(pki, req[:cut]) == MALFORMED, cut


def _nested(depth: int, inner: bytes = b"") -> bytes:
    for _ in range(depth):
        inner = w.sequence(inner)
    return inner


def test_deep_nesting_fails_fast(pki: Pki) -> None:
    huge = _nested(10**4)  # ~40 KB: over the size limit
    under_limit = _nested(5000)  # ~20 KB: refused by the depth check
    assert len(under_limit) < core.MAX_REQUEST_SIZE < len(huge)
    started = time.perf_counter()
    assert respond(pki, huge) == MALFORMED
    assert respond(pki, under_limit) == MALFORMED
    assert respond(pki, b"\x30\x80" * 10**4) == MALFORMED  # indefinite lengths, never closed
    # Deep nesting hidden in an otherwise plausible request (inside requestorName).
    cid = cert_id_der(pki.issuer(), 1)
    sneaky = w.sequence(
        w.sequence(w.explicit(1, w.explicit(4, _nested(50))), w.sequence(w.sequence(cid)))
    )
    assert respond(pki, sneaky) == MALFORMED
    assert time.perf_counter() - started < 1.0
    for deep in (under_limit, sneaky):
        with pytest.raises(der.DerError, match="nesting"):
            der.check_structure(deep, core.MAX_DEPTH)
    # The structure check itself is iterative: 10^4 levels with no depth limit, no recursion.
    started = time.perf_counter()
    der.check_structure(huge, max_depth=10**5, max_tlvs=10**5)
    with pytest.raises(der.DerError, match="more than 4000 elements"):
        der.check_structure(huge, max_depth=10**5)  # (and a request holds far fewer TLVs)
    assert time.perf_counter() - started < 1.0


def test_signed_request_is_answered(pki: Pki) -> None:
    leaf, key = pki.services.ca.issue_with_new_key(
        request_for("admin-client"), KeyType.EC_P256, TEST_ACTOR
    )
    key_path = pki.dir / "signer.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    req = openssl_request(
        pki, ["good"], "-signer", pki.pem("signer", leaf), "-signkey", str(key_path)
    )
    assert asn1_ocsp.OCSPRequest.load(req)["optional_signature"].native is not None
    resp = respond(pki, req)
    assert "Cert Status: good" in openssl_check(pki, req, resp)


def test_random_bytes_are_malformed(pki: Pki) -> None:
    rng = random.Random(6960)
    valid = _valid(pki)
    started = time.perf_counter()
    for _ in range(2000):
        blob = rng.randbytes(rng.randrange(1, 300))
        if rng.random() < 0.5:
            blob = b"\x30" + blob
        assert respond(pki, blob) == MALFORMED
    # Single-byte corruptions of a valid request: malformed or, where the damage still
    # decodes, a real answer (never an exception).
    for _ in range(2000):
        mutated = bytearray(valid)
        mutated[rng.randrange(len(valid))] = rng.randrange(256)
        out = respond(pki, bytes(mutated))
        assert out in (MALFORMED, UNAUTHORIZED) or basic_of(out)
    assert time.perf_counter() - started < 20


def test_unknown_non_critical_extension_ignored(pki: Pki) -> None:
    issuer = pki.issuer()
    extra = w.extension("1.2.3.4.5", w.octet_string(b"x"))
    req = hand_request([cert_id_der(issuer, pki.good.serial_number)], [extra])
    resp = respond(pki, req)
    assert basic_of(resp)["tbs_response_data"]["response_extensions"].native is None
    openssl_check(pki, req, resp)


class _WrongSignature(_ObservedEC):
    """A key object standing for a faulty token: well-formed signatures over other bytes."""

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(inner, lambda _data: None)

    def sign(
        self, data: bytes | bytearray | memoryview, algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        return self._inner.sign(bytes(data) + b"fault", algorithm)


def test_signatures_made_outside_openssl_are_checked_before_they_leave(pki: Pki) -> None:
    """Keys of cryptography's own (OpenSSL in this process) are matched with the responder
    certificate once, at ``create``; any other key object (a PKCS#11 token, a wrapper) has each
    signature verified, and a bad one never reaches a client: tryLater instead."""
    assert not pki.issuer().verify_each
    responder_key = pki.responder_key
    assert isinstance(responder_key, ec.EllipticCurvePrivateKey)
    faulty = core.Issuer.create(pki.ca, _WrongSignature(responder_key), pki.responder)
    assert faulty.verify_each
    req = openssl_request(pki, ["good"])
    assert respond(pki, req, [faulty]) == bytes.fromhex("3003 0a01 03")  # tryLater
    with pytest.raises(KeyBackendError, match="does not verify"):
        core.precompute(faulty, pki.good.serial_number, core.GOOD, NOW, NOW + VALIDITY)
    # The same request answered by the sound key verifies with openssl.
    openssl_check(pki, req, respond(pki, req))


def test_invalid_primitive_encodings_are_malformed(pki: Pki) -> None:
    """DER content rules: an empty or padded INTEGER serial, a NULL with content, a padded
    OID, a BOOLEAN other than 00/FF are malformedRequest, never echoed in a signed answer."""
    issuer = pki.issuer()
    sha1 = w.sequence(w.oid("1.3.14.3.2.26"), b"\x05\x00")

    def cert_id(serial_tlv: bytes, algorithm: bytes = sha1) -> bytes:
        return w.sequence(
            algorithm,
            w.octet_string(issuer.name_hashes["sha1"]),
            w.octet_string(issuer.key_hashes["sha1"]),
            serial_tlv,
        )

    serial = w.integer(pki.good.serial_number)
    assert cert_id(serial) == cert_id_der(issuer, pki.good.serial_number)  # built right
    assert basic_of(respond(pki, hand_request([cert_id(serial)])))
    bad_boolean = w.sequence(
        w.oid(core.OID_NONCE), b"\x01\x01\x01", w.octet_string(b"\x04\x10" + b"n" * 16)
    )
    cases = {
        "empty INTEGER": hand_request([cert_id(b"\x02\x00")]),
        "padded INTEGER": hand_request([cert_id(b"\x02\x02\x00\x01")]),
        "padded negative INTEGER": hand_request([cert_id(b"\x02\x02\xff\x80")]),
        "NULL with content": hand_request(
            [cert_id(serial, w.sequence(w.oid("1.3.14.3.2.26"), b"\x05\x01\x00"))]
        ),
        "padded OID": hand_request(
            [cert_id(serial, w.sequence(b"\x06\x06\x2b\x80\x0e\x03\x02\x1a", b"\x05\x00"))]
        ),
        "BOOLEAN 01": hand_request([cert_id(serial)], [bad_boolean]),
        "empty Extensions": hand_request([cert_id(serial)], []),
    }
    for label, request_der in cases.items():
        assert respond(pki, request_der) == MALFORMED, label
