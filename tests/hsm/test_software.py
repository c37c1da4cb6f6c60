"""Software key backend: PBES2 PKCS#8 key files read by asn1crypto, OpenSSL and cryptography;
0600 files; wrong passphrases refused by name; passphrases only from files or named
environment variables, and never in logs.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import cast

import click
import pytest
from asn1crypto import core as asn1_core
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from hsm.base import CA_KEY_TYPES, KeyType, sign_bytes, signature_hash
from hsm.pbes2 import (
    MIN_ITERATIONS,
    EncryptedPrivateKeyInfo,
    decrypt_private_key,
    describe,
    encrypt_private_key,
)
from hsm.secrets import create_secret_file, read_secret
from hsm.software import PEM_LABEL, SoftwareBackend, generate_private_key, pem_unwrap
from sekisho.cli import cli, main
from sekisho.errors import ConfigError, KeyBackendError, NotFound, WrongPassphrase
from sekisho.settings import Settings

PASSPHRASE = b"correct horse battery staple 42"
TIMEOUT = 30


@pytest.fixture
def backend(tmp_path: Path) -> SoftwareBackend:
    return SoftwareBackend(tmp_path / "keys", PASSPHRASE)


def _epki_der(path: Path) -> bytes:
    return pem_unwrap(path.read_bytes(), PEM_LABEL)


def test_key_file_is_pbes2_scrypt_aes256(backend: SoftwareBackend, tmp_path: Path) -> None:
    """Security target 39: PKCS#8 PBES2 with scrypt, N >= 2^14 and r = 8 (RFC 7914 7), and
    AES-256; read here with asn1crypto's generic parser (DER tags and OIDs as they are
    stored), not with Sekisho's own ASN.1 classes."""
    ref = backend.generate("ca-root", KeyType.EC_P256)
    assert ref == "file:ca-root"
    path = tmp_path / "keys" / "ca-root.key"
    text = path.read_text()
    assert text.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    outer = asn1_core.Sequence.load(_epki_der(path))
    algorithm, _data = outer[0], outer[1]
    assert algorithm[0].dotted == "1.2.840.113549.1.5.13"  # id-PBES2
    kdf, cipher = algorithm[1][0], algorithm[1][1]
    assert kdf[0].dotted == "1.3.6.1.4.1.11591.4.11"  # id-scrypt
    salt, n, r, p, length = (kdf[1][i] for i in range(5))
    assert len(salt.native) >= 16
    assert n.native >= 2**14 and n.native & (n.native - 1) == 0 and r.native == 8
    assert p.native >= 1 and length.native == 32
    assert cipher[0].dotted == "2.16.840.1.101.3.4.1.42"  # aes256-CBC
    assert len(cipher[1].native) == 16  # the IV
    assert describe(_epki_der(path)) == ("pbes2", "scrypt", 2**14, "aes256_cbc", 8, 2)


def _openssl_pkcs8(key: ec.EllipticCurvePrivateKey, tmp_path: Path, *options: str) -> bytes:
    """``key`` encrypted by ``openssl pkcs8 -topk8`` with ``options`` (DER)."""
    plain = tmp_path / "plain.pem"
    plain.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-in", str(plain), "-outform", "DER", *options,
         "-passout", f"pass:{PASSPHRASE.decode()}"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def test_pbkdf2_key_files_of_earlier_versions_and_openssl_scrypt_files_are_read(
    tmp_path: Path,
) -> None:
    """Deployments made before scrypt hold PBKDF2-HMAC-SHA256 files at 600,000 iterations:
    still read, as a file OpenSSL encrypted with either KDF is (a ceremony's key brought back
    online); OpenSSL's scrypt below N = 2^14 is refused as weak."""
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.private_numbers()
    pbkdf2 = _openssl_pkcs8(
        key, tmp_path, "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256", "-iter", "600000"
    )
    assert describe(pbkdf2)[:4] == ("pbes2", "pbkdf2-sha256", 600_000, "aes256_cbc")
    scrypt = _openssl_pkcs8(key, tmp_path, "-v2", "aes-256-cbc", "-scrypt", "-scrypt_N", "16384")
    assert describe(scrypt) == ("pbes2", "scrypt", 16384, "aes256_cbc", 8, 1)
    for der in (pbkdf2, scrypt):
        loaded = decrypt_private_key(der, PASSPHRASE)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.private_numbers() == numbers
        with pytest.raises(WrongPassphrase):
            decrypt_private_key(der, b"not the passphrase at all")
    small = _openssl_pkcs8(key, tmp_path, "-v2", "aes-256-cbc", "-scrypt", "-scrypt_N", "8192")
    assert describe(small).cost == 8192
    with pytest.raises(KeyBackendError, match="weak encryption"):
        decrypt_private_key(small, PASSPHRASE)


