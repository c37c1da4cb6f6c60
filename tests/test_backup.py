"""``sekisho backup create | verify | restore`` on real deployments: the archive holds a
consistent, signed copy (no passphrase, no plaintext key); verification catches every kind of
damage without a secret; a restore checks everything before the data directory appears, moves
CRL numbers past anything the lost deployment may have signed, and journals itself. Every
certificate and CRL the restored deployment makes goes through pkilint and OpenSSL."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.crl import latest_by_name
from ca.models import CrlKind
from ca.revocation import Reason
from hsm.pbes2 import encrypt_private_key
from hsm.software import PEM_LABEL, pem_wrap
from sekisho import backup
from sekisho.cli import main
from sekisho.db import Database
from sekisho.errors import ConfigError
from sekisho.services import Services, build_services
from sekisho.settings import load_settings
from tests.ca.helpers import make_csr, name
from tests.conftest import TEST_ACTOR, Deployment, make_settings
from tests.support.checkers import (
    openssl_crl_verify,
    openssl_verify,
    openssl_verify_revoked,
    pkilint_cert,
    pkilint_crl,
)

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Result:
    capsys.readouterr()
    code = main(["--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return Result(code, out, err)


@pytest.fixture
def source(template_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "source"
    shutil.copytree(template_dir, target)
    return target


def _services(data_dir: Path) -> Services:
    return build_services(make_settings(data_dir))


def _issue(services: Services, cn: str) -> x509.Certificate:
    return services.ca.issue_from_csr(
        make_csr(
            name(O="Tenant One", UID="alice", CN=cn), [x509.RFC822Name("alice@tenant1.example.com")]
        ),
        ca="admin",
        profile="admin-client",
        actor=TEST_ACTOR,
    )


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            out[m.name] = fh.read() if fh is not None else b""
        return out


def _write_tar(path: Path, members: list[tuple[str, bytes]], tweak: Any = None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            if tweak is not None:
                tweak(info)
            tar.addfile(info, io.BytesIO(data))


def _resign(members: dict[str, bytes], sign: Callable[[bytes], bytes]) -> None:
    """Bring the manifest up to date with the members and sign it with ``sign``."""
    manifest = json.loads(members[backup.MANIFEST])
    manifest["files"] = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in members.items()
        if n not in backup._HEADER
    ]
    pem = members[backup.AUDIT_KEY]
    der = serialization.load_pem_public_key(pem).public_bytes(serialization.Encoding.DER, _SPKI)
    manifest["audit_public_key_sha256"] = hashlib.sha256(der).hexdigest()
    body = json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"
    members[backup.MANIFEST] = body
    members[backup.SIGNATURE] = sign(body)


def _audit_signer(data_dir: Path) -> Callable[[bytes], bytes]:
    services = _services(data_dir)
    signer = services.journal.signer
    assert signer is not None
    return signer.sign


def _crl(data_dir: Path, ca: str) -> tuple[int, bytes]:
    services = _services(data_dir)
    try:
        with services.db.read_scope() as session:
            crl = latest_by_name(session, ca, CrlKind.FULL)
            assert crl is not None
            return crl.number, crl.der
    finally:
        services.close()


def _ca_der(data_dir: Path, ca: str) -> bytes:
    return (data_dir / "public" / f"{ca}.crt").read_bytes()


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_round_trip(capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path) -> None:
    services = _services(source)
    try:
        kept = _issue(services, "Kept Admin")
        later = _issue(services, "Revoked After The Backup")
    finally:
        services.close()
    archive = tmp_path / "out" / "backup.tar"
    archive.parent.mkdir()
    made = cli(capsys, source, "--json", "backup", "create", str(archive))
    assert made.code == 0, made.err
    summary = json.loads(made.out)
    # A new owner-only file, whose digest the journal records.
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert summary["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert sorted(os.listdir(archive.parent)) == ["backup.tar"]  # no temporary left
    members = _members(archive)
    assert list(members)[:3] == [backup.MANIFEST, backup.SIGNATURE, backup.AUDIT_KEY]
    assert {"keys/ca-root.key", "keys/ca-admin.key", "keys/audit.key", "sekisho.db"} <= set(members)
    blob = archive.read_bytes()
    passphrase = (source / "secrets" / "ca-passphrase").read_bytes().strip()
    assert passphrase not in blob
    assert b"-----BEGIN PRIVATE KEY" not in blob and b"BEGIN EC PRIVATE KEY" not in blob
    found = cli(capsys, source, "--json", "audit", "search", "--action", "ca.backup")
    (record,) = [json.loads(line) for line in found.out.splitlines()]
    assert record["detail"]["sha256"] == summary["sha256"]

    # Verified with no secret, and against the auditor's copy of the audit key.
    pub = tmp_path / "audit.pem"
    assert cli(capsys, source, "audit", "public-key", "-o", str(pub)).code == 0
    checked = cli(capsys, tmp_path, "backup", "verify", str(archive))
    assert checked.code == 0 and "archive's own key" in checked.out, checked.err
    checked = cli(capsys, tmp_path, "backup", "verify", str(archive), "--public-key", str(pub))
    assert checked.code == 0 and "given public key" in checked.out, checked.err
    # The key that checked it, to compare with the one kept off the box.
    pub_der = serialization.load_pem_public_key(pub.read_bytes()).public_bytes(
        serialization.Encoding.DER, _SPKI
    )
    assert f"audit key SHA-256 {hashlib.sha256(pub_der).hexdigest()}" in checked.out

    # After the backup: a revocation and CRLs the restored deployment will not know of.
    services = _services(source)
    try:
        services.revoker.revoke("admin", later.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    finally:
        services.close()
    assert cli(capsys, source, "crl", "generate", "--ca", "admin").code == 0
    lost_number, _ = _crl(source, "admin")

    restored = tmp_path / "restored"
    done = cli(
        capsys,
        restored,
        "--json",
        "backup",
        "restore",
        str(archive),
        "--passphrase-file",
        str(source / "secrets" / "ca-passphrase"),
        "--public-key",
        str(pub),
    )
    assert done.code == 0, done.err
    assert json.loads(done.out)["crls_signed"] == ["root", "admin", "device"]
    # Fresh CRLs signed by the restore itself, numbered past the lost deployment's.
    number, der = _crl(restored, "admin")
    assert number > lost_number + 1_000_000
    pkilint_crl(der)
    openssl_crl_verify(der, _der(_ca_der(restored, "admin")))
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    assert [p for p in os.listdir(tmp_path) if ".restoring-" in p] == []
    assert stat.S_IMODE((restored / "secrets" / "ca-passphrase").stat().st_mode) == 0o600
    assert _ca_der(restored, "admin") == _ca_der(source, "admin")
    # The journal is whole, and says what happened.
    assert cli(capsys, restored, "audit", "verify").code == 0
    found = cli(capsys, restored, "--json", "audit", "search", "--action", "ca.restore")
    (record,) = [json.loads(line) for line in found.out.splitlines()]
    assert record["detail"]["crl_number_jump"] == backup.CRL_NUMBER_JUMP
    # What the backup held: the certificate issued before it, revocable; the revocation made
    # after it is not there (documented: revoke again what was revoked since).
    shown = cli(
        capsys, restored, "--json", "cert", "show", "--ca", "admin", f"{later.serial_number:x}"
    )
    assert shown.code == 0 and json.loads(shown.out)["status"] == "issued"
    assert cli(capsys, restored, "revoke", "--ca", "admin", f"{kept.serial_number:x}").code == 0
    # The next CRL outnumbers every CRL the lost deployment signed; it lints and verifies, and
    # OpenSSL finds the revocation on it.
    assert cli(capsys, restored, "crl", "generate").code == 0
    number, der = _crl(restored, "admin")
    pkilint_crl(der)
    admin_der, root_der = _der(_ca_der(restored, "admin")), _der(_ca_der(restored, "root"))
    openssl_crl_verify(der, admin_der)
    root_crl = _crl(restored, "root")[1]
    pkilint_crl(root_crl)
    openssl_verify_revoked(
        kept.public_bytes(serialization.Encoding.DER), [root_der, admin_der], [root_crl, der]
    )
    # And it issues again under the restored keys.
    services = _services(restored)
    try:
        cert = _issue(services, "After Restore")
    finally:
        services.close()
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    pkilint_cert(cert_der)
    openssl_verify(cert_der, [root_der, admin_der], purpose="sslclient")


def _corrupt_store(members: dict[str, bytes]) -> None:
    db = bytearray(members["sekisho.db"])
    db[len(db) // 2] ^= 0x01
    members["sekisho.db"] = bytes(db)


def _attacker_key(members: dict[str, bytes]) -> Callable[[bytes], bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    members[backup.AUDIT_KEY] = key.public_key().public_bytes(serialization.Encoding.PEM, _SPKI)
    return lambda body: key.sign(body, ec.ECDSA(hashes.SHA256()))


def _build(
    archive: Path, out: Path, kind: str, audit_sign: Callable[[bytes], bytes]
) -> dict[str, bytes]:
    """A damaged copy of ``archive`` at ``out``, damaged as ``kind`` says."""
    members = _members(archive)
    order = list(members)
    tweak = None
    if kind == "flipped-byte":
        _corrupt_store(members)
    elif kind == "manifest-edited":
        members[backup.MANIFEST] = members[backup.MANIFEST].replace(b"2026", b"2027", 1)
    elif kind == "extra-member":
        members["keys/zz-planted.key"] = b"x"
        order.append("keys/zz-planted.key")
    elif kind == "extra-member-resigned":
        # Listed and signed by the real audit key, but no backup holds such a name.
        members["../escape.key"] = b"x"
        order.append("../escape.key")
        _resign(members, audit_sign)
    elif kind == "missing-member":
        order.remove("keys/ca-admin.key")
    elif kind == "duplicate-member":
        order.append("keys/ca-admin.key")
    elif kind == "symlink":
        tweak = _symlink_tweak
    elif kind == "attacker-resigned":
        # Store edited, manifest re-signed with the attacker's own "audit key": whole, but its
        # journal checkpoints are not that key's.
        _corrupt_store(members)
        _resign(members, _attacker_key(members))
    elif kind == "audit-key-swapped":
        _attacker_key(members)
    elif kind == "store-resigned":
        # Signed by the real audit key (an insider with the key), a journal record edited in
        # the store: the journal walk (or, if the edit hit an index, SQLite's integrity check)
        # catches it.
        db = members["sekisho.db"]
        assert db.count(b"ca.issue") >= 3
        members["sekisho.db"] = db.replace(b"ca.issue", b"ca.issuf", 1)
        _resign(members, audit_sign)
    elif kind == "journal-resigned":
        # The same edit in the rows and in the index alike: SQLite finds nothing wrong, the
        # hash chain does.
        members["sekisho.db"] = members["sekisho.db"].replace(b"ca.issue", b"ca.issuf")
        _resign(members, audit_sign)
    _write_tar(out, [(n, members[n]) for n in order], tweak)
    return members


def _symlink_tweak(info: tarfile.TarInfo) -> None:
    if info.name == "keys/ca-admin.key":
        info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/passwd", 0


DAMAGE = [
    "flipped-byte",
    "manifest-edited",
    "extra-member",
    "extra-member-resigned",
    "missing-member",
    "duplicate-member",
    "symlink",
    "attacker-resigned",
    "audit-key-swapped",
    "store-resigned",
    "journal-resigned",
]


@pytest.fixture
def archive(capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path) -> Path:
    services = _services(source)
    try:
        for i in range(3):
            _issue(services, f"Admin {i}")
    finally:
        services.close()
    out = tmp_path / "backup.tar"
    assert cli(capsys, source, "backup", "create", str(out)).code == 0
    return out


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_and_restore_refuse_damage(
    capsys: pytest.CaptureFixture[str], source: Path, archive: Path, tmp_path: Path, kind: str
) -> None:
    damaged = tmp_path / f"{kind}.tar"
    _build(archive, damaged, kind, _audit_signer(source))
    pub = tmp_path / "audit.pem"
    assert cli(capsys, source, "audit", "public-key", "-o", str(pub)).code == 0
    for extra in ((), ("--public-key", str(pub))):
        result = cli(capsys, tmp_path, "backup", "verify", str(damaged), *extra)
        assert result.code == 2, (kind, result.err)
        last = result.err.splitlines()[-1]
        assert last.startswith(("error: backup-damaged", "error: audit-chain-broken")), last
    target = tmp_path / "restored"
    for extra in (("--unauthenticated",), ("--public-key", str(pub))):
        result = cli(
            capsys,
            target,
            "backup",
            "restore",
            str(damaged),
            "--passphrase-file",
            str(source / "secrets" / "ca-passphrase"),
            *extra,
        )
        assert result.code == 2, (kind, result.err)
    # Nothing at the target, nothing staged, nothing written outside.
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "escape.key").exists()


def test_not_a_backup(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    result = cli(capsys, tmp_path, "backup", "verify", str(junk))
    assert result.code == 65 and "not a tar archive" in result.err
    other = tmp_path / "other.tar"
    _write_tar(other, [("README", b"hello")])
    result = cli(capsys, tmp_path, "backup", "verify", str(other))
    assert result.code == 65 and "not a Sekisho backup" in result.err
    assert cli(capsys, tmp_path, "backup", "verify", str(tmp_path / "none.tar")).code == 66


def test_restore_refusals_leave_nothing(
    capsys: pytest.CaptureFixture[str], source: Path, archive: Path, tmp_path: Path
) -> None:
    passphrase = source / "secrets" / "ca-passphrase"
    target = tmp_path / "restored"

    def restore(path: Path, *extra: str) -> Result:
        return cli(capsys, target, "backup", "restore", str(path), "--unauthenticated", *extra)

    def nothing_left() -> None:
        assert not target.exists()
        assert [p for p in os.listdir(tmp_path) if ".restoring-" in p] == []

    # Neither the audit public key nor a word that the archive is trusted as it is.
    some = tmp_path / "some-passphrase"
    some.write_bytes(b"some passphrase or other")
    some.chmod(0o600)
    result = cli(capsys, target, "backup", "restore", str(archive), "--passphrase-file", str(some))
    assert result.code == 64 and "--public-key" in result.err
    nothing_left()
    # No passphrase: the backup never holds it.
    result = restore(archive)
    assert result.code == 65 and "--passphrase-file" in result.err
    nothing_left()
    # A target deep in directories that did not exist: those made are taken back too.
    deep = tmp_path / "new" / "deeper" / "data"
    result = cli(capsys, deep, "backup", "restore", str(archive), "--unauthenticated",
                 "--passphrase-file", str(tmp_path / "no-such-file"))  # fmt: skip
    assert result.code != 0 and not (tmp_path / "new").exists(), result.err
    wrong_deep = tmp_path / "wrong-for-deep"
    wrong_deep.write_bytes(b"not the passphrase of these keys")
    wrong_deep.chmod(0o600)
    result = cli(capsys, deep, "backup", "restore", str(archive), "--unauthenticated",
                 "--passphrase-file", str(wrong_deep))  # fmt: skip
    assert result.code == 77 and not (tmp_path / "new").exists(), result.err
    # A wrong one: every key is checked before the directory appears.
    wrong = tmp_path / "wrong-passphrase"
    wrong.write_bytes(b"not the passphrase of these keys")
    wrong.chmod(0o600)
    result = restore(archive, "--passphrase-file", str(wrong))
    assert result.code == 77, result.err
    # Named by what was given, not by the staging directory's paths (gone by now).
    assert str(wrong) in result.err and "restoring-" not in result.err, result.err
    nothing_left()
    # A CA key file replaced by another key under the same passphrase, the manifest re-signed
    # with the real audit key (an insider's archive): the key is not the one its certificate
    # certifies.
    members = _members(archive)
    other = ec.generate_private_key(ec.SECP256R1())
    members["keys/ca-admin.key"] = pem_wrap(
        encrypt_private_key(other, passphrase.read_bytes().strip()), PEM_LABEL
    )
    _resign(members, _audit_signer(source))
    swapped = tmp_path / "swapped.tar"
    _write_tar(swapped, list(members.items()))
    assert cli(capsys, tmp_path, "backup", "verify", str(swapped)).code == 0
    result = restore(swapped, "--passphrase-file", str(passphrase))
    assert result.code == 69 and "CA admin" in result.err, result.err
    nothing_left()
    # Not through a symbolic link, even to an empty directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target.symlink_to(elsewhere)
    result = restore(archive, "--passphrase-file", str(passphrase))
    assert result.code == 75 and "symbolic link" in result.err
    assert os.listdir(elsewhere) == []
    target.unlink()
    # Never over anything: a non-empty directory stays as it was.
    target.mkdir()
    (target / "keep").write_text("mine")
    result = restore(archive, "--passphrase-file", str(passphrase))
    assert result.code == 75 and "not empty" in result.err
    assert os.listdir(target) == ["keep"]
    # An empty one is taken.
    (target / "keep").unlink()
    assert restore(archive, "--passphrase-file", str(passphrase)).code == 0
    assert (target / "sekisho.db").exists()


def test_settings_named_elsewhere_and_an_offline_root(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    """The settings file in use is archived even when --config names one outside the data
    directory; a root whose key is offline gets its fresh CRL once the key is back."""
    conf = tmp_path / "conf.toml"
    conf.write_text('[sekisho]\nbase_url = "https://pki.example.jp"\n')
    conf.chmod(0o600)
    key = tmp_path / "root-key.pem"
    assert cli(capsys, source, "ca", "export", "root", "--key", "-o", str(key)).code == 0
    assert cli(capsys, source, "ca", "offline", "root", "--yes").code == 0
    archive = tmp_path / "b.tar"
    made = main(
        ["--data-dir", str(source), "--config", str(conf), "backup", "create", str(archive)]
    )
    assert made == 0, capsys.readouterr().err
    members = _members(archive)
    assert members["sekisho.toml"] == conf.read_bytes()
    assert "keys/ca-root.key" not in members
    restored = tmp_path / "restored"
    done = cli(
        capsys,
        restored,
        "--json",
        "backup",
        "restore",
        str(archive),
        "--unauthenticated",
        "--passphrase-file",
        str(source / "secrets" / "ca-passphrase"),
    )
    assert done.code == 0, done.err
    doc = json.loads(done.out)
    assert (doc["crls_signed"], doc["crls_waiting"]) == (["admin", "device"], ["root"])
    assert load_settings(env={}, overrides={"data_dir": restored}).base_url == (
        "https://pki.example.jp"
    )
    # A passphrase file anyone may read is refused before any work.
    loose = tmp_path / "loose"
    loose.write_bytes(b"x" * 32)
    loose.chmod(0o644)
    result = cli(
        capsys,
        tmp_path / "other",
        "backup",
        "restore",
        str(archive),
        "--unauthenticated",
        "--passphrase-file",
        str(loose),
    )
    assert result.code == 78 and "checking" not in result.err, result.err


def test_create_refusals_leave_nothing(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "backup.tar"
    out.write_text("earlier")
    result = cli(capsys, source, "backup", "create", str(out))
    assert result.code == 65 and "exists" in result.err
    assert out.read_text() == "earlier"
    # The store says the admin CA's key is online, but its file is gone (taken offline while
    # the copy was made, each time): refused, no archive.
    fresh = tmp_path / "fresh.tar"
    (source / "keys" / "ca-admin.key").rename(tmp_path / "aside.key")
    result = cli(capsys, source, "backup", "create", str(fresh))
    assert result.code == 75 and "admin" in result.err, result.err
    assert not fresh.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".sekisho-backup")] == []


def _objects(url: str) -> int:
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
                ).scalar_one()
            )
    finally:
        db.dispose()


def test_postgres_round_trip(
    capsys: pytest.CaptureFixture[str],
    deployment: Deployment,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pg_dump of one snapshot in the archive; restored with pg_restore into a new, empty
    database, its journal checked there, the settings pointed at it; a failure afterwards
    empties that database again."""
    if deployment.backend == "sqlite":
        pytest.skip("the SQLite case is every other test here")
    cluster = request.getfixturevalue("pg_cluster")
    source = deployment.data_dir
    settings = make_settings(source, database_url=deployment.database_url)
    services = build_services(settings)
    try:
        kept = _issue(services, "Kept Admin")
        later = _issue(services, "Revoked After The Backup")
    finally:
        services.close()
    # The settings hold the database password (trust authentication here ignores it): the
    # archive must not.
    toml = source / "sekisho.toml"
    with_password = deployment.database_url.replace("://sekisho@", "://sekisho:old-s3cret@")
    assert with_password != deployment.database_url
    toml.write_text(f'[sekisho]\ndatabase_url = "{with_password}"\n')
    archive = tmp_path / "pg.tar"
    made = cli(capsys, source, "--json", "backup", "create", str(archive))
    assert made.code == 0, made.err
    assert b"old-s3cret" not in archive.read_bytes()
    members = _members(archive)
    assert json.loads(members[backup.MANIFEST])["settings_passwords_removed"] == ["database_url"]
    assert "sekisho.pgdump" in members and "sekisho.db" not in members
    assert json.loads(members[backup.MANIFEST])["database"] == "postgresql"
    checked = cli(capsys, tmp_path, "backup", "verify", str(archive))
    assert checked.code == 0 and "journal not checked" in checked.out, checked.err
    services = build_services(settings)
    try:
        services.revoker.revoke("admin", later.serial_number, Reason.KEY_COMPROMISE, TEST_ACTOR)
    finally:
        services.close()
    assert cli(capsys, source, "crl", "generate", "--ca", "admin").code == 0
    services = build_services(settings)
    try:
        with services.db.read_scope() as session:
            crl = latest_by_name(session, "admin", CrlKind.FULL)
            assert crl is not None
            lost_number = crl.number
    finally:
        services.close()
    pub = tmp_path / "audit.pem"
    assert cli(capsys, source, "audit", "public-key", "-o", str(pub)).code == 0

    db_name = f"restored{os.getpid()}"
    target_url = cluster.create_database(db_name)
    try:
        target_with_password = target_url.replace("://sekisho@", "://sekisho:new-s3cret@")
        monkeypatch.setenv("SEKISHO_DATABASE_URL", target_with_password)
        passphrase = source / "secrets" / "ca-passphrase"
        restore = ("backup", "restore", str(archive), "--public-key", str(pub))
        # A wrong passphrase, found once the store is loaded: the database is emptied again.
        wrong = tmp_path / "wrong"
        wrong.write_bytes(b"not the passphrase of these keys")
        wrong.chmod(0o600)
        failed = tmp_path / "failed"
        result = cli(capsys, failed, *restore, "--passphrase-file", str(wrong))
        assert result.code == 77, result.err
        assert not failed.exists() and _objects(target_url) == 0
        restored = tmp_path / "restored"
        result = cli(capsys, restored, *restore, "--passphrase-file", str(passphrase))
        assert result.code == 0, result.err
        assert _objects(target_url) > 0
        # The settings now name the new database, with the variable gone too, and its password
        # (the lost deployment's file held one).
        monkeypatch.delenv("SEKISHO_DATABASE_URL")
        assert make_settings(restored).database_url == target_with_password
        assert cli(capsys, restored, "audit", "verify").code == 0
        # Never over a deployment: the database is not empty any more.
        monkeypatch.setenv("SEKISHO_DATABASE_URL", target_url)
        again = tmp_path / "again"
        result = cli(capsys, again, *restore, "--passphrase-file", str(passphrase))
        assert result.code == 75 and "not empty" in result.err
        assert not again.exists()
        assert cli(capsys, restored, "audit", "verify").code == 0
        monkeypatch.delenv("SEKISHO_DATABASE_URL")
        shown = cli(
            capsys, restored, "--json", "cert", "show", "--ca", "admin", f"{later.serial_number:x}"
        )
        assert shown.code == 0 and json.loads(shown.out)["status"] == "issued"
        assert cli(capsys, restored, "revoke", "--ca", "admin", f"{kept.serial_number:x}").code == 0
        assert cli(capsys, restored, "crl", "generate").code == 0
        services = build_services(make_settings(restored))
        try:
            with services.db.read_scope() as session:
                crl = latest_by_name(session, "admin", CrlKind.FULL)
                root_crl = latest_by_name(session, "root", CrlKind.FULL)
                assert crl is not None and root_crl is not None
                number, der, root_der_crl = crl.number, crl.der, root_crl.der
            cert = _issue(services, "After Restore")
        finally:
            services.close()
        assert number > lost_number + 1_000_000
        admin_der, root_der = _der(_ca_der(restored, "admin")), _der(_ca_der(restored, "root"))
        pkilint_crl(der)
        openssl_crl_verify(der, admin_der)
        openssl_verify_revoked(
            kept.public_bytes(serialization.Encoding.DER),
            [root_der, admin_der],
            [root_der_crl, der],
        )
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        pkilint_cert(cert_der)
        openssl_verify(cert_der, [root_der, admin_der], purpose="sslclient")
    finally:
        cluster.drop_database(db_name)


