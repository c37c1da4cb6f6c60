"""The ``sekisho`` command line, driven through ``sekisho.cli.main(argv)``: help on every
command, init, CA hierarchy (offline root), issuance from CSRs and with server-side keygen,
revocation, listing, CRLs, ``--json`` output, and exit codes taken from the error classes.

Every certificate and CRL the CLI produces goes through pkilint and OpenSSL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from audit.events import Category, Event, Outcome
from ca.crl import latest_by_name
from ca.hierarchy import create_issuing
from ca.models import CrlKind
from hsm.base import KeyType
from hsm.pbes2 import describe
from hsm.software import PEM_LABEL, pem_unwrap
from sekisho.cli import cli as cli_group
from sekisho.cli import main
from sekisho.services import Services, build_services
from sekisho.settings import Settings
from tests.ca.helpers import make_csr, name
from tests.conftest import TEST_ACTOR
from tests.support.checkers import (
    openssl_crl_verify,
    openssl_verify,
    openssl_verify_revoked,
    pkilint_cert,
    pkilint_chain,
    pkilint_crl,
)

TIMEOUT = 30


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Runner = Callable[..., Result]


def _runner(capsys: pytest.CaptureFixture[str], data_dir: Path) -> Runner:
    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(["--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, out + err
        return Result(code, out, err)

    return run


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], data_dir: Path) -> Runner:
    """The CLI against a copy of the initialised deployment (SQLite and PostgreSQL)."""
    return _runner(capsys, data_dir)


def ok(result: Result) -> Result:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    return result


def jsonl(text: str) -> list[Any]:
    """The records of a JSON Lines output (``audit search --json``)."""
    return [json.loads(line) for line in text.splitlines()]


def der_of_pem(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def ca_der(run: Runner, ca: str) -> bytes:
    return der_of_pem(ok(run("ca", "export", ca)).out.encode())


def latest_crl(settings: Settings, ca: str, delta: bool = False) -> tuple[int, bytes]:
    services = build_services(settings, migrate=False)
    try:
        with services.db.scope() as session:
            row = latest_by_name(session, ca, CrlKind.DELTA if delta else CrlKind.FULL)
            assert row is not None
            return row.number, row.der
    finally:
        services.close()


# -- help -------------------------------------------------------------------------------------
def _walk(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for cmd_name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _walk(command, (*prefix, cmd_name))
        else:
            yield (*prefix, cmd_name)


COMMAND_PATHS = list(_walk(cli_group))


def test_command_tree_is_what_the_docs_promise() -> None:
    expected = {
        ("init",), ("ca",), ("ca", "list"), ("ca", "show"), ("ca", "export"),
        ("ca", "offline"), ("ca", "online"), ("ca", "create-issuing"), ("issue",),
        ("revoke",), ("release",), ("cert",), ("cert", "list"), ("cert", "show"), ("cert", "check"),
        ("crl",), ("crl", "generate"), ("crl", "prune"), ("serve",), ("run",),
        ("backup", "create"), ("backup", "verify"), ("backup", "restore"),
        ("db", "status"), ("db", "upgrade"),
    }  # fmt: skip
    assert expected <= set(COMMAND_PATHS)


@pytest.mark.parametrize(
    "path", COMMAND_PATHS, ids=[" ".join(p) or "sekisho" for p in COMMAND_PATHS]
)
def test_help_on_every_command_exits_zero(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for flag in ("--help", "-h"):
        code = main(["--data-dir", str(tmp_path / "never"), *path, flag])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.startswith("Usage: sekisho"), out
    # Help must not create or touch a data directory.
    assert not (tmp_path / "never").exists()


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert re.match(r"sekisho, version \d+\.\d+", capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-option"],
        ["no-such-command"],
        ["ca", "show"],  # missing argument
        ["issue", "--ca", "admin"],  # missing --profile
        ["cert", "list", "--status", "lost"],
        ["cert", "list", "--expiring-within", "-3"],
        ["revoke", "--ca", "admin", "not-hex"],
        ["init", "--key-type", "dsa-1024"],
        ["ca", "offline", "root"],  # needs --yes
        ["ca", "export", "root", "--key"],  # needs --output
        ["issue", "--ca", "admin", "--profile", "admin-client"],  # neither --csr nor --keygen
    ],
)
def test_usage_errors_exit_64(run: Runner, argv: list[str]) -> None:
    result = run(*argv)
    assert result.code == 64, result
    assert result.err.strip(), "a usage error must say what is wrong"


def test_an_empty_subject_or_one_file_given_twice_is_a_usage_error(
    run: Runner, tmp_path: Path, settings: Settings
) -> None:
    """From the operator review: `--subject ""` with a CSR certified the CSR's subject (an
    empty value was taken for none), and `--out X --key-out X` was refused as "'X' exists"
    of a file that did not exist. Both are usage errors now, and nothing is issued."""
    csr = tmp_path / "req.csr"
    csr.write_bytes(make_csr(name(O="Tenant One", CN="x")))
    before = len(ok(run("--json", "cert", "list")).json())
    empty = run("issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(csr),
                "--subject", " ", "--san", "email:x@tenant1.example.com")  # fmt: skip
    assert empty.code == 64 and "--subject is empty" in empty.err, empty
    same = tmp_path / "alice.pem"
    twice = run("issue", "--ca", "admin", "--profile", "admin-client", "--keygen", "ec-p256",
                "--subject", "CN=Alice,O=Tenant One", "--san", "email:a@tenant1.example.com",
                "--out", str(same), "--key-out", str(tmp_path / "." / "alice.pem"))  # fmt: skip
    assert twice.code == 64 and "must name different files" in twice.err, twice
    assert not same.exists()
    assert len(ok(run("--json", "cert", "list")).json()) == before


def test_usage_errors_quote_arguments_escaped_and_cut(run: Runner) -> None:
    """click's own usage errors quote what was given: a 5,000-character value filled the
    screen, and an unexpected argument reached the terminal raw (escape sequences, a line
    break that forges an "Error:" line). Now escaped and cut, as our own errors quote."""
    long = run("cert", "list", "--status", "x" * 5000)
    assert long.code == 64 and long.out == ""
    (line,) = [x for x in long.err.splitlines() if x.startswith("Error:")]
    assert f"'{'x' * 79}... (5002 characters) is not one of" in line and len(line) < 250
    forged = run("cert", "list", "extra\x1b[31mred\x07\u202e\nError: forged")
    assert forged.code == 64
    assert forged.err.splitlines()[-1] == (
        "Error: Got unexpected extra argument (extra\\x1b[31mred\\x07\\u202e\\nError: forged)"
    )
    assert forged.err.count("Error:") == 2 and "\x1b" not in forged.err
    words = run("cert", "list", "many " * 3000)  # short runs, a long message
    assert words.code == 64 and len(words.err) < 2500
    assert re.search(r"\.\.\. \(150\d\d characters in all\)$", words.err.strip())


# -- init -------------------------------------------------------------------------------------
def test_init_on_a_fresh_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "fresh"
    run = _runner(capsys, data)
    doc = ok(run("--json", "init", "--org", "Fresh Corp", "--key-type", "ec-p384")).json()
    assert doc["cas"] == ["root", "admin", "device"]
    assert doc["data_dir"] == str(data.resolve())
    assert (data / "sekisho.db").exists()
    assert (data / "secrets" / "ca-passphrase").stat().st_mode & 0o077 == 0
    assert data.stat().st_mode & 0o077 == 0
    root = der_of_pem((data / "public" / "root.crt").read_bytes())
    pkilint_cert(root)
    for issuing in ("admin", "device"):
        sub = der_of_pem(Path(doc["certificates"][issuing]).read_bytes())
        pkilint_cert(sub)
        pkilint_chain(root, sub)
        openssl_verify(sub, [root])
        assert doc["crl_urls"][issuing].endswith(f"/crl/{issuing}.crl")
    listed = ok(run("--json", "ca", "list")).json()
    assert {c["name"]: c["key_type"] for c in listed} == {
        "root": "ec-p384", "admin": "ec-p384", "device": "ec-p384",
    }  # fmt: skip
    assert "O=Fresh Corp" in ok(run("ca", "show", "root")).out
    # A second init refuses: the deployment exists (Conflict -> 75).
    again = run("init")
    assert again.code == 75 and "already initialised" in again.err


def test_init_text_output_names_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _runner(capsys, tmp_path / "d")
    out = ok(run("init", "--issuing", "ops", "--issuing", "iot")).out
    assert "Initialised Sekisho in" in out
    assert re.search(r"ops\s+\S+/public/ops\.crt", out)
    assert "http://127.0.0.1:8080/crl/iot.crl" in out


def test_init_in_an_unusable_directory_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _runner(capsys, blocker / "sub")("init")
    assert result.code == 78 and "data directory" in result.err


# -- ca ---------------------------------------------------------------------------------------
def test_ca_list_show_export(run: Runner, tmp_path: Path) -> None:
    cas = ok(run("--json", "ca", "list")).json()
    assert [c["name"] for c in cas] == ["root", "admin", "device"]
    assert all(c["key_online"] for c in cas)
    text = ok(run("ca", "list")).out
    assert re.search(r"^root\s+root\s+ec-p256\s+online\s+.*CN=", text, re.M), text
    shown = ok(run("--json", "ca", "show", "admin")).json()
    assert shown["kind"] == "issuing" and shown["name"] == "admin"
    dt.datetime.fromisoformat(shown["not_after"])
    pem_out = ok(run("ca", "export", "admin")).out
    admin = der_of_pem(pem_out.encode())
    assert f"{x509.load_der_x509_certificate(admin).serial_number:x}" in shown["serial"].lstrip("0")
    target = tmp_path / "admin.pem"
    assert ok(run("--json", "ca", "export", "admin", "-o", str(target))).json()["file"] == str(
        target
    )
    assert der_of_pem(target.read_bytes()) == admin
    root = ca_der(run, "root")
    pkilint_chain(root, admin)
    openssl_verify(admin, [root])


def test_ca_export_writes_new_files_only_and_journals_only_what_it_wrote(
    run: Runner, tmp_path: Path
) -> None:
    """An existing file (or a symlink planted where the key is to go) is refused before the
    key is exported: the file keeps its content, and no ca.key.export entry claims an export
    that went nowhere."""

    def exports() -> int:
        found = ok(run("--json", "audit", "search", "--action", "ca.key.export")).out
        return len(found.splitlines())

    before = exports()
    existing = tmp_path / "existing.pem"
    existing.write_text("someone else's\n")
    planted = tmp_path / "planted.pem"
    planted.symlink_to(tmp_path / "elsewhere.pem")
    for target in (existing, planted):
        refused = run("ca", "export", "admin", "--key", "-o", str(target))
        assert refused.code == 65 and "exists" in refused.err, refused
    nowhere = run("ca", "export", "admin", "--key", "-o", str(tmp_path / "no" / "k.pem"))
    assert nowhere.code == 65 and "Traceback" not in nowhere.err
    assert existing.read_text() == "someone else's\n" and not (tmp_path / "elsewhere.pem").exists()
    assert exports() == before
    good = tmp_path / "admin-key.pem"
    ok(run("ca", "export", "admin", "--key", "-o", str(good)))
    assert good.stat().st_mode & 0o777 == 0o600 and b"ENCRYPTED PRIVATE KEY" in good.read_bytes()
    assert exports() == before + 1


def test_data_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Created by someone else (e.g. planted in a shared directory before init ran): its
    settings, keys/ and secrets/ would be theirs to swap."""
    if os.geteuid() != 0:
        pytest.skip("only root can create a directory owned by another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert main(["--data-dir", str(theirs), "init", "--org", "X"]) == 78
    assert not (theirs / "keys").exists()


def test_unknown_ca_exits_66(run: Runner) -> None:
    for argv in (
        ["ca", "show", "nope"],
        ["ca", "export", "nope"],
        ["crl", "generate", "--ca", "nope"],
    ):
        result = run(*argv)
        assert result.code == 66, result
        assert "error: not-found:" in result.err and "nope" in result.err


def test_offline_root_blocks_root_signing_until_brought_back(
    run: Runner, tmp_path: Path, settings: Settings
) -> None:
    key_file = tmp_path / "root-key.pem"
    doc = ok(run("--json", "ca", "export", "root", "--key", "--output", str(key_file))).json()
    assert doc == {"ca": "root", "key_file": str(key_file)}
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert describe(pem_unwrap(key_file.read_bytes(), PEM_LABEL))[:3] == ("pbes2", "scrypt", 2**14)
    offline = ok(run("--json", "ca", "offline", "root", "--yes")).json()
    assert not (settings.keys_dir / "ca-root.key").exists()
    # Going offline signed a last full CRL and a delta that lasts as long as it: nothing
    # renews the root's CRLs now, and its Freshest CRL pointer must not lead to an expired
    # delta for most of the full CRL's life (it did: 24 h of 7 days).
    full_number, full_der = latest_crl(settings, "root")
    delta_number, delta_der = latest_crl(settings, "root", delta=True)
    assert (offline["crl_number"], offline["delta_crl_number"]) == (full_number, delta_number)
    full_crl, delta_crl = x509.load_der_x509_crl(full_der), x509.load_der_x509_crl(delta_der)
    assert delta_crl.next_update_utc == full_crl.next_update_utc
    assert full_crl.next_update_utc.isoformat() == offline["crls_next_update"]
    base = delta_crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
    assert base.crl_number == full_number < delta_number
    root_der = ca_der(run, "root")
    pkilint_crl(full_der)
    pkilint_crl(delta_der, delta=True)
    openssl_crl_verify(delta_der, root_der)
    listed = {c["name"]: c["key_online"] for c in ok(run("--json", "ca", "list")).json()}
    assert listed == {"root": False, "admin": True, "device": True}
    assert "OFFLINE" in ok(run("ca", "list")).out
    # While offline: no new issuing CA, no root CRL; both fail cleanly as conflicts.
    refused = run("ca", "create-issuing", "ops")
    assert refused.code == 75 and "offline" in refused.err, refused
    refused = run("crl", "generate", "--ca", "root")
    assert refused.code == 75 and "offline" in refused.err, refused
    assert run("ca", "offline", "root", "--yes").code == 75  # already offline
    # A revocation by the offline root is recorded, and said to wait for the root's CRL.
    admin_serial = ok(run("--json", "ca", "show", "admin")).json()["serial"]
    held = run("--json", "revoke", "--ca", "root", admin_serial, "--reason", "certificate_hold")
    assert ok(held).json()["crl_pending_key_offline"] is True
    assert "key of CA root is offline" in held.err and "ca online root" in held.err
    released = ok(run("--json", "release", "--ca", "root", admin_serial))
    assert released.json()["crl_pending_key_offline"] is True
    leaf = _issue_device(run, "pending.example.com")
    online = ok(run("--json", "revoke", "--ca", "device", leaf, "--reason", "superseded"))
    assert online.json()["crl_pending_key_offline"] is False and online.err == ""
    # Without --ca, CRLs are generated for the online CAs only.
    # A full CRL and a delta against it each, never a full CRL alone: a delta numbered below
    # the full CRL served beside it is discarded by RFC 5280 5.2.4 clients.
    docs = ok(run("--json", "crl", "generate")).json()
    assert [(d["ca"], d["kind"]) for d in docs] == [
        ("admin", "full"), ("admin", "delta"), ("device", "full"), ("device", "delta"),
    ]  # fmt: skip
    assert docs[1]["number"] == docs[0]["number"] + 1
    assert latest_crl(settings, "admin", delta=True)[0] == docs[1]["number"]
    deltas = ok(run("--json", "crl", "generate", "--ca", "admin", "--delta")).json()
    assert [(d["ca"], d["kind"]) for d in deltas] == [("admin", "delta")]
    # Nothing has ended 90 days ago yet: nothing to prune (the pruning: tests/ca/test_crl.py).
    assert ok(run("--json", "crl", "prune")).json() == {"deleted": 0, "keep_days": 90.0}
    # The issuing CAs keep working.
    ok(run("issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
           "--subject", "CN=d1.example.com", "--san", "dns:d1.example.com",
           *_key_out()))  # fmt: skip
    # A wrong key file is refused by name; the right one brings the root back.
    wrong = tmp_path / "admin-key.pem"
    ok(run("ca", "export", "admin", "--key", "-o", str(wrong)))
    result = run("ca", "online", "root", "--key-file", str(wrong))
    assert result.code == 65 and "does not belong" in result.err
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    assert run("ca", "online", "root", "--key-file", str(garbage)).code == 65
    assert run("ca", "online", "root", "--key-file", str(tmp_path / "missing.pem")).code == 66
    ok(run("ca", "online", "root", "--key-file", str(key_file)))
    assert run("ca", "online", "root", "--key-file", str(key_file)).code == 75
    new_ca = ok(run("--json", "ca", "create-issuing", "ops", "--org", "Example Corp")).json()
    assert new_ca["name"] == "ops" and new_ca["kind"] == "issuing"
    # Its OCSP responder is made with it: its CA key never signs its answers.
    listed = ok(run("--json", "ocsp", "responders")).json()
    assert listed["changes"] == []
    (made,) = [d for d in listed["responders"] if d["ca"] == "ops"]
    assert made["active"] and made["serial"] == new_ca["ocsp_responder"]
    root = ca_der(run, "root")
    ops = ca_der(run, "ops")
    pkilint_cert(ops)
    pkilint_chain(root, ops)
    openssl_verify(ops, [root])
    root_crl = ok(run("--json", "crl", "generate", "--ca", "root")).json()[0]
    number, crl_der = latest_crl(settings, "root")
    assert number == root_crl["number"]
    pkilint_crl(crl_der)
    openssl_crl_verify(crl_der, root)
    # The new CA has CRLs too (create-issuing makes them) and can issue at once.
    _, ops_crl = latest_crl(settings, "ops")
    openssl_crl_verify(ops_crl, ops)
    csr = tmp_path / "ops.csr"
    csr.write_bytes(make_csr(name(CN="ops-1.example.com")))
    leaf_pem = ok(run("issue", "--ca", "ops", "--profile", "tls-server", "--csr", str(csr),
                      "--san", "dns:ops-1.example.com")).out  # fmt: skip
    leaf = der_of_pem(leaf_pem.encode())
    pkilint_cert(leaf)
    openssl_verify(leaf, [root, ops], [crl_der, ops_crl], purpose="sslserver")


def test_create_issuing_takes_the_organisation_of_its_parent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --org, a new issuing CA's O is its parent's (it was "Sekisho" under any root)."""
    data = tmp_path / "corp"
    assert main(["--data-dir", str(data), "init", "--org", "Example Corp"]) == 0
    assert main(["--data-dir", str(data), "ca", "create-issuing", "partners"]) == 0
    capsys.readouterr()
    assert main(["--data-dir", str(data), "--json", "ca", "show", "partners"]) == 0
    subject = json.loads(capsys.readouterr().out)["subject"]
    assert subject.endswith(",O=Example Corp") and "Sekisho" not in subject, subject


def test_create_issuing_refuses_duplicates_and_bad_key_types(run: Runner) -> None:
    assert run("ca", "create-issuing", "admin").code == 75
    result = run("ca", "create-issuing", "x1", "--key-type", "rsa-2048")
    assert result.code == 65 and "key" in result.err, result
    assert run("ca", "create-issuing", "x2", "--parent", "nope").code == 66
    # Names its CRL URLs could not carry, or would carry as another CA's delta CRL.
    for bad in ("ops-delta", "ops.x"):
        result = run("ca", "create-issuing", bad)
        assert result.code == 65 and "CA name" in result.err, result
    assert [c["name"] for c in ok(run("--json", "ca", "list")).json()] == [
        "root", "admin", "device",
    ]  # fmt: skip


def test_init_refuses_a_bad_ca_name_before_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _runner(capsys, tmp_path / "d")
    result = run("init", "--issuing", "ops", "--issuing", "iot-delta")
    assert result.code == 65 and "'iot-delta'" in result.err, result
    # Refused from the options alone: not even the data directory was made.
    assert not (tmp_path / "d").exists()
    listed = run("--json", "ca", "list")
    assert listed.code == 78 and "no Sekisho deployment" in listed.err, listed


def test_init_with_one_issuing_ca_is_refused_before_anything_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was exit 75 (a conflict) after the data directory, its store and secrets were
    made; it is bad input, refused from the options alone."""
    run = _runner(capsys, tmp_path / "d")
    for argv, why in [
        (("--issuing", "ops"), "two distinct issuing CAs"),
        (("--issuing", "ops", "--issuing", "ops"), "two distinct issuing CAs"),
        # Each named for what is wrong with it (the operator review: "two distinct issuing
        # CAs" for a root named as one, or for a name refused).
        (("--issuing", "root", "--issuing", "ops"), "--issuing names the root, 'root'"),
        (("--issuing", "root"), "--issuing names the root, 'root'"),
        (("--issuing", "foo-delta"), "CA name 'foo-delta' refused"),
    ]:
        result = run("init", *argv)
        assert result.code == 65 and why in result.err, (argv, result)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--permit-dns", ""),
        ("--permit-dns", " "),
        ("--exclude-dns", ""),
        ("--permit-email", ""),
        ("--permit-dns", "*.example.com"),
        ("--permit-dns", ".example.com"),
        ("--permit-dns", "Example.COM"),
        ("--permit-dns", "exa mple.com"),
        ("--exclude-dns", "bad..example.com"),
        ("--permit-email", "@example.com"),
        ("--permit-email", "a@b@example.com"),
        ("--permit-dns", "example.com\n"),
        ("--permit-email", "a@example.com\n"),
        # Under no top-level domain: a CA that could issue no name in it.
        ("--permit-dns", "lab.b2"),
        ("--permit-dns", "corp1"),
        ("--permit-email", ".lab.b2"),
        ("--permit-email", "a@lab.b2"),
        # Not a network in CIDR form: host bits, no prefix, empty.
        ("--permit-ip", "10.20.0.1/16"),
        ("--permit-ip", "10.20.0.0"),
        ("--exclude-ip", ""),
    ],
)
def test_name_constraints_empty_or_malformed_are_refused_before_anything_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run: Runner, option: str, value: str
) -> None:
    data = tmp_path / "d"
    result = _runner(capsys, data)("init", option, value)
    assert result.code == 65, result
    assert "name constraint" in result.err and result.err.count("\n") == 1, result.err
    assert not data.exists()
    before = ok(run("--json", "ca", "list")).json()
    result = run("ca", "create-issuing", "ops", option, value)
    assert result.code == 65 and "name constraint" in result.err, result
    assert ok(run("--json", "ca", "list")).json() == before


