"""Debian weak keys (CVE-2008-0166, BR 6.1.1.3) are refused as ``weak-key``, from a CSR and
from an authorised request, before anything is signed; RSA-2048/4096 keys are refused as
``weak-key-list`` when their list is missing or damaged (fail closed); the installer takes
only the published packages and replaces nothing unless every list is whole.

The weak keys are the examples Debian ships in openssl-blacklist itself (a 2048-bit
certificate, a 4096-bit private key), read from the package ``make test`` downloads into
``<venv>/cache`` (``sekisho key install-weak-lists --debs``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import weakkeys
from ca.issuance import IssueRequest
from hsm.base import KeyType
from sekisho.cli import main
from sekisho.errors import InputError, PolicyViolation
from sekisho.services import Services
from tests.ca.helpers import PROFILE_REQUESTS, ca_key_ref
from tests.ca.test_bad_input import _assert_refused, _csr_with_key, _from_csr
from tests.conftest import TEST_ACTOR, RecordingBackend
from tests.support import checkers

DEBS = Path(sys.prefix) / "cache"
MAIN = weakkeys.PACKAGES[0]
EXAMPLES = "./usr/share/doc/openssl-blacklist/examples/"


def _example(name: str) -> bytes:
    deb = DEBS / MAIN.filename
    if not deb.is_file():
        pytest.fail(f"{deb} is missing: `make test` downloads it (sekisho key install-weak-lists)")
    return weakkeys.deb_member(deb.read_bytes(), EXAMPLES + name)


def _weak_2048() -> rsa.RSAPublicKey:
    key = x509.load_pem_x509_certificate(_example("bad_x509.pem")).public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    return key


def _weak_4096() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(_example("bad_rsa_4096.pem"), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    return key


def _request(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> IssueRequest:
    ca, subject, sans = PROFILE_REQUESTS["device"]
    return IssueRequest(ca=ca, profile="device", subject=subject, public_key=key, sans=sans)


def test_the_published_examples_are_on_the_lists_and_fresh_keys_are_not() -> None:
    assert weakkeys.is_debian_weak(_weak_2048().public_numbers().n)
    assert weakkeys.is_debian_weak(_weak_4096().public_key().public_numbers().n)
    for bits in (2048, 4096):
        fresh = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
        assert not weakkeys.is_debian_weak(fresh)
    # The fingerprint is what `openssl rsa -modulus | sha1sum` gives, last 20 hex digits.
    n = _weak_2048().public_numbers().n
    assert weakkeys.fingerprint(n).hex() == "d10d992069d592fe1766"


def test_csr_with_a_debian_weak_4096_key_is_refused_unsigned(
    services: Services, recording_backend: RecordingBackend
) -> None:
    # The CA key's signatures only: the refusal's journal entry may sign a checkpoint with the
    # audit key (a time-based one is due once the template's is 5 minutes old).
    ca_key = ca_key_ref(services, "admin")
    signed_before = [data for ref, data in recording_backend.calls if ref == ca_key]
    exc = _assert_refused(
        services, _from_csr(services, _csr_with_key(_weak_4096())), PolicyViolation, "weak-key"
    )
    assert "Debian weak key" in exc.message and "CVE-2008-0166" in exc.message
    assert [data for ref, data in recording_backend.calls if ref == ca_key] == signed_before


def test_authorised_request_for_a_debian_weak_2048_key_is_refused(services: Services) -> None:
    request = _request(_weak_2048())
    _assert_refused(
        services, lambda: services.ca.issue(request, TEST_ACTOR), PolicyViolation, "weak-key"
    )


def test_without_the_lists_rsa_2048_and_4096_are_refused_and_others_issue(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(weakkeys.ENV_DIR, str(tmp_path / "none"))
    for bits in (2048, 4096):
        key = rsa.generate_private_key(65537, bits)
        exc = _assert_refused(
            services, _from_csr(services, _csr_with_key(key)), PolicyViolation, "weak-key-list"
        )
        assert f"RSA-{bits}" in exc.message and "install-weak-lists" in exc.message
    # No list covers RSA-3072; EC keys have nothing to look up.
    for key in (rsa.generate_private_key(65537, 3072), ec.generate_private_key(ec.SECP256R1())):
        cert = services.ca.issue(_request(key.public_key()), TEST_ACTOR)
        checkers.pkilint_cert(cert.public_bytes(serialization.Encoding.DER))


def test_keys_made_here_need_no_list(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Failing closed is for keys received: a key generated by this process or its backend
    (server-side keygen, a new CA, an OCSP responder) is issued without the lists, so a
    venv rebuilt without them does not stop an RSA deployment's init or its responders."""
    monkeypatch.setenv(weakkeys.ENV_DIR, str(tmp_path / "none"))
    ca, subject, sans = PROFILE_REQUESTS["device"]
    placeholder = IssueRequest(ca=ca, profile="device", subject=subject, public_key=None, sans=sans)  # type: ignore[arg-type]
    cert, _key = services.ca.issue_with_new_key(placeholder, KeyType.RSA_2048, TEST_ACTOR)
    checkers.pkilint_cert(cert.public_bytes(serialization.Encoding.DER))
    data = tmp_path / "rsa"
    assert main(["--data-dir", str(data), "--json", "init", "--key-type", "rsa-4096"]) == 0
    assert json.loads(capsys.readouterr().out)["cas"] == ["root", "admin", "device"]
    assert main(["--data-dir", str(data), "--json", "ocsp", "responders"]) == 0
    responders = json.loads(capsys.readouterr().out)
    assert responders, "init made no OCSP responder"


