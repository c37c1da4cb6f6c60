"""``audit prove``: an inclusion proof (a record in the middle) and a consistency proof (the
middle checkpoint to the last) over a journal of N records, beside the floor of any proof that
checks the signed root, measured in the same run: one read of every leaf from the store and
its tree hash. Also the peak of Python allocations (``tracemalloc``) of each, beside that of
the same read holding every leaf hash in a list (what ``audit prove`` did until stop 19).

    python -m bench.prove [--sizes 100000] [--database sqlite]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.journal import consecutive_leaves, leaf_reader
from audit.merkle import Frontier
from audit.models import Checkpoint
from audit.prove import consistency, inclusion
from bench.common import (
    deployment,
    parse_sizes,
    peak_rss_mib,
    progress,
    run_each_database,
    write_result,
)
from bench.retention import fill


def measured(fn: Callable[[], Any]) -> tuple[float, float]:
    """(seconds untraced, peak MiB of Python allocations traced) of ``fn()``."""
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak / 2**20


def streamed_root(session: Session, size: int) -> bytes:
    frontier = Frontier()
    frontier.extend(consecutive_leaves(leaf_reader(session), 0, size))
    return frontier.root()


def listed_root(session: Session, size: int) -> bytes:
    leaves = list(consecutive_leaves(leaf_reader(session), 0, size))
    frontier = Frontier()
    frontier.extend(leaves)
    return frontier.root()


def bench_size(database: str, count: int) -> dict[str, Any]:
    with deployment(database) as services:
        now = services.clock()
        progress(f"{database}: {count:,} records in two halves, a checkpoint after each")
        fill(services, count // 2, now - dt.timedelta(days=1))
        fill(services, count - count // 2, now)
        origin = services.journal.origin
        with services.db.read_scope(snapshot=True) as session:
            seqs = sorted(session.scalars(select(Checkpoint.seq)))
            middle, last = seqs[len(seqs) // 2], seqs[-1]
            progress(f"{database}: reference, one read of {last:,} leaves and their root")
            floor_s, floor_mib = measured(lambda: streamed_root(session, last))
            _, listed_mib = measured(lambda: listed_root(session, last))
            progress(f"{database}: audit prove inclusion, consistency {middle} -> {last}")
            inclusion_s, inclusion_mib = measured(
                lambda: inclusion(session, origin, [count // 3], None)
            )
            consistency_s, consistency_mib = measured(
                lambda: consistency(session, origin, middle, last)
            )
    return {
        "database": database,
        "records": last,
        "floor_s": floor_s,
        "floor_peak_mib": floor_mib,
        "all_leaves_listed_peak_mib": listed_mib,
        "inclusion_s": inclusion_s,
        "inclusion_peak_mib": inclusion_mib,
        "inclusion_over_floor": inclusion_s / floor_s,
        "consistency_s": consistency_s,
        "consistency_peak_mib": consistency_mib,
        "consistency_over_floor": consistency_s / floor_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.prove",
        description="audit prove (inclusion, consistency) beside one read of the leaves.",
    )
    parser.add_argument("--sizes", default="100000", help="records (100000)")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="sqlite", help="(sqlite)"
    )
    args = parser.parse_args(argv)
    sizes = parse_sizes(parser, args.sizes, minimum=4)

    def each(database: str) -> dict[str, Any]:
        return {"database": database, "runs": [bench_size(database, n) for n in sizes]}

    results, skipped = run_each_database(args.database, each)
    print("\naudit prove over N records; floor: one read of the leaves + root (same run)")
    print(
        f"{'database':<10}{'records':>10}{'floor s':>9}{'incl s':>8}{'ratio':>7}"
        f"{'cons s':>8}{'ratio':>7}{'peak MiB: floor':>17}{'prove':>7}{'all leaves':>12}"
    )
    for res in results:
        for run in res["runs"]:
            prove_mib = max(run["inclusion_peak_mib"], run["consistency_peak_mib"])
            print(
                f"{run['database']:<10}{run['records']:>10,}{run['floor_s']:>9.2f}"
                f"{run['inclusion_s']:>8.2f}{run['inclusion_over_floor']:>7.2f}"
                f"{run['consistency_s']:>8.2f}{run['consistency_over_floor']:>7.2f}"
                f"{run['floor_peak_mib']:>17.1f}{prove_mib:>7.1f}"
                f"{run['all_leaves_listed_peak_mib']:>12.1f}"
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    write_result("prove", {"results": results, "skipped": skipped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