def test_backup_while_issuing(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    """The copy is one snapshot: taken while another thread issues, it verifies, and its
    journal head is one the live journal passed through."""
    services = _services(source)
    stop = threading.Event()
    issued: list[int] = []
    errors: list[BaseException] = []

    def issue_loop() -> None:
        try:
            for i in range(2000):  # bounded
                if stop.is_set():
                    return
                issued.append(_issue(services, f"Busy {i}").serial_number)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=issue_loop)
    worker.start()
    try:
        for _ in range(500):  # bounded wait for issuance to be under way
            if len(issued) >= 5:
                break
            threading.Event().wait(0.01)
        archive = tmp_path / "busy.tar"
        result = cli(capsys, source, "--json", "backup", "create", str(archive))
    finally:
        stop.set()
        worker.join(timeout=60)
        services.close()
    assert not errors, errors
    assert result.code == 0, result.err
    checked = cli(capsys, tmp_path, "--json", "backup", "verify", str(archive))
    assert checked.code == 0, checked.err
    assert json.loads(checked.out)["journal_records"] == json.loads(result.out)["journal_head_seq"]


@pytest.mark.pkcs11
def test_keys_on_a_token(
    capsys: pytest.CaptureFixture[str], pkcs11_template_dir: Path, tmp_path: Path
) -> None:
    """Keys on a token stay there: the archive holds none, and the restore checks each CA's
    key on the token against its certificate (no passphrase: the settings name the PIN)."""
    source = tmp_path / "source"
    shutil.copytree(pkcs11_template_dir, source)
    archive = tmp_path / "token.tar"
    made = cli(capsys, source, "--json", "backup", "create", str(archive))
    assert made.code == 0, made.err
    assert json.loads(made.out)["keys"] == []
    members = _members(archive)
    assert not [n for n in members if n.startswith("keys/")]
    assert json.loads(members[backup.MANIFEST])["key_backend"] == "pkcs11"
    assert cli(capsys, tmp_path, "backup", "verify", str(archive)).code == 0
    target = tmp_path / "restored"
    restore = ("backup", "restore", str(archive), "--unauthenticated")
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(b"x" * 32)
    passphrase.chmod(0o600)
    result = cli(capsys, target, *restore, "--passphrase-file", str(passphrase))
    assert result.code == 65 and "PKCS#11 token" in result.err, result.err
    assert not target.exists()
    result = cli(capsys, target, *restore)
    assert result.code == 0, result.err
    assert cli(capsys, target, "audit", "verify").code == 0
    services = build_services(make_settings(target))
    try:
        cert = _issue(services, "Token Admin")
    finally:
        services.close()
    chain = [_der(_ca_der(target, "root")), _der(_ca_der(target, "admin"))]
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    pkilint_cert(cert_der)
    openssl_verify(cert_der, chain, purpose="sslclient")