def test_key_files_are_owner_only(backend: SoftwareBackend, tmp_path: Path) -> None:
    backend.generate("k1", KeyType.EC_P256)
    assert stat.S_IMODE((tmp_path / "keys" / "k1.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_openssl_and_cryptography_read_the_key_file(
    backend: SoftwareBackend, tmp_path: Path
) -> None:
    backend.generate("k2", KeyType.EC_P384)
    path = tmp_path / "keys" / "k2.key"
    pw = tmp_path / "pw"
    pw.write_bytes(PASSPHRASE + b"\n")
    res = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-passin", f"file:{pw}", "-noout"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    res = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-passin", f"file:{wrong}", "-noout"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert res.returncode != 0
    loaded = serialization.load_pem_private_key(path.read_bytes(), PASSPHRASE)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.public_key() == backend.public_key("file:k2")


def test_openssl_public_key_matches_backend(backend: SoftwareBackend, tmp_path: Path) -> None:
    backend.generate("k3", KeyType.ED25519)
    pw = tmp_path / "pw"
    pw.write_bytes(PASSPHRASE)
    res = subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "keys" / "k3.key"), "-passin", f"file:{pw}",
         "-pubout"],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ours = backend.public_key("file:k3").public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert res.stdout == ours


def _verify(public: object, key_type: KeyType, signature: bytes, data: bytes) -> None:
    algorithm = signature_hash(key_type)
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        assert algorithm is not None
        public.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public, rsa.RSAPublicKey):
        assert algorithm is not None
        public.verify(signature, data, padding.PKCS1v15(), algorithm)
    else:
        raise AssertionError(type(public))


@pytest.mark.parametrize("key_type", CA_KEY_TYPES, ids=[k.value for k in CA_KEY_TYPES])
def test_each_key_type_signs_and_verifies_after_reload(tmp_path: Path, key_type: KeyType) -> None:
    first = SoftwareBackend(tmp_path / "keys", PASSPHRASE)
    ref = first.generate(f"k-{key_type.value}", key_type)
    first.close()
    # A fresh backend decrypts from disk: the round trip through the file is what signs.
    second = SoftwareBackend(tmp_path / "keys", PASSPHRASE)
    key = second.signing_key(ref)
    public = second.public_key(ref)
    data = b"to be signed " + key_type.value.encode()
    signature = sign_bytes(key, key_type, data)
    _verify(public, key_type, signature, data)
    with pytest.raises(Exception):  # noqa: B017  (each library raises InvalidSignature)
        _verify(public, key_type, signature, data + b"!")
    if key_type.rsa_bits:
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == key_type.rsa_bits
    second.close()


def test_wrong_passphrase_is_refused_clearly(backend: SoftwareBackend, tmp_path: Path) -> None:
    ref = backend.generate("k4", KeyType.EC_P256)
    other = SoftwareBackend(tmp_path / "keys", b"a different passphrase!!")
    with pytest.raises(WrongPassphrase) as info:
        other.signing_key(ref)
    assert "wrong passphrase" in info.value.message
    assert info.value.exit_code == 77 and info.value.http_status == 503
    assert PASSPHRASE.decode() not in info.value.message


