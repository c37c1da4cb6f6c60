"""CRL build time for 10^5 and 10^6 revoked entries of one issuing CA, through Sekisho's CRL
generator (``services.crls.generate(ca, now, delta=False)``: read the revocations, encode,
sign through the key backend, store + journal), on SQLite and/or PostgreSQL. Each size is
built a second time while another thread revokes certificates of the same CA every 20 ms:
how long a revocation waits while a large CRL is read.

Revocations are bulk-inserted straight into the certificates table first (not measured).
Reference in the same run: ``cryptography``'s ``CertificateRevocationListBuilder(
revoked_certificates=[...])`` at 10^4 entries (its ``add_revoked_certificate`` loop is
quadratic, so it is never run at 10^6); printed as an entries/s ratio.

    python -m bench.crl [--sizes 100000,1000000] [--database both] [--reference 10000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Table, func, select, update

from bench.common import (
    BENCH_ACTOR,
    deployment,
    peak_rss_mib,
    progress,
    run_each_database,
    write_result,
)
from bench.issuance import make_csrs
from ca.models import Certificate, CertificateAuthority, CertStatus
from ca.revocation import Reason
from sekisho.services import Services

CA_NAME = "admin"
TARGET_SECONDS_AT_1M = 10.0
# Reason names as stored (ca.revocation.Reason values), cycled over the bulk rows; None is
# "unspecified" (no reason extension on the entry).
REASONS = (None, "key_compromise", "superseded", "cessation_of_operation", "affiliation_changed")
CHUNK = 50_000
PROBE_CERTS = 200  # certificates issued per size for the revocation probe
PROBE_INTERVAL = 0.02  # seconds between the probe's revocations


def reference_build(n: int) -> dict[str, Any]:
    """``cryptography``'s CRL builder with the entry list given at once, ``n`` entries with
    reason codes, P-256 signature: the reference rate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench Reference CA")])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    reasons = [None, x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded]
    progress(f"reference: cryptography CertificateRevocationListBuilder, {n:,} entries")
    start = time.perf_counter()
    revoked = []
    for i in range(n):
        builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(secrets.randbits(159) | (1 << 158))
            .revocation_date(now)
        )
        reason = reasons[i % len(reasons)]
        if reason is not None:
            builder = builder.add_extension(x509.CRLReason(reason), critical=False)
        revoked.append(builder.build())
    crl = x509.CertificateRevocationListBuilder(
        issuer_name=name,
        last_update=now,
        next_update=now + dt.timedelta(days=7),
        revoked_certificates=revoked,
    ).sign(key, hashes.SHA256())
    der = crl.public_bytes(serialization.Encoding.DER)
    elapsed = time.perf_counter() - start
    return {"entries": n, "seconds": elapsed, "rate": n / elapsed, "bytes": len(der)}


def _rows(ca_id: int, start: int, n: int, now: dt.datetime) -> Iterator[tuple[Any, ...]]:
    """Revoked certificate rows: random 159-bit serials (unique by construction: the low 32
    bits are the row number), revoked over the last days, expiring next year."""
    not_before = now - dt.timedelta(days=30)
    not_after = now + dt.timedelta(days=335)
    times = [now - dt.timedelta(minutes=m) for m in range(1, 1441, 7)]
    for i in range(start, start + n):
        serial = ((secrets.randbits(126) | (1 << 125)) << 32) | i
        yield (
            ca_id,
            f"{serial:040x}",
            "revoked",
            "admin-client",
            f"CN=Bench Admin {i},O=Tenant One",
            "[]",
            not_before,
            not_after,
            "ec-p256",
            now,
            REASONS[i % len(REASONS)],
            times[i % len(times)],
            1,
        )


COLUMNS = (
    "issuer_id",
    "serial",
    "status",
    "profile",
    "subject_dn",
    "sans",
    "not_before",
    "not_after",
    "key_type",
    "created_at",
    "revocation_reason",
    "revoked_at",
    "status_epoch",
)