def test_name_constraints_in_every_rfc_5280_form_are_written(run: Runner) -> None:
    ok(run("ca", "create-issuing", "ops", "--permit-dns", "ops.example.com",
           "--permit-dns", "xn--bcher-kva.example", "--permit-email", "a@example.com",
           "--permit-email", "Example.org", "--permit-email", ".example.net",
           "--exclude-dns", "bad.ops.example.com", "--permit-ip", "10.20.0.0/16",
           "--permit-ip", "2001:db8::/32", "--exclude-ip", "10.20.99.0/24"))  # fmt: skip
    cert = x509.load_der_x509_certificate(ca_der(run, "ops"))
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    assert [str(n.value) for n in nc.permitted_subtrees or ()] == [
        "ops.example.com", "xn--bcher-kva.example", "a@example.com", "Example.org",
        ".example.net", "10.20.0.0/16", "2001:db8::/32",
    ]  # fmt: skip
    assert [str(n.value) for n in nc.excluded_subtrees or ()] == [
        "bad.ops.example.com", "10.20.99.0/24",
    ]  # fmt: skip
    pkilint_cert(cert.public_bytes(serialization.Encoding.DER))


def test_a_key_compromise_reaching_a_ca_whose_key_is_offline_says_so(
    run: Runner, tmp_path: Path
) -> None:
    """Revoking for key_compromise revokes every certificate of the key, under any CA: the
    note names each CA whose key is offline among them, not only the one given."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = tmp_path / "shared.csr"
    csr.write_bytes(make_csr(name(O="Tenant One", UID="bob", CN="Bob"), key=key))
    admin = ok(run("--json", "issue", "--ca", "admin", "--profile", "admin-client", "--csr",
                   str(csr), "--san", "email:bob@tenant1.example.com")).json()  # fmt: skip
    device = ok(run("--json", "issue", "--ca", "device", "--profile", "device", "--csr",
                    str(csr), "--subject", "CN=bob.example.com,O=Tenant One",
                    "--san", "dns:bob.example.com")).json()  # fmt: skip
    ok(run("ca", "export", "admin", "--key", "--output", str(tmp_path / "admin-key.pem")))
    ok(run("ca", "offline", "admin", "--yes"))
    done = run("--json", "revoke", "--ca", "device", device["serial"], "--reason", "key_compromise")
    doc = ok(done).json()
    assert doc["also_revoked"] == [{"ca": "admin", "serial": admin["serial"]}]
    assert doc["crl_pending_key_offline"] is True
    assert "key of CA admin is offline" in done.err and "CA device" not in done.err


# -- issue ------------------------------------------------------------------------------------
def test_issue_from_csr_file(run: Runner, tmp_path: Path, settings: Settings) -> None:
    csr = tmp_path / "alice.csr"
    csr.write_bytes(make_csr(name(O="Tenant One", UID="alice", CN="Alice Admin")))
    out = tmp_path / "alice.pem"
    doc = ok(
        run("--json", "issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(csr),
            "--san", "email:alice@tenant1.example.com", "--days", "30", "--owner", "acct-1",
            "--tenant", "tenant1", "--out", str(out))
    ).json()  # fmt: skip
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert doc["serial"] == f"{cert.serial_number:040x}"
    assert doc["certificate_file"] == str(out)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=10)
    leaf = cert.public_bytes(serialization.Encoding.DER)
    chain = [ca_der(run, "root"), ca_der(run, "admin")]
    pkilint_cert(leaf)
    pkilint_chain(chain[1], leaf)
    _, crl_der = latest_crl(settings, "admin")
    openssl_verify(leaf, chain, [latest_crl(settings, "root")[1], crl_der], purpose="sslclient")
    shown = ok(run("--json", "cert", "show", "--ca", "admin", doc["serial"])).json()
    assert shown["owner"] == "acct-1" and shown["tenant"] == "tenant1"
    assert shown["status"] == "issued" and shown["profile"] == "admin-client"
    assert shown["sans"]
    pem = ok(run("cert", "show", "--ca", "admin", doc["serial"], "--pem")).out
    assert x509.load_pem_x509_certificate(pem.encode()) == cert


def test_a_subject_or_san_the_cli_refuses_is_journalled(run: Runner, tmp_path: Path) -> None:
    """From the review: a --san or --subject refused as it was read (before the request
    reached the issuance service) left no rejection in the journal."""

    def rejections() -> list[dict[str, Any]]:
        found = ok(run("--json", "audit", "search", "--action", "ca.issue", "--limit", "100"))
        entries = [json.loads(line) for line in found.out.splitlines()]
        return [e for e in entries if e["outcome"] == "failure"]

    before = len(rejections())
    base = ("issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
            "--key-out", str(tmp_path / "k.pem"))  # fmt: skip
    refused = run(*base, "--subject", "CN=d1.example.com", "--san", "foo:bar")
    assert refused.code == 65 and "foo" in refused.err, refused
    refused = run(*base, "--subject", "CN=d1\x1b[31m", "--san", "dns:d1.example.com")
    assert refused.code == 65, refused
    found = rejections()
    assert len(found) == before + 2, found
    assert {e["detail"]["ca"] for e in found[-2:]} == {"device"}
    assert [e["detail"]["code"] for e in found[-2:]] == ["malformed", "policy-violation"]
    assert "foo" in found[-2]["detail"]["reason"], found[-2]
    assert not (tmp_path / "k.pem").exists()


def test_issue_says_the_sans_the_csr_gave(run: Runner, tmp_path: Path) -> None:
    """From the review: with --csr and --subject alone, the certificate carries the CSR's
    SANs, and the output named only the subject. It says the SANs too, whatever gave them."""
    csr = tmp_path / "dev.csr"
    csr.write_bytes(
        make_csr(
            name(CN="dev1.example.com"),
            [x509.DNSName("dev1.example.com"), x509.DNSName("secret.example.com")],
        )
    )
    argv = ("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
            "--subject", "CN=dev2.example.com")  # fmt: skip
    doc = ok(run("--json", *argv, "--out", str(tmp_path / "a.pem"))).json()
    assert doc["subject"] == "CN=dev2.example.com"
    assert doc["sans"] == ["dns:dev1.example.com", "dns:secret.example.com"]
    text = ok(run(*argv, "--out", str(tmp_path / "b.pem"))).out
    assert "sans: dns:dev1.example.com, dns:secret.example.com\n" in text, text


def test_issue_der_csr_prints_pem_on_stdout(run: Runner, tmp_path: Path) -> None:
    pem_csr = make_csr(name(CN="dev-7.example.com"))
    csr = tmp_path / "dev.der"
    csr.write_bytes(x509.load_pem_x509_csr(pem_csr).public_bytes(serialization.Encoding.DER))
    out = ok(run("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
                 "--san", "dns:dev-7.example.com", "--san", "ip:10.1.2.3")).out  # fmt: skip
    assert out.startswith("-----BEGIN CERTIFICATE-----")
    pkilint_cert(der_of_pem(out.split("-----END CERTIFICATE-----")[0].encode()
                            + b"-----END CERTIFICATE-----\n"))  # fmt: skip


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!!\n"
            b"-----END CERTIFICATE REQUEST-----\n",
            65,
        ),
        (b"\x30\x82\x01\x00garbage", 65),
        (b"", 65),
    ],
    ids=["bad-pem", "truncated-der", "empty"],
)
def test_malformed_csr_file_exits_65(
    run: Runner, tmp_path: Path, content: bytes, code: int
) -> None:
    csr = tmp_path / "bad.csr"
    csr.write_bytes(content)
    before = ok(run("--json", "cert", "list")).json()
    result = run("issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(csr))
    assert result.code == code, result
    assert result.err.startswith("error: "), result.err
    assert ok(run("--json", "cert", "list")).json() == before  # nothing reserved or issued


def test_a_file_of_two_csrs_is_refused(run: Runner, tmp_path: Path) -> None:
    first = make_csr(name(CN="one.example.com"))
    csr = tmp_path / "two.csr"
    csr.write_bytes(first + make_csr(name(CN="two.example.com")))
    before = ok(run("--json", "cert", "list")).json()
    result = run("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
                 "--san", "dns:one.example.com")  # fmt: skip
    assert result.code == 65, result
    assert result.err == "error: malformed: the input holds 2 CSRs; give one\n", result.err
    assert ok(run("--json", "cert", "list")).json() == before
    csr.write_bytes(first)  # the first one alone is fine
    ok(run("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
           "--san", "dns:one.example.com"))  # fmt: skip


def test_issue_input_errors(run: Runner, tmp_path: Path) -> None:
    csr = tmp_path / "c.csr"
    csr.write_bytes(make_csr(name(CN="x.example.com")))
    missing = run(
        "issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(tmp_path / "no.csr")
    )
    # A named input file that does not exist is not found (66, sysexits' EX_NOINPUT), as the
    # README says, for every command: it was 64 for some (click's check) and 65 for others.
    assert missing.code == 66 and "no such file" in missing.err and "no.csr" in missing.err
    late = run("cert", "list", "--json")  # a global option after the command: said so
    assert late.code == 64 and "--json goes before the command" in late.err, late
    nowhere = str(tmp_path / "nothere.pem")
    for argv in (
        [
            "issue",
            "--ca",
            "admin",
            "--profile",
            "admin-client",
            "--keygen",
            "ec-p256",
            "--subject",
            "CN=x,O=y",
            "--san",
            "email:x@y.example",
            "--p12",
            str(tmp_path / "x.p12"),
            "--password-file",
            nowhere,
        ],
        ["key", "block", nowhere],
        ["ca", "online", "admin", "--key-file", nowhere],
        ["audit", "verify", "--public-key", nowhere],
        ["backup", "verify", nowhere],
    ):
        refused = run(*argv)
        assert refused.code == 66 and "no such file" in refused.err, (argv, refused)
    # A text file that is no CSR: said in words, not as the ASN.1 parser's debug text.
    garbage = tmp_path / "garbage.csr"
    garbage.write_text("garbage\n")
    refused = run("issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(garbage))
    assert refused.code == 65 and "neither PEM" in refused.err and "ParseError" not in refused.err
    garbage.write_bytes(b"\x30\x82\x01\x00" + b"\x00" * 20)
    refused = run("issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(garbage))
    assert refused.code == 65 and "truncated" in refused.err, refused
    assert run("issue", "--ca", "nope", "--profile", "device", "--csr", str(csr),
               "--san", "dns:x.example.com").code == 66  # fmt: skip
    assert run("issue", "--ca", "device", "--profile", "nope", "--csr", str(csr)).code == 66
    # Policy: an admin-client certificate needs an email SAN and O.
    policy = run("issue", "--ca", "admin", "--profile", "admin-client", "--csr", str(csr))
    assert policy.code == 65 and "policy-violation" in policy.err, policy
    bad_san = run(
        "issue", "--ca", "device", "--profile", "device", "--csr", str(csr), "--san", "dns"
    )
    assert bad_san.code == 65 and "SAN" in bad_san.err
    bad_subject = run("issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
                      "--subject", "not a dn", "--san", "dns:x.example.com",
                      *_key_out())  # fmt: skip
    assert bad_subject.code == 65 and "subject" in bad_subject.err
    no_subject = run("issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256")
    assert no_subject.code == 64
    assert run("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
               "--p12", str(tmp_path / "x.p12")).code == 64  # fmt: skip
    assert run("issue", "--ca", "device", "--profile", "device", "--csr", str(csr),
               "--days", "0").code == 64  # fmt: skip


def test_issue_with_keygen_writes_pem_and_pkcs12(
    run: Runner, tmp_path: Path, settings: Settings
) -> None:
    pw = tmp_path / "p12.pw"
    pw.write_text("a-strong-p12-password\n")
    pw.chmod(0o600)
    cert_out, key_out, p12 = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "c.p12"
    doc = ok(
        run("--json", "issue", "--ca", "admin", "--profile", "admin-client", "--keygen",
            "rsa-3072", "--subject", "CN=Carol,O=Tenant Two,UID=carol", "--san",
            "email:carol@tenant2.example.com", "--out", str(cert_out), "--key-out",
            str(key_out), "--p12", str(p12), "--password-file", str(pw))
    ).json()  # fmt: skip
    assert "p12_password" not in doc  # it came from the file; nothing to show
    assert {doc["key_file"], doc["p12_file"]} == {str(key_out), str(p12)}
    assert key_out.stat().st_mode & 0o777 == 0o600 and p12.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    key = serialization.load_pem_private_key(key_out.read_bytes(), None)
    assert key.public_key() == cert.public_key()
    info = subprocess.run(
        ["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"file:{pw}", "-noout"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    text = info.stdout + info.stderr
    assert info.returncode == 0, text
    assert "MAC: sha256" in text and "AES-256-CBC" in text and "Iteration 600000" in text
    bundle = pkcs12.load_pkcs12(p12.read_bytes(), b"a-strong-p12-password")
    assert bundle.cert is not None and bundle.cert.certificate == cert
    assert bundle.key is not None and bundle.key.public_key() == cert.public_key()
    chain = [
        c.certificate.public_bytes(serialization.Encoding.DER) for c in bundle.additional_certs
    ]
    assert chain == [ca_der(run, "admin"), ca_der(run, "root")]
    leaf = cert.public_bytes(serialization.Encoding.DER)
    pkilint_cert(leaf)
    openssl_verify(leaf, list(reversed(chain)), purpose="sslclient")


def test_keygen_pkcs12_password_from_env_or_generated(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--json", "issue", "--ca", "device", "--profile", "connector", "--keygen",
            "ed25519", "--subject", "CN=conn-1", "--san", "dns:conn-1.example.com"]  # fmt: skip
    monkeypatch.setenv("TEST_P12_PW", "env-supplied-password")
    ok(run(*base, "--p12", str(tmp_path / "env.p12"), "--password-env", "TEST_P12_PW"))
    pkcs12.load_pkcs12((tmp_path / "env.p12").read_bytes(), b"env-supplied-password")

    def device_certs() -> int:
        return len(ok(run("--json", "cert", "list", "--ca", "device", "--limit", "1000")).json())

    # Refusals come before issuance: no certificate is left behind whose key nobody has.
    before = device_certs()
    missing = run(*base, "--p12", str(tmp_path / "x.p12"), "--password-env", "UNSET_VAR_XYZ")
    assert missing.code == 78 and "UNSET_VAR_XYZ" in missing.err
    short = tmp_path / "short"
    short.write_text("short\n")
    short.chmod(0o600)
    assert run(*base, "--p12", str(tmp_path / "y.p12"), "--password-file", str(short)).code == 65
    # A password file is a secret like the key passphrase: owner-only, never via a symlink.
    shared = tmp_path / "shared-pw"
    shared.write_text("a-strong-p12-password\n")
    shared.chmod(0o644)
    loose = run(*base, "--p12", str(tmp_path / "y.p12"), "--password-file", str(shared))
    assert loose.code == 78 and "readable by others" in loose.err
    shared.chmod(0o600)
    linked = tmp_path / "linked-pw"
    linked.symlink_to(shared)
    via_link = run(*base, "--p12", str(tmp_path / "y.p12"), "--password-file", str(linked))
    assert via_link.code == 78 and "symbolic link" in via_link.err
    # Output files are new files: an existing one (which could be another user's, or keep a
    # loose mode) and a symlink to one are refused and left as they were.
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n")
    planted = tmp_path / "planted.p12"
    planted.symlink_to(victim)
    for target in (victim, planted):
        again = run(*base, "--p12", str(target))
        assert again.code == 65 and "exists" in again.err and target.name in again.err
    assert victim.read_text() == "keep me\n"
    nowhere = run(*base, "--p12", str(tmp_path / "no-such-dir" / "z.p12"))
    assert nowhere.code == 65 and "no-such-dir" in nowhere.err
    dangling = tmp_path / "dangling.pem"  # a link to a place that cannot be created
    dangling.symlink_to(tmp_path / "no-such-dir" / "cert.pem")
    key_first = tmp_path / "k-first.pem"
    refused = run(*base, "--key-out", str(key_first), "--out", str(dangling))
    assert refused.code == 65 and "dangling.pem" in refused.err
    assert not key_first.exists()  # created for the check, removed with the refusal
    assert device_certs() == before
    doc = ok(run(*base, "--p12", str(tmp_path / "gen.p12"))).json()
    generated = doc["p12_password"]
    assert len(generated) >= 16
    bundle = pkcs12.load_pkcs12((tmp_path / "gen.p12").read_bytes(), generated.encode())
    assert bundle.cert is not None


def _cert_row(run: Runner, ca: str, serial: str) -> dict[str, Any]:
    rows = ok(run("--json", "cert", "list", "--ca", ca, "--limit", "1000")).json()
    (row,) = [r for r in rows if r["serial"] == serial]
    return dict(row)


def _issue_with_stdout_closed(data_dir: Path, *argv: str) -> tuple[int, str]:
    """Run `sekisho --json issue ...` whose reader has gone before it writes (`... | true`)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "sekisho", "--data-dir", str(data_dir), "--json", "issue",
         *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()
        err = child.stderr.read().decode()
        return child.wait(timeout=TIMEOUT), err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


