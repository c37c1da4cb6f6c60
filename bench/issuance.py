"""End-to-end issuance rate: CSR in (PEM), certificate out (PEM), through Sekisho's real path
(``services.ca.issue_from_csr``: CSR checks, profile rules, the lint gate (pkilint on the
TBS), intent row committed before signing, issued row + audit entry committed after) on
SQLite and/or PostgreSQL, then the same without the lint gate, beside a raw
``cryptography`` loop doing the same CSR parse + signature check + certificate build (BC, KU,
EKU, SKI, AKI, SAN, CDP, AIA) + sign + PEM in the same run. Prints Sekisho / raw as a ratio.

    python -m bench.issuance [--seconds 5] [--count N] [--rounds 2] [--database both]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import os
import pstats
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select

from audit.models import JournalRecord
from bench.common import (
    BASE_URL,
    BENCH_ACTOR,
    deployment,
    peak_rss_mib,
    progress,
    run_each_database,
    write_result,
)
from ca.models import Certificate, CertStatus

TARGET_RATIO = 0.5
CA_NAME = "admin"
PROFILE = "admin-client"


def make_csrs(n: int) -> list[bytes]:
    """``n`` distinct P-256 CSRs for the admin-client profile (not measured)."""
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tenant One"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Bench Admin {i}"),
            ]
        )
        san = x509.SubjectAlternativeName([x509.RFC822Name(f"admin{i}@tenant1.example.com")])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(subject)
            .add_extension(san, critical=False)
            .sign(key, hashes.SHA256())
        )
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


class RawIssuer:
    """The reference: what issuing costs with ``cryptography`` alone, no store, no rules."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench Corp"),
                x509.NameAttribute(NameOID.COMMON_NAME, "Bench Raw Issuing CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.aki = x509.AuthorityKeyIdentifier(ski.digest, None, None)
        self.cdp = x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(f"{BASE_URL}/crl/{CA_NAME}.crl")],
                    relative_name=None,
                    reasons=None,
                    crl_issuer=None,
                )
            ]
        )
        self.aia = x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(f"{BASE_URL}/ocsp"),
                ),
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(f"{BASE_URL}/ca/{CA_NAME}.crt"),
                ),
            ]
        )

    def issue(self, pem: bytes, serial: int | None = None) -> bytes:
        csr = x509.load_pem_x509_csr(pem)
        if not csr.is_signature_valid:
            raise ValueError("bad CSR signature")
        public_key = csr.public_key()
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        now = dt.datetime.now(dt.UTC)
        builder = x509.CertificateBuilder(
            issuer_name=self.name,
            subject_name=csr.subject,
            public_key=public_key,
            serial_number=serial or secrets.randbits(159) | (1 << 158),
            not_valid_before=now - dt.timedelta(minutes=1),
            not_valid_after=now + dt.timedelta(days=365),
        )
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(self.aki, False)
            .add_extension(san, False)
            .add_extension(self.cdp, False)
            .add_extension(self.aia, False)
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM)


