"""PKCS#11 key backend on a throwaway SoftHSM2 token, beside the software backend, one run.

* **Issuance**: CSR PEM in, certificate PEM out through the real ``CaService``
  (``issue_from_csr``: CSR checks, rules, intent row before the signature, issued row + journal
  entry after, pre-signed OCSP response) on SQLite, once with every key in the software
  backend and once with every key (CAs, OCSP responders, audit) on the token. Phases
  alternate; prints pkcs11 / software.
* **Raw signing**: ECDSA P-256 signatures per second through
  ``Pkcs11Backend.signing_key(ref).sign(...)`` with 1 thread and with ``--threads`` threads
  sharing one backend, beside ``cryptography``'s own P-256 key with the same threads and data;
  prints pkcs11 / cryptography. Each token phase runs in a child process that logs in like a
  deployment does (PIN from the 0600 file): a crash inside the PKCS#11 module (SoftHSM aborts
  when two threads enter it at once, python-pkcs11 initialises it with ``C_Initialize(NULL)``)
  is reported as that phase's outcome instead of ending the run before the token is removed.

    python -m bench.hsm [--seconds 3] [--rounds 2] [--threads 4] [--pool 200]

The token (softhsm2.conf, token directory, PIN file) lives in a temporary directory removed
at the end, also on failure or SIGTERM. ``SOFTHSM2_CONF`` is set in this process before the
module is loaded. Needs ``softhsm2`` (``apt-get install softhsm2``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from bench.common import (
    BENCH_ACTOR,
    deployment,
    peak_rss_mib,
    progress,
    write_result,
)
from bench.issuance import CA_NAME, PROFILE, make_csrs, run_phase
from ca.models import CertificateAuthority
from hsm.base import KeyType
from sekisho.services import Services

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_UTIL = "softhsm2-util"
DEPLOYMENT_PREFIX = "sekisho-"
RAW_PREFIX = "bench-raw-"
ROOT = Path(__file__).resolve().parents[1]
SIGN_DATA = secrets.token_bytes(300)  # about the size of a client certificate's TBS


# -- the throwaway token -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Token:
    """A SoftHSM2 token in its own directory: label, PIN and the PIN file (0600)."""

    root: Path
    label: str
    pin_file: Path
    pin: str = dataclasses.field(repr=False)
    module: str = MODULE


@contextlib.contextmanager
def softhsm_token() -> Iterator[Token]:
    """Create a SoftHSM2 configuration + token under a temporary directory; remove it after.

    Sets SOFTHSM2_CONF in os.environ (restored afterwards): SoftHSM reads it when the module
    is loaded, so this must run before anything loads the module in this process."""
    if not os.path.isfile(MODULE):
        raise SystemExit(f"{MODULE} not found: apt-get install softhsm2")
    if shutil.which(SOFTHSM_UTIL) is None:
        raise SystemExit(f"{SOFTHSM_UTIL} not found: apt-get install softhsm2")
    root = Path(tempfile.mkdtemp(prefix="sekisho-bench-hsm-"))
    previous = os.environ.get("SOFTHSM2_CONF")
    try:
        os.chmod(root, 0o700)
        tokens = root / "tokens"
        tokens.mkdir(mode=0o700)
        conf = root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        label = f"sekisho-bench-{secrets.token_hex(4)}"
        pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
        progress(f"initialising SoftHSM2 token {label!r} under {root}")
        # A throwaway token's PINs on argv are acceptable here; production: see docs/hsm.md.
        init = [SOFTHSM_UTIL, "--init-token", "--free", "--label", label]
        subprocess.run(
            [*init, "--so-pin", so_pin, "--pin", pin],
            check=True,
            capture_output=True,
            env={**os.environ},
            timeout=30,
        )
        pin_file = root / "pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pin + "\n")
        yield Token(root, label, pin_file, pin)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        shutil.rmtree(root, ignore_errors=True)
        progress(f"removed the throwaway token directory {root}")


def pkcs11_deployment(token: Token) -> contextlib.AbstractContextManager[Services]:
    """``bench.common.deployment('sqlite')`` with every key on the token."""
    return deployment(
        "sqlite",
        settings={
            "key_backend": "pkcs11",
            "pkcs11_module": token.module,
            "pkcs11_token": token.label,
            "pkcs11_pin_file": str(token.pin_file),
            "pkcs11_label_prefix": DEPLOYMENT_PREFIX,
        },
    )


# -- issuance ----------------------------------------------------------------------------------
def issuer(services: Services) -> Callable[[bytes], bytes]:
    def issue(pem: bytes) -> bytes:
        cert = services.ca.issue_from_csr(pem, ca=CA_NAME, profile=PROFILE, actor=BENCH_ACTOR)
        return cert.public_bytes(serialization.Encoding.PEM)

    return issue


def ca_certificate(services: Services, name: str) -> x509.Certificate:
    with services.db.scope() as session:
        der = session.scalar(
            select(CertificateAuthority.certificate_der).where(CertificateAuthority.name == name)
        )
    assert der is not None
    return x509.load_der_x509_certificate(der)


def bench_issuance(token: Token, args: argparse.Namespace, csrs: list[bytes]) -> dict[str, Any]:
    with deployment("sqlite") as software, pkcs11_deployment(token) as hsm:
        backends = {"software": issuer(software), "pkcs11": issuer(hsm)}
        cold: dict[str, float] = {}
        for name, issue in backends.items():
            t0 = time.perf_counter()
            first = issue(csrs[0])
            cold[name] = time.perf_counter() - t0
            # The certificate verifies under the CA certificate (whose key is where we think).
            x509.load_pem_x509_certificate(first).verify_directly_issued_by(
                ca_certificate(software if name == "software" else hsm, CA_NAME)
            )
            for pem in csrs[1:20]:  # warm-up, not measured
                issue(pem)
        runs: dict[str, list[dict[str, Any]]] = {"software": [], "pkcs11": []}
        for r in range(args.rounds):
            for name, issue in backends.items():
                progress(f"issuance round {r + 1}/{args.rounds}: {name} backend")
                runs[name].append(run_phase(name, issue, csrs, args.seconds, 1_000_000))
        ca_ref = _ca_key_ref(hsm, CA_NAME)
        token_keys = hsm.backend.keys()  # type: ignore[attr-defined]
        status = hsm.backend.status()  # type: ignore[attr-defined]
    best = {name: max(run["rate"] for run in rs) for name, rs in runs.items()}
    return {
        "runs": runs,
        "software_rate": best["software"],
        "pkcs11_rate": best["pkcs11"],
        "ratio": best["pkcs11"] / best["software"],
        "ratio_per_round": [
            p["rate"] / s["rate"] for s, p in zip(runs["software"], runs["pkcs11"], strict=True)
        ],
        "cold_first_issue_s": cold,
        "ca_key_ref": ca_ref,
        "token_status": status,
        "token_keys": [
            {"label": k.label, "key_type": k.key_type, "attributes": k.attributes}
            for k in token_keys
        ],
    }


def _ca_key_ref(services: Services, name: str) -> str | None:
    with services.db.scope() as session:
        return session.scalar(
            select(CertificateAuthority.key_ref).where(CertificateAuthority.name == name)
        )


# -- raw signing -------------------------------------------------------------------------------
def sign_rate(sign: Callable[[bytes], bytes], threads: int, seconds: float) -> dict[str, Any]:
    """Signatures of SIGN_DATA from ``threads`` threads for ``seconds``; errors are counted,
    never allowed to hang the run."""
    counts = [0] * threads
    errors: list[str] = []
    start_line = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        start_line.wait()
        n = 0
        try:
            while not stop.is_set():
                sign(SIGN_DATA)
                n += 1
        except Exception as exc:  # reported in the result
            errors.append(f"{type(exc).__name__}: {exc}")
            stop.set()
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in pool:
        t.join(timeout=30)
    elapsed = time.perf_counter() - start
    done = sum(counts)
    return {
        "threads": threads,
        "count": done,
        "seconds": elapsed,
        "rate": done / elapsed,
        "outcome": "error" if errors else "ok",
        "errors": errors[:3],
    }


def sign_child(spec_json: str) -> int:
    """Child process: log in to the token like a deployment does (PIN from the 0600 file),
    sign with the key ``ref`` from N threads, print the result as one JSON line on stdout.
    Run apart so that a crash in the PKCS#11 module ends this child, not the benchmark."""
    from hsm.pkcs11 import Pkcs11Backend
    from hsm.secrets import read_secret

    spec = json.loads(spec_json)
    pin = read_secret(Path(spec["pin_file"]), what="PKCS#11 PIN", min_length=4).decode()
    backend = Pkcs11Backend(spec["module"], spec["token"], pin, label_prefix=RAW_PREFIX)
    try:
        key = backend.signing_key(spec["ref"])
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        algorithm = ec.ECDSA(hashes.SHA256())

        def sign(data: bytes) -> bytes:
            return key.sign(data, algorithm)

        result = sign_rate(sign, spec["threads"], spec["seconds"])
    finally:
        backend.close()
    print(json.dumps(result), flush=True)
    return 0


