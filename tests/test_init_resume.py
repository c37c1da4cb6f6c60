"""An interrupted first run (killed part way, a step that failed) is finished by running
``init`` or ``run`` again, with the plan it began with; two first runs at once make one
deployment. Each interruption is a real SIGKILL of a child process at a chosen step."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sekisho.cli import main
from tests.support.checkers import openssl_verify

TIMEOUT = 120

# Run `sekisho --data-dir D init --org "Kill Corp" --issuing ops --issuing iot` with name
# constraints (--permit-dns example.com --permit-ip 10.20.0.0/16 --exclude-ip 10.20.99.0/24),
# SIGKILLed when STEP is reached: a function entered, or a key file just written.
_KILLED_INIT = textwrap.dedent(
    """
    import os, signal, sys
    import ca.hierarchy, sekisho.bootstrap
    from hsm.software import SoftwareBackend
    from sekisho.cli import main

    data_dir, step = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if step.startswith("key:"):
        store = SoftwareBackend.store
        def killing_store(self, ref, der):
            store(self, ref, der)
            if ref.endswith(step[4:]):
                die()
        SoftwareBackend.store = killing_store
    elif step == "issuing:iot":
        create = sekisho.bootstrap.create_issuing
        def killing_create(service, name, *args, **kwargs):
            if name == "iot":
                die()
            return create(service, name, *args, **kwargs)
        sekisho.bootstrap.create_issuing = killing_create
    else:
        setattr(sekisho.bootstrap, step, lambda *a, **k: die())
    sys.exit(main(["--data-dir", data_dir, "init", "--org", "Kill Corp",
                   "--issuing", "ops", "--issuing", "iot", "--permit-dns", "example.com",
                   "--permit-ip", "10.20.0.0/16", "--exclude-ip", "10.20.99.0/24"]))
    """
)


def _killed_init(data_dir: Path, step: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_INIT, str(data_dir), step],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])


def _cli(capsys: pytest.CaptureFixture[str], data_dir: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--data-dir", str(data_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "step",
    [
        "enable_checkpoints",  # after the plan is journalled, before the audit key
        "key:audit",
        "key:ca-root",
        "key:ca-ops",
        "issuing:iot",
        "ensure_responders",
        "publish_ca_files",
    ],
)
def test_an_init_killed_part_way_is_finished_by_the_next_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], step: str
) -> None:
    data = tmp_path / "data"
    _killed_init(data, step)
    # Half a deployment is no deployment: a command that writes says how to finish it (it
    # used to serve it, or refuse init for good with "key already exists").
    code, _, err = _cli(capsys, data, "crl", "generate")
    assert code == 78 and ("interrupted" in err or "not initialised" in err), err
    # The next init finishes the plan the first began (its organization and CAs), whatever
    # it is asked now.
    code, out, err = _cli(capsys, data, "--json", "init", "--org", "Other Corp")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["cas"] == ["root", "ops", "iot"]
    assert doc["resumed"] is True
    root = x509.load_pem_x509_certificate((data / "public" / "root.crt").read_bytes())
    assert "O=Kill Corp" in root.subject.rfc4514_string()
    for name in ("ops", "iot"):
        sub = x509.load_pem_x509_certificate((data / "public" / f"{name}.crt").read_bytes())
        openssl_verify(sub.public_bytes(Encoding.DER), [root.public_bytes(Encoding.DER)])
        # The first init's name constraints, those of IP networks included.
        nc = sub.extensions.get_extension_for_class(x509.NameConstraints).value
        assert [str(n.value) for n in nc.permitted_subtrees or ()] == [
            "example.com", "10.20.0.0/16",
        ]  # fmt: skip
        assert [str(n.value) for n in nc.excluded_subtrees or ()] == ["10.20.99.0/24"]
    code, out, err = _cli(capsys, data, "--json", "ca", "list")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["root", "ops", "iot"]
    assert _cli(capsys, data, "audit", "verify")[0] == 0
    with closing(sqlite3.connect(data / "sekisho.db")) as db:  # the init signed its records
        assert db.execute("SELECT seq = checkpoint_seq FROM audit_head").fetchall() == [(1,)]
    code, out, _ = _cli(capsys, data, "--json", "audit", "search", "--category", "system",
                        "--limit", "1000")  # fmt: skip
    actions = [json.loads(line)["action"] for line in out.splitlines()]
    assert actions.count("system.init.begin") == 1 and actions[-1] == "system.init"
    code, out, err = _cli(capsys, data, "--json", "crl", "generate", "--ca", "iot")
    assert code == 0, err
    assert _cli(capsys, data, "init")[0] == 75  # now it is initialised
    # A key file written before its CA's row is set aside (kept, renamed) and journalled,
    # not reused and not deleted.
    set_aside = sorted(p.name for p in (data / "keys").glob("*.set-aside-*"))
    if step.startswith("key:ca-"):
        assert [name.split(".key.")[0] for name in set_aside] == [step[4:]], set_aside
        code, out, _ = _cli(capsys, data, "--json", "audit", "search", "--category", "ca",
                            "--limit", "1000")  # fmt: skip
        entries = [json.loads(line) for line in out.splitlines()]
        assert [e["detail"]["file"] for e in entries if e["action"] == "ca.key.set_aside"] == (
            set_aside
        )
    else:
        assert set_aside == []


def test_a_fresh_init_never_touches_a_key_file_already_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys left by an older deployment whose database was removed: a fresh init is refused
    (75) and the file left as it was, not set aside or overwritten."""
    data = tmp_path / "data"
    assert _cli(capsys, data, "init")[0] == 0
    (data / "sekisho.db").unlink()
    key = (data / "keys" / "ca-root.key").read_bytes()
    code, _, err = _cli(capsys, data, "init")
    assert code == 75 and "already exists" in err, err
    assert (data / "keys" / "ca-root.key").read_bytes() == key
    assert list((data / "keys").glob("*.set-aside-*")) == []


def test_two_first_runs_at_once_make_one_deployment(tmp_path: Path) -> None:
    """The second waits for the first and finds it done (75); it used to fail on the first's
    half-made files with 70, 74 or 75 and journal a second init."""
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "sekisho", "--data-dir", str(data), "init"]
    children = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for child in children:
        try:
            _out, err = child.communicate(timeout=TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        results.append((child.returncode, err))
    assert sorted(code for code, _ in results) == [0, 75], results
    assert any("already initialised" in err for _, err in results), results
    done = subprocess.run(
        [*argv[:-1], "--json", "audit", "search", "--category", "system"],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    actions = [json.loads(line)["action"] for line in done.stdout.splitlines()]
    assert actions.count("system.init") == 1 and actions.count("system.init.begin") == 1
