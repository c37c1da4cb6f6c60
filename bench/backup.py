"""Backup and restore of a store holding N certificates (10^5, 10^6 by default), SQLite and/or
PostgreSQL: ``sekisho.backup.create`` (copy of one snapshot, key files, manifest, signature,
tar, journal entry), ``verify_archive`` and ``restore``, each beside the bare copy it is built
on, measured in the same run: SQLite ``VACUUM INTO`` then SHA-256 of the copy; PostgreSQL
``pg_dump --format=custom`` of the database. Prints Sekisho / bare copy as a ratio.

    python -m bench.backup [--sizes 100000,1000000] [--database both]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.common import (
    BENCH_ACTOR,
    deployment,
    peak_rss_mib,
    progress,
    run_each_database,
    write_result,
)
from bench.crl import bulk_insert
from ca.models import CertificateAuthority
from sekisho import backup
from sekisho.db import sqlite_file
from sekisho.services import Services


def bare_copy(services: Services, into: Path) -> float:
    """The floor under a backup: one consistent copy of the store (and, for SQLite, its
    digest: the manifest needs one)."""
    into.unlink(missing_ok=True)
    t0 = time.perf_counter()
    path = sqlite_file(services.settings.db_url)
    if path is not None:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            conn.execute("VACUUM INTO ?", (str(into),))
        backup.file_digest(into)
    else:
        backup._run_pg_tool(
            [backup.pg_tool("pg_dump"), "--format=custom", f"--file={into}"],
            services.settings.db_url,
        )
    return time.perf_counter() - t0


def bench_size(services: Services, work: Path, n: int) -> dict[str, Any]:
    floor = bare_copy(services, work / "bare.copy")
    archive = work / f"backup-{n}.tar"
    archive.unlink(missing_ok=True)
    t0 = time.perf_counter()
    made = backup.create(services, archive, BENCH_ACTOR)
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    backup.verify_archive(archive)
    verified = time.perf_counter() - t0
    restore_s: float | None = None  # PostgreSQL: a second database would be needed; not run
    if not services.settings.database_url:
        restored_at = work / f"restored-{n}"
        t0 = time.perf_counter()
        backup.restore(
            archive, restored_at, BENCH_ACTOR, passphrase_file=services.settings.passphrase_path
        )
        restore_s = time.perf_counter() - t0
        shutil.rmtree(restored_at, ignore_errors=True)
    result = {
        "certificates": n,
        "archive_bytes": made["size"],
        "bare_copy_s": floor,
        "create_s": created,
        "create_ratio": created / floor,
        "verify_s": verified,
        "restore_s": restore_s,
    }
    archive.unlink()
    return result


def bench_database(database: str, args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out: list[dict[str, Any]] = []
    with deployment(database) as services, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with services.db.scope() as session:
            ca_id = session.scalar(
                select(CertificateAuthority.id).where(CertificateAuthority.name == "admin")
            )
        assert ca_id is not None
        have = 0
        for n in sizes:
            progress(f"{database}: filling the store to {n:,} certificates")
            bulk_insert(services, ca_id, have, n - have, dt.datetime.now(dt.UTC))
            have = n
            progress(f"{database}: backup of {n:,} certificates")
            out.append(bench_size(services, work, n))
    return {"database": database, "sizes": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backup",
        description="Backup create / verify / restore beside the bare store copy, same run.",
    )
    parser.add_argument("--sizes", default="100000,1000000", help="certificates (comma list)")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="both", help="(both)"
    )
    args = parser.parse_args(argv)
    results, skipped = run_each_database(args.database, lambda db: bench_database(db, args))
    print("\nbackup of a store of N certificates (seconds; ratio = create / bare copy)")
    print(
        f"{'database':<10}{'N':>10}{'MB':>8}{'bare':>8}{'create':>8}{'ratio':>7}"
        f"{'verify':>8}{'restore':>9}"
    )
    for res in results:
        for row in res["sizes"]:
            restore = f"{row['restore_s']:>9.2f}" if row["restore_s"] is not None else f"{'-':>9}"
            print(
                f"{res['database']:<10}{row['certificates']:>10,}"
                f"{row['archive_bytes'] / 1e6:>8.1f}{row['bare_copy_s']:>8.2f}"
                f"{row['create_s']:>8.2f}{row['create_ratio']:>7.2f}{row['verify_s']:>8.2f}"
                f"{restore}"
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    write_result(
        "backup",
        {"args": vars(args), "results": results, "skipped": skipped, "rss": peak_rss_mib()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