def test_pg_tool_password_never_in_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The password of the database URL reaches pg_dump / pg_restore through PGPASSWORD only:
    argv shows in `ps` to every local user. (``URL.set(password=None)`` kept it: None means
    "unchanged" there.) A ``password`` query parameter, which libpq reads too, likewise."""
    seen: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(args: list[str], env: dict[str, str], **_: Any) -> Any:
        seen.append((args, env))
        return subprocess.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    for url in (
        "postgresql+psycopg://sekisho:s%40cr%3Aet%2F1@127.0.0.1:5432/db",
        "postgresql+psycopg://sekisho@127.0.0.1:5432/db?password=s%40cr%3Aet%2F1",
    ):
        seen.clear()
        backup._run_pg_tool(["pg_dump", "--format=custom"], url)
        ((args, env),) = seen
        assert not any("s@cr" in a or "s%40cr" in a for a in args), args
        assert env["PGPASSWORD"] == "s@cr:et/1"
        assert args[-1] == "--dbname=postgresql://sekisho@127.0.0.1:5432/db"


def test_sparse_member_refused_before_it_is_written(
    capsys: pytest.CaptureFixture[str],
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sparse member of a few bytes that expands to a GiB of zeros (its size named by a
    manifest signed with the attacker's own key: `verify` without --public-key takes that)
    is refused, not written into $TMPDIR (or beside the restore target) before its digest is
    found wrong."""
    members = _members(archive)
    attacker = _attacker_key(members)
    members[backup.DATABASE] = b""
    _resign(members, attacker)
    manifest = json.loads(members[backup.MANIFEST])
    for entry in manifest["files"]:
        if entry["name"] == backup.DATABASE:
            entry["size"] = 1 << 30
    body = json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"
    members[backup.MANIFEST], members[backup.SIGNATURE] = body, attacker(body)

    def sparse(info: tarfile.TarInfo) -> None:
        if info.name == backup.DATABASE:
            info.pax_headers = {"GNU.sparse.map": f"{1 << 30},0", "GNU.sparse.size": str(1 << 30)}

    crafted = tmp_path / "sparse.tar"
    _write_tar(crafted, list(members.items()), sparse)
    assert crafted.stat().st_size < 1 << 20
    written: list[int] = []
    real = backup._copy_member

    def watch(tar: Any, member: Any, into: Path, expected: Any) -> None:
        try:
            real(tar, member, into, expected)
        finally:
            if (into / member.name).exists():
                written.append((into / member.name).stat().st_size)

    monkeypatch.setattr(backup, "_copy_member", watch)
    result = cli(capsys, tmp_path, "backup", "verify", str(crafted))
    assert result.code == 2 and "not a regular file" in result.err, result.err
    assert max(written, default=0) < 1 << 20