class DurableRawIssuer:
    """The raw loop plus the least storage the issuance rules need, on the database's own
    file system: the reserved serial appended and ``fdatasync``'d before signing, the
    certificate appended and ``fdatasync``'d before it is handed out. No database, no
    journal, no rules: what two ordered durable points cost on this disk, beside the rest."""

    def __init__(self, raw: RawIssuer, directory: Path) -> None:
        self.raw = raw
        self.fd = os.open(
            directory / "bench-durable-reference.log",
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        self.syncs = 0
        self.sync_seconds = 0.0

    def _durable(self, data: bytes) -> None:
        os.write(self.fd, data)
        t0 = time.perf_counter()
        os.fdatasync(self.fd)
        self.sync_seconds += time.perf_counter() - t0
        self.syncs += 1

    def issue(self, pem: bytes) -> bytes:
        serial = secrets.randbits(159) | (1 << 158)
        self._durable(b"intent %040x\n" % serial)
        out = self.raw.issue(pem, serial)
        self._durable(out)
        return out

    def close(self) -> None:
        os.close(self.fd)


def run_phase(
    label: str, fn: Callable[[bytes], bytes], csrs: list[bytes], seconds: float, count: int
) -> dict[str, Any]:
    """Call ``fn`` on CSRs round-robin until ``count`` done or ``seconds`` passed."""
    done = 0
    n = len(csrs)
    start = time.perf_counter()
    deadline = start + seconds
    next_report = start + 1.0
    while done < count:
        fn(csrs[done % n])
        done += 1
        if done & 31 == 0:
            now = time.perf_counter()
            if now >= deadline:
                break
            if now >= next_report:
                progress(f"  {label}: {done} issued, {done / (now - start):,.0f}/s")
                next_report = now + 1.0
    elapsed = time.perf_counter() - start
    return {"label": label, "count": done, "seconds": elapsed, "rate": done / elapsed}


def print_profile(profiler: cProfile.Profile, limit: int) -> None:
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(limit)
    print(buf.getvalue(), file=sys.stderr)
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(limit)
    print(buf.getvalue(), file=sys.stderr)


def bench_database(database: str, args: argparse.Namespace, csrs: list[bytes]) -> dict[str, Any]:
    raw = RawIssuer()
    with deployment(database, pg_fast=args.pg_fast) as services:

        def sekisho_issue(pem: bytes) -> bytes:
            cert = services.ca.issue_from_csr(pem, ca=CA_NAME, profile=PROFILE, actor=BENCH_ACTOR)
            return cert.public_bytes(serialization.Encoding.PEM)

        # Warm-up (not measured): first use loads the CA key (scrypt) and the CA context.
        t0 = time.perf_counter()
        first = sekisho_issue(csrs[0])
        cold = time.perf_counter() - t0
        for pem in csrs[1:20]:
            sekisho_issue(pem)
            raw.issue(pem)
        durable = DurableRawIssuer(raw, services.settings.data_dir)
        raw_runs, durable_runs, sekisho_runs, unlinted_runs = [], [], [], []
        linter = services.ca.linter
        for r in range(args.rounds):
            progress(f"{database}: round {r + 1}/{args.rounds}: raw cryptography loop")
            raw_runs.append(run_phase("raw", raw.issue, csrs, args.seconds, args.count))
            progress(f"{database}: round {r + 1}/{args.rounds}: raw loop + two fdatasyncs")
            durable_runs.append(
                run_phase("raw+sync", durable.issue, csrs, args.seconds, args.count)
            )
            progress(f"{database}: round {r + 1}/{args.rounds}: Sekisho issue_from_csr")
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            sekisho_runs.append(run_phase("sekisho", sekisho_issue, csrs, args.seconds, args.count))
            if profiler is not None:
                profiler.disable()
                print_profile(profiler, args.profile)
            if linter is not None:  # the same path with lint_before_signing = false
                progress(f"{database}: round {r + 1}/{args.rounds}: Sekisho without the lint gate")
                services.ca.linter = None
                try:
                    unlinted_runs.append(
                        run_phase("unlinted", sekisho_issue, csrs, args.seconds, args.count)
                    )
                finally:
                    services.ca.linter = linter
        # Sanity: the store holds what we issued, and the certificate has the same extensions.
        with services.db.scope() as session:
            issued = session.scalar(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.status == CertStatus.ISSUED)
            )
            journal = session.scalar(select(func.count()).select_from(JournalRecord))
        ours = x509.load_pem_x509_certificate(first)
        theirs = x509.load_pem_x509_certificate(raw.issue(csrs[0]))
        same_exts = [e.oid for e in ours.extensions] == [e.oid for e in theirs.extensions]
        durable.close()
    best_raw = max(r["rate"] for r in raw_runs)
    best_durable = max(r["rate"] for r in durable_runs)
    best_sek = max(r["rate"] for r in sekisho_runs)
    best_unlinted = max((r["rate"] for r in unlinted_runs), default=None)
    sync_s = durable.sync_seconds / max(durable.syncs, 1)
    return {
        "database": database,
        "raw_runs": raw_runs,
        "sekisho_runs": sekisho_runs,
        "raw_rate": best_raw,
        "sekisho_rate": best_sek,
        "ratio": best_sek / best_raw,
        "durable_runs": durable_runs,
        "durable_rate": best_durable,
        "ratio_to_durable": best_sek / best_durable,
        "lint_gate": linter is not None,
        "unlinted_runs": unlinted_runs,
        "unlinted_rate": best_unlinted,
        "ratio_unlinted": best_unlinted / best_raw if best_unlinted else None,
        # What the lint gate (pkilint on each TBS) adds to one issuance, in seconds.
        "lint_seconds_per_issue": 1 / best_sek - 1 / best_unlinted if best_unlinted else None,
        "fdatasync_mean_s": sync_s,
        # The best any issuer with two ordered durable points can reach against the raw loop
        # on this disk, even with no other cost at all: raw time / (raw time + two syncs).
        "ceiling_two_syncs": (1 / best_raw) / (1 / best_raw + 2 * sync_s),
        "ceiling_one_sync": (1 / best_raw) / (1 / best_raw + sync_s),
        "ratio_median": statistics.median(
            s["rate"] / r["rate"] for s, r in zip(sekisho_runs, raw_runs, strict=True)
        ),
        "cold_first_issue_s": cold,
        "issued_rows": issued,
        "journal_records": journal,
        "same_extensions_as_raw": same_exts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.issuance",
        description="Issuance rate through Sekisho (CSR PEM in, certificate PEM out, durable "
        "store + audit journal) beside a raw cryptography loop in the same run.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="time per phase (default 5)")
    parser.add_argument("--count", type=int, default=1_000_000, help="max issuances per phase")
    parser.add_argument("--rounds", type=int, default=2, help="raw/Sekisho alternations (2)")
    parser.add_argument("--pool", type=int, default=200, help="distinct CSRs to cycle (200)")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="both", help="(both)"
    )
    parser.add_argument(
        "--pg-fast",
        action="store_true",
        help="run PostgreSQL with fsync/synchronous_commit off (default: production defaults)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile Sekisho; print top N"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.count <= 0 or args.rounds <= 0 or args.pool <= 0:
        parser.error("--seconds, --count, --rounds and --pool must be positive")

    progress(f"generating {args.pool} CSRs (not measured)")
    csrs = make_csrs(args.pool)
    results, skipped = run_each_database(
        args.database, lambda database: bench_database(database, args, csrs)
    )
    ok = True
    print(f"\nissuance, CSR PEM -> certificate PEM, one process, P-256 CA, profile {PROFILE}")
    print(f"{'database':<10}{'Sekisho/s':>12}{'raw/s':>10}{'ratio':>8}  target >= {TARGET_RATIO}")
    for res in results:
        flag = "ok" if res["ratio"] >= TARGET_RATIO else "BELOW TARGET"
        ok = ok and res["ratio"] >= TARGET_RATIO
        print(
            f"{res['database']:<10}{res['sekisho_rate']:>12,.0f}{res['raw_rate']:>10,.0f}"
            f"{res['ratio']:>8.2f}  {flag} (median of rounds {res['ratio_median']:.2f}; "
            f"first issue cold {res['cold_first_issue_s'] * 1000:.0f} ms; "
            f"{res['issued_rows']} issued rows, {res['journal_records']} journal records; "
            f"extensions match raw: {res['same_extensions_as_raw']})"
        )
        print(
            f"{'':<10}{'':>12}{res['durable_rate']:>10,.0f}"
            f"{res['ratio_to_durable']:>8.2f}  against the raw loop + two fdatasyncs "
            f"(mean fdatasync {res['fdatasync_mean_s'] * 1e6:.0f} us here; even at zero "
            f"other cost, the ratio to the raw loop cannot pass {res['ceiling_two_syncs']:.2f} "
            f"with two durable points, {res['ceiling_one_sync']:.2f} with one)"
        )
        if res["unlinted_rate"]:
            print(
                f"{'':<10}{res['unlinted_rate']:>12,.0f}{res['raw_rate']:>10,.0f}"
                f"{res['ratio_unlinted']:>8.2f}  with lint_before_signing = false (the lint "
                f"gate costs {res['lint_seconds_per_issue'] * 1000:.1f} ms per issuance)"
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    write_result(
        "issuance",
        {
            "args": vars(args),
            "target_ratio": TARGET_RATIO,
            "results": results,
            "skipped": skipped,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    if not ok:
        print(f"below the target ratio {TARGET_RATIO}: profile with --profile 30")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
