"""Taking a CA key offline and bringing it back (software backend): a bring-online that fails
at the journal entry or at the commit leaves no key file behind, a key file left by one that
stopped half-way does not block the next, and damaged key files are refused by exit code."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from ca.hierarchy import bring_online, create_issuing, export_key, take_offline
from ca.models import CertificateAuthority
from hsm.base import KeyType
from hsm.software import PEM_LABEL, SoftwareBackend, pem_unwrap
from sekisho.cli import main
from sekisho.errors import AuditError, Conflict, KeyBackendError, StoreError
from sekisho.services import Services, build_services, open_backend
from sekisho.settings import Settings
from tests.conftest import TEST_ACTOR

# The journal refuses new entries (a fault in the statement that writes it).
SQLITE_JOURNAL_FAULT = [
    "CREATE TRIGGER fault BEFORE INSERT ON audit_records "
    "BEGIN SELECT RAISE(ABORT, 'journal full'); END"
]
PG_JOURNAL_FAULT = [
    "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'journal full'; END $$",
    "CREATE TRIGGER fault BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION fault()",
]
# Every statement succeeds, the COMMIT fails: a deferred constraint broken by the update.
SQLITE_COMMIT_FAULT = [
    "CREATE TABLE fault_parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE fault_child (parent INTEGER REFERENCES fault_parent (id) "
    "DEFERRABLE INITIALLY DEFERRED)",
    "CREATE TRIGGER fault AFTER UPDATE OF key_online ON ca_authorities "
    "BEGIN INSERT INTO fault_child VALUES (42); END",
]
PG_COMMIT_FAULT = [
    "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'commit refused'; END $$",
    "CREATE CONSTRAINT TRIGGER fault AFTER UPDATE ON ca_authorities "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fault()",
]


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    services = build_services(settings, migrate=False)
    yield services
    services.close()


def _sql(services: Services, statements: list[str]) -> None:
    with services.db.engine.begin() as conn:
        for stmt in statements:
            conn.execute(text(stmt))


def _inject(
    services: Services, fault: str, sqlite_commit: list[str], pg_commit: list[str]
) -> type[Exception]:
    """Make the journal refuse its entries (``fault`` "journal") or the commit fail (the
    given statements); the error the operation is then expected to raise."""
    sqlite = services.db.engine.dialect.name == "sqlite"
    if fault == "journal":
        _sql(services, SQLITE_JOURNAL_FAULT if sqlite else PG_JOURNAL_FAULT)
        return AuditError
    _sql(services, sqlite_commit if sqlite else pg_commit)
    return StoreError


def _heal(services: Services) -> None:
    if services.db.engine.dialect.name == "sqlite":
        _sql(services, ["DROP TRIGGER fault"])
    else:
        _sql(services, ["DROP TRIGGER IF EXISTS fault ON audit_records",
                        "DROP TRIGGER IF EXISTS fault ON ca_authorities",
                        "DROP FUNCTION fault()"])  # fmt: skip


def _key_online(services: Services, name: str) -> bool:
    with services.db.scope() as session:
        online = session.scalar(
            select(CertificateAuthority.key_online).where(CertificateAuthority.name == name)
        )
    return bool(online)


def _entries(services: Services, action: str) -> int:
    with services.db.scope() as session:
        count = session.scalar(text("SELECT count(*) FROM audit_records WHERE action = :a"),
                               {"a": action})  # fmt: skip
    return int(count or 0)


def _online_entries(services: Services) -> int:
    return _entries(services, "ca.key.online")


def _offline_root(services: Services) -> bytes:
    pem = export_key(services.ca, "root", TEST_ACTOR)
    take_offline(services.ca, "root", TEST_ACTOR)
    return pem


def _key_file(settings: Settings) -> Path:
    return settings.keys_dir / "ca-root.key"


def _leftovers(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.keys_dir.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fault", ["journal", "commit"])
def test_a_failed_bring_online_leaves_no_key_file_and_the_retry_works(
    svc: Services, settings: Settings, fault: str
) -> None:
    pem = _offline_root(svc)
    expected = _inject(svc, fault, SQLITE_COMMIT_FAULT, PG_COMMIT_FAULT)
    entries = _online_entries(svc)
    with pytest.raises(expected):
        bring_online(svc.ca, "root", pem, TEST_ACTOR)
    assert not _key_file(settings).exists()
    assert not _key_online(svc, "root") and _online_entries(svc) == entries
    assert _leftovers(settings) == []
    _heal(svc)
    bring_online(svc.ca, "root", pem, TEST_ACTOR)
    assert _key_file(settings).exists() and _key_online(svc, "root")
    assert _online_entries(svc) == entries + 1
    open_backend(settings).signing_key("file:ca-root")  # a whole key, as another process reads it


# Only the record of a new CA is refused: its certificate is issued, its row is not stored.
SQLITE_CA_CREATE_FAULT = [
    "CREATE TRIGGER fault BEFORE INSERT ON audit_records WHEN NEW.action = 'ca.create' "
    "BEGIN SELECT RAISE(ABORT, 'journal full'); END"
]
PG_CA_CREATE_FAULT = [
    "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF NEW.action = 'ca.create' THEN RAISE EXCEPTION 'journal full'; END IF; RETURN NEW; END $$",
    "CREATE TRIGGER fault BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION fault()",
]


@pytest.mark.parametrize("refused", ["issue", "ca.create"])
def test_a_new_issuing_ca_the_journal_refuses_leaves_no_key_and_the_retry_works(
    svc: Services, settings: Settings, refused: str
) -> None:
    """`ca create-issuing` while the journal cannot be written (at the certificate's
    issuance, or only at the CA's record after it): no CA, no key file left unrecorded (it
    was, and the retry then failed "key file:ca-partners already exists")."""
    sqlite = svc.db.engine.dialect.name == "sqlite"
    if refused == "issue":
        _sql(svc, SQLITE_JOURNAL_FAULT if sqlite else PG_JOURNAL_FAULT)
    else:
        _sql(svc, SQLITE_CA_CREATE_FAULT if sqlite else PG_CA_CREATE_FAULT)
    key_file = settings.keys_dir / "ca-partners.key"
    with pytest.raises(AuditError):
        create_issuing(svc.ca, "partners", "root", None, KeyType.EC_P256, TEST_ACTOR)
    assert not key_file.exists() and not _leftovers(settings)
    with svc.db.scope() as session:
        assert (
            session.scalar(
                select(CertificateAuthority.id).where(CertificateAuthority.name == "partners")
            )
            is None
        )
    _heal(svc)
    row = create_issuing(svc.ca, "partners", "root", None, KeyType.EC_P256, TEST_ACTOR)
    assert row.name == "partners" and key_file.exists()


# The statements of a rewrap succeed, its COMMIT fails (as SQLITE_COMMIT_FAULT).
SQLITE_REWRAP_COMMIT_FAULT = [
    *SQLITE_COMMIT_FAULT[:2],
    "CREATE TRIGGER fault AFTER INSERT ON audit_records WHEN NEW.action = 'ca.key.rewrap' "
    "BEGIN INSERT INTO fault_child VALUES (42); END",
]
PG_REWRAP_COMMIT_FAULT = [
    PG_COMMIT_FAULT[0],
    "CREATE CONSTRAINT TRIGGER fault AFTER INSERT ON audit_records "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fault()",
]


def _pbkdf2_device_key(settings: Settings) -> tuple[Path, bytes]:
    """The device CA's key file re-encrypted as stop 19 wrote files (PBKDF2-HMAC-SHA256,
    600,000 iterations), by OpenSSL; its path and bytes."""
    target = settings.keys_dir / "ca-device.key"
    plain = settings.data_dir / "plain.pem"
    secret = f"file:{settings.data_dir / 'secrets' / 'ca-passphrase'}"
    for args in (["-in", str(target), "-passin", secret, "-out", str(plain)],
                 ["-topk8", "-in", str(plain), "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256",
                  "-iter", "600000", "-passout", secret, "-out", str(target)]):  # fmt: skip
        subprocess.run(["openssl", "pkcs8", *args], check=True, capture_output=True, timeout=60)
    plain.unlink()
    return target, target.read_bytes()


def test_a_rewrap_whose_directory_sync_fails_puts_the_old_file_back(
    svc: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new file is renamed into place and then the directory's sync fails (EIO): the
    rewrap fails, the journal has nothing, and the PBKDF2 file is back (before, the new file
    stayed, unrecorded, for the failure came after the rename)."""
    import errno

    import sekisho.files as files_module
    from ca.hierarchy import rewrap_keys

    target, pbkdf2 = _pbkdf2_device_key(settings)
    real_sync = files_module.sync_directory
    failed: list[Path] = []

    def sync_fails_once(directory: Path) -> None:
        if not failed:
            failed.append(directory)
            raise OSError(errno.EIO, "Input/output error")
        real_sync(directory)

    monkeypatch.setattr(files_module, "sync_directory", sync_fails_once)
    with pytest.raises(KeyBackendError, match="cannot write key file:ca-device"):
        rewrap_keys(svc.ca, TEST_ACTOR)
    assert failed == [settings.keys_dir]
    assert target.read_bytes() == pbkdf2 and _leftovers(settings) == []
    assert _entries(svc, "ca.key.rewrap") == 0