def bulk_insert(services: Services, ca_id: int, start: int, n: int, now: dt.datetime) -> float:
    """Insert ``n`` revoked rows directly (COPY on PostgreSQL, executemany on SQLite)."""
    t0 = time.perf_counter()
    engine = services.db.engine
    table = cast(Table, Certificate.__table__)
    rows = _rows(ca_id, start, n, now)
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            cur = raw.cursor()
            with cur.copy(f"COPY certificates ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for done, row in enumerate(rows, 1):
                    copy.write_row(row)
                    if done % 100_000 == 0:
                        progress(f"  inserted {done:,}/{n:,}")
        else:
            # Bind values exactly as the column types would (UTCDateTime text on SQLite, the
            # dialect's: without dialect_impl the sqlite3 module's adapter wrote "+00:00" too).
            dialect = engine.dialect
            procs = [
                table.c[c].type.dialect_impl(dialect).bind_processor(dialect) or (lambda v: v)
                for c in COLUMNS
            ]
            # Fixed column names and placeholders only; values are bound.
            sql = (
                f"INSERT INTO certificates ({', '.join(COLUMNS)}) "  # noqa: S608
                f"VALUES ({', '.join('?' * len(COLUMNS))})"
            )
            cur = raw.cursor()
            # The store's SQLite connections run in autocommit (Database opens its own
            # transactions): without this each row was its own synced commit (80,000 took 33 s).
            cur.execute("BEGIN IMMEDIATE")
            batch: list[tuple[Any, ...]] = []
            done = 0
            for row in rows:
                batch.append(tuple(p(v) for p, v in zip(procs, row, strict=True)))  # type: ignore[no-untyped-call]
                if len(batch) >= CHUNK:
                    cur.executemany(sql, batch)
                    done += len(batch)
                    batch.clear()
                    if done % 100_000 == 0:
                        progress(f"  inserted {done:,}/{n:,}")
            if batch:
                cur.executemany(sql, batch)
        raw.commit()
    finally:
        raw.close()
    # Make the CA's revocation epoch cover the new rows, as revocations would have.
    with services.db.scope() as session:
        session.execute(
            update(CertificateAuthority)
            .where(CertificateAuthority.id == ca_id)
            .values(revocation_epoch=CertificateAuthority.revocation_epoch + 1)
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE certificates")
    return time.perf_counter() - t0


class RevocationProbe:
    """While a full CRL is built, revoke certificates of the same CA from another thread, one
    every PROBE_INTERVAL: how long an operator's revocation waits for the build meanwhile."""

    def __init__(self, services: Services, serials: list[int]) -> None:
        self.services = services
        self.serials = serials
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="revocation-probe", daemon=True)

    def _run(self) -> None:
        for serial in self.serials:
            if self.stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                self.services.revoker.revoke(CA_NAME, serial, Reason.SUPERSEDED, BENCH_ACTOR)
            except Exception as exc:  # reported, not raised: a bench
                self.errors.append(exc.__class__.__name__)
            self.latencies.append(time.perf_counter() - t0)
            self.stop.wait(PROBE_INTERVAL)

    def __enter__(self) -> RevocationProbe:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(120)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "revocations": len(lat),
            "errors": self.errors,
            "median_ms": statistics.median(lat) * 1000 if lat else None,
            "max_ms": lat[-1] * 1000 if lat else None,
        }


def probe_serials(services: Services, n: int) -> list[int]:
    """Issue ``n`` certificates of the CA for the probe to revoke (not measured)."""
    out = []
    for pem in make_csrs(n):
        cert = services.ca.issue_from_csr(
            pem, ca=CA_NAME, profile="admin-client", actor=BENCH_ACTOR
        )
        out.append(cert.serial_number)
    return out


