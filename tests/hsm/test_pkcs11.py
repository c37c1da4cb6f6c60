"""The PKCS#11 key backend on a real SoftHSM2 token: key attributes read back from the token,
concurrent signing, the token going away and coming back during issuance, lost sessions and
logins, a wrong PIN (one C_Login, counted by OpenSC's pkcs11-spy), RFC 7512 references, key
adoption, and the operator commands. The issuance, CRL and checkpoint suites also run on the
token (``KEY_BACKENDS`` in those modules)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters
from sqlalchemy import func, select

from audit.models import Checkpoint
from ca.models import Certificate, CertificateAuthority, CertStatus
from hsm.base import KeyType
from hsm.pkcs11 import Pkcs11Backend
from hsm.uri import Pkcs11Uri, parse
from sekisho.bootstrap import InitPlan, initialise
from sekisho.cli import main as cli_main
from sekisho.errors import ConfigError, KeyBackendError
from sekisho.services import Services, build_services
from tests.ca.helpers import issue, request_for
from tests.conftest import FAULT_TOKEN, TEST_ACTOR, TEST_TOKEN, make_settings
from tests.support import checkers
from tests.support import softhsm as softhsm_support

pytestmark = pytest.mark.pkcs11
TIMEOUT = 60


@pytest.fixture
def backend(softhsm: softhsm_support.SoftHsm) -> Iterator[Pkcs11Backend]:
    with softhsm.backend(TEST_TOKEN, "u") as b:
        yield b


def _deployment(softhsm: softhsm_support.SoftHsm, tmp_path: Path, token: str) -> Path:
    """A new deployment whose keys are generated on ``token`` (its own label prefix)."""
    data_dir = tmp_path / "data"
    softhsm.write_settings(data_dir, token, f"d{secrets.token_hex(3)}-")
    return data_dir


@pytest.fixture
def token_services(softhsm: softhsm_support.SoftHsm, tmp_path: Path) -> Iterator[Services]:
    """An initialised deployment with every key on the fault token."""
    data_dir = _deployment(softhsm, tmp_path, FAULT_TOKEN)
    services = build_services(make_settings(data_dir))
    initialise(services, InitPlan(organization="Token Corp"), TEST_ACTOR)
    yield services
    services.close()


# -- references -------------------------------------------------------------------------------
def test_rfc7512_references_round_trip_and_refuse_what_they_should() -> None:
    uri = Pkcs11Uri(token="Sekisho CA", object="sekisho-ca-admin", id=b"\x01\xab")
    text = str(uri)
    assert text == "pkcs11:token=Sekisho%20CA;object=sekisho-ca-admin;id=%01%ab"
    assert parse(text) == uri
    assert parse("pkcs11:object=a%3Bb;type=private").object == "a;b"
    for bad in (
        "file:ca-admin",
        "pkcs11:token=x",  # neither object nor id
        "pkcs11:object=a?pin-value=1234",  # never a PIN in a reference
        "pkcs11:object=a;object=b",
        "pkcs11:object=a;slot-id=3",
        "pkcs11:object=a;type=banana",
        "pkcs11:id=",
    ):
        with pytest.raises(ConfigError):
            parse(bad)


# -- keys on the token ------------------------------------------------------------------------
def test_generated_keys_never_leave_the_token(backend: Pkcs11Backend) -> None:
    refs = {
        kt: backend.generate(f"attr-{kt.value}", kt) for kt in (KeyType.EC_P256, KeyType.RSA_3072)
    }
    by_uri = {k.uri: k for k in backend.keys()}
    for key_type, ref in refs.items():
        info = by_uri[ref]
        assert info.key_type == key_type.value
        attrs = info.attributes
        assert attrs["sensitive"] is True and attrs["always_sensitive"] is True
        assert attrs["never_extractable"] is True and attrs["extractable"] is False
        assert attrs["token"] is True and attrs["private"] is True and attrs["sign"] is True
        # The private value cannot be read: the token refuses (CKR_ATTRIBUTE_SENSITIVE).
        with pytest.raises(KeyBackendError, match="AttributeSensitive"):
            backend.private_attribute(
                ref, Attribute.VALUE if key_type.rsa_bits is None else Attribute.PRIVATE_EXPONENT
            )
        with pytest.raises(TypeError):
            backend.signing_key(ref).private_bytes(  # type: ignore[call-arg]
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )


def test_rsa_pkcs1_and_pss_and_ecdsa_signatures_verify(backend: Pkcs11Backend) -> None:
    data = b"to be signed" * 50
    rsa_key = backend.signing_key(backend.generate("sig-rsa", KeyType.RSA_2048))
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    for algorithm in (hashes.SHA256(), hashes.SHA384()):
        pkcs1 = padding.PKCS1v15()
        rsa_key.public_key().verify(rsa_key.sign(data, pkcs1, algorithm), data, pkcs1, algorithm)
        pss = padding.PSS(padding.MGF1(algorithm), padding.PSS.DIGEST_LENGTH)
        rsa_key.public_key().verify(rsa_key.sign(data, pss, algorithm), data, pss, algorithm)
    ec_key = backend.signing_key(backend.generate("sig-ec", KeyType.EC_P384))
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        signature = ec_key.sign(data, ec.ECDSA(algorithm))
        ec_key.public_key().verify(signature, data, ec.ECDSA(algorithm))
    with pytest.raises(ConfigError, match="EC P-256/P-384 and RSA"):
        backend.generate("sig-ed", KeyType.ED25519)


def test_sixteen_threads_times_two_hundred_signatures(backend: Pkcs11Backend) -> None:
    key = backend.signing_key(backend.generate("threads", KeyType.EC_P256))
    public = key.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
        public, ec.EllipticCurvePublicKey
    )
    errors: list[BaseException] = []
    signed: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(200):
            data = f"thread {n} signature {i}".encode()
            try:
                signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                signed.append((data, signature))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and len(signed) == 16 * 200
    for data, signature in signed:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def test_asyncio_code_and_threads_sign_together(backend: Pkcs11Backend) -> None:
    """The OCSP server signs nonce answers on its event loop while its thread pool (and other
    threads) sign too: all through the one module lock, all valid."""
    import asyncio

    key = backend.signing_key(backend.generate("asyncio", KeyType.EC_P256))
    public = key.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)

    def sign(data: bytes) -> tuple[bytes, bytes]:
        return data, key.sign(data, ec.ECDSA(hashes.SHA256()))

    async def main() -> list[tuple[bytes, bytes]]:
        loop = asyncio.get_running_loop()
        pooled = [loop.run_in_executor(None, sign, f"pool {i}".encode()) for i in range(200)]
        on_loop = []
        for i in range(200):  # the loop thread signs between the pool's calls
            on_loop.append(sign(f"loop {i}".encode()))
            await asyncio.sleep(0)
        return on_loop + list(await asyncio.gather(*pooled))

    results = asyncio.run(main())
    assert len(results) == 400
    for data, signature in results:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))


# -- failures and recovery --------------------------------------------------------------------
class _FlakyKey:
    """Stands in for the cached token key object and raises a PKCS#11 error on sign()."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def sign(self, *_args: object, **_kwargs: object) -> bytes:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [p11e.SessionHandleInvalid, p11e.UserNotLoggedIn, p11e.DeviceError, p11e.SessionClosed],
)
def test_lost_session_or_device_is_renewed_transparently(
    backend: Pkcs11Backend, error: type[Exception]
) -> None:
    ref = backend.generate("flaky", KeyType.EC_P256)
    key = backend.signing_key(ref)
    key.sign(b"warm", ec.ECDSA(hashes.SHA256()))  # the token key object is cached now
    logins = backend.logins
    backend._keys[ref] = _FlakyKey(error())
    signature = key.sign(b"after", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"after", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    assert backend.logins == logins + 1  # one new session, logged in with the PIN


def test_session_logged_out_behind_our_back(backend: Pkcs11Backend) -> None:
    key = backend.signing_key(backend.generate("logout", KeyType.EC_P256))
    key.sign(b"one", ec.ECDSA(hashes.SHA256()))
    backend._session.close()  # C_Logout + C_CloseSession by someone else
    signature = key.sign(b"two", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"two", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]


def _rows(services: Services) -> list[Certificate]:
    with services.db.scope() as session:
        return list(session.scalars(select(Certificate).order_by(Certificate.id)))


def test_token_away_during_issuance_fails_cleanly_and_recovers(
    token_services: Services, softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    services = token_services
    issue(services, "device")  # warm: the CA key handle is cached
    before = {r.id for r in _rows(services)}
    with softhsm.token_away(FAULT_TOKEN):
        with pytest.raises(KeyBackendError, match=r"unavailable|no PKCS#11 token"):
            services.ca.issue(request_for("device"), TEST_ACTOR)
        # Not half-issued: the reserved row was marked failed, no issued row lacks its DER.
        new = [r for r in _rows(services) if r.id not in before]
        assert [r.status for r in new] == [CertStatus.FAILED]
        assert new[0].der is None and "signing failed" in (new[0].failure or "")
        assert all(r.der is not None for r in _rows(services) if r.status is CertStatus.ISSUED)
    # The token is back: the same services sign again, no restart.
    cert = issue(services, "device")
    device = x509.load_der_x509_certificate(_ca_der(services, "device"))
    cert.verify_directly_issued_by(device)
    checkers.pkilint_cert(cert.public_bytes(serialization.Encoding.DER))


def _ca_der(services: Services, name: str) -> bytes:
    with services.db.scope() as session:
        return bytes(
            session.scalars(
                select(CertificateAuthority.certificate_der).where(
                    CertificateAuthority.name == name
                )
            ).one()
        )


def test_cli_exits_69_while_the_token_is_away(
    softhsm: softhsm_support.SoftHsm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = _deployment(softhsm, tmp_path, FAULT_TOKEN)
    assert cli_main(["--data-dir", str(data_dir), "init", "--org", "Away Corp"]) == 0
    args = ["--data-dir", str(data_dir), "issue", "--ca", "device", "--profile", "device",
            "--keygen", "ec-p256", "--subject", "CN=away.example.com",
            "--san", "dns:away.example.com", "--key-out", str(tmp_path / "away.key")]  # fmt: skip
    with softhsm.token_away(FAULT_TOKEN):
        capsys.readouterr()
        code = cli_main(args)
        _out, err = capsys.readouterr()
        assert code == 69, err  # the process starts; signing fails: key backend error
        assert "Traceback" not in err and softhsm_support.USER_PIN not in err
    assert cli_main(args) == 0


# -- the PIN ----------------------------------------------------------------------------------
def test_wrong_pin_is_one_login_attempt_and_a_clear_error(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    spy = softhsm_support.spy_module()
    assert spy is not None, "OpenSC's pkcs11-spy.so is missing (make test installs opensc-pkcs11)"
    data_dir = _deployment(softhsm, tmp_path, TEST_TOKEN)
    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("not-the-pin-0000\n")
    bad_pin.chmod(0o600)
    log = tmp_path / "spy.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEKISHO_")},
        **softhsm.env(),
        "PKCS11SPY": softhsm.module,
        "PKCS11SPY_OUTPUT": str(log),
        "SEKISHO_PKCS11_MODULE": spy,
        "SEKISHO_PKCS11_PIN_FILE": str(bad_pin),
    }
    exe = Path(sys.executable).with_name("sekisho")
    proc = subprocess.run(
        [str(exe), "--data-dir", str(data_dir), "hsm", "status"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 78, proc.stderr
    assert "PIN was refused" in proc.stderr and "no further login attempt" in proc.stderr
    assert "not-the-pin" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    calls = log.read_text(errors="replace")
    assert calls.count("C_Login") == 1, calls[-2000:]
    assert "CKR_PIN_INCORRECT" in calls


# -- operator commands and adoption -----------------------------------------------------------
def test_hsm_status_and_keys(deployment_pkcs11: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli_main(["--data-dir", str(deployment_pkcs11), "--json", "hsm", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["token"]["label"] == TEST_TOKEN and status["token"]["model"] == "SoftHSM v2"
    assert "ECDSA" in status["mechanisms"] and status["keys"] >= 6
    assert cli_main(["--data-dir", str(deployment_pkcs11), "--json", "hsm", "keys"]) == 0
    keys = json.loads(capsys.readouterr().out)
    labels = {k["label"] for k in keys}
    assert {"t-audit", "t-ca-root", "t-ca-admin", "t-ca-device"} <= labels
    for key in keys:
        assert key["attributes"]["extractable"] is False and key["uri"].startswith("pkcs11:")
    assert cli_main(["--data-dir", str(deployment_pkcs11), "hsm", "keys"]) == 0
    assert "t-ca-root" in capsys.readouterr().out
    # Nothing to re-encrypt: the token protects its keys (usage error, nothing journalled).
    assert cli_main(["--data-dir", str(deployment_pkcs11), "key", "rewrap"]) == 64
    assert "PKCS#11 token" in capsys.readouterr().err


def test_ca_offline_is_refused_on_a_token_before_anything_is_signed(
    deployment_pkcs11: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys on a token never leave it: `ca offline` is refused (69) before it signs the last
    CRLs it signs for a software key that goes away."""
    base = ["--data-dir", str(deployment_pkcs11), "--json"]
    capsys.readouterr()
    assert cli_main([*base, "ca", "show", "root"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert cli_main([*base, "ca", "offline", "root", "--yes"]) == 69
    assert "software key backend" in capsys.readouterr().err
    assert cli_main([*base, "ca", "show", "root"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after == before and after["key_online"] is True, after


@pytest.fixture
def deployment_pkcs11(pkcs11_template_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(pkcs11_template_dir, target)
    return target


def test_hsm_commands_refuse_a_software_deployment(
    template_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "data"
    shutil.copytree(template_dir, target)
    assert cli_main(["--data-dir", str(target), "hsm", "status"]) == 78
    assert "not pkcs11" in capsys.readouterr().err


def test_init_on_the_token_and_adopting_an_existing_key(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An existing key made by another tool (OpenSC's pkcs11-tool), adopted as the root's.
    label = f"adopted-{secrets.token_hex(3)}"
    subprocess.run(
        ["pkcs11-tool", "--module", softhsm.module, "--token-label", FAULT_TOKEN, "--login",
         "--pin", softhsm_support.USER_PIN, "--keypairgen", "--key-type", "EC:secp384r1",
         "--label", label, "--id", secrets.token_hex(8), "--sensitive", "--private"],
        env={**os.environ, **softhsm.env()}, check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    data_dir = tmp_path / "data"
    prefix = f"i{secrets.token_hex(3)}-"
    args = ["--data-dir", str(data_dir), "--json", "init", "--org", "Adopt Corp",
            "--key-backend", "pkcs11", "--pkcs11-module", softhsm.module,
            "--pkcs11-token", FAULT_TOKEN, "--pkcs11-pin-file", str(softhsm.pin_file),
            "--pkcs11-label-prefix", prefix,
            "--adopt-key", f"root=pkcs11:token={FAULT_TOKEN};object={label}"]  # fmt: skip
    capsys.readouterr()
    code = cli_main(args)
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["cas"] == ["root", "admin", "device"]
    toml = (data_dir / "sekisho.toml").read_text()
    assert 'key_backend = "pkcs11"' in toml and softhsm_support.USER_PIN not in toml
    # Later commands need no backend options: the settings were recorded.
    assert cli_main(["--data-dir", str(data_dir), "--json", "ca", "show", "root"]) == 0
    root = json.loads(capsys.readouterr().out)
    assert root["key_type"] == "ec-p384" and f"object={label}" in root["key_ref"]
    assert cli_main(["--data-dir", str(data_dir), "--json", "ca", "show", "admin"]) == 0
    admin = json.loads(capsys.readouterr().out)
    assert admin["key_ref"].startswith(f"pkcs11:token={FAULT_TOKEN};object={prefix}ca-admin;id=")
    public = data_dir / "public"
    checkers.openssl_verify(
        x509.load_pem_x509_certificate((public / "admin.crt").read_bytes()).public_bytes(
            serialization.Encoding.DER
        ),
        [
            x509.load_pem_x509_certificate((public / "root.crt").read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
        ],
    )
    # Adopting a key that does not exist, or with the software backend: clear errors.
    other = tmp_path / "other"
    bad = ["--data-dir", str(other), "init", "--key-backend", "pkcs11",
           "--pkcs11-module", softhsm.module, "--pkcs11-token", FAULT_TOKEN,
           "--pkcs11-pin-file", str(softhsm.pin_file), "--pkcs11-label-prefix", "x-",
           "--adopt-key", f"root=pkcs11:token={FAULT_TOKEN};object=no-such-key"]  # fmt: skip
    assert cli_main(bad) == 66
    assert not (other / "sekisho.toml").exists()  # a refused init records nothing


def test_a_debian_weak_key_on_the_token_is_not_adopted_as_the_root_key(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A root's certificate meets no issuance rule: its adopted key is checked on adoption
    (the weak-key checks of every issued key; here Debian's own example of CVE-2008-0166)."""
    from tests.ca.test_debian_weak_keys import _weak_4096

    pkcs8 = tmp_path / "weak.pk8"
    pkcs8.write_bytes(
        _weak_4096().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    label = f"weak-{secrets.token_hex(3)}"
    subprocess.run(
        ["softhsm2-util", "--import", str(pkcs8), "--token", FAULT_TOKEN, "--label", label,
         "--id", secrets.token_hex(8), "--pin", softhsm_support.USER_PIN],
        env={**os.environ, **softhsm.env()}, check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir), "init", "--key-type", "rsa-4096",
            "--key-backend", "pkcs11", "--pkcs11-module", softhsm.module,
            "--pkcs11-token", FAULT_TOKEN, "--pkcs11-pin-file", str(softhsm.pin_file),
            "--pkcs11-label-prefix", f"w{secrets.token_hex(3)}-",
            "--adopt-key", f"root=pkcs11:token={FAULT_TOKEN};object={label}"]  # fmt: skip
    capsys.readouterr()
    assert cli_main(args) == 65
    err = capsys.readouterr().err
    assert "weak-key" in err and "Debian weak key" in err and "Traceback" not in err
    assert not (data_dir / "sekisho.toml").exists()  # a refused init records nothing


# -- start-up and outages seen from a fresh backend -------------------------------------------
def test_keys_are_found_again_after_the_token_came_back(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    """Not only signing: looking a key up (public key, has_key) recovers too, no restart."""
    backend = Pkcs11Backend(softhsm.module, FAULT_TOKEN, softhsm_support.USER_PIN)
    try:
        ref = backend.generate(f"lookup-{secrets.token_hex(3)}", KeyType.EC_P256)
        backend._public_cache.clear()
        with softhsm.token_away(FAULT_TOKEN), pytest.raises(KeyBackendError):
            backend.public_key(ref)
        key = backend.signing_key(ref)  # reads the public key again: found
        assert backend.has_key(ref) and not backend.has_key(backend.reference("no-such-key"))
        signature = key.sign(b"back", ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(signature, b"back", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    finally:
        backend.close()


def test_a_backend_started_while_the_token_is_away_works_once_it_is_back(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    """A process (a gunicorn worker restarted during an outage) starts; its key operations
    fail with KeyBackendError and the start-up check refuses, until the token is back."""
    with softhsm.token_away(FAULT_TOKEN):
        backend = Pkcs11Backend(softhsm.module, FAULT_TOKEN, softhsm_support.USER_PIN)
        with pytest.raises(KeyBackendError):
            backend.check()
        with pytest.raises(KeyBackendError):
            backend.generate("while-away", KeyType.EC_P256)
    try:
        backend.check()
        ref = backend.generate(f"after-{secrets.token_hex(3)}", KeyType.EC_P256)
        backend.signing_key(ref).sign(b"x", ec.ECDSA(hashes.SHA256()))
    finally:
        backend.close()


def test_a_second_deployment_with_the_same_prefix_is_refused(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"dup{secrets.token_hex(2)}-"
    args = ["init", "--key-backend", "pkcs11", "--pkcs11-module", softhsm.module,
            "--pkcs11-token", FAULT_TOKEN, "--pkcs11-pin-file", str(softhsm.pin_file),
            "--pkcs11-label-prefix", prefix]  # fmt: skip
    assert cli_main(["--data-dir", str(tmp_path / "one"), *args]) == 0
    capsys.readouterr()
    assert cli_main(["--data-dir", str(tmp_path / "two"), *args]) == 75
    err = capsys.readouterr().err
    assert "already holds an audit key" in err and "pkcs11_label_prefix" in err
    assert not (tmp_path / "two" / "sekisho.toml").exists()


def test_serve_checks_the_token_in_a_child_and_workers_sign_on_it(
    deployment_pkcs11: Path, softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    """`sekisho serve` on a token deployment: the start-up check refuses a wrong PIN (exit 78,
    gunicorn never starts); with the right one the forked workers open the module themselves
    and answer nonce OCSP requests signed on the token (openssl verifies them)."""
    from tests.test_serve import Server, curl, free_port

    exe = Path(sys.executable).with_name("sekisho")
    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("wrong-pin-000\n")
    bad_pin.chmod(0o600)
    res = subprocess.run(
        [str(exe), "--data-dir", str(deployment_pkcs11), "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={**os.environ, "SEKISHO_PKCS11_PIN_FILE": str(bad_pin)},
    )  # fmt: skip
    assert res.returncode == 78 and "PIN was refused" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

    server = Server(deployment_pkcs11, tmp_path / "server.log")
    try:
        server.wait_healthy()
        public = deployment_pkcs11 / "public"
        leaf = tmp_path / "leaf.pem"
        code = cli_main(["--data-dir", str(deployment_pkcs11), "issue", "--ca", "device",
                         "--profile", "device", "--keygen", "ec-p256", "--subject",
                         "CN=served.example.com", "--san", "dns:served.example.com",
                         "--out", str(leaf), "--key-out", str(tmp_path / "leaf.key")])  # fmt: skip
        assert code == 0
        for _ in range(3):  # several requests: more than one worker may answer
            out = subprocess.run(
                ["openssl", "ocsp", "-issuer", str(public / "device.crt"), "-cert", str(leaf),
                 "-url", f"{server.base}/ocsp", "-CAfile", str(public / "root.crt"),
                 "-verify_other", str(public / "device.crt")],
                capture_output=True, text=True, timeout=TIMEOUT, check=False,
            )  # fmt: skip
            assert "Response verify OK" in out.stderr + out.stdout, out.stderr
            assert f"{leaf}: good" in out.stdout
        assert curl(f"{server.base}/healthz").returncode == 0
    finally:
        server.stop()


def test_a_ca_key_pair_replaced_on_the_token_signs_no_certificate_and_no_crl(
    token_services: Services,
) -> None:
    """Both objects of the device CA's key replaced under the same label and id (a token
    restored from the wrong backup, say): the token's public object matches its private one,
    only the CA certificate tells. Issuance and CRLs are refused (KeyBackendError, exit 69 /
    503), the reserved row marked failed; nothing that verifies under no CA is handed out."""
    services = token_services
    backend = services.backend
    assert isinstance(backend, Pkcs11Backend)
    with services.db.scope() as session:
        ref = session.scalars(
            select(CertificateAuthority.key_ref).where(CertificateAuthority.name == "device")
        ).one()
    uri = parse(ref)
    with backend._lock:
        session = backend._open_session()
        for obj in list(session.get_objects({Attribute.LABEL: uri.object, Attribute.ID: uri.id})):
            obj.destroy()
        params = session.create_domain_parameters(
            P11KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
            local=True,
        )
        params.generate_keypair(store=True, label=uri.object, id=uri.id)
        backend._keys.clear()
        backend._public_cache.clear()  # as a process started after the swap
    before = {r.id for r in _rows(services)}
    with pytest.raises(KeyBackendError, match="does not verify under the CA's certificate"):
        services.ca.issue(request_for("device"), TEST_ACTOR)
    new = [r for r in _rows(services) if r.id not in before]
    assert [r.status for r in new] == [CertStatus.FAILED] and new[0].der is None
    with pytest.raises(KeyBackendError, match="does not verify under the CA's certificate"):
        services.crls.publish("device", services.clock(), actor=TEST_ACTOR)


def test_a_module_that_cannot_initialise_at_start_is_an_outage_not_a_settings_error(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    """C_Initialize fails as the process starts (SoftHSM2 with its token directory away; a
    network HSM's library with the HSM unreachable): read-only commands work, signing is a
    key-backend error (69) naming the cause; it used to be exit 78 for every command, with
    "cannot load PKCS#11 module ...: " and no cause."""
    data_dir = _deployment(softhsm, tmp_path, FAULT_TOKEN)
    assert cli_main(["--data-dir", str(data_dir), "init", "--org", "Unready Corp"]) == 0
    conf = tmp_path / "away.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'no-such-dir'}\nobjectstore.backend = file\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEKISHO_")},
        "SOFTHSM2_CONF": str(conf),
    }
    exe = [sys.executable, "-m", "sekisho", "--data-dir", str(data_dir)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*exe, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
        )

    listed = run("cert", "list", "--ca", "device")
    assert listed.returncode == 0, listed.stderr
    issued = run("issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
                 "--subject", "CN=unready.example.com", "--san", "dns:unready.example.com",
                 "--key-out", str(tmp_path / "unready.key"))  # fmt: skip
    assert issued.returncode == 69, issued.stderr
    assert "cannot be initialised (GeneralError)" in issued.stderr
    assert "Traceback" not in issued.stderr and softhsm_support.USER_PIN not in issued.stderr


def test_a_process_started_while_the_token_is_away_signs_checkpoints_once_it_is_back(
    softhsm: softhsm_support.SoftHsm, tmp_path: Path
) -> None:
    """Its audit key was unavailable as it started: it used to append unsigned for the rest
    of its life (no checkpoint ever, the token back or not)."""
    data_dir = _deployment(softhsm, tmp_path, FAULT_TOKEN)
    assert cli_main(["--data-dir", str(data_dir), "init", "--org", "Late Corp"]) == 0
    settings = make_settings(data_dir, audit_checkpoint_every=1)
    with softhsm.token_away(FAULT_TOKEN):
        services = build_services(settings)
        try:
            # Due at once (every record): the operation fails, as in a process started before.
            with pytest.raises(KeyBackendError):
                services.crls.publish("admin", services.clock(), actor=TEST_ACTOR)
        except BaseException:
            services.close()
            raise
    try:
        with services.db.scope() as session:
            before = session.scalar(select(func.count()).select_from(Checkpoint))
        services.crls.publish("admin", services.clock(), actor=TEST_ACTOR)
        with services.db.scope() as session:
            after = session.scalar(select(func.count()).select_from(Checkpoint))
        assert after is not None and before is not None and after > before
    finally:
        services.close()