def test_a_rewrap_lists_what_is_offline_once_it_holds_the_lock(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `ca offline root` that ends just before the rewrap takes the keys lock: root is
    listed once, as offline (the CAs were read before the lock: root was in neither list)."""
    from ca.hierarchy import rewrap_keys

    backend = svc.ca.backend
    assert isinstance(backend, SoftwareBackend)
    real_exclusive = SoftwareBackend.exclusive
    raced: list[str] = []

    def offline_first(self: SoftwareBackend) -> contextlib.AbstractContextManager[None]:
        if not raced:  # another process's `ca offline root`, just before our lock
            raced.append("root")
            _offline_root(svc)
        return real_exclusive(self)

    monkeypatch.setattr(SoftwareBackend, "exclusive", offline_first)
    done = rewrap_keys(svc.ca, TEST_ACTOR)
    assert raced == ["root"]
    assert [d for d in done if d["ca"] == "root"] == [
        {"key_ref": "file:ca-root", "ca": "root", "offline": True, "rewrapped": False, "was": None}
    ]


@pytest.mark.parametrize("fault", ["journal", "commit"])
def test_a_rewrap_the_journal_does_not_record_leaves_the_key_file_as_it_was(
    svc: Services, settings: Settings, fault: str
) -> None:
    """`key rewrap` replaces a file in the transaction that journals it: when the journal
    entry or the commit fails, the PBKDF2 file is as it was (before, the file was replaced
    first and the journal failure left it rewrapped unrecorded); the retry rewraps it."""
    from ca.hierarchy import rewrap_keys
    from hsm.pbes2 import CURRENT, describe

    target, pbkdf2 = _pbkdf2_device_key(settings)
    expected = _inject(svc, fault, SQLITE_REWRAP_COMMIT_FAULT, PG_REWRAP_COMMIT_FAULT)
    with pytest.raises(expected):
        rewrap_keys(svc.ca, TEST_ACTOR)
    assert target.read_bytes() == pbkdf2 and _leftovers(settings) == []
    assert _entries(svc, "ca.key.rewrap") == 0
    _heal(svc)
    done = rewrap_keys(svc.ca, TEST_ACTOR)
    assert [d["key_ref"] for d in done if d["rewrapped"]] == ["file:ca-device"]
    assert describe(pem_unwrap(target.read_bytes(), PEM_LABEL)) == CURRENT
    assert _entries(svc, "ca.key.rewrap") == 1
    open_backend(settings).signing_key("file:ca-device")  # a whole key, as another process reads it


@pytest.mark.parametrize("leftover", ["whole", "truncated"])
def test_a_key_file_the_store_does_not_record_does_not_block_bring_online(
    svc: Services, settings: Settings, leftover: str
) -> None:
    """What a crash between the write and the commit (or a take-offline between its commit
    and the removal) leaves: a key file while the store says offline."""
    pem = _offline_root(svc)
    if leftover == "whole":
        assert isinstance(svc.backend, SoftwareBackend)
        svc.backend.store("file:ca-root", pem_unwrap(pem, PEM_LABEL))
    else:
        _key_file(settings).write_bytes(pem[:100])
    bring_online(svc.ca, "root", pem, TEST_ACTOR)
    assert _key_online(svc, "root")
    assert _key_file(settings).read_bytes() == pem
    with pytest.raises(Conflict, match="already online"):
        bring_online(svc.ca, "root", pem, TEST_ACTOR)
    assert _key_file(settings).read_bytes() == pem


def test_bring_online_and_take_offline_wait_for_the_keys_directory_lock(
    svc: Services, settings: Settings
) -> None:
    """Two `ca online` (or one and a `ca offline`) never decide from the key file at once:
    one that found another's file mid-way would take it for a leftover."""
    pem = _offline_root(svc)
    assert isinstance(svc.backend, SoftwareBackend)
    other = build_services(settings, migrate=False)  # another process's view, its own lock
    errors: list[BaseException] = []

    def online() -> None:
        try:
            bring_online(other.ca, "root", pem, TEST_ACTOR)
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        with svc.backend.exclusive():
            worker = threading.Thread(target=online)
            worker.start()
            time.sleep(1.0)
            assert worker.is_alive() and not _key_file(settings).exists()
            assert not _key_online(svc, "root")
        worker.join(30)
        assert not worker.is_alive() and errors == []
        assert _key_file(settings).exists() and _key_online(svc, "root")
        with pytest.raises(Conflict, match="already online"):
            bring_online(svc.ca, "root", pem, TEST_ACTOR)
        assert _key_file(settings).exists()
    finally:
        other.close()


def test_damaged_key_files_are_refused_by_exit_code(
    data_dir: Path, settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, out + err
        return code, err

    exported = tmp_path / "root.pem"
    assert run("ca", "export", "root", "--key", "-o", str(exported))[0] == 0
    assert run("ca", "offline", "root", "--yes")[0] == 0
    begin, end = f"-----BEGIN {PEM_LABEL}-----\n", f"\n-----END {PEM_LABEL}-----\n"
    for body, why in (("MIIB=x", "base64"), ("MIIBAAAA", "EncryptedPrivateKeyInfo")):
        bad = tmp_path / "bad.pem"
        bad.write_text(begin + body + end)
        code, err = run("ca", "online", "root", "--key-file", str(bad))
        assert code == 65 and why in err, err  # the file given: bad input
    # Two keys in one file: the first was brought back and the other ignored.
    double = tmp_path / "double.pem"
    double.write_bytes(exported.read_bytes() * 2)
    code, err = run("ca", "online", "root", "--key-file", str(double))
    assert code == 65 and "holds 2 PEM" in err and "give one" in err, err
    assert not _key_file(settings).exists()
    # A damaged key file in the store: the key backend's fault, not a bug.
    admin = settings.keys_dir / "ca-admin.key"
    lines = admin.read_bytes().split(b"\n")
    admin.write_bytes(b"\n".join(lines[:3]) + b"A\n" + lines[-2] + b"\n")
    code, err = run("crl", "generate", "--ca", "admin")
    assert code == 69 and "base64" in err, err
    assert run("ca", "online", "root", "--key-file", str(exported))[0] == 0