def test_weak_pkcs8_from_best_available_encryption_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    weak = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    assert describe(weak).kdf.startswith("pbkdf2") and describe(weak).cost < MIN_ITERATIONS
    with pytest.raises(KeyBackendError, match="weak encryption"):
        decrypt_private_key(weak, PASSPHRASE)
    with pytest.raises(ValueError, match="empty"):
        encrypt_private_key(key, b"")


def _with_cost(der: bytes, field: str, value: int) -> bytes:
    """``der`` with one KDF parameter changed (``iteration_count`` of PBKDF2; ``cost_parameter``,
    ``block_size`` or ``parallelization_parameter`` of scrypt)."""
    info = EncryptedPrivateKeyInfo.load(der)
    params = info["encryption_algorithm"]["parameters"]["key_derivation_func"]["parameters"]
    params[field] = value
    return bytes(EncryptedPrivateKeyInfo.load(info.dump(force=True)).dump())


def test_key_files_brought_online_need_sha2_aes256_and_sane_costs(tmp_path: Path) -> None:
    """A key file re-encrypted elsewhere with 3DES and HMAC-SHA1 (600,000 iterations, which
    the iteration check alone let through) is refused, as is one asking for 2^31 - 1
    iterations (minutes of CPU before anything could fail), or scrypt with 1 GiB of memory or
    an hour of work: refused at once. scrypt with r below 8, or N not a power of two: weak."""
    key = ec.generate_private_key(ec.SECP256R1())
    weak = _openssl_pkcs8(key, tmp_path, "-v2", "des3", "-v2prf", "hmacWithSHA1", "-iter", "600000")
    assert describe(weak)[:4] == ("pbes2", "pbkdf2-sha1", 600_000, "tripledes_3key")
    with pytest.raises(KeyBackendError, match="weak encryption"):
        decrypt_private_key(weak, PASSPHRASE)
    pbkdf2 = _openssl_pkcs8(
        key, tmp_path, "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256", "-iter", "600000"
    )
    endless = _with_cost(pbkdf2, "iteration_count", 2**31 - 1)
    assert describe(endless).cost == 2**31 - 1
    with pytest.raises(KeyBackendError, match="more than"):
        decrypt_private_key(endless, PASSPHRASE)
    ours = encrypt_private_key(key, PASSPHRASE)
    for field, value, refusal in [
        ("cost_parameter", 2**23, "more than 256 MiB"),  # 1 GiB
        ("parallelization_parameter", 2**16, "more than 256 MiB or"),  # an hour
        ("block_size", 1, "weak encryption"),
        ("cost_parameter", 3 * 2**13, "weak encryption"),
    ]:
        changed = _with_cost(ours, field, value)
        with pytest.raises(KeyBackendError, match=refusal):
            decrypt_private_key(changed, PASSPHRASE)


