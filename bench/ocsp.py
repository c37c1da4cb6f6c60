"""OCSP serving rate of ``sekisho ocsp serve`` beside Debian's nginx in the same run.

* Cached answers (pre-signed, RFC 5019 GET and POST) per **server-CPU-second** (utime+stime of
  the server process from /proc/PID/stat before/after; for nginx, master + workers) against
  nginx serving a static file of the same size with the same load generator (``wrk``, keep-
  alive, loopback). Target ratio >= 0.5. p99 latency from ``wrk --latency``.
* Nonce answers (signed on the fly) per server-CPU-second against the raw build-and-sign rate
  of the same key in this process (per CPU-second): ``cryptography``'s own
  ``OCSPResponseBuilder`` making the same response (responderID byKey, one SingleResponse,
  the nonce, the delegated responder's certificate when there is one). Target ratio >= 0.5.
  Sekisho's builder (``ocsp.core.build_response``, which the server calls) is measured too
  and printed beside it: server / own builder is what the HTTP server adds. It is not the
  target's reference, as a faster builder would lower that ratio (docs/ocsp-nginx.md).

    python -m bench.ocsp [--seconds 5] [--connections 32] [--certs 200] [--rounds 2]

The load generator shares the cores with the server (2 vCPUs here): compare ratios, not
absolute figures. Everything binds 127.0.0.1; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from bench.common import BENCH_ACTOR, deployment, peak_rss_mib, progress, write_result
from ca.issuance import IssueRequest
from ca.tbs import SanEntry
from hsm.base import KeyType
from hsm.software import generate_private_key
from ocsp import core, store
from ocsp.index import rfc5019_request

TARGET_RATIO = 0.5
NGINX = "/usr/sbin/nginx"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its direct children (nginx workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(c) for c in children)
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def sekisho_server(data_dir: Path, extra: list[str]) -> Iterator[tuple[int, int]]:
    port = free_port()
    cmd = [
        sys.executable, "-c", "import sys; from sekisho.cli import main; sys.exit(main())",
        "--data-dir", str(data_dir), "ocsp", "serve", "--host", "127.0.0.1",
        "--port", str(port), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_port(port, proc, "sekisho ocsp serve")
        yield proc.pid, port
    finally:
        stop(proc)


@contextlib.contextmanager
def nginx_static(body: bytes, workdir: Path) -> Iterator[tuple[int, int]]:
    prefix = workdir / "nginx"
    (prefix / "www").mkdir(parents=True)
    (prefix / "www" / "resp.der").write_bytes(body)
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"{k}_temp_path {prefix / k}; " for k in ("client_body", "proxy"))
    (prefix / "nginx.conf").write_text(
        f"{user}daemon off; worker_processes 1; pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; {temps} server {{ listen 127.0.0.1:{port}; "
        f"root {prefix / 'www'}; location / {{ types {{ }} "
        f"default_type application/ocsp-response; }} }} }}\n"
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "e.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc, "nginx")
        yield proc.pid, port
    finally:
        stop(proc, signal.SIGQUIT)


def lua_post(body: bytes, path: Path) -> Path:
    escaped = "".join(f"\\{b:03d}" for b in body)
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{escaped}"\n'
        'wrk.headers["Content-Type"] = "application/ocsp-request"\n'
    )
    return path


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(url: str, seconds: float, connections: int, script: Path | None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    res = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed: {res.stderr}")
    total = re.search(r"(\d+) requests in", res.stdout)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", res.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout)
    socket_errors = re.search(r"Socket errors: (.*)", res.stdout)
    if total is None or p99 is None:
        raise RuntimeError(f"cannot parse wrk output: {res.stdout}")
    return {
        "requests": float(total.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] * 1000,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


def measure(pid: int, url: str, args: argparse.Namespace, script: Path | None) -> dict[str, Any]:
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    out = wrk(url, args.seconds, args.connections, script)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    out.update(
        server_cpu_s=cpu,
        wall_s=wall,
        per_cpu_s=out["requests"] / cpu if cpu > 0 else 0.0,
        per_s=out["requests"] / wall,
    )
    return out


def per_cpu_second(fn: Callable[[], bytes], seconds: float) -> float:
    start = time.process_time()
    n = 0
    while time.process_time() - start < seconds:
        fn()
        n += 1
    return n / (time.process_time() - start)


def raw_builder(issuer: core.Issuer, serial: int) -> Callable[[], bytes]:
    """The reference: the same nonce response built and signed by ``cryptography`` alone."""
    cert_id = issuer.cert_id(serial)
    nonce = os.urandom(16)
    delegated = [issuer.responder_certificate] if issuer.delegated else []

    def build() -> bytes:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=cert_id.issuer_name_hash,
                issuer_key_hash=cert_id.issuer_key_hash,
                serial_number=serial,
                algorithm=hashes.SHA1(),  # noqa: S303 - the CertID hash RFC 5019 clients send
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=now,
                next_update=now + dt.timedelta(hours=24),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.responder_certificate)
            .add_extension(x509.OCSPNonce(nonce), critical=False)
        )
        if delegated:
            builder = builder.certificates(delegated)
        response = builder.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
        return response.public_bytes(serialization.Encoding.DER)

    return build


def check_same_shape(der: bytes, issuer: core.Issuer) -> None:
    """Refuse to compare against a builder whose answer is not the server's kind of answer."""
    response = ocsp.load_der_ocsp_response(der)
    single = next(iter(response.responses))
    nonce = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    certs = [c.public_bytes(serialization.Encoding.DER) for c in response.certificates]
    expected_certs = (
        [issuer.responder_certificate.public_bytes(serialization.Encoding.DER)]
        if issuer.delegated
        else []
    )
    if (
        response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL
        or response.responder_key_hash != issuer.responder_key_id
        or len(list(response.responses)) != 1
        or single.certificate_status != ocsp.OCSPCertStatus.GOOD
        or single.next_update_utc is None
        or len(nonce) != 16
        or certs != expected_certs
    ):
        raise RuntimeError("a reference builder does not make the server's kind of response")