def openssl_verify(crl_der: bytes, issuer_der: bytes) -> str:
    """``openssl crl -inform DER -noout -CAfile issuer.pem``: prints "verify OK"."""
    if shutil.which("openssl") is None:
        return "openssl not installed: skipped"
    tmp = Path(tempfile.mkdtemp(prefix="sekisho-bench-crl-"))
    try:
        (tmp / "crl.der").write_bytes(crl_der)
        issuer = x509.load_der_x509_certificate(issuer_der)
        (tmp / "issuer.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
        done = subprocess.run(
            ["openssl", "crl", "-inform", "DER", "-in", str(tmp / "crl.der"), "-noout",
             "-CAfile", str(tmp / "issuer.pem")],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        return (done.stdout + done.stderr).decode("utf-8", "replace").strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_database(database: str, args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(args.sizes)
    out: dict[str, Any] = {"database": database, "runs": []}
    with deployment(database, pg_fast=args.pg_fast) as services:
        with services.db.scope() as session:
            ca = session.scalars(
                select(CertificateAuthority).where(CertificateAuthority.name == CA_NAME)
            ).one()
            ca_id, issuer_der = ca.id, ca.certificate_der
        issuer = x509.load_der_x509_certificate(issuer_der)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        have = 0
        for size in sizes:
            progress(f"{database}: bulk-inserting {size - have:,} revoked rows (not measured)")
            setup = bulk_insert(services, ca_id, have, size - have, now)
            have = size
            with services.db.scope() as session:
                count = session.scalar(
                    select(func.count())
                    .select_from(Certificate)
                    .where(Certificate.issuer_id == ca_id, Certificate.status == CertStatus.REVOKED)
                )
            gc.collect()
            rss_before = peak_rss_mib()
            progress(f"{database}: generating the full CRL over {count:,} revoked certificates")
            start = time.perf_counter()
            row = services.crls.generate(CA_NAME, now, delta=False)
            elapsed = time.perf_counter() - start
            rss_after = peak_rss_mib()
            crl_der = row.der
            progress(f"{database}: {size:,} entries in {elapsed:.2f} s; checking the CRL")
            crl = x509.load_der_x509_crl(crl_der)
            parsed = {
                "signature_valid": crl.is_signature_valid(issuer.public_key()),  # type: ignore[arg-type]
                "entries": len(crl),
                "crl_number": crl.extensions.get_extension_for_class(
                    x509.CRLNumber
                ).value.crl_number,
            }
            run: dict[str, Any] = {
                "entries": size,
                "revoked_rows": count,
                "stored_entries": row.entries,
                "seconds": elapsed,
                "rate": size / elapsed,
                "bytes": len(crl_der),
                "setup_seconds": setup,
                "peak_rss_mib_before": rss_before,
                "peak_rss_mib_after": rss_after,
                "cryptography_parse": parsed,
            }
            if size <= args.openssl_max:
                run["openssl"] = openssl_verify(crl_der, issuer_der)
            del crl, crl_der, row
            # The same build again, with revocations of the CA arriving meanwhile.
            serials = probe_serials(services, PROBE_CERTS)
            progress(f"{database}: the build again, revoking every {PROBE_INTERVAL * 1000:.0f} ms")
            with RevocationProbe(services, serials) as probe:
                start = time.perf_counter()
                services.crls.generate(CA_NAME, now, delta=False)
                run["seconds_with_probe"] = time.perf_counter() - start
            run["probe"] = probe.summary()
            out["runs"].append(run)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.crl",
        description="Full CRL build time through Sekisho's generator at large revocation "
        "counts, beside cryptography's CRL builder at 10^4 entries in the same run.",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=[100_000, 1_000_000],
        help="comma-separated revoked-entry counts (default 100000,1000000)",
    )
    parser.add_argument("--reference", type=int, default=10_000, help="reference size (10^4)")
    parser.add_argument(
        "--openssl-max", type=int, default=100_000, help="verify with openssl up to this size"
    )
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="both", help="(both)"
    )
    parser.add_argument(
        "--pg-fast", action="store_true", help="PostgreSQL with fsync/synchronous_commit off"
    )
    args = parser.parse_args(argv)
    if any(s <= 0 or s > 5_000_000 for s in args.sizes):
        parser.error("--sizes must be between 1 and 5,000,000")
    if not 0 < args.reference <= 50_000:
        parser.error("--reference must be between 1 and 50,000 (the builder is superlinear)")

    reference = reference_build(args.reference)
    results, skipped = run_each_database(
        args.database, lambda database: bench_database(database, args)
    )

    print("\nfull CRL build, one issuing CA (P-256), entries with reason codes")
    print(
        f"reference: cryptography CertificateRevocationListBuilder(revoked_certificates=[...]) "
        f"{reference['entries']:,} entries in {reference['seconds']:.2f} s = "
        f"{reference['rate']:,.0f} entries/s"
    )
    print(
        f"{'database':<10}{'entries':>10}{'seconds':>9}{'entries/s':>12}{'ratio':>7}"
        f"{'MB':>6}{'peak RSS MiB':>14}  checks"
    )
    for res in results:
        for run in res["runs"]:
            checks = (
                f"cryptography: signature {run['cryptography_parse']['signature_valid']}, "
                f"{run['cryptography_parse']['entries']:,} entries"
            )
            if "openssl" in run:
                checks += f"; openssl: {run['openssl']}"
            if run["entries"] >= 1_000_000:
                flag = "ok" if run["seconds"] < TARGET_SECONDS_AT_1M else "ABOVE TARGET"
                checks += f"; target < {TARGET_SECONDS_AT_1M:.0f} s at 10^6: {flag}"
            print(
                f"{res['database']:<10}{run['entries']:>10,}{run['seconds']:>9.2f}"
                f"{run['rate']:>12,.0f}{run['rate'] / reference['rate']:>7.1f}"
                f"{run['bytes'] / 1e6:>6.0f}{run['peak_rss_mib_after']:>14.0f}  {checks}"
            )
            probe = run["probe"]
            if probe["revocations"]:
                print(
                    f"{'':<10}{'':>10}{run['seconds_with_probe']:>9.2f}  the same build while "
                    f"revoking every {PROBE_INTERVAL * 1000:.0f} ms: {probe['revocations']} "
                    f"revocations, each waited {probe['median_ms']:.0f} ms (median), "
                    f"{probe['max_ms']:.0f} ms at most; errors: {probe['errors'] or 'none'}"
                )
    print(f"peak RSS of the whole run {peak_rss_mib():.0f} MiB")
    write_result(
        "crl",
        {
            "args": vars(args),
            "reference": reference,
            "results": results,
            "skipped": skipped,
            "target_seconds_at_1m": TARGET_SECONDS_AT_1M,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