class _PlainKeyInfo:
    """Stands for a private key: its PKCS#8 PrivateKeyInfo is the DER given."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def private_bytes(self, *_args: object) -> bytes:
        return self._der


def test_a_key_of_an_algorithm_cryptography_does_not_know_is_a_key_backend_error() -> None:
    """A key file under the right passphrase whose key is of another algorithm (a newer
    OpenSSL's ML-DSA, say, brought to `ca online`): cryptography raises UnsupportedAlgorithm,
    which is no ValueError, and it went out as an internal error (exit 70)."""
    # PrivateKeyInfo: version 0, algorithm 1.2.3.4, privateKey OCTET STRING.
    info = bytes.fromhex("3010020100300506032a0304040404020000")
    der = encrypt_private_key(cast(ec.EllipticCurvePrivateKey, _PlainKeyInfo(info)), PASSPHRASE)
    with pytest.raises(KeyBackendError, match="key type"):
        decrypt_private_key(der, PASSPHRASE)


def test_garbage_key_file_is_a_key_backend_error(tmp_path: Path) -> None:
    with pytest.raises(KeyBackendError):
        decrypt_private_key(b"\x30\x03\x02\x01\x00", PASSPHRASE)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "junk.key").write_text("hello\n")
    with pytest.raises(KeyBackendError, match="PEM"):
        SoftwareBackend(keys_dir, PASSPHRASE).signing_key("file:junk")


def test_references_and_labels_are_checked(backend: SoftwareBackend) -> None:
    with pytest.raises(KeyBackendError, match="reference"):
        backend.signing_key("pkcs11:token=x;object=y")
    with pytest.raises(KeyBackendError, match="label"):
        backend.signing_key("file:../../etc/passwd")
    with pytest.raises(KeyBackendError, match="label"):
        backend.generate("root\n", KeyType.EC_P256)  # "$" matched before a final newline
    with pytest.raises(KeyBackendError, match="offline"):
        backend.signing_key("file:absent")
    with pytest.raises(NotFound):
        backend.export_encrypted("file:absent")


def test_store_refuses_to_overwrite_and_remove_deletes(
    backend: SoftwareBackend, tmp_path: Path
) -> None:
    ref = backend.generate("k5", KeyType.EC_P256)
    exported = backend.export_encrypted(ref)
    from sekisho.errors import Conflict

    with pytest.raises(Conflict):
        backend.store(ref, pem_unwrap(exported, PEM_LABEL))
    backend.remove(ref)
    assert not backend.has_key(ref)
    assert not (tmp_path / "keys" / "k5.key").exists()
    with pytest.raises(KeyBackendError):
        backend.signing_key(ref)  # the cache was dropped too
    backend.store(ref, pem_unwrap(exported, PEM_LABEL))
    assert backend.has_key(ref)
    backend.signing_key(ref)


def test_repr_does_not_show_the_passphrase(backend: SoftwareBackend) -> None:
    assert PASSPHRASE.decode() not in repr(backend)
    assert "correct" not in repr(backend)


# -- where the passphrase comes from ----------------------------------------------------------
def test_a_generated_passphrase_file_is_whole_or_absent_and_never_replaced(
    tmp_path: Path,
) -> None:
    """It used to be written in place, unsynced: a crash between create and write left an
    empty file that failed every later start (exit 78), and a power loss could take it while
    the keys it protects, which are synced, survived. Now it appears only whole and synced;
    a second creation (two first runs at once) keeps the first."""
    from tests.hsm.test_key_files import file_size_limit

    path = tmp_path / "secrets" / "pw"
    with file_size_limit(8), pytest.raises(OSError):  # the disk fills part way
        create_secret_file(path)
    assert not path.exists() and list(path.parent.iterdir()) == []
    create_secret_file(path)
    first = path.read_bytes()
    create_secret_file(path)
    assert path.read_bytes() == first and len(read_secret(path)) >= 32
    assert [p.name for p in path.parent.iterdir()] == ["pw"]


def test_passphrase_from_file_needs_owner_only_mode_and_length(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "pw"
    create_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    value = read_secret(path)
    assert len(value) >= 32 and not value.endswith(b"\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_secret(path)
    short = tmp_path / "short"
    short.write_text("tiny\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_secret(short)
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret(tmp_path / "missing")


def test_passphrase_files_are_read_only_when_they_are_plainly_ours(tmp_path: Path) -> None:
    """Checked on the descriptor read from: no symlink, no directory, not another user's."""
    real = tmp_path / "pw"
    real.write_text("x" * 20 + "\n")
    real.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_secret(link)
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(folder)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(real, 65534, 65534)
        with pytest.raises(ConfigError, match="another user"):
            read_secret(real)


def test_passphrase_from_named_environment_variable(tmp_path: Path) -> None:
    assert read_secret(None, "SEKISHO_TEST_PW", {"SEKISHO_TEST_PW": "x" * 20}) == b"x" * 20
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_secret(None, "SEKISHO_TEST_PW", {"SEKISHO_TEST_PW": "x"})
    with pytest.raises(ConfigError, match="SEKISHO_TEST_PW"):
        read_secret(None, "SEKISHO_TEST_PW", {})
    with pytest.raises(ConfigError, match="no key passphrase source"):
        read_secret(None)


def _all_commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _all_commands(command, (*prefix, name))
        else:
            out.append(((*prefix, name), command))
    return out


def test_no_command_takes_a_secret_value_on_argv() -> None:
    """Secret options exist only as ``--…-file`` or ``--…-env`` (a name, not the value)."""
    secret_words = ("password", "passphrase", "pin", "secret")
    for path, command in _all_commands(cli):
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if any(w in opt for w in secret_words):
                    assert opt.endswith(("-file", "-env")), (path, opt)


def test_passphrase_never_logged_during_init_and_issue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    secret = "pp-" + os.urandom(12).hex() + "-never-log-me"
    monkeypatch.setenv("SEKISHO_TEST_KEY_PW", secret)
    monkeypatch.setenv("SEKISHO_KEY_PASSPHRASE_ENV", "SEKISHO_TEST_KEY_PW")
    data = tmp_path / "d"
    base = ["--data-dir", str(data), "--log-level", "DEBUG"]
    assert main([*base, "init", "--org", "Log Test"]) == 0
    pw_file = tmp_path / "p12pw"
    pw_file.write_text("p12-password-" + os.urandom(8).hex() + "\n")
    pw_file.chmod(0o600)
    rc = main(
        [*base, "--json", "issue", "--ca", "admin", "--profile", "admin-client", "--keygen",
         "ec-p256", "--subject", "CN=Log Test,O=Tenant", "--san", "email:log@example.com",
         "--p12", str(tmp_path / "a.p12"), "--password-file", str(pw_file)]
    )  # fmt: skip
    assert rc == 0
    # Wrong passphrase: the error path must not echo it either.
    monkeypatch.setenv("SEKISHO_TEST_KEY_PW", secret + "-wrong")
    assert main([*base, "crl", "generate", "--ca", "admin"]) == 77
    # Prove the capture sees the log stream (setup_logging's handler on stderr), so the
    # absence below means something; and a secret-looking extra is masked.
    logging.getLogger("sekisho.test").debug("probe", extra={"key_passphrase": secret})
    out, err = capfd.readouterr()
    probe = [json.loads(line) for line in err.splitlines() if '"probe"' in line]
    assert probe and probe[0]["key_passphrase"] == "***"
    assert "wrong-passphrase" in err
    for text in (out, err):
        assert secret not in text
        assert pw_file.read_text().strip() not in text
    # The key files under the env passphrase are real PBES2 files; no passphrase file made.
    assert describe(_epki_der(data / "keys" / "ca-root.key"))[0] == "pbes2"
    assert not (data / "secrets" / "ca-passphrase").exists()
    logging.getLogger().handlers.clear()


def test_settings_name_no_secret_values() -> None:
    """Settings carry where a secret is (file or variable name), never the secret itself."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(Settings)}
    secretish = {n for n in names if "passphrase" in n or "password" in n}
    assert secretish == {"key_passphrase_file", "key_passphrase_env"}


def test_generate_private_key_types() -> None:
    assert isinstance(generate_private_key(KeyType.EC_P384), ec.EllipticCurvePrivateKey)
    assert isinstance(generate_private_key(KeyType.ED25519), ed25519.Ed25519PrivateKey)
    assert hashes.SHA384().name == signature_hash(KeyType.EC_P384).name  # type: ignore[union-attr]


def test_a_pkcs11_pin_that_is_not_utf8_is_a_settings_error(tmp_path: Path) -> None:
    """A PIN file with a byte that is not UTF-8: a settings error (78) that quotes nothing of
    the PIN. Before: UnicodeDecodeError (exit 70), its message, with the byte, in the log."""
    from sekisho.errors import ConfigError
    from sekisho.services import open_backend
    from tests.conftest import make_settings

    pin = tmp_path / "pin"
    pin.write_bytes(b"caf\xe9-secret\n")
    pin.chmod(0o600)
    settings = make_settings(
        tmp_path / "data",
        key_backend="pkcs11",
        pkcs11_module="/usr/lib/softhsm/libsofthsm2.so",
        pkcs11_token="none",
        pkcs11_pin_file=str(pin),
    )
    with pytest.raises(ConfigError) as info:
        open_backend(settings)
    assert info.value.exit_code == 78
    assert "UTF-8" in info.value.message and "xe9" not in info.value.message
    assert "caf" not in info.value.message