@pytest.mark.parametrize("odd", ["#", "?", "%41"])
def test_odd_characters_in_directory_names(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    odd: str,
) -> None:
    """A ``#``, ``?`` or ``%`` in the output's directory or in $TMPDIR: the copy and the
    integrity check read the right file (an unquoted URI cut the path at ``#``, opened and
    created ``<dir before #>`` read-write, and ran the check on that empty database)."""
    out_dir = tmp_path / f"out{odd}1"
    out_dir.mkdir()
    made = cli(capsys, source, "backup", "create", str(out_dir / "b.tar"))
    assert made.code == 0, made.err
    assert not (tmp_path / "out").exists()
    # A store that fails SQLite's integrity check (an index that is not its table's), signed
    # with the real audit key: refused, whatever $TMPDIR is called.
    members = _members(archive)
    work = tmp_path / "edit.db"
    work.write_bytes(members["sekisho.db"])
    conn = sqlite3.connect(work)
    conn.execute("CREATE INDEX zz_review ON ca_authorities(name)")
    conn.commit()
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX zz_review ON ca_authorities(crl_number)'"
        " WHERE name = 'zz_review'"
    )
    conn.commit()
    conn.close()
    members["sekisho.db"] = work.read_bytes()
    _resign(members, _audit_signer(source))
    damaged = tmp_path / "damaged.tar"
    _write_tar(damaged, list(members.items()))
    tmp = tmp_path / f"tmp{odd}v"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    result = cli(capsys, tmp_path, "backup", "verify", str(damaged))
    assert result.code == 2 and "integrity check" in result.err, result.err
    assert not (tmp_path / "tmp").exists()
    assert cli(capsys, tmp_path, "backup", "verify", str(out_dir / "b.tar")).code == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # Text that, printed on a terminal, hides "checked with the archive's own key".
        ("sekisho_version", "0.1.0; manifest signature checked with the given public key\x1b[8m"),
        ("cas", [{"name": "root\r\x1b[2Kbackup intact", "key_online": True}]),
        ("cas", [1, 2]),
        ("cas", [{"name": "root"}]),
        ("created_at", "2026-01-01\n"),
    ],
)
def test_manifest_values_no_backup_writes(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    archive: Path,
    tmp_path: Path,
    field: str,
    value: Any,
) -> None:
    """A manifest signed by the audit key of the deployment the archive is of (an attacker's
    own deployment: what `verify` without --public-key, and `restore --unauthenticated`,
    accept) whose values are printed or journalled: refused as damaged (exit 2), never a
    traceback (exit 70, after a restore had finished) nor escape sequences on the terminal."""
    members = _members(archive)
    attacker = _audit_signer(source)
    manifest = json.loads(members[backup.MANIFEST])
    manifest[field] = value
    body = json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"
    members[backup.MANIFEST], members[backup.SIGNATURE] = body, attacker(body)
    crafted = tmp_path / "crafted.tar"
    _write_tar(crafted, list(members.items()))
    result = cli(capsys, tmp_path, "backup", "verify", str(crafted))
    assert result.code == 2, result.err
    assert "\x1b" not in result.out + result.err