def own_builder(issuer: core.Issuer, serial: int) -> Callable[[], bytes]:
    """Sekisho's builder, as the server calls it (what the server adds is the difference)."""
    cert_id = issuer.cert_id(serial)
    nonce = os.urandom(16)

    def build() -> bytes:
        now = dt.datetime.now(dt.UTC)
        return core.build_response(
            issuer,
            [(cert_id, core.GOOD)],
            produced_at=now,
            this_update=now,
            next_update=now + dt.timedelta(hours=24),
            nonce=nonce,
        )

    return build


def nonce_request(issuer: core.Issuer, serial: int) -> bytes:
    from ca import der as w

    ext = w.extension(core.OID_NONCE, w.octet_string(os.urandom(16)))
    return w.sequence(
        w.sequence(
            w.sequence(w.sequence(issuer.cert_id(serial).der)), w.explicit(2, w.sequence(ext))
        )
    )


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["per_cpu_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ocsp",
        description="OCSP answers per server-CPU-second of `sekisho ocsp serve` beside nginx "
        "serving a static file of the same size (wrk, loopback), and nonce answers beside a "
        "raw build-and-sign loop.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--certs", type=int, default=200, help="certificates issued (200)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations; best kept (2)")
    parser.add_argument("--no-uvloop", action="store_true", help="serve on stock asyncio")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.connections <= 0 or args.certs <= 0 or args.rounds <= 0:
        parser.error("all numbers must be positive")
    for tool in ("wrk", NGINX):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: run tools/sysdeps.sh")

    workdir = Path(tempfile.mkdtemp(prefix="sekisho-bench-ocsp-"))
    try:
        with deployment("sqlite") as services:
            progress(f"issuing {args.certs} certificates (pre-signed at issuance)")
            serials = []
            for i in range(args.certs):
                key = generate_private_key(KeyType.EC_P256)
                request = IssueRequest(
                    ca="admin",
                    profile="admin-client",
                    subject=x509.Name.from_rfc4514_string(f"CN=Bench {i},O=Tenant One"),
                    public_key=key.public_key(),
                    sans=(SanEntry("email", f"bench{i}@tenant1.example.com"),),
                )
                serials.append(services.ca.issue(request, BENCH_ACTOR).serial_number)
            issuers = store.load_issuers(services)
            stored = {(r.issuer_id, r.serial): r for r in store.snapshot(services.db)[0]}
            ca_id, issuer = next(
                (i, iss) for i, iss in issuers.items() if (i, serials[0]) in stored
            )
            serial = serials[len(serials) // 2]
            response = stored[(ca_id, serial)].der
            request = rfc5019_request(issuer, serial)
            b64 = base64.b64encode(request).decode()
            get_path = "/ocsp/" + b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
            post_script = lua_post(request, workdir / "post.lua")
            nonce_script = lua_post(nonce_request(issuer, serial), workdir / "nonce.lua")
            extra = ["--no-uvloop"] if args.no_uvloop else []
            runs: dict[str, list[dict[str, Any]]] = {
                "nginx_static": [],
                "sekisho_get": [],
                "sekisho_post": [],
                "sekisho_nonce": [],
            }
            raw_rates: list[float] = []
            own_rates: list[float] = []
            # Both builders answer what the server answers: same shape, the nonce echoed.
            for build in (raw_builder(issuer, serial), own_builder(issuer, serial)):
                check_same_shape(build(), issuer)
            data_dir = services.settings.data_dir
            for round_no in range(args.rounds):
                progress(f"round {round_no + 1}/{args.rounds}: nginx static {len(response)} B")
                with nginx_static(response, workdir / f"r{round_no}") as (pid, port):
                    runs["nginx_static"].append(
                        measure(pid, f"http://127.0.0.1:{port}/resp.der", args, None)
                    )
                progress(f"round {round_no + 1}/{args.rounds}: sekisho ocsp serve")
                with sekisho_server(data_dir, extra) as (pid, port):
                    base = f"http://127.0.0.1:{port}"
                    check = subprocess.run(
                        ["curl", "-s", f"{base}{get_path}"], capture_output=True, check=False
                    )
                    if check.stdout != response:
                        raise RuntimeError("the server does not answer the stored response")
                    runs["sekisho_get"].append(measure(pid, base + get_path, args, None))
                    runs["sekisho_post"].append(measure(pid, base + "/ocsp", args, post_script))
                    runs["sekisho_nonce"].append(measure(pid, base + "/ocsp", args, nonce_script))
                progress(f"round {round_no + 1}/{args.rounds}: raw build-and-sign loops")
                seconds = min(args.seconds, 3.0)
                raw_rates.append(per_cpu_second(raw_builder(issuer, serial), seconds))
                own_rates.append(per_cpu_second(own_builder(issuer, serial), seconds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    nginx, get, post, nonce = (best(runs[k]) for k in runs)
    raw = max(raw_rates)
    own = max(own_rates)
    results = {
        "response_bytes": len(response),
        "delegated_responder": issuer.delegated,
        "nginx_static": nginx,
        "sekisho_get": get,
        "sekisho_post": post,
        "sekisho_nonce": nonce,
        "raw_sign_per_cpu_s": raw,
        "own_builder_per_cpu_s": own,
        "ratio_get": get["per_cpu_s"] / nginx["per_cpu_s"],
        "ratio_post": post["per_cpu_s"] / nginx["per_cpu_s"],
        "ratio_nonce": nonce["per_cpu_s"] / raw,
        "server_over_own_builder": nonce["per_cpu_s"] / own,
        "runs": runs,
        "raw_rates": raw_rates,
        "own_rates": own_rates,
    }
    print(
        f"\nOCSP serving, loopback, wrk -t1 -c{args.connections}, {args.seconds:.0f} s each, "
        f"{len(response)} B responses, best of {args.rounds}"
    )
    print(f"{'':<28}{'per srv-CPU-s':>14}{'per s':>10}{'p99 ms':>9}{'ratio':>8}  target")
    for label, res, ref in (
        ("nginx static (reference)", nginx, None),
        ("sekisho GET cached", get, nginx),
        ("sekisho POST cached", post, nginx),
    ):
        ratio = f"{res['per_cpu_s'] / ref['per_cpu_s']:>8.2f}" if ref else f"{'':>8}"
        flag = ""
        if ref:
            flag = "ok" if res["per_cpu_s"] / ref["per_cpu_s"] >= TARGET_RATIO else "BELOW"
            flag = f"  >= {TARGET_RATIO} {flag}"
        print(
            f"{label:<28}{res['per_cpu_s']:>14,.0f}{res['per_s']:>10,.0f}{res['p99_ms']:>9.2f}"
            f"{ratio}{flag}"
        )
    print(
        f"{'sekisho POST nonce (signed)':<28}{nonce['per_cpu_s']:>14,.0f}{nonce['per_s']:>10,.0f}"
        f"{nonce['p99_ms']:>9.2f}{results['ratio_nonce']:>8.2f}  >= {TARGET_RATIO} "
        f"{'ok' if results['ratio_nonce'] >= TARGET_RATIO else 'BELOW'} "
        f"(vs raw cryptography build+sign {raw:,.0f}/CPU-s)"
    )
    print(
        f"{'':<28}Sekisho's own builder alone: {own:,.0f}/CPU-s; the server answers "
        f"{results['server_over_own_builder']:.2f} of that (the rest is HTTP and sockets)"
    )
    for label, res in (("get", get), ("post", post), ("nonce", nonce), ("nginx", nginx)):
        if res["non_2xx"] or res["socket_errors"]:
            print(f"warning: {label}: non-2xx {res['non_2xx']:.0f}, socket errors seen")
    print(f"peak RSS (bench process) {peak_rss_mib():.0f} MiB")
    write_result("ocsp", {"args": vars(args), "target_ratio": TARGET_RATIO, **results})
    print(
        json.dumps(
            {
                k: round(v, 3)
                for k, v in results.items()
                if k.startswith("ratio") or k == "server_over_own_builder"
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