def test_a_damaged_list_refuses_its_size(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lists = tmp_path / "lists"
    shutil.copytree(weakkeys.lists_dir(), lists)
    table = lists / weakkeys.TABLES[2048].filename
    data = bytearray(table.read_bytes())
    data[12345] ^= 0x01  # one record changed: a weak key would no longer be found
    table.write_bytes(bytes(data))
    monkeypatch.setenv(weakkeys.ENV_DIR, str(lists))
    exc = _assert_refused(
        services,
        _from_csr(services, _csr_with_key(rsa.generate_private_key(65537, 2048))),
        PolicyViolation,
        "weak-key-list",
    )
    assert "damaged" in exc.message
    # The intact 4096 list still serves: the weak key is found there.
    _assert_refused(
        services, _from_csr(services, _csr_with_key(_weak_4096())), PolicyViolation, "weak-key"
    )


def test_a_list_that_is_a_fifo_or_a_directory_is_refused_unread(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never waited on: a FIFO at the table's name would block every RSA issuance."""
    lists = tmp_path / "lists"
    lists.mkdir()
    os.mkfifo(lists / weakkeys.TABLES[2048].filename)
    (lists / weakkeys.TABLES[4096].filename).mkdir()
    monkeypatch.setenv(weakkeys.ENV_DIR, str(lists))
    for bits in (2048, 4096):
        key = rsa.generate_private_key(65537, bits)
        exc = _assert_refused(
            services, _from_csr(services, _csr_with_key(key)), PolicyViolation, "weak-key-list"
        )
        assert "damaged" in exc.message


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_from_packages_then_again(tmp_path: Path) -> None:
    target = tmp_path / "lists"
    done = weakkeys.install(target, DEBS, download=False)
    assert not done.already and not done.downloaded
    assert done.tables == {2048: 294_912, 4096: 294_912}
    for bits, spec in weakkeys.TABLES.items():
        path = target / spec.filename
        assert _digest(path) == spec.sha256
        assert path.stat().st_mode & 0o777 == 0o644
        assert bits in done.tables
    again = weakkeys.install(target, DEBS, download=False)
    assert again.already


def test_install_refuses_a_tampered_package_and_writes_nothing(tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    for spec in weakkeys.PACKAGES:
        shutil.copy(DEBS / spec.filename, debs / spec.filename)
    extra = debs / weakkeys.PACKAGES[1].filename
    data = bytearray(extra.read_bytes())
    data[-100] ^= 0xFF
    extra.write_bytes(bytes(data))
    target = tmp_path / "lists"
    with pytest.raises(InputError, match="SHA-256 differs"):
        weakkeys.install(target, debs, download=False)
    # The first package was good, but no table is installed unless all are.
    assert not target.exists() or not any(target.iterdir())


def test_deb_reader_and_list_parser_refuse_garbage() -> None:
    with pytest.raises(InputError, match="not a Debian package"):
        weakkeys.deb_member(b"PK\x03\x04not an ar archive", "./x")
    truncated = (DEBS / MAIN.filename).read_bytes()[:5000]
    with pytest.raises(InputError):
        weakkeys.deb_member(truncated, MAIN.lists[2048])
    with pytest.raises(InputError, match="line 2 is not 20 hex digits"):
        weakkeys.build_table(b"# comment\nnot-hex\n")
    table = weakkeys.build_table(b"# c\n\nffffffffffffffffffff\n00000000000000000001\n")
    assert table == bytes(9) + b"\x01" + b"\xff" * 10


def test_cli_installs_and_refuses_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "lists"
    argv = ["--json", "key", "install-weak-lists", "--debs", str(DEBS), "--no-download"]
    assert main([*argv, "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert '"rsa-2048": 294912' in out and '"already_installed": false' in out
    assert main(["key", "install-weak-lists", "--no-download"]) == 64  # needs --debs
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["key", "install-weak-lists", "--debs", str(empty), "--no-download",
                 "--dir", str(tmp_path / "other")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 65 and "downloading is off" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()


def test_install_replaces_links_planted_in_the_directory_and_writes_through_none(
    tmp_path: Path,
) -> None:
    target = tmp_path / "lists"
    target.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    victim.chmod(0o600)
    name = weakkeys.TABLES[2048].filename
    (target / name).symlink_to(victim)
    (target / f".{name}.tmp").symlink_to(victim)  # the temporary name of the first version
    weakkeys.install(target, DEBS, download=False)
    assert victim.read_bytes() == b"secret" and victim.stat().st_mode & 0o777 == 0o600
    assert not (target / name).is_symlink()
    assert _digest(target / name) == weakkeys.TABLES[2048].sha256


def test_install_exit_codes_for_a_failed_download_and_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(weakkeys, "ARCHIVES", ("http://127.0.0.1:9/",))  # nothing listens
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["key", "install-weak-lists", "--debs", str(empty)]
    assert main([*base, "--dir", str(tmp_path / "new")]) == 69
    assert "could not download" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # Installed already: the packages that cannot be kept are a warning, not a failure.
    installed = tmp_path / "installed"
    weakkeys.install(installed, DEBS, download=False)
    assert main([*base, "--dir", str(installed)]) == 0
    assert "warning:" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code = main(["key", "install-weak-lists", "--debs", str(DEBS), "--no-download",
                 "--dir", str(a_file / "sub")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 74 and "cannot write" in err and "Traceback" not in err


def test_deb_reader_refuses_lying_member_sizes_at_once() -> None:
    def member(size: bytes) -> bytes:
        header = b"data.tar.gz/".ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2
        return header + b"100644".ljust(8) + size.ljust(10) + b"`\n"

    for size in (b"-60", b"1x", b"999999999"):
        with pytest.raises(InputError, match="bad member size"):
            weakkeys.deb_member(b"!<arch>\n" + member(size) + b"x" * 100, "./x")