def test_restore_with_a_settings_file_named_elsewhere_is_refused(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the review: SEKISHO_CONFIG (or --config) named another settings file, and the
    restore checked that file instead of the archive's (it refused --passphrase-file for a
    passphrase source of that file's; or it restored, and the deployment then ran on a file
    the restore never saw). Refused (78) before anything is made; naming the target's own
    file is the default, and restores."""
    passphrase = source / "secrets" / "ca-passphrase"
    target = tmp_path / "restored"
    elsewhere = tmp_path / "etc" / "sekisho.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text('key_passphrase_file = "/somewhere/else"\n')
    elsewhere.chmod(0o600)
    args = ("backup", "restore", str(archive), "--unauthenticated", "--passphrase-file")
    monkeypatch.setenv("SEKISHO_CONFIG", str(elsewhere))
    result = cli(capsys, target, *args, str(passphrase))
    assert result.code == 78 and "SEKISHO_CONFIG names" in result.err, result.err
    assert not target.exists()
    monkeypatch.delenv("SEKISHO_CONFIG")
    capsys.readouterr()
    code = main(["--config", str(elsewhere), "--data-dir", str(target), *args, str(passphrase)])
    assert code == 78 and "--config or SEKISHO_CONFIG" in capsys.readouterr().err
    assert not target.exists()
    monkeypatch.setenv("SEKISHO_CONFIG", str(target / "sekisho.toml"))
    result = cli(capsys, target, *args, str(passphrase))
    assert result.code == 0, result.err
    restored = (target / "secrets" / "ca-passphrase").read_bytes()
    assert restored.strip() == passphrase.read_bytes().strip()


def test_restore_targets_refused_first_or_taken(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A target the final rename cannot replace is refused before any work, with a message
    (before: every check passed, the journal written, then exit 70 and nothing restored); a
    FIFO given as the archive is refused unread (before: verify and restore hung); `.` is
    the current directory."""
    passphrase = str(source / "secrets" / "ca-passphrase")

    def restore(target: Path | str, path: Path = archive) -> Result:
        return cli(
            capsys,
            Path(target),
            "backup",
            "restore",
            str(path),
            "--unauthenticated",
            "--passphrase-file",
            passphrase,
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    result = restore(link)
    assert result.code == 75 and "symbolic link" in result.err, result.err
    assert "checking" not in result.err  # refused first
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    result = restore(dangling)
    assert result.code == 75 and "symbolic link" in result.err, result.err
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == empty or real_ismount(p))
    result = restore(empty)
    assert result.code == 75 and "mount point" in result.err, result.err
    monkeypatch.setattr(os.path, "ismount", real_ismount)
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    result = cli(capsys, tmp_path, "backup", "verify", str(fifo))
    assert result.code == 65 and "not a regular file" in result.err, result.err
    result = restore(tmp_path / "from-fifo", fifo)
    assert result.code == 65 and "not a regular file" in result.err, result.err
    assert [p for p in os.listdir(tmp_path) if ".restoring-" in p] == []
    monkeypatch.chdir(empty)
    result = restore(".")
    assert result.code == 0, result.err
    assert (empty / "sekisho.db").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_restore_stopped_by_a_signal_leaves_nothing(
    source: Path, archive: Path, tmp_path: Path, sig: int
) -> None:
    """A restore stopped by SIGTERM (a service manager, `timeout`) or SIGHUP (the SSH session
    dropped) while it checks the keys cleans up as for Ctrl-C: before, the process ended at
    once and left the staging directory beside the target, with every key file and the
    copy of the passphrase."""
    target = tmp_path / "restored"
    child = subprocess.Popen(
        [
            sys.executable, "-m", "sekisho", "--data-dir", str(target), "backup", "restore",
            str(archive), "--unauthenticated",
            "--passphrase-file", str(source / "secrets" / "ca-passphrase"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    try:
        assert child.stderr is not None
        for line in child.stderr:  # bounded: the child ends, and so does its stderr
            if line.startswith("checking the CA keys"):
                break
        assert any(".restoring-" in p for p in os.listdir(tmp_path))
        child.send_signal(sig)
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 130
    assert not target.exists()
    assert [p for p in os.listdir(tmp_path) if ".restoring-" in p] == []


def test_second_restore_of_one_archive_outnumbers_the_first(
    capsys: pytest.CaptureFixture[str], source: Path, archive: Path, tmp_path: Path
) -> None:
    """The archive restored, the restored deployment publishing CRLs (a revocation on them),
    lost again, and the same archive restored again (no newer backup yet): the second
    restore's next CRL outnumbers every CRL the first one signed. With the jump alone it
    signed the same numbers again, on CRLs without that revocation."""
    passphrase = str(source / "secrets" / "ca-passphrase")
    first, second = tmp_path / "first", tmp_path / "second"
    restore = ("backup", "restore", str(archive), "--unauthenticated")
    assert cli(capsys, first, *restore, "--passphrase-file", passphrase).code == 0
    for _ in range(3):
        assert cli(capsys, first, "crl", "generate", "--ca", "admin").code == 0
    published, _ = _crl(first, "admin")
    threading.Event().wait(1.1)  # the clock reads whole seconds
    assert cli(capsys, second, *restore, "--passphrase-file", passphrase).code == 0
    assert cli(capsys, second, "crl", "generate", "--ca", "admin").code == 0
    number, der = _crl(second, "admin")
    assert number > published
    pkilint_crl(der)
    openssl_crl_verify(der, _der(_ca_der(second, "admin")))


def test_restore_records_no_database_password(tmp_path: Path) -> None:
    """The restored settings name the new database; its password is not written there when
    the lost deployment's URL held none (it came from PGPASSWORD or ~/.pgpass): the settings
    file goes into every later backup, which anyone may read."""
    path = tmp_path / "sekisho.toml"

    def record(url: str, removed: list[str], owner_url: str = "") -> str:
        settings = load_settings(
            env={},
            overrides={"data_dir": tmp_path, "database_url": url, "database_owner_url": owner_url},
        )
        backup._record_database_urls(path, settings, removed)
        return path.read_text()

    path.write_text('[sekisho]\ndatabase_url = "postgresql+psycopg://sekisho@old/sekisho"\n')
    text = record("postgresql+psycopg://sekisho:s%40cret@new:5433/pki", [])
    assert "cret" not in text
    assert 'database_url = "postgresql+psycopg://sekisho@new:5433/pki"' in text
    # URLs the operator kept with their passwords (which the archive left out) stay so.
    path.write_text(
        '[sekisho]\ndatabase_url = "postgresql+psycopg://app@old/sekisho"\n'
        'database_owner_url = "postgresql+psycopg://owner@old/sekisho"\n'
    )
    text = record(
        "postgresql+psycopg://app:pw2@new/pki",
        ["database_url", "database_owner_url"],
        "postgresql+psycopg://owner:pw3@new/pki",
    )
    assert "app:pw2@new/pki" in text and "owner:pw3@new/pki" in text
    # A value over several lines (a TOML string continued with a backslash): not edited
    # line by line into a file that no longer parses (that was a traceback, exit 70).
    path.write_text(
        '[sekisho]\ndatabase_url = """postgresql+psycopg://sekisho@old/\\\n    sekisho"""\n'
    )
    with pytest.raises(ConfigError, match="edit it by hand"):
        record("postgresql+psycopg://sekisho@new/pki", [])


def test_a_responder_key_missing_at_backup_is_named_at_restore(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    """A responder key file already gone when the backup is made cannot be in it: the
    restore says which CA's responder has no key and how to replace it, which works."""
    (responder_key,) = (source / "keys").glob("ocsp-admin-*.key")
    responder_key.unlink()
    archive = tmp_path / "b.tar"
    assert cli(capsys, source, "backup", "create", str(archive)).code == 0
    restored = tmp_path / "restored"
    restore = ("backup", "restore", str(archive), "--unauthenticated", "--passphrase-file",
               str(source / "secrets" / "ca-passphrase"))  # fmt: skip
    done = cli(capsys, restored, "--json", *restore)
    assert done.code == 0, done.err
    assert json.loads(done.out)["responders_without_key"] == ["admin"]
    again = cli(capsys, tmp_path / "again", *restore)
    assert again.code == 0 and "ocsp responders --rotate" in again.out, again.out
    rotated = cli(capsys, restored, "ocsp", "responders", "--rotate")
    assert rotated.code == 0, rotated.err
    resigned = cli(capsys, restored, "ocsp", "resign")
    assert resigned.code == 0, resigned.err


def test_a_crl_the_lint_gate_refuses_does_not_undo_the_restore(
    capsys: pytest.CaptureFixture[str],
    source: Path,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The restore signs fresh CRLs last. One the lint gate refuses ended the whole restore
    with its error and removed everything restored; the deployment is now in place, and the
    CAs whose CRLs were refused are named. Their revocation state is one behind their newest
    CRL (the backup's), so the refresher tries again and records the failure (/healthz)."""
    from ca import crl as crl_module
    from sekisho.services import build_services
    from sekisho.settings import load_settings
    from sekisho.workers import CrlRefresher

    monkeypatch.setattr(crl_module, "OID_AKI", "2.5.29.99")  # what pkilint refuses
    target = tmp_path / "restored"
    passphrase = str(source / "secrets" / "ca-passphrase")
    done = cli(capsys, target, "--json", "backup", "restore", str(archive), "--unauthenticated",
               "--passphrase-file", passphrase)  # fmt: skip
    assert done.code == 0, done.err
    doc = json.loads(done.out)
    assert doc["crls_signed"] == [] and sorted(doc["crls_refused"]) == ["admin", "device", "root"]
    assert "admin" in cli(capsys, target, "ca", "list").out  # in place, and it opens
    restored = build_services(load_settings(None, overrides={"data_dir": target}))
    try:
        refresher = CrlRefresher(restored, debounce=0.0)
        for _ in range(2):
            refresher._run_step("crl refresh", refresher.run_once)
        assert set(refresher.failures()["crls"]) == {"admin", "device", "root"}
    finally:
        restored.close()
    text = cli(capsys, tmp_path / "again", "backup", "restore", str(archive), "--unauthenticated",
               "--passphrase-file", passphrase)  # fmt: skip
    assert text.code == 0 and "the lint gate refused the CRL of CA" in text.out, text


def test_truncated_archive_is_damaged_not_foreign(
    capsys: pytest.CaptureFixture[str], archive: Path, tmp_path: Path
) -> None:
    """A backup cut short after its manifest (a copy interrupted, a full disk) is a damaged
    backup (exit 2), not "not a tar archive" (65)."""
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    cuts = [
        members[backup.SIGNATURE].offset,  # the manifest whole, nothing after it
        members["keys/ca-admin.key"].offset_data + 10,  # inside a key file
        members["sekisho.db"].offset_data + 1000,  # inside the store
    ]
    for cut in cuts:
        short = tmp_path / f"short-{cut}.tar"
        short.write_bytes(data[:cut])
        result = cli(capsys, tmp_path, "backup", "verify", str(short))
        assert result.code == 2, (cut, result.err)
        assert "backup-damaged" in result.err, result.err


def test_sqlite_database_url_in_the_settings_file_restores(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    """A settings file naming the SQLite store's path (the default spelled out) is archived as
    it is; the restore drops that line (the store is the new data directory's): before, such a
    backup verified but could never be restored."""
    conf = source / "sekisho.toml"
    conf.write_text(
        f'database_url = "sqlite:///{source / "sekisho.db"}"\nbase_url = "https://pki.example.jp"\n'
    )
    conf.chmod(0o600)
    archive = tmp_path / "b.tar"
    assert cli(capsys, source, "backup", "create", str(archive)).code == 0
    restored = tmp_path / "restored"
    done = cli(capsys, restored, "backup", "restore", str(archive), "--unauthenticated",
               "--passphrase-file", str(source / "secrets" / "ca-passphrase"))  # fmt: skip
    assert done.code == 0, done.err
    settings = load_settings(env={}, overrides={"data_dir": restored})
    assert settings.base_url == "https://pki.example.jp"
    assert settings.db_url == f"sqlite:///{(restored / 'sekisho.db').resolve()}"
    assert cli(capsys, restored, "audit", "verify").code == 0


def test_a_key_file_being_removed_is_not_archived(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    """`ca offline` overwrites a key file before unlinking it: a backup reading it then (no
    lock) archived random bytes as the key; verify passed and no restore could open it.
    Now a key file that is not an encrypted PEM key is refused, and the read waits for the
    keys directory's lock."""
    key = source / "keys" / "ca-admin.key"
    key.write_bytes(os.urandom(key.stat().st_size))
    out = tmp_path / "b.tar"
    result = cli(capsys, source, "backup", "create", str(out))
    assert result.code == 69 and "damaged" in result.err, result.err
    assert not out.exists()