def token_phase(token: Token, ref: str, threads: int, seconds: float) -> dict[str, Any]:
    spec = {
        "module": token.module,
        "token": token.label,
        "pin_file": str(token.pin_file),
        "ref": ref,
        "threads": threads,
        "seconds": seconds,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.hsm", "--sign-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ},  # SOFTHSM2_CONF
            cwd=ROOT,
            timeout=seconds + 60,
        )
    except subprocess.TimeoutExpired:
        return {"threads": threads, "rate": None, "outcome": "timed out (killed)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    if proc.returncode < 0:
        outcome = f"crashed ({signal.Signals(-proc.returncode).name})"
    else:
        outcome = f"failed (exit {proc.returncode})"
    tail = [line for line in proc.stderr.strip().splitlines() if line][-3:]
    return {"threads": threads, "rate": None, "outcome": outcome, "errors": tail}


def _describe(name: str, run: dict[str, Any]) -> str:
    rate = run.get("rate")
    figure = f"{rate:,.0f} signs/s" if rate is not None else "no figure"
    extra = "" if run["outcome"] == "ok" else f", {run['outcome']}: {run.get('errors')}"
    return f"  {name}, {run['threads']} thread(s): {figure}{extra}"


def bench_signing(token: Token, args: argparse.Namespace) -> dict[str, Any]:
    from hsm.pkcs11 import Pkcs11Backend  # after SOFTHSM2_CONF is set

    backend = Pkcs11Backend(token.module, token.label, token.pin, label_prefix=RAW_PREFIX)
    try:
        ref = backend.generate("sign", KeyType.EC_P256)
        token_key = backend.signing_key(ref)
        assert isinstance(token_key, ec.EllipticCurvePrivateKey)
        # The token's signature verifies under the token's public key.
        signature = token_key.sign(SIGN_DATA, ec.ECDSA(hashes.SHA256()))
        token_key.public_key().verify(signature, SIGN_DATA, ec.ECDSA(hashes.SHA256()))
        mechanisms = backend.status()["mechanisms"]
    finally:
        backend.close()
    soft_key = ec.generate_private_key(ec.SECP256R1())
    algorithm = ec.ECDSA(hashes.SHA256())

    def soft_sign(data: bytes) -> bytes:
        return soft_key.sign(data, algorithm)

    n = args.threads
    counts = sorted({1, n})
    phases: list[tuple[str, int, Callable[[], dict[str, Any]]]] = []
    for threads in counts:
        phases.append(
            ("pkcs11", threads, functools.partial(token_phase, token, ref, threads, args.seconds))
        )
        phases.append(
            (
                "cryptography",
                threads,
                functools.partial(sign_rate, soft_sign, threads, args.seconds),
            )
        )
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for name, threads, phase in phases:
            progress(f"signing round {r + 1}/{args.rounds}: {name}, {threads} thread(s)")
            run = phase()
            progress(_describe(name, run))
            runs.setdefault(f"{name}/{threads}", []).append(run)
    best: dict[str, float | None] = {}
    for key, rs in runs.items():
        rates = [run["rate"] for run in rs if run["outcome"] == "ok"]
        best[key] = max(rates) if rates else None

    def ratio(a: str, b: str) -> float | None:
        x, y = best.get(a), best.get(b)
        return x / y if x is not None and y else None

    return {
        "key_ref": ref,
        "mechanisms": mechanisms,
        "ecdsa_path": "CKM_ECDSA_SHA256"
        if "ECDSA_SHA256" in mechanisms
        else "SHA-256 in Python + CKM_ECDSA",
        "runs": runs,
        "rates": best,
        "outcomes": {k: [run["outcome"] for run in rs] for k, rs in runs.items()},
        "ratios": {t: ratio(f"pkcs11/{t}", f"cryptography/{t}") for t in counts},
        "pkcs11_scaling": ratio(f"pkcs11/{n}", "pkcs11/1"),
        "cryptography_scaling": ratio(f"cryptography/{n}", "cryptography/1"),
    }


# -- main --------------------------------------------------------------------------------------
def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the token goes


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args: argparse.Namespace, issuance: dict[str, Any], signing: dict[str, Any]) -> None:
    print(
        f"\nPKCS#11 backend on SoftHSM2 ({MODULE}), one process, {os.cpu_count()} CPUs; "
        f"best of {args.rounds} rounds of {args.seconds:g} s"
    )
    print("\nissuance, CSR PEM -> certificate PEM (+ pre-signed OCSP response), SQLite, P-256")
    print(f"{'backend':<14}{'certs/s':>10}{'first issue (cold)':>22}")
    for name in ("software", "pkcs11"):
        print(
            f"{name:<14}{issuance[f'{name}_rate']:>10,.0f}"
            f"{issuance['cold_first_issue_s'][name] * 1000:>19.0f} ms"
        )
    per_round = ", ".join(f"{r:.2f}" for r in issuance["ratio_per_round"])
    print(f"ratio pkcs11/software {issuance['ratio']:.2f} (per round: {per_round})")

    print(f"\nraw ECDSA P-256 signatures, 300-byte message ({signing['ecdsa_path']})")
    print(f"{'threads':<9}{'pkcs11/s':>10}{'cryptography/s':>16}{'ratio':>8}  token outcomes")
    rates, outcomes = signing["rates"], signing["outcomes"]
    for t, r in signing["ratios"].items():
        print(
            f"{t:<9}{_fmt(rates[f'pkcs11/{t}'], ',.0f'):>10}"
            f"{_fmt(rates[f'cryptography/{t}'], ',.0f'):>16}{_fmt(r, '.2f'):>8}  "
            f"{', '.join(outcomes[f'pkcs11/{t}'])}"
        )
    n = args.threads
    if n > 1:
        print(
            f"{n} threads / 1 thread: pkcs11 {_fmt(signing['pkcs11_scaling'], '.2f')}, "
            f"cryptography {_fmt(signing['cryptography_scaling'], '.2f')} (the backend "
            "serialises calls into the module: one lock per module and process)"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hsm",
        description="PKCS#11 backend on a throwaway SoftHSM2 token: end-to-end issuance "
        "(SQLite) pkcs11 vs software backend, and raw ECDSA P-256 signs/s on the token vs "
        "cryptography with 1 and N threads, in one run. Token phases run in child processes "
        "(a crash in the module is reported, not fatal). About 12 x --seconds + 10 s.",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per phase (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per comparison (2)")
    parser.add_argument("--threads", type=int, default=4, help="threads for the N-thread run (4)")
    parser.add_argument("--pool", type=int, default=200, help="distinct CSRs to cycle (200)")
    parser.add_argument("--sign-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sign_child:
        return sign_child(args.sign_child)
    if args.seconds <= 0 or args.rounds <= 0 or args.pool <= 0:
        parser.error("--seconds, --rounds and --pool must be positive")
    if not 1 <= args.threads <= 64:
        parser.error("--threads must be between 1 and 64")
    signal.signal(signal.SIGTERM, _terminate)

    progress(f"generating {args.pool} CSRs (not measured)")
    csrs = make_csrs(args.pool)
    with softhsm_token() as token:
        issuance = bench_issuance(token, args, csrs)
        signing = bench_signing(token, args)
    report(args, issuance, signing)
    write_result(
        "hsm",
        {
            "args": vars(args),
            "module": MODULE,
            "issuance": issuance,
            "signing": signing,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