_ADMIN_KEYGEN = ("--ca", "admin", "--profile", "admin-client", "--keygen", "ec-p256",
                 "--subject", "CN=Bob,O=Tenant One,UID=bob", "--san",
                 "email:bob@tenant1.example.com")  # fmt: skip


def _serial_in(err: str) -> str:
    found = re.search(r"certificate ([0-9a-f]{40}) of CA admin was issued", err)
    assert found, err
    return found.group(1)


def test_issued_files_outlive_a_closed_stdout(run: Runner, data_dir: Path, tmp_path: Path) -> None:
    """The reader of stdout gone once everything was written: the files stay (they used to be
    deleted, with the certificate left issued), the error names the serial, exit 74."""
    cert_out, key_out = tmp_path / "bob.pem", tmp_path / "bob.key"
    code, err = _issue_with_stdout_closed(
        data_dir, *_ADMIN_KEYGEN, "--out", str(cert_out), "--key-out", str(key_out)
    )
    assert code == 74, err
    serial = _serial_in(err)
    assert "kept" in err and "Traceback" not in err
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    key = serialization.load_pem_private_key(key_out.read_bytes(), None)
    assert key.public_key() == cert.public_key() and f"{cert.serial_number:040x}" == serial
    assert _cert_row(run, "admin", serial)["status"] == "issued"


