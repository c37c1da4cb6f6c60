"""``audit purge``: removing N journal records whose retention has ended (each leaving a
tombstone, one ``audit.purge`` record per batch, a checkpoint at the end), beside ``audit
verify`` of the same journal in the same run (the purge command verifies first, so its cost
is that verify plus this). Then ``audit verify`` of the purged journal, which walks the
tombstones.

The records are system events dated three years back (appended with that time, 1000 per
transaction, then signed), so every one of them is due.

    python -m bench.retention [--sizes 10000,100000] [--database both]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from typing import Any

from audit import retention
from audit.events import Category, Event, Outcome
from audit.verify import verify
from bench.common import (
    BENCH_ACTOR,
    deployment,
    parse_sizes,
    peak_rss_mib,
    progress,
    run_each_database,
    write_result,
)
from sekisho.services import Services

PER_TX = 1000


def fill(services: Services, count: int, when: dt.datetime) -> None:
    """``count`` records dated ``when`` (a second apart), then a checkpoint over them."""
    done = 0
    while done < count:
        with services.db.scope() as session:
            for n in range(done, min(done + PER_TX, count)):
                services.journal.append(
                    session,
                    Event(
                        Category.SYSTEM,
                        "system.bench",
                        Outcome.SUCCESS,
                        actor_account=f"bench-{n % 17}",
                        client_ip=f"10.0.{n % 256}.7",
                        detail={"n": n},
                    ),
                    when + dt.timedelta(seconds=n),
                )
        done = min(done + PER_TX, count)
        if done % 20_000 == 0 or done == count:
            progress(f"  {done:,} records written")
    with services.db.scope() as session:
        services.journal.checkpoint(session, when + dt.timedelta(seconds=count))


def timed_verify(services: Services) -> float:
    keys = {services.journal.signer.public_key_der} if services.journal.signer else set()
    t0 = time.perf_counter()
    with services.db.read_scope(snapshot=True) as session:
        verify(session, services.journal.origin, trusted_keys=keys, initialised=True)
    return time.perf_counter() - t0


def bench_size(database: str, count: int) -> dict[str, Any]:
    with deployment(database) as services:
        now = services.clock()
        progress(f"{database}: {count:,} records dated three years back")
        fill(services, count, now - dt.timedelta(days=3 * 365))
        progress(f"{database}: audit verify (reference)")
        verify_s = timed_verify(services)
        progress(f"{database}: purge")
        t0 = time.perf_counter()
        result = retention.purge(services.db, services.journal, now, 730, BENCH_ACTOR)
        purge_s = time.perf_counter() - t0
        progress(f"{database}: audit verify of the purged journal")
        after_s = timed_verify(services)
    return {
        "database": database,
        "records": count,
        "purged": result.purged,
        "kept": result.kept,
        "verify_s": verify_s,
        "purge_s": purge_s,
        "purge_per_record_us": purge_s / max(result.purged, 1) * 1e6,
        "purge_over_verify": purge_s / verify_s,
        "verify_after_purge_s": after_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retention",
        description="audit purge of N due records beside audit verify of the same journal.",
    )
    parser.add_argument("--sizes", default="10000,100000", help="records (10000,100000)")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="both", help="(both)"
    )
    args = parser.parse_args(argv)
    sizes = parse_sizes(parser, args.sizes)

    def each(database: str) -> dict[str, Any]:
        return {"database": database, "runs": [bench_size(database, n) for n in sizes]}

    results, skipped = run_each_database(args.database, each)
    print("\naudit purge: N due records removed (tombstones, purge records, checkpoint)")
    print(
        f"{'database':<10}{'records':>10}{'verify s':>10}{'purge s':>10}{'us/rec':>8}"
        f"{'purge/verify':>14}{'verify after s':>16}"
    )
    for res in results:
        for run in res["runs"]:
            print(
                f"{run['database']:<10}{run['records']:>10,}{run['verify_s']:>10.2f}"
                f"{run['purge_s']:>10.2f}{run['purge_per_record_us']:>8.0f}"
                f"{run['purge_over_verify']:>14.2f}{run['verify_after_purge_s']:>16.2f}"
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    write_result("retention", {"results": results, "skipped": skipped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
