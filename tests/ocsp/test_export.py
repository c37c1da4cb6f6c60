"""``sekisho ocsp export DIR``: the layout (RFC 5019 GET paths, both base64 alphabets, mtime =
thisUpdate, expired and foreign responses left out, atomic swap), the CLI, and Debian's nginx
running docs/nginx-ocsp.conf over an export: ``curl`` fetches the exact RFC 5019 URL and
``openssl ocsp -respin`` verifies what came back; ``openssl ocsp -url`` (POST) and a GET
missing from the export reach the live responder through the same nginx."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocsp import store
from ocsp.export import export_responses, urlsafe_path
from ocsp.index import rfc5019_request
from sekisho.services import Services
from tests.ca.helpers import issue
from tests.ocsp.test_server import Pki, free_port, make_pki, run, running

NGINX = Path("/usr/sbin/nginx")
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "docs" / "nginx-ocsp.conf"


@pytest.fixture
def pki(services: Services, tmp_path: Path) -> Pki:
    return make_pki(services, tmp_path)


def stored_by_serial(pki: Pki) -> dict[int, store.StoredResponse]:
    return {r.serial: r for r in store.snapshot(pki.services.db)[0] if r.issuer_id == pki.ca_id()}


def test_layout(pki: Pki, tmp_path: Path) -> None:
    issuers = store.load_issuers(pki.services)
    responses, _ = store.snapshot(pki.services.db)
    now = dt.datetime.now(dt.UTC)
    expired = dataclasses.replace(
        responses[0], serial=424242, next_update=now - dt.timedelta(seconds=1)
    )
    foreign = dataclasses.replace(responses[0], issuer_id=999_999)
    out = tmp_path / "export"
    result = export_responses(issuers, [*responses, expired, foreign], out, now)
    assert result.written == len(responses) and result.expired == 1
    assert result.unknown_issuer == 1
    manifest = json.loads((out / "ocsp-manifest.json").read_text())
    assert manifest["written"] == len(responses)
    for serial in (pki.good.serial_number, pki.revoked.serial_number):
        want = stored_by_serial(pki)[serial]
        request = rfc5019_request(pki.issuer(), serial)
        std = base64.b64encode(request).decode()
        # A base64 ending in "/" cannot name a file (nginx falls back to the live responder).
        for rel in {std, urlsafe_path(request)} - {std if std.endswith("/") else ""}:
            path = out / "ocsp" / rel  # a "/" of the base64 is a directory level
            assert path.read_bytes() == want.der, rel
            assert int(path.stat().st_mtime) == int(want.this_update.timestamp())
    # Nothing for the expired one; no staging left behind; a second export replaces the first.
    bad = base64.urlsafe_b64encode(rfc5019_request(pki.issuer(), 424242)).decode()
    assert not (out / "ocsp" / bad).exists()
    (out / "ocsp" / "stale-file").write_bytes(b"x")
    export_responses(issuers, responses, out, now)
    assert not (out / "ocsp" / "stale-file").exists()
    assert sorted(p.name for p in out.iterdir()) == ["ocsp", "ocsp-manifest.json"]


def test_export_writes_through_no_planted_link(pki: Pki, tmp_path: Path) -> None:
    """The manifest was written with write_text, through a symlink planted in place of it
    (the export directory is often a web server's, writable by more than Sekisho's user):
    the file the link named was overwritten. The link is replaced, its target left alone."""
    issuers = store.load_issuers(pki.services)
    responses, _ = store.snapshot(pki.services.db)
    out = tmp_path / "export"
    out.mkdir()
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    (out / "ocsp-manifest.json").symlink_to(precious)
    result = export_responses(issuers, responses, out, dt.datetime.now(dt.UTC))
    assert precious.read_text() == "keep me\n"
    manifest = out / "ocsp-manifest.json"
    assert not manifest.is_symlink() and json.loads(manifest.read_text())["written"] == (
        result.written
    )
    assert manifest.stat().st_mode & 0o777 == 0o644  # read by the web server, as before
    assert sorted(p.name for p in out.iterdir()) == ["ocsp", "ocsp-manifest.json"]


def test_cli_export_into_a_directory_it_cannot_write(
    pki: Pki, data_dir: Path, tmp_path: Path
) -> None:
    """An export directory that exists but cannot be written exited 70 (an unexpected
    PermissionError, "a bug in Sekisho"); it is refused as one that cannot be created (78)."""
    if os.geteuid() == 0:
        target = Path("/sys/kernel")  # root may write any ordinary directory, not sysfs
        if not target.is_dir():
            pytest.skip("no /sys/kernel")
    else:
        target = tmp_path / "read-only"
        target.mkdir(mode=0o555)
    res = sekisho(data_dir, "ocsp", "export", str(target))
    assert res.returncode == 78 and "cannot create" in res.stderr, res.stderr
    assert "internal" not in res.stderr


def sekisho(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            sys.executable, "-c", "import sys; from sekisho.cli import main; sys.exit(main())",
            "--data-dir", str(data_dir), *args,
        ],
        timeout=60,
    )  # fmt: skip


def test_cli_export(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    res = sekisho(data_dir, "--json", "ocsp", "export", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["written"] == len(store.snapshot(pki.services.db)[0]) >= 2
    res = sekisho(data_dir, "ocsp", "export", "--help")
    assert res.returncode == 0 and "DIRECTORY" in res.stdout
    res = sekisho(data_dir, "ocsp", "serve", "--help")
    assert res.returncode == 0 and "--request-timeout" in res.stdout
    with socket.socket() as taken:  # a port already bound: config error, exit 78
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = sekisho(data_dir, "ocsp", "serve", "--port", str(taken.getsockname()[1]))
    assert res.returncode == 78 and "cannot listen" in res.stderr, res.stderr
    (tmp_path / "file").write_text("x")
    res = sekisho(data_dir, "ocsp", "export", str(tmp_path / "file"))
    assert res.returncode == 64  # usage: not a directory


# -- nginx ------------------------------------------------------------------------------------
@contextlib.contextmanager
def nginx(export_dir: Path, responder_port: int, prefix: Path) -> Iterator[int]:
    """Debian's nginx in the foreground with docs/nginx-ocsp.conf; stopped by PID."""
    port = free_port()
    prefix.mkdir()
    site = CONF.read_text()
    site = site.replace("@LISTEN@", f"127.0.0.1:{port}").replace("@EXPORT_DIR@", str(export_dir))
    site = site.replace("@RESPONDER@", f"127.0.0.1:{responder_port}")
    (prefix / "ocsp.conf").write_text(site)
    temps = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # the export lives in a 0700 tmp dir
    (prefix / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n{temps}\n    include {prefix / 'ocsp.conf'};\n}}\n"
    )
    proc = subprocess.Popen(
        [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert proc.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGQUIT)  # graceful; the master stops its workers
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def curl_get(url: str, out: Path) -> dict[str, str]:
    res = run(["curl", "-sS", "-D", "-", "-o", str(out), "--max-time", "10", url])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert " 200 " in lines[0], res.stdout
    return {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}


def openssl_verify_respin(pki: Pki, resp: Path, cert: str) -> str:
    res = run(
        [
            "openssl", "ocsp", "-respin", str(resp), "-issuer", str(pki.dir / "ca.pem"),
            "-cert", str(pki.dir / f"{cert}.pem"), "-no_nonce",
            "-CAfile", str(pki.dir / "root.pem"), "-verify_other", str(pki.dir / "ca.pem"),
        ]
    )  # fmt: skip
    assert res.returncode == 0 and "Response verify OK" in res.stderr, res.stdout + res.stderr
    return res.stdout


@pytest.mark.skipif(not NGINX.exists(), reason="nginx not installed (tools/sysdeps.sh)")
def test_nginx_serves_export(pki: Pki, data_dir: Path, tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    res = sekisho(data_dir, "--json", "ocsp", "export", str(export_dir))
    assert res.returncode == 0, res.stderr
    late = issue(pki.services, "admin-client")  # issued after the export: not in it
    pki.pem("late", late)
    # As docs/ocsp-nginx.md says: no cap per address behind nginx (all of it is nginx's).
    live_server = running(data_dir, tmp_path, "--max-per-client", "0")
    with live_server as live, nginx(export_dir, live.port, tmp_path / "ng") as port:
        base = f"http://127.0.0.1:{port}/ocsp"
        for name, cert in (("good", pki.good), ("revoked", pki.revoked)):
            b64 = pki.get_path(cert)
            want = stored_by_serial(pki)[cert.serial_number]
            # RFC 5019 section 5: the URL-encoded base64, and the raw form some clients send.
            for url in (f"{base}/{urllib.parse.quote(b64, safe='')}", f"{base}/{b64}"):
                resp = tmp_path / f"{name}.der"
                headers = curl_get(url, resp)
                if b64.endswith("/"):  # no file can be named so: answered live (1 in 64)
                    continue
                assert resp.read_bytes() == want.der
                assert headers["content-type"] == "application/ocsp-response"
                assert "max-age=3600" in headers["cache-control"]
                assert headers["last-modified"] == want.this_update.strftime(
                    "%a, %d %b %Y %H:%M:%S GMT"
                )
                assert "etag" in headers
            out = openssl_verify_respin(pki, resp, name)
            assert f": {name}" in out
            if name == "revoked":
                assert "Reason: keyCompromise" in out
        # Not in the export: nginx falls back to the live responder (signed there).
        resp = tmp_path / "late.der"
        headers = curl_get(f"{base}/{pki.get_path(late)}", resp)
        assert ": good" in openssl_verify_respin(pki, resp, "late")
        # openssl's own client POSTs (with a nonce): proxied to the live responder.
        res = run(
            [
                "openssl", "ocsp", "-issuer", str(pki.dir / "ca.pem"), "-cert",
                str(pki.dir / "revoked.pem"), "-url", base, "-CAfile", str(pki.dir / "root.pem"),
                "-verify_other", str(pki.dir / "ca.pem"), "-timeout", "10",
            ]
        )  # fmt: skip
        assert "Response verify OK" in res.stderr and ": revoked" in res.stdout, res.stderr
        # Anything else: 404 from nginx, never a file outside the export.
        res = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/../../etc"])
        assert res.stdout in ("400", "404"), res.stdout