def test_a_key_that_reached_no_one_has_its_certificate_revoked(
    run: Runner, data_dir: Path, tmp_path: Path
) -> None:
    """A generated PKCS#12 password that could not be shown (stdout closed) leaves a bundle
    nobody can open: the bundle is removed and the certificate revoked (journalled,
    cessation_of_operation), not left valid with its key lost and nobody told."""
    bundle = tmp_path / "bob.p12"
    code, err = _issue_with_stdout_closed(data_dir, *_ADMIN_KEYGEN, "--p12", str(bundle))
    assert code == 74, err
    serial = _serial_in(err)
    assert "revoked (cessation_of_operation)" in err and not bundle.exists()
    row = _cert_row(run, "admin", serial)
    assert (row["status"], row["reason"]) == ("revoked", "cessation_of_operation")
    journal = jsonl(ok(run("--json", "audit", "search", "--serial", serial)).out)
    assert [(r["action"], r["outcome"]) for r in journal] == [
        ("ca.issue", "success"), ("ca.revoke", "success"),
    ]  # fmt: skip


@pytest.mark.parametrize("with_key_file", [False, True], ids=["p12-only", "p12-and-key-file"])
def test_a_pkcs12_that_cannot_be_written_after_issuance(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_key_file: bool
) -> None:
    """The disk fills while the PKCS#12 is written (a real EFBIG, from a file size limit on
    that write): exit 74, not "bad input". With no other copy of the key the certificate is
    revoked and no file is left; with a key file written whole, that file and the
    certificate stay."""
    from sekisho.files import NewFiles
    from tests.hsm.test_key_files import file_size_limit

    original = NewFiles.write

    def write(self: NewFiles, path: Path, data: bytes) -> None:
        if path.suffix != ".p12":
            return original(self, path, data)
        with file_size_limit(64):
            return original(self, path, data)

    monkeypatch.setattr(NewFiles, "write", write)
    pw = tmp_path / "pw"
    pw.write_text("a-strong-p12-password\n")
    pw.chmod(0o600)
    bundle, key_out = tmp_path / "bob.p12", tmp_path / "bob.key"
    extra = ("--key-out", str(key_out)) if with_key_file else ()
    result = run("issue", *_ADMIN_KEYGEN, "--p12", str(bundle), "--password-file", str(pw), *extra)
    assert result.code == 74, result
    assert "error: output: cannot write" in result.err and "bob.p12" in result.err
    serial = _serial_in(result.err)
    assert not bundle.exists()
    row = _cert_row(run, "admin", serial)
    if with_key_file:
        assert "kept" in result.err and row["status"] == "issued"
        assert serialization.load_pem_private_key(key_out.read_bytes(), None)
    else:
        assert "revoked" in result.err and row["status"] == "revoked"
        assert not key_out.exists()


def test_a_pkcs12_password_importers_would_misread_is_refused_before_issuance(
    run: Runner, tmp_path: Path
) -> None:
    """A UTF-16 password file read as UTF-8 (NULs between the letters) made a bundle that no
    tool opens; six two-byte letters passed as twelve characters; a password given for a
    plain key file was silently unused."""
    before = _issued_count(run, "admin")
    for label, data in (
        ("utf16", "password-long".encode("utf-16-le")),
        ("short", "ääääää".encode()),
        ("emoji", "long-enough-😀".encode()),
    ):
        pw = tmp_path / label
        pw.write_bytes(data)
        pw.chmod(0o600)
        refused = run("issue", *_ADMIN_KEYGEN, "--p12", str(tmp_path / f"{label}.p12"),
                      "--password-file", str(pw))  # fmt: skip
        assert refused.code == 65, (label, refused)
        assert not (tmp_path / f"{label}.p12").exists()
    unused = run("issue", *_ADMIN_KEYGEN, "--key-out", str(tmp_path / "k.pem"), "--password-file",
                 str(tmp_path / "utf16"))  # fmt: skip
    assert unused.code == 64 and "go with --p12" in unused.err
    assert _issued_count(run, "admin") == before


# -- revoke / release / cert list -------------------------------------------------------------
# Where tests that need no key put the one `issue --keygen` must write (removed at exit).
_SCRATCH = tempfile.TemporaryDirectory(prefix="sekisho-test-cli-")


def _key_out() -> tuple[str, str]:
    return "--key-out", str(Path(_SCRATCH.name) / f"{secrets.token_hex(8)}.key")


def _issue_device(run: Runner, host: str, *extra: str) -> str:
    argv = ["--json", "issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
            "--subject", f"CN={host}", "--san", f"dns:{host}", *_key_out(), *extra]  # fmt: skip
    doc = ok(run(*argv)).json()
    serial: str = doc["serial"]
    return serial


def test_revoke_release_and_crls(run: Runner, settings: Settings) -> None:
    s1 = _issue_device(run, "r1.example.com")
    s2 = _issue_device(run, "r2.example.com")
    leaf1 = der_of_pem(ok(run("cert", "show", "--ca", "device", s1, "--pem")).out.encode())
    doc = ok(run("--json", "revoke", "--ca", "device", s1, "--reason", "key_compromise",
                 "--invalidity-date", "2020-01-02")).json()  # fmt: skip
    assert doc["status"] == "revoked" and doc["reason"] == "key_compromise"
    assert run("revoke", "--ca", "device", s1).code == 75  # already revoked
    ok(run("revoke", "--ca", "device", s2, "--reason", "certificate_hold"))
    assert run("release", "--ca", "device", s1).code == 75  # not on hold
    full = ok(run("--json", "crl", "generate", "--ca", "device")).json()[0]
    assert full["kind"] == "full" and full["entries"] == 2
    number, crl_der = latest_crl(settings, "device")
    assert number == full["number"]
    crl = x509.load_der_x509_crl(crl_der)
    assert {r.serial_number for r in crl} == {int(s1, 16), int(s2, 16)}
    root, device = ca_der(run, "root"), ca_der(run, "device")
    pkilint_crl(crl_der)
    openssl_crl_verify(crl_der, device)
    root_crl = latest_crl(settings, "root")[1]
    openssl_verify_revoked(leaf1, [root, device], [root_crl, crl_der])
    released = ok(run("--json", "release", "--ca", "device", s2)).json()
    assert released["status"] == "issued"
    delta = ok(run("--json", "crl", "generate", "--ca", "device", "--delta")).json()[0]
    assert delta["kind"] == "delta" and delta["number"] > full["number"]
    _, delta_der = latest_crl(settings, "device", delta=True)
    pkilint_crl(delta_der, delta=True)
    openssl_crl_verify(delta_der, device)
    parsed = x509.load_der_x509_crl(delta_der)
    indicator = parsed.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
    assert indicator.crl_number == full["number"]
    # The released hold appears as removeFromCRL in the delta (RFC 5280 5.3.1).
    entry = parsed.get_revoked_certificate_by_serial_number(int(s2, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.remove_from_crl
    )
    text = ok(run("crl", "generate", "--ca", "admin", "--ca", "device")).out
    assert re.search(r"^admin\s+full\s+#\d+ entries=0", text, re.M), text
    assert re.search(r"^device\s+full\s+#\d+ entries=1", text, re.M), text


def test_unknown_serial_exits_66(run: Runner) -> None:
    for argv in (
        ["revoke", "--ca", "admin", "0x1234abcd"],
        ["release", "--ca", "admin", "1234abcd"],
        ["cert", "show", "--ca", "admin", "12:34:ab:cd"],
    ):
        result = run(*argv)
        assert result.code == 66, (argv, result)
        assert "1234abcd" in result.err.replace(":", "")


def test_crl_generate_refuses_a_ca_that_expires_within_the_hour(
    run: Runner, settings: Settings
) -> None:
    services = build_services(settings, migrate=False)
    try:
        create_issuing(
            services.ca, "brief", "root", "Example Corp", KeyType.EC_P256, TEST_ACTOR,
            validity=dt.timedelta(minutes=30),
        )  # fmt: skip
    finally:
        services.close()
    refused = run("crl", "generate", "--ca", "brief")
    assert refused.code == 75 and "CA brief expires at" in refused.err, refused
    # Every other CA still gets its CRL; the one that cannot is named, not fatal.
    result = ok(run("--json", "crl", "generate"))
    assert [d["ca"] for d in result.json()] == [
        "root",
        "root",
        "admin",
        "admin",
        "device",
        "device",
    ]
    assert "skipped: the certificate of CA brief expires at" in result.err, result
    _, crl_der = latest_crl(settings, "device")
    pkilint_crl(crl_der)
    openssl_crl_verify(crl_der, ca_der(run, "device"))


def test_key_block_revokes_the_keys_certificates_and_refuses_it_from_then_on(
    run: Runner, tmp_path: Path
) -> None:
    """`key block FILE` (a certificate here; a CSR or a public key, PEM or DER, alike):
    every certificate with that key revoked for key_compromise, the key listed by `key list`,
    and an issuance from a CSR with the key refused (exit 65, rule blocked-key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    csr_file = tmp_path / "kb.csr"
    csr_file.write_bytes(make_csr(name(CN="kb.example.com"), key=key))
    issue = ["--json", "issue", "--ca", "device", "--profile", "device", "--csr", str(csr_file),
             "--subject", "CN=kb.example.com", "--san", "dns:kb.example.com"]  # fmt: skip
    serials = [ok(run(*issue)).json()["serial"] for _ in range(2)]
    other = _issue_device(run, "kb-other.example.com")
    assert ok(run("key", "list")).out.strip() == "no blocked keys"
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_der = tmp_path / "kb.pub.der"
    public_der.write_bytes(spki)

    private = tmp_path / "kb.key"
    private.write_bytes(key_pem)
    refused = run("key", "block", str(private))
    assert refused.code == 65 and "private key" in refused.err and refused.out == ""
    private_der = tmp_path / "kb.key.der"  # a private key in DER is named as one too
    private_der.write_bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    refused = run("key", "block", str(private_der))
    assert refused.code == 65 and "this is a private key" in refused.err
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    behind = tmp_path / "behind.pem"  # a private key after the public one: not overlooked
    behind.write_bytes(public_pem + key_pem)
    refused = run("key", "block", str(behind))
    assert refused.code == 65 and "this is a private key" in refused.err
    two = tmp_path / "two.pem"
    two.write_bytes(public_pem + csr_file.read_bytes())
    refused = run("key", "block", str(two))
    assert refused.code == 65 and "the file holds 2 PEM blocks" in refused.err
    (tmp_path / "empty").write_bytes(b"")
    assert run("key", "block", str(tmp_path / "empty")).code == 65
    assert run("key", "block", str(tmp_path / "missing.pem")).code == 66
    assert run("key", "block", str(public_der), "--comment", "x" * 501).code == 65
    shown_pem = ok(run("cert", "show", "--ca", "device", serials[0], "--pem")).out.encode()
    cert_der = der_of_pem(shown_pem)
    assert cert_der.count(b"\xa0\x03\x02\x01\x02") == 1
    bad_version = tmp_path / "v6.der"  # x509.InvalidVersion is no ValueError: it was exit 70
    bad_version.write_bytes(cert_der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05"))
    refused = run("key", "block", str(bad_version))
    assert refused.code == 65 and "no certificate, CSR or public key can be" in refused.err

    doc = ok(run("--json", "key", "block", str(public_der), "--comment", "ticket 7")).json()
    digest = hashlib.sha256(spki).hexdigest()
    assert doc["spki_sha256"] == digest and doc["newly_blocked"] is True
    assert sorted(r["serial"] for r in doc["revoked"]) == sorted(serials)
    for serial in serials:
        shown_doc = ok(run("--json", "cert", "show", "--ca", "device", serial)).json()
        assert (shown_doc["status"], shown_doc["reason"]) == ("revoked", "key_compromise")
    assert ok(run("--json", "cert", "show", "--ca", "device", other)).json()["status"] == "issued"
    again = ok(run("key", "block", str(csr_file)))
    assert f"key {digest} was blocked already" in again.out
    listed = ok(run("--json", "key", "list")).json()
    assert [(k["spki_sha256"], k["comment"], k["serial"]) for k in listed] == [
        (digest, "ticket 7", None)
    ]
    blocked = run(*issue)
    assert blocked.code == 65 and "blocked-key" in blocked.err, blocked


def test_revoke_for_key_compromise_says_what_else_it_revoked(run: Runner, tmp_path: Path) -> None:
    """`revoke --reason key_compromise` blocks the key and revokes its other certificates;
    the command names them (text and JSON)."""
    serials: dict[str, list[str]] = {}
    for name_ in ("text", "json"):
        csr = tmp_path / f"{name_}.csr"
        csr.write_bytes(make_csr(name(CN=f"{name_}.example.com")))
        serials[name_] = [
            ok(run("--json", "issue", "--ca", "device", "--profile", profile, "--csr", str(csr),
                   "--subject", f"CN={name_}.example.com", "--san",
                   f"dns:{name_}.example.com")).json()["serial"]
            for profile in ("device", "device", "tls-server")
        ]  # fmt: skip
    first, *others = serials["text"]
    text = ok(run("revoke", "--ca", "device", first, "--reason", "key_compromise")).out
    assert text.splitlines()[0] == f"revoked {first} (key_compromise)"
    assert "blocked its key" in text and "revoked 2 other certificate(s) of the key" in text
    assert all(f"  device {other}" in text for other in others)
    assert run("revoke", "--ca", "device", others[0], "--reason", "superseded").code == 75
    first, *others = serials["json"]
    doc = ok(run("--json", "revoke", "--ca", "device", first, "--reason", "key_compromise")).json()
    assert doc["key_blocked"] is True and doc["reason"] == "key_compromise"
    assert sorted(d["serial"] for d in doc["also_revoked"]) == sorted(others)
    plain = ok(run("--json", "revoke", "--ca", "device", _issue_device(run, "p.example.com")))
    assert (plain.json()["key_blocked"], plain.json()["also_revoked"]) == (False, [])


def test_revoke_with_a_future_invalidity_date_exits_65(run: Runner) -> None:
    serial = _issue_device(run, "future.example.com")
    result = run("revoke", "--ca", "device", serial, "--invalidity-date", "2999-01-01")
    assert result.code == 65 and "future" in result.err
    assert run("revoke", "--ca", "device", serial, "--reason", "because").code == 65


def test_revoke_refuses_an_invalidity_date_before_1950(run: Runner, settings: Settings) -> None:
    serial = _issue_device(run, "past.example.com")
    for absurd in ("0001-01-01", "1949-12-31T23:59:59"):
        result = run("revoke", "--ca", "device", serial, "--invalidity-date", absurd)
        assert result.code == 65, result
        assert "lies before 1950-01-01" in result.err and result.err.count("\n") == 1
    assert ok(run("--json", "cert", "show", "--ca", "device", serial)).json()["status"] == "issued"
    # The earliest accepted date: before the certificate existed (the key may have leaked first).
    ok(run("revoke", "--ca", "device", serial, "--reason", "key_compromise",
           "--invalidity-date", "1950-01-01"))  # fmt: skip
    ok(run("crl", "generate", "--ca", "device"))
    _, crl_der = latest_crl(settings, "device")
    entry = x509.load_der_x509_crl(crl_der).get_revoked_certificate_by_serial_number(
        int(serial, 16)
    )
    assert entry is not None
    invalidity = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert invalidity.invalidity_date_utc == dt.datetime(1950, 1, 1, tzinfo=dt.UTC)
    pkilint_crl(crl_der)


def test_cert_list_filters(run: Runner) -> None:
    # What init issued: the issuing CAs' own certificates (profile sub-ca, issued by the root)
    # and one delegated OCSP responder per issuing CA.
    initial = ok(run("--json", "cert", "list")).json()
    sub_cas = [d["serial"] for d in initial if d["profile"] == "sub-ca"]
    responders = {d["ca"]: d["serial"] for d in initial if d["profile"] == "ocsp-signer"}
    assert len(sub_cas) == 2 and len(initial) == 4 and set(responders) == {"admin", "device"}
    listed = ok(run("cert", "list", "--ca", "device")).out.splitlines()
    assert len(listed) == 1 and responders["device"] in listed[0]
    short = _issue_device(run, "short.example.com", "--days", "10")
    long = _issue_device(run, "long.example.com", "--days", "300")
    revoked = _issue_device(run, "gone.example.com")
    ok(run("revoke", "--ca", "device", revoked))
    csr_serial = ok(run("--json", "issue", "--ca", "admin", "--profile", "admin-client",
                        "--keygen", "ec-p256", "--subject", "CN=Dan,O=T",
                        "--san", "email:dan@example.com",
                        *_key_out())).json()["serial"]  # fmt: skip

    def serials(*argv: str) -> list[str]:
        return [d["serial"] for d in ok(run("--json", "cert", "list", *argv)).json()]

    def issued_here(found: list[str]) -> list[str]:
        return [s for s in found if s not in responders.values()]

    initial_serials = [d["serial"] for d in initial]
    assert serials() == [csr_serial, revoked, long, short, *initial_serials]  # newest first
    assert serials("--status", "revoked") == [revoked]
    assert set(serials("--status", "issued")) == {short, long, csr_serial, *initial_serials}
    assert serials("--ca", "root") == sub_cas
    assert issued_here(serials("--ca", "admin")) == [csr_serial]
    assert issued_here(serials("--ca", "device", "--status", "issued")) == [long, short]
    # The responders live 30 days at most: within the 400-day window, maybe in the 30-day one.
    assert issued_here(serials("--expiring-within", "30")) == [short]
    assert set(serials("--expiring-within", "400")) == {
        short, long, revoked, csr_serial, *responders.values()
    }  # fmt: skip
    assert serials("--limit", "1") == [csr_serial]
    assert run("--json", "cert", "list", "--ca", "nope").code == 66  # not "none"
    text = ok(run("cert", "list", "--status", "revoked")).out
    assert re.search(rf"^device\s+{revoked}\s+revoked\s+\d{{4}}-\d\d-\d\d CN=gone", text, re.M)


def test_json_output_of_every_read_command_parses(run: Runner, tmp_path: Path) -> None:
    serial = _issue_device(run, "j.example.com")
    for argv in (
        ["ca", "list"], ["ca", "show", "root"], ["cert", "list"],
        ["cert", "show", "--ca", "device", serial], ["crl", "generate"],
        ["crl", "generate", "--delta"], ["revoke", "--ca", "device", serial],
        ["ca", "export", "root", "-o", str(tmp_path / "r.pem")],
    ):  # fmt: skip
        doc = ok(run("--json", *argv)).json()
        assert isinstance(doc, dict | list) and doc, argv


def test_json_is_one_document_from_commands_that_print_pem_or_write_files(
    run: Runner, tmp_path: Path
) -> None:
    """--json used to be ignored by these: PEM (or nothing) on stdout, a count on stderr; an
    issued certificate without --out went nowhere at all."""
    serial = _issue_device(run, "pem.example.com")

    def one_document(*argv: str) -> dict[str, Any]:
        result = ok(run("--json", *argv))
        assert result.out.count("\n") == 1 and result.err == "", (argv, result)
        doc = result.json()
        assert isinstance(doc, dict), argv
        return doc

    exported = one_document("ca", "export", "admin")
    assert exported["ca"] == "admin"
    assert der_of_pem(exported["certificate_pem"].encode()) == ca_der(run, "admin")
    shown = one_document("cert", "show", "--ca", "device", serial, "--pem")
    assert shown["serial"] == serial and shown["status"] == "issued"
    cert = x509.load_pem_x509_certificate(shown["certificate_pem"].encode())
    assert f"{cert.serial_number:040x}" == serial
    issued = one_document("issue", "--ca", "device", "--profile", "device", "--keygen",
                          "ec-p256", "--subject", "CN=nowhere.example.com", "--san",
                          "dns:nowhere.example.com", *_key_out())  # fmt: skip
    cert = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    assert f"{cert.serial_number:040x}" == issued["serial"]
    key = one_document("audit", "public-key")
    serialization.load_pem_public_key(key["public_key_pem"].encode())
    key_file = tmp_path / "audit-key.pem"
    assert one_document("audit", "public-key", "-o", str(key_file)) == {
        "public_key_file": str(key_file)
    }
    assert key_file.read_text() == key["public_key_pem"]
    journal = tmp_path / "journal.csv"
    doc = one_document("audit", "export", "--format", "csv", "-o", str(journal))
    assert doc == {"file": str(journal), "format": "csv", "records": doc["records"]}
    assert doc["records"] == len(journal.read_text().splitlines()) - 1 > 0  # a header line
    checkpoints = tmp_path / "cp.jsonl"
    doc = one_document("audit", "checkpoints", "export", "-o", str(checkpoints))
    assert doc == {
        "file": str(checkpoints),
        "checkpoints": len(checkpoints.read_text().splitlines()),
    }
    # Without a file, the records are the export itself: --json has nothing to describe.
    for argv in (["audit", "export"], ["audit", "checkpoints", "export"]):
        refused = run("--json", *argv)
        assert refused.code == 64 and "--output" in refused.err and refused.out == "", refused
    # Without --json, unchanged: the PEM itself on stdout.
    assert ok(run("ca", "export", "admin")).out == exported["certificate_pem"]
    assert ok(run("audit", "public-key")).out == key["public_key_pem"]


def test_wrong_key_passphrase_exits_77(run: Runner, data_dir: Path) -> None:
    secret = data_dir / "secrets" / "ca-passphrase"
    secret.write_text("an-entirely-different-passphrase\n")
    result = run("crl", "generate", "--ca", "admin")
    assert result.code == 77, result
    assert "error: wrong-passphrase:" in result.err
    assert "an-entirely-different-passphrase" not in result.err
    # Which key, and which passphrase to check: not only "wrong passphrase".
    named = f"cannot decrypt key file '{data_dir / 'keys'}/"  # (the audit key, read first)
    assert named in result.err and f"the file '{secret}'" in result.err, result.err


def test_passphrase_file_readable_by_others_exits_78(run: Runner, data_dir: Path) -> None:
    (data_dir / "secrets" / "ca-passphrase").chmod(0o644)
    result = run("ca", "list")
    assert result.code == 78 and "chmod 600" in result.err


def test_ocsp_responders_and_resign(run: Runner) -> None:
    listed = ok(run("--json", "ocsp", "responders")).json()
    assert listed["changes"] == []  # init provisioned them: nothing due
    active = {d["ca"]: d["serial"] for d in listed["responders"] if d["active"]}
    assert set(active) == {"admin", "device"}
    rotated = ok(run("--json", "ocsp", "responders", "--rotate")).json()
    assert sorted((c["ca"], c["action"]) for c in rotated["changes"]) == [
        ("admin", "rotate"),
        ("device", "rotate"),
    ]
    now_active = {d["ca"]: d["serial"] for d in rotated["responders"] if d["active"]}
    assert set(now_active) == set(active) and not set(now_active.values()) & set(active.values())
    assert len(rotated["responders"]) == 4  # the old ones stay listed, inactive
    text = ok(run("ocsp", "responders")).out
    assert re.search(rf"^admin\s+{now_active['admin']} active", text, re.M)

    _issue_device(run, "ocsp.example.com")
    counts = ok(run("--json", "ocsp", "resign")).json()
    # the device leaf + four responder certificates (two per CA, under their CA)
    assert counts == {
        "good": 5,
        "revoked": 0,
        "unknown": 0,
        "responder_changes": [],  # all in order: nothing replaced
        "responder_failures": {},
        "not_resigned": {},
        "withheld_revoked_cas": [],
    }
    assert "re-signed 5 responses" in ok(run("ocsp", "resign")).out

    def journal(action: str) -> list[dict[str, Any]]:
        out = ok(run("--json", "audit", "search", "--action", action)).out
        return jsonl(out)

    found = journal("ocsp.resign")
    assert len(found) == 2 and all(r["actor_account"].startswith("cli:") for r in found)
    assert len(journal("ocsp.signer.rotate")) == 2


def _clock_ahead(monkeypatch: pytest.MonkeyPatch, days: int) -> None:
    """Every command's clock ``days`` ahead of the wall clock (services built from now on)."""
    import sekisho.services

    real = sekisho.services.utcnow
    monkeypatch.setattr(sekisho.services, "utcnow", lambda: real() + dt.timedelta(days=days))


def test_ocsp_resign_after_a_long_stop_replaces_the_expired_responders_first(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing ran for 35 days: every responder certificate (30 days) has expired, and no
    answer could be signed with them. The command makes new ones, then re-signs."""
    _clock_ahead(monkeypatch, 35)
    done = ok(run("--json", "ocsp", "resign")).json()
    assert sorted((c["ca"], c["action"]) for c in done["responder_changes"]) == [
        ("admin", "rotate"),
        ("device", "rotate"),
    ]
    # every responder certificate, the expired ones and their successors
    assert (done["good"], done["revoked"], done["not_resigned"]) == (4, 0, {})
    listed = ok(run("--json", "ocsp", "responders")).json()
    assert listed["changes"] == []


def test_ocsp_resign_fails_for_a_ca_whose_answers_it_could_not_sign(
    run: Runner, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device CA's key is away while its responder has expired: no successor can be made,
    nothing can be signed for that CA. The admin CA's answers are re-signed all the same; the
    command says which CA was left and why, journals a failure, and exits with the cause."""
    _clock_ahead(monkeypatch, 35)
    key = data_dir / "keys" / "ca-device.key"
    away = data_dir / "ca-device.key.away"
    key.rename(away)
    result = run("--json", "ocsp", "resign")
    assert result.code == 69, result
    done = result.json()
    assert [(c["ca"], c["action"]) for c in done["responder_changes"]] == [("admin", "rotate")]
    assert set(done["responder_failures"]) == {"device"}
    assert set(done["not_resigned"]) == {"device"}
    assert "expired at" in done["not_resigned"]["device"]
    assert done["good"] == 2  # the admin CA's old and new responder certificates
    assert "error: key-backend:" in result.err and "ca-device" in result.err
    text = run("ocsp", "resign")
    assert text.code == 69 and "not re-signed: CA device:" in text.out
    away.rename(key)
    done = ok(run("--json", "ocsp", "resign")).json()
    assert [(c["ca"], c["action"]) for c in done["responder_changes"]] == [("device", "rotate")]
    assert done["not_resigned"] == {}
    out = ok(run("--json", "audit", "search", "--action", "ocsp.resign")).out
    outcomes = [r["outcome"] for r in jsonl(out)]
    assert outcomes == ["failure", "failure", "success"]


def test_the_journalled_actor_is_the_real_user_not_user_variables(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pwd

    from sekisho.cli import cli_account

    me = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("USER", "the-auditor")
    monkeypatch.setenv("SUDO_USER", "the-auditor")
    ok(run("crl", "generate", "--ca", "admin"))
    out = ok(run("--json", "audit", "search", "--action", "ca.crl")).out
    actors = {r["actor_account"] for r in jsonl(out)}
    expected = f"cli:{me}" + (" sudo:the-auditor" if os.getuid() == 0 else "")
    assert expected in actors and "cli:the-auditor" not in actors, actors
    nobody = pwd.getpwnam("nobody").pw_uid  # not root: SUDO_USER and USER are not read
    assert cli_account(nobody, {"SUDO_USER": "alice", "USER": "bob"}) == "cli:nobody"
    assert cli_account(0, {"SUDO_USER": "alice"}) == "cli:root sudo:alice"
    assert cli_account(0, {}) == "cli:root"
    assert cli_account(2**31 - 7, {}) == f"cli:uid {2**31 - 7}"


def test_ocsp_resign_leaves_a_ca_its_parent_revoked_or_holds_without_failing(
    run: Runner,
) -> None:
    """Its answers are withheld by design: named, journalled, not a failure (it was exit 69
    at every run after a routine hold or revocation of an issuing CA)."""
    admin = f"{x509.load_der_x509_certificate(ca_der(run, 'admin')).serial_number:x}"
    ok(run("revoke", "--ca", "root", admin, "--reason", "certificate_hold"))
    done = ok(run("--json", "ocsp", "resign")).json()
    assert done["withheld_revoked_cas"] == ["admin"] and done["not_resigned"] == {}
    assert done["good"] >= 1  # the device CA's answers
    assert "withheld: CA admin" in ok(run("ocsp", "resign")).out
    out = ok(run("--json", "audit", "search", "--action", "ocsp.resign")).out
    records = jsonl(out)
    assert {r["outcome"] for r in records} == {"success"}
    assert all(r["detail"]["withheld_revoked_cas"] == ["admin"] for r in records)


def test_ocsp_commands_have_help(run: Runner) -> None:
    for argv in (("ocsp",), ("ocsp", "serve"), ("ocsp", "export"), ("ocsp", "responders"),
                 ("ocsp", "resign")):  # fmt: skip
        result = ok(run(*argv, "--help"))
        assert "Usage:" in result.out


def test_python_dash_m_sekisho_is_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sekisho", "--help"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "issue" in done.stdout, done.stderr


# -- hostile command lines (found by fuzzing the CLI) -----------------------------------------
def _issued_count(run: Runner, ca: str) -> int:
    return len(ok(run("--json", "cert", "list", "--ca", ca, "--limit", "1000")).json())


def test_refusals_come_before_anything_is_issued_or_created(run: Runner, tmp_path: Path) -> None:
    """Each of these used to issue a certificate (then crash or drop the key), leave keys
    behind, or end in a traceback."""
    base = ["issue", "--ca", "device", "--profile", "tls-server", "--keygen", "ec-p256",
            "--subject", "CN=portal9.example.com", "--san", "dns:portal9.example.com"]  # fmt: skip
    before = _issued_count(run, "device")
    assert run(*base).code == 64  # the key would go nowhere
    assert run(*base[:-4], "--subject", " ", "--key-out", str(tmp_path / "k")).code == 64
    assert run(*[a if a != "tls-server" else "sub-ca" for a in base], "--key-out", "x").code == 64
    # A responder key written to a file would sign answers nobody can revoke (ocsp-nocheck).
    responder = [a if a != "tls-server" else "ocsp-signer" for a in base]
    refused = run(*responder, "--key-out", str(tmp_path / "o.key"))
    assert refused.code == 64 and "ocsp responders" in refused.err
    assert not (tmp_path / "o.key").exists()
    csr = tmp_path / "o.csr"
    csr.write_bytes(make_csr(name(CN="o1")))
    refused = run("issue", "--ca", "device", "--profile", "ocsp-signer", "--csr", str(csr))
    assert refused.code == 64
    binary = tmp_path / "binary-pw"
    binary.write_bytes(b"\xff\xfe" * 10)
    binary.chmod(0o600)
    refused = run(*base, "--p12", str(tmp_path / "b.p12"), "--password-file", str(binary))
    assert refused.code == 65 and "UTF-8" in refused.err
    zone = run(*base[:-1], "ip:fe80::1%eth0", "--key-out", str(tmp_path / "z"))
    assert zone.code == 65 and "zone" in zone.err
    garbage = run(*base[:-3], "garbage", *base[-2:], "--key-out", str(tmp_path / "g"))
    assert garbage.code == 65 and "not an RFC 4514 name" in garbage.err, garbage  # it said ''
    assert "CN=Alice Admin" in garbage.err
    assert _issued_count(run, "device") == before
    assert not list(tmp_path.glob("*.p12")) and not (tmp_path / "z").exists()
    # Odd spellings of an IP address are written as the certificate carries them.
    doc = ok(run("--json", *base[:-1], "ip:FE80::0:1", "--key-out", str(tmp_path / "ok"))).json()
    assert _issued_count(run, "device") == before + 1 and doc["serial"]
    # Not UTF-8 in an argument: a usage error, not a traceback (or a half-written row).
    assert main(["--data-dir", str(tmp_path), "ca", "show", "\udcff"]) == 64
    assert main(["--data-dir", "", "ca", "list"]) == 64


def test_owner_and_tenant_are_bounded_one_line_text(run: Runner, tmp_path: Path) -> None:
    """--owner and --tenant went to the store unchecked: over their columns' 128 characters
    PostgreSQL refused the row (exit 74, "StringDataRightTruncation") and SQLite kept 100,000
    characters; a terminal escape or a bidi override was stored and printed by `cert show`.
    Both are refused (65) before any certificate exists, on either store."""
    base = ["issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
            "--subject", "CN=o", "--san", "dns:o.example"]  # fmt: skip
    before = _issued_count(run, "device")
    cases = [
        ("--tenant", "t" * 129),
        ("--owner", "o" * 129),
        ("--owner", "bob\x1b[31m"),
        ("--tenant", "acme\u202egpj.exe"),
        ("--tenant", "two\nlines"),
        ("--owner", ""),
    ]
    for n, (option, value) in enumerate(cases):
        key = tmp_path / f"k{n}.pem"
        refused = run(*base, "--key-out", str(key), option, value)
        assert refused.code == 65 and option[2:] in refused.err and refused.out == "", refused
        assert "\x1b" not in refused.err and "\u202e" not in refused.err
        assert not key.exists()
    assert _issued_count(run, "device") == before
    fine = ["--owner", "o" * 128, "--tenant", "テナント 1"]
    doc = ok(run("--json", *base, "--key-out", str(tmp_path / "ok.pem"), *fine)).json()
    stored = ok(run("--json", "cert", "show", "--ca", "device", doc["serial"])).json()
    assert stored["owner"] == "o" * 128 and stored["tenant"] == "テナント 1"


def test_cert_list_of_an_unknown_ca_is_not_found(run: Runner) -> None:
    """A mistyped --ca (a cron job's `cert list --ca admn --expiring-within 30`) listed "no
    certificates" and exited 0, as for a CA with none expiring: an unknown CA is 66, as in
    `cert show` and `cert check`."""
    for args in (["cert", "list", "--ca", "admn"], ["--json", "cert", "list", "--ca", "admn"]):
        refused = run(*args)
        assert refused.code == 66 and "admn" in refused.err and refused.out == "", refused
    assert ok(run("--json", "cert", "list", "--ca", "admin")).json()


def test_init_refuses_a_bad_organization_before_creating_any_key(tmp_path: Path) -> None:
    for org in ("", "x" * 100):
        data = tmp_path / f"d{len(org)}"
        assert main(["--data-dir", str(data), "init", "--org", org]) == 65
        assert not (data / "keys").exists() or not list((data / "keys").iterdir())
    again = tmp_path / "d0"
    assert main(["--data-dir", str(again), "init", "--org", "Fine Corp"]) == 0
    # A value no certificate may carry (a control or bidirectional character) was only
    # refused by the issuing CAs' rules, after the root was made with it: an init that could
    # never be finished (a resumed init keeps the first plan's organization).
    for n, org in enumerate(("Evil\x1b[31m Corp", "Trojan\u202e Corp", "Tab\tCorp")):
        data = tmp_path / f"c{n}"
        assert main(["--data-dir", str(data), "init", "--org", org]) == 65
        assert not data.exists()
        assert main(["--data-dir", str(data), "init", "--org", "Fine Corp"]) == 0


def test_inputs_that_are_not_regular_files_are_refused_unread(run: Runner, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source in (Path("/dev/zero"), fifo):  # a FIFO with no writer used to hang forever
        result = run("issue", "--ca", "device", "--profile", "device", "--csr", str(source))
        assert result.code == 65 and "not a regular file" in result.err
        result = run("ca", "online", "root", "--key-file", str(source))
        assert result.code == 65 and "not a regular file" in result.err


def test_a_revoked_ca_issues_nothing_until_released(run: Runner, tmp_path: Path) -> None:
    admin_serial = f"{x509.load_der_x509_certificate(ca_der(run, 'admin')).serial_number:x}"
    request = ["issue", "--ca", "admin", "--profile", "admin-client", "--keygen", "ec-p256",
               "--subject", "CN=Dana,O=Tenant One,UID=dana", "--san",
               "email:dana@tenant1.example.com"]  # fmt: skip
    before = _issued_count(run, "admin")
    ok(run("revoke", "--ca", "root", admin_serial, "--reason", "certificate_hold"))
    refused = run(*request, "--key-out", str(tmp_path / "held.key"))
    assert refused.code == 75 and "revoked" in refused.err
    assert not (tmp_path / "held.key").exists() and _issued_count(run, "admin") == before
    ok(run("release", "--ca", "root", admin_serial))
    ok(run(*request, "--key-out", str(tmp_path / "released.key")))
    assert _issued_count(run, "admin") == before + 1


def test_errors_quote_long_or_hostile_values_short_and_escaped(run: Runner, tmp_path: Path) -> None:
    """A mistyped 10,000-character value is quoted by its first 80 characters and its length;
    a value carrying a line break or a terminal escape cannot forge an error line."""
    forged = "x\nerror: ok: all good\x1b[2J\u202e"
    long = "q" * 10_000
    keygen = ["issue", "--ca", "device", "--profile", "device", "--keygen", "ec-p256",
              "--key-out", str(tmp_path / "k.pem")]  # fmt: skip
    cases = [
        (["ca", "show", forged + long], 66),
        (["ca", "show", long], 66),
        (["crl", "generate", "--ca", forged], 66),
        ([*keygen, "--subject", "not a dn " + long, "--san", "dns:a.example.com"], 65),
        ([*keygen, "--subject", "CN=a.example.com", "--san", "dns:" + long], 65),
        ([*keygen, "--subject", "CN=a.example.com", "--san", "dns:" + forged], 65),
        ([*keygen[:4], forged + long, *keygen[5:], "--subject", "CN=a"], 66),
        (["revoke", "--ca", "device", "1234", "--reason", forged + long], 65),
        (["revoke", "--ca", "device", "zz" + long], 64),
    ]
    for argv, code in cases:
        result = run(*argv)
        assert result.code == code, (argv[:4], result)
        last = result.err.splitlines()[-1]  # click puts "Usage:" lines before a usage error
        assert last.lower().startswith("error"), result.err
        assert len(last) < 500, last
        assert "\x1b" not in result.err and "\u202e" not in result.err, result.err
        assert not any(line.startswith("error: ok") for line in result.err.splitlines())
        if long in "".join(argv):
            assert re.search(r"'\.\.\. \(100\d\d characters\)", last), last
        else:
            assert "\\n" in last and "\\x1b" in last, last
    assert not (tmp_path / "k.pem").exists()


def test_ca_show_and_list_say_when_the_parent_revoked_or_held_the_ca(
    run: Runner, tmp_path: Path
) -> None:
    admin_serial = f"{x509.load_der_x509_certificate(ca_der(run, 'admin')).serial_number:x}"

    def status() -> tuple[dict[str, Any], str, str]:
        """ca show --json (the same in ca list --json), ca show's status line, ca list's row."""
        shown = ok(run("--json", "ca", "show", "admin")).json()
        listed = {d["name"]: d for d in ok(run("--json", "ca", "list")).json()}
        assert listed["admin"] == shown and listed["root"]["status"] == "good"
        line = re.search(r"^status\s+(.*)$", ok(run("ca", "show", "admin")).out, re.M)
        row = re.search(r"^admin\s.*$", ok(run("ca", "list")).out, re.M)
        assert line is not None and row is not None
        return shown, line.group(1), row.group(0)

    doc, text, row = status()
    assert (doc["status"], doc["revocation"], text) == ("good", None, "good")
    assert re.match(r"admin\s+issuing\s+ec-p256\s+online\s+good\s+CN=", row), row

    ok(run("revoke", "--ca", "root", admin_serial, "--reason", "certificate_hold"))
    doc, text, row = status()
    assert doc["status"] == "on_hold" and doc["revocation"]["reason"] == "certificate_hold"
    held_at = dt.datetime.fromisoformat(doc["revocation"]["revoked_at"])
    assert text == f"on hold (since {held_at.isoformat()})"
    assert re.match(r"admin\s+issuing\s+ec-p256\s+online\s+on_hold\s+CN=", row), row
    held = run("issue", "--ca", "admin", "--profile", "admin-client", "--keygen", "ec-p256",
               "--subject", "O=T,CN=Held Admin", "--san", "email:held@example.com",
               "--key-out", str(tmp_path / "held.key"))  # fmt: skip
    assert held.code == 75 and "on hold" in held.err and "ca show" in held.err, held

    ok(run("revoke", "--ca", "root", admin_serial, "--reason", "key_compromise",
           "--invalidity-date", "2024-05-06"))  # fmt: skip
    doc, text, row = status()
    revocation = doc["revocation"]
    assert doc["status"] == "revoked" and revocation["reason"] == "key_compromise"
    assert dt.datetime.fromisoformat(revocation["invalidity_date"]) == dt.datetime(
        2024, 5, 6, tzinfo=dt.UTC
    )
    assert text == (
        f"revoked (key_compromise, {revocation['revoked_at']}, key invalid since "
        f"{revocation['invalidity_date']})"
    )
    assert re.match(r"admin\s+issuing\s+ec-p256\s+online\s+revoked\s+CN=", row), row


# -- data directories that hold no deployment -------------------------------------------------
# Every command but `init` and `run` (first run): nothing may be created.
NOT_CREATING = [
    ["cert", "list"],
    ["ca", "list"],
    ["ca", "show", "admin"],
    ["audit", "verify"],
    ["audit", "search"],
    ["audit", "checkpoint"],
    ["crl", "generate"],
    ["revoke", "--ca", "admin", "0x1"],
    ["ocsp", "responders"],
    ["ocsp", "export", "{tmp}/exported"],
    ["serve", "--host", "256.0.0.1"],  # (an address it cannot listen on, should it go ahead)
]


@pytest.mark.parametrize("argv", NOT_CREATING, ids=lambda argv: " ".join(argv[:2]))
def test_a_mistyped_data_directory_is_not_made_into_an_empty_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`--data-dir ./vra` (for ./var) used to create ./vra, a database and a passphrase, then
    list nothing: the operator read "no certificates". Now one line, exit 78, nothing made."""
    typo = tmp_path / "vra"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    for where, why in ((typo, "no such directory"), (empty, "no database")):
        result = _runner(capsys, where)(*argv)
        assert result.code == 78, result
        assert result.err.count("\n") == 1, result.err
        assert f"no Sekisho deployment in {where} ({why}" in result.err, result.err
        assert "run `sekisho init`" in result.err
    assert not typo.exists()
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "exported").exists()


@pytest.mark.postgres
def test_an_empty_postgresql_database_is_not_made_into_a_deployment(
    pg_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings naming a database nobody initialised: commands used to migrate it (tables
    made) and list nothing."""
    from sqlalchemy import create_engine, inspect

    name = f"empty_{os.getpid()}"
    url = pg_cluster.create_database(name)
    try:
        data = tmp_path / "d"
        data.mkdir()
        (data / "sekisho.toml").write_text(f'[sekisho]\ndatabase_url = "{url}"\n')
        for argv in (["cert", "list"], ["crl", "generate"], ["ocsp", "responders"]):
            result = _runner(capsys, data)(*argv)
            assert result.code == 78, result
            assert "has no tables" in result.err and "sekisho init" in result.err, result.err
        engine = create_engine(url)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
    finally:
        pg_cluster.drop_database(name)


def test_python_dash_m_sekisho_cli_is_the_cli_too() -> None:
    """`python -m sekisho.cli` died on a circular import (sekisho.cli <-> audit.cli)."""
    for argv in (["--help"], ["audit", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "sekisho.cli", *argv],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Usage:" in done.stdout and "Traceback" not in done.stderr
    assert "verify" in done.stdout and "export" in done.stdout


# -- read-only data directories ---------------------------------------------------------------
# Read as the CLI sees them through a read-only bind mount in a private mount namespace: file
# modes do not stop root (the tests run as root in CI), a read-only mount does.
_RO_SCRIPT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _unshare() -> list[str]:
    return ["unshare", "--mount", *([] if os.geteuid() == 0 else ["--map-root-user"])]


@pytest.fixture(scope="module")
def read_only_mounts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips unless a read-only bind mount can be made here (and holds for this user)."""
    probe = tmp_path_factory.mktemp("ro-probe")
    try:
        done = subprocess.run(
            [*_unshare(), "sh", "-c", _RO_SCRIPT, "sh", str(probe), "touch", str(probe / "x")],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    except OSError as exc:
        pytest.skip(f"no unshare(1) to make a read-only mount: {exc}")
    if "Read-only file system" not in done.stderr or (probe / "x").exists():
        pytest.skip(
            "cannot make a read-only bind mount in a private mount namespace here "
            f"(unshare --mount needs root or user namespaces): {done.stderr.strip()}"
        )


def read_only(data: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`sekisho --data-dir DATA ARGV` in a child process that sees DATA read-only."""
    cli = [sys.executable, "-m", "sekisho", "--data-dir", str(data), *argv]
    done = subprocess.run(
        [*_unshare(), "sh", "-c", _RO_SCRIPT, "sh", str(data), *cli],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _copy(template_dir: Path, target: Path) -> Path:
    shutil.copytree(template_dir, target)
    return target


def _audit_public_key(data: Path, out: Path) -> Path:
    """What `audit public-key -o OUT` writes, taken with a writer that cleans up after itself
    (the CLI, a reader, would leave SQLite's -shm file behind)."""
    from tests.conftest import make_settings

    services = build_services(make_settings(data))
    try:
        assert services.journal.signer is not None
        der = services.journal.signer.public_key_der
    finally:
        services.close()
    key = serialization.load_der_public_key(der)
    out.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return out


@pytest.mark.usefixtures("read_only_mounts")
def test_read_commands_work_on_a_read_only_copy(template_dir: Path, tmp_path: Path) -> None:
    """An auditor's copy on a read-only mount: every reading command works (it was exit 78,
    "Read-only file system", from the chmod of the data directory, then from SQLite's WAL and
    the migrations); no -shm file there, so SQLite reads it as immutable, and says so."""
    copy = _copy(template_dir, tmp_path / "copy")
    key = _audit_public_key(copy, tmp_path / "audit-key.pem")
    checkpoints = tmp_path / "checkpoints.jsonl"
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("sekisho.db")) == [
        "sekisho.db", "sekisho.db-migrate.lock", "sekisho.db-writer",
    ]  # fmt: skip
    listed = read_only(copy, "--json", "cert", "list")
    assert listed.returncode == 0, listed.stderr
    assert "immutable" in listed.stderr and listed.stderr.count("\n") == 1
    certs = json.loads(listed.stdout)
    assert len(certs) >= 2
    first = certs[0]
    for argv in (
        ["audit", "verify"],
        ["audit", "verify", "--public-key", str(key)],
        ["ca", "list"],
        ["--json", "ca", "show", "admin"],
        ["cert", "show", "--ca", first["ca"], first["serial"]],
        ["--json", "audit", "search", "--limit", "5"],
        ["audit", "export", "--format", "csv", "-o", str(tmp_path / "journal.csv")],
        ["audit", "checkpoints", "export", "-o", str(checkpoints)],
        ["--json", "db", "status"],
    ):
        done = read_only(copy, *argv)
        assert done.returncode == 0, (argv, done.stderr)
    assert "journal intact" in read_only(copy, "audit", "verify").stdout
    verified = read_only(copy, "audit", "verify", "--checkpoints", str(checkpoints))
    assert verified.returncode == 0 and "journal intact" in verified.stdout, verified.stderr
    assert (tmp_path / "journal.csv").read_text().count("\n") > 5
    # A command that writes is refused, in one line.
    refused = read_only(copy, "crl", "generate")
    assert refused.returncode == 78 and "Read-only file system" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1


@pytest.mark.usefixtures("read_only_mounts")
def test_a_read_only_view_of_a_live_deployment_sees_what_its_writer_committed(
    template_dir: Path, tmp_path: Path
) -> None:
    """With a writer running (its -shm file there), SQLite opens the database read-only
    (``mode=ro``, not immutable) and reads what sits in the write-ahead log too."""
    from tests.ca.helpers import issue
    from tests.conftest import make_settings

    copy = _copy(template_dir, tmp_path / "live")
    services = build_services(make_settings(copy))
    try:
        cert = issue(services, "device")
        assert (copy / "sekisho.db-shm").exists() and (copy / "sekisho.db-wal").stat().st_size
        done = read_only(copy, "--json", "cert", "list", "--ca", "device")
        assert done.returncode == 0 and "immutable" not in done.stderr, done.stderr
        assert f"{cert.serial_number:040x}" in [c["serial"] for c in json.loads(done.stdout)]
        # The same files without the -shm (copied so, mid-write): refused, not read stale.
        partial = tmp_path / "partial"
        partial.mkdir()
        for name in ("sekisho.db", "sekisho.db-wal"):
            shutil.copy2(copy / name, partial / name)
        shutil.copytree(copy / "secrets", partial / "secrets")
    finally:
        services.close()
    done = read_only(partial, "cert", "list")
    assert done.returncode == 74, done.stderr
    assert "sekisho.db-wal holds changes" in done.stderr and done.stderr.count("\n") == 1


# Run in the read-only view: opens the database as immutable, reads, says so (file "opened"),
# waits for the test to write it through the read-write view (file "written"), reads again.
_IMMUTABLE_READER = """
import sys, time
from pathlib import Path
from sqlalchemy import text
from sekisho.db import Database
from sekisho.errors import StoreError
database, sync = Path(sys.argv[1]), Path(sys.argv[2])
db = Database(f"sqlite:///{database}", read_only=True)
count = "SELECT count(*) FROM audit_records"
with db.read_scope() as session:
    print("immutable", db.immutable, "records", session.execute(text(count)).scalar())
(sync / "opened").touch()
for _ in range(300):
    if (sync / "written").exists():
        break
    time.sleep(0.1)
try:
    with db.read_scope() as session:
        print("read again", session.execute(text(count)).scalar())
except StoreError as exc:
    print("refused:", exc.message)
"""


@pytest.mark.usefixtures("read_only_mounts")
def test_an_immutable_read_that_a_writer_overlaps_is_refused(
    template_dir: Path, tmp_path: Path
) -> None:
    """An immutable reader takes no lock and trusts its page cache: a writer that starts
    meanwhile (the service on the same directory, read-write for it) gave it torn reads, and
    `audit verify` reported "journal broken" on them. A read that a write overlapped is now
    refused (exit 74 from the command line) instead of being reported."""
    from tests.audit.conftest import event
    from tests.conftest import make_settings

    copy = _copy(template_dir, tmp_path / "copy")
    sync = tmp_path / "sync"
    sync.mkdir()
    reader = [sys.executable, "-c", _IMMUTABLE_READER, str(copy / "sekisho.db"), str(sync)]
    proc = subprocess.Popen(
        [*_unshare(), "sh", "-c", _RO_SCRIPT, "sh", str(copy), *reader],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(int(TIMEOUT / 0.1)):
            if (sync / "opened").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (sync / "opened").exists(), proc.communicate(timeout=TIMEOUT)
        services = build_services(make_settings(copy))  # the writer: the read-write view
        try:
            for n in range(20):
                with services.db.scope() as session:
                    services.journal.append(session, event(n), services.clock())
        finally:
            services.close()
        (sync / "written").touch()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "immutable True" in out, out
    assert "refused: the database" in out and "was written while it was read" in out, out


def _schema(data: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{data / 'sekisho.db'}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]


def _downgrade(url: str, revision: str) -> None:
    """The store at ``url`` taken back to ``revision`` (as an older version left it)."""
    from alembic import command

    from sekisho.db import Database, alembic_config

    db = Database(url)
    try:
        command.downgrade(alembic_config(db.engine), revision)
    finally:
        db.dispose()


def test_a_read_command_never_migrates_the_store(
    template_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store at an older schema was migrated by any reading command that could write it:
    `ca list` run as root changed the schema of another user's deployment (which commands
    that write refuse to touch), and a newer Sekisho run to read a store changed it under the
    older one serving it. Reading now refuses (exit 74) and changes nothing; a command that
    writes migrates."""
    from sekisho.db import head_revisions

    copy = _copy(template_dir, tmp_path / "older")
    _downgrade(f"sqlite:///{copy / 'sekisho.db'}", "0002")
    run = _runner(capsys, copy)
    for argv in (["ca", "list"], ["audit", "verify"], ["--json", "cert", "list"]):
        refused = run(*argv)
        assert refused.code == 74, (argv, refused)
        assert "a command that only reads does not migrate it" in refused.err, refused.err
        assert refused.err.count("\n") == 1, refused.err
        assert _schema(copy) == ["0002"]
    ok(run("crl", "generate"))  # a command that writes migrates it
    assert _schema(copy) == list(head_revisions())
    assert len(ok(run("--json", "ca", "list")).json()) == 3


def test_db_status_shows_what_db_upgrade_applies_and_the_journal_records_it(
    run: Runner, settings: Settings
) -> None:
    """`db status` (read-only) lists the migrations this version would apply; `db upgrade`
    applies them, says from and to, and journals system.migrate once; a store a newer version
    wrote is named as such by both (status exit 0, upgrade and every writer exit 74)."""
    from sekisho.db import Database, head_revisions

    heads = sorted(head_revisions())
    _downgrade(settings.db_url, "0008")
    status = ok(run("--json", "db", "status")).json()
    assert status["revisions"] == ["0008"] and status["heads"] == heads
    assert not status["current"] and status["known"] and status["problem"] is None
    checked = run("--json", "db", "status", "--check")  # for deployment scripts
    assert checked.code == 2 and json.loads(checked.out)["pending"] == status["pending"]
    assert "4 migrations pending: run `sekisho db upgrade`" in checked.err, checked
    assert [p["revision"] for p in status["pending"]] == ["0009", "0010", "0011", "0012"]
    assert all(p["description"] for p in status["pending"])
    text = ok(run("db", "status")).out
    assert "`sekisho db upgrade` would apply:" in text
    assert "  0010  PostgreSQL: a purged seq" in text
    assert ok(run("--json", "db", "status")).json()["revisions"] == ["0008"]  # read only

    done = ok(run("--json", "db", "upgrade")).json()
    assert done == {"migrated": True, "from": ["0008"], "to": heads}
    assert ok(run("--json", "db", "status")).json()["current"]
    assert "nothing to migrate" in ok(run("db", "status", "--check")).out
    again = ok(run("--json", "db", "upgrade")).json()
    assert again == {"migrated": False, "from": heads, "to": heads}
    out = ok(run("--json", "audit", "search", "--action", "system.migrate")).out
    found = jsonl(out)
    assert len(found) == 1, found
    assert found[0]["detail"]["from"] == ["0008"] and found[0]["detail"]["to"] == heads, found
    assert found[0]["category"] == "system" and found[0]["outcome"] == "success"
    assert found[0]["detail"]["process"].startswith(f"uid {os.getuid()} pid "), found
    assert "journal intact" in ok(run("audit", "verify")).out

    db = Database(settings.db_url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    finally:
        db.dispose()
    ahead = ok(run("--json", "db", "status")).json()
    assert ahead["known"] is False and ahead["current"] is False and ahead["pending"] == []
    assert "a newer version wrote it" in ok(run("db", "status")).out
    assert run("db", "status", "--check").code == 2
    for argv in (("db", "upgrade"), ("crl", "generate")):
        refused = run(*argv)
        assert refused.code == 74, (argv, refused)
        assert "which this version of Sekisho does not know" in refused.err, refused.err
        assert refused.err.count("\n") == 1, refused.err


@pytest.mark.parametrize(
    ("stamped", "named"),
    [
        ([], "alembic_version names no migration, yet the store has tables"),
        (["0005", "0009"], "alembic_version holds 0005, 0009, one of which follows the other"),
    ],
)
def test_damaged_migration_bookkeeping_is_named_and_nothing_is_migrated(
    run: Runner, settings: Settings, stamped: list[str], named: str
) -> None:
    """An ``alembic_version`` edited by hand or half restored: emptied on a store with tables
    (`db status` offered to apply 0001.. and `db upgrade` then failed on CREATE TABLE with a
    multi-line SQL error), or holding two revisions of the one line (called "written by a
    newer version"). Both are now named as damaged bookkeeping, and nothing is migrated."""
    from sqlalchemy import text

    from sekisho.db import Database

    db = Database(settings.db_url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM alembic_version")
            for revision in stamped:
                conn.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})
    finally:
        db.dispose()
    status = ok(run("--json", "db", "status")).json()
    assert status["known"] is False and status["pending"] == [], status
    assert named in status["problem"] and "restore a backup" in status["problem"], status
    assert named in ok(run("db", "status")).out
    for argv in (("db", "upgrade"), ("crl", "generate"), ("ca", "list")):
        refused = run(*argv)
        assert refused.code == 74, (argv, refused)
        assert named in refused.err and refused.err.count("\n") == 1, refused.err
    db = Database(settings.db_url)
    try:
        with db.engine.connect() as conn:
            left = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
            assert sorted(left) == stamped
    finally:
        db.dispose()


def test_a_migration_whose_command_then_fails_is_still_journalled(
    run: Runner, settings: Settings
) -> None:
    """A writer that migrates the store and then fails before its journal is open (a wrong key
    passphrase: exit 77) left the migration unrecorded for good: the next writer found the
    store at this version's revisions (found by a review). The migration's own transaction
    now leaves a row that the next writer journals, once."""
    _downgrade(settings.db_url, "0008")
    secret = settings.passphrase_path
    assert secret is not None
    good = secret.read_bytes()
    secret.write_bytes(b"a-wrong-but-long-enough-passphrase\n")
    assert run("crl", "generate").code == 77
    secret.write_bytes(good)
    ok(run("crl", "generate"))
    ok(run("crl", "generate"))
    out = ok(run("--json", "audit", "search", "--action", "system.migrate")).out
    found = jsonl(out)
    assert len(found) == 1, "the migration from 0008 was not journalled once"
    assert found[0]["detail"]["from"] == ["0008"], found
    assert "journal intact" in ok(run("audit", "verify")).out


def test_read_commands_need_no_key_passphrase(
    template_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy without secrets/ (or one whose passphrase this user may not read): what needs
    no key works, `audit verify` wants the auditor's public key, and nothing is created (a
    read command used to write a new random passphrase there)."""
    copy = _copy(template_dir, tmp_path / "copy")
    run = _runner(capsys, copy)
    key = tmp_path / "audit-key.pem"
    ok(run("audit", "public-key", "-o", str(key)))
    shutil.rmtree(copy / "secrets")
    listed = ok(run("--json", "cert", "list"))
    assert len(listed.json()) >= 2
    assert listed.err == ""  # no "audit key unavailable" errors for a command that appends nothing
    no_key = run("audit", "verify")
    assert no_key.code == 69 and "--public-key" in no_key.err, no_key
    assert "journal intact" in ok(run("audit", "verify", "--public-key", str(key))).out
    assert not (copy / "secrets").exists()
    refused = run("crl", "generate")  # writing needs the keys: refused, and names why
    assert refused.code == 78 and "does not exist" in refused.err, refused
    assert not (copy / "secrets").exists()


def test_a_read_command_on_another_users_deployment_reads_a_write_is_refused(
    template_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading creates no certificate, key or journal entry a planted directory could
    subvert, so another user's data directory (an auditor's view of the operator's) may be
    read; commands that write still refuse it."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    copy = _copy(template_dir, tmp_path / "theirs")
    for path in [copy, *copy.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    run = _runner(capsys, copy)
    assert [c["name"] for c in ok(run("--json", "ca", "list")).json()] == [
        "root", "admin", "device",
    ]  # fmt: skip
    refused = run("crl", "generate")
    assert refused.code == 78 and "belongs to uid 65534" in refused.err, refused


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_output_that_cannot_be_written_exits_74(data_dir: Path) -> None:
    """`sekisho audit export > file` on a full disk: stdout's write fails with ENOSPC. It
    exited 70, "a bug in Sekisho"; it is an I/O error (74), said in one line, as for a
    file given with -o or a reader that went away."""
    for command in (["audit", "export"], ["cert", "list"], ["--json", "ca", "list"]):
        with open("/dev/full", "wb") as full:
            done = subprocess.run(
                [sys.executable, "-m", "sekisho", "--data-dir", str(data_dir), *command],
                stdout=full,
                stderr=subprocess.PIPE,
                timeout=TIMEOUT,
                check=False,
            )
        err = done.stderr.decode()
        assert done.returncode == 74, (command, err)
        assert "No space left on device" in err and "internal" not in err, err
        assert "Traceback" not in err and "Exception ignored" not in err, err


def test_output_closed_early_exits_74_quietly(services: Services, data_dir: Path) -> None:
    """`sekisho audit export | head`: the reader goes away; the export stops with 74 (an I/O
    error, sysexits) and no traceback or "Exception ignored" noise. Before: click's own exit
    1, outside the documented codes."""
    with services.db.scope() as session:
        for n in range(1500):  # well past a pipe's 64 KiB buffer
            services.journal.append(
                session,
                Event(Category.SYSTEM, "test.fill", Outcome.SUCCESS, object_dn=f"CN=host{n}"),
                services.clock(),
            )
    child = subprocess.Popen(
        [sys.executable, "-m", "sekisho", "--data-dir", str(data_dir), "audit", "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.read(100)
        child.stdout.close()
        err = child.stderr.read().decode()
        code = child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 74, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def _openssl_pkcs8(*args: str) -> None:
    subprocess.run(["openssl", "pkcs8", *args], check=True, capture_output=True, timeout=60)


def test_key_rewrap_re_encrypts_older_pbkdf2_files_with_scrypt_and_journals_each(
    run: Runner, data_dir: Path, tmp_path: Path
) -> None:
    """A key file as a deployment of stop 19 wrote it (PBKDF2-HMAC-SHA256, 600,000
    iterations): `key rewrap` re-encrypts it with scrypt, the same key, 0600, journalled;
    the CA still signs with it; files already current are left as they were, and a second
    run changes nothing."""
    from hsm.pbes2 import CURRENT, describe
    from hsm.software import PEM_LABEL, pem_unwrap

    keys, secret = data_dir / "keys", data_dir / "secrets" / "ca-passphrase"
    target = keys / "ca-device.key"
    plain = tmp_path / "plain.pem"
    _openssl_pkcs8("-in", str(target), "-passin", f"file:{secret}", "-out", str(plain))
    pbkdf2 = ("-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256", "-iter", "600000")
    _openssl_pkcs8("-topk8", "-in", str(plain), *pbkdf2, "-passout", f"file:{secret}",
                   "-out", str(target))  # fmt: skip
    target.chmod(0o600)
    assert describe(pem_unwrap(target.read_bytes(), PEM_LABEL)).kdf == "pbkdf2-sha256"
    others = {p.name: p.read_bytes() for p in keys.glob("*.key") if p != target}

    done = ok(run("--json", "key", "rewrap")).json()
    assert [d for d in done if d["rewrapped"]] == [
        {
            "key_ref": "file:ca-device",
            "ca": "device",
            "offline": False,
            "rewrapped": True,
            "was": "pbes2 pbkdf2-sha256 600000 aes256_cbc",
        }
    ]
    assert len(done) == len(others) + 1
    assert describe(pem_unwrap(target.read_bytes(), PEM_LABEL)) == CURRENT
    assert target.stat().st_mode & 0o777 == 0o600
    assert {p.name: p.read_bytes() for p in keys.glob("*.key") if p != target} == others
    again = tmp_path / "again.pem"
    _openssl_pkcs8("-in", str(target), "-passin", f"file:{secret}", "-out", str(again))
    assert again.read_bytes() == plain.read_bytes()  # the same key, as OpenSSL reads it

    journal = jsonl(ok(run("--json", "audit", "search", "--action", "ca.key.rewrap")).out)
    assert len(journal) == 1 and "file:ca-device" in json.dumps(journal[0])
    assert '"ca": "device"' in json.dumps(journal[0])  # which CA's key
    ok(run("crl", "generate", "--ca", "device"))  # the CA signs with the rewrapped key
    assert not [d for d in ok(run("--json", "key", "rewrap")).json() if d["rewrapped"]]
    assert len(jsonl(ok(run("--json", "audit", "search", "--action", "ca.key.rewrap")).out)) == 1
    # An offline CA key is out of reach: listed as such, its exported file left as it was.
    exported = tmp_path / "root.key"
    ok(run("ca", "export", "root", "--key", "-o", str(exported)))
    ok(run("ca", "offline", "root", "--yes"))
    done = ok(run("--json", "key", "rewrap")).json()
    assert [d for d in done if d["offline"]] == [
        {"key_ref": "file:ca-root", "ca": "root", "offline": True, "rewrapped": False, "was": None}
    ]
    assert "file:ca-root (CA root): offline" in ok(run("key", "rewrap")).out


def test_read_input_says_not_found_for_a_missing_file(tmp_path: Path) -> None:
    """(The commands' own read, behind the option's check: a file gone in between.)"""
    from sekisho.errors import InputError, NotFound
    from sekisho.files import read_input

    with pytest.raises(NotFound, match="no such file: CSR"):
        read_input(tmp_path / "gone.csr", "CSR", 100)
    with pytest.raises(InputError):
        read_input(tmp_path, "CSR", 100)  # a directory: bad input, as before
