"""The journal's Merkle tree: the root over 10^5 and 10^6 records (leaf hashes plus the
frontier, ``audit.merkle``) beside raw ``hashlib`` SHA-256 of the same canonical bytes, and
the hash chain over them, measured in the same run; then, on a real deployment, one
checkpoint's incremental root over 1000 new records (the previous checkpoint's frontier
extended with the records read back from the store), beside the signature of that checkpoint.

Records are canonical encodings (``audit.chain.canonical``) of varied synthetic events; the
larger sizes cycle through 10^5 distinct ones (SHA-256 costs the same whatever the bytes)
so that the input does not take gigabytes.

    python -m bench.merkle [--sizes 100000,1000000] [--new 1000] [--database sqlite]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import statistics
import time
from typing import Any

from sqlalchemy import select

from audit.chain import canonical, canonical_json
from audit.events import Category, Event, Outcome
from audit.journal import checkpoint_tree, leaf_reader
from audit.merkle import Frontier, leaf_hash
from audit.models import Checkpoint, JournalHead
from bench.common import deployment, peak_rss_mib, progress, run_each_database, write_result

POOL = 100_000
REPEATS = 5


def records(count: int) -> list[bytes]:
    """``count`` distinct canonical records, shaped as the journal writes them."""
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    out = []
    for n in range(1, count + 1):
        out.append(
            canonical(
                {
                    "seq": n,
                    "time": start + dt.timedelta(seconds=n),
                    "category": "ca",
                    "action": "ca.issue",
                    "outcome": "success",
                    "actor_account": f"enrol-{n % 17}@tenant.example",
                    "actor_serial": None,
                    "client_ip": f"10.{n % 256}.{n // 256 % 256}.7",
                    "object_dn": f"CN=device-{n},OU=Devices,O=Tenant One",
                    "object_serial": f"{0x5F3A0000 + n:040x}",
                    "device_id": f"dev-{n}",
                    "device_mac": f"02:00:00:{n // 65536 % 256:02x}:{n // 256 % 256:02x}:"
                    f"{n % 256:02x}",
                    "request_id": f"req-{n:012d}",
                    "detail": canonical_json({"profile": "device", "days": 365}),
                }
            )
        )
    return out


def raw(data: list[bytes]) -> None:
    """The reference: SHA-256 of each record's canonical bytes, nothing else."""
    for d in data:
        hashlib.sha256(d).digest()


def chain(data: list[bytes]) -> bytes:
    head = bytes(32)
    for d in data:
        head = hashlib.sha256(head + d).digest()
    return head


def root(data: list[bytes]) -> bytes:
    frontier = Frontier()
    for d in data:
        frontier.append(leaf_hash(d))
    return frontier.root()


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - started, value


def in_memory(sizes: list[int]) -> list[dict[str, Any]]:
    progress(f"encoding {min(POOL, max(sizes)):,} canonical records")
    pool = records(min(POOL, max(sizes)))
    out = []
    for size in sizes:
        data = [pool[i % len(pool)] for i in range(size)]

        progress(f"{size:,} records: raw SHA-256, chain, Merkle root")
        raw_s, _ = _timed(raw, data)
        chain_s, _ = _timed(chain, data)
        root_s, _ = _timed(root, data)
        out.append(
            {
                "records": size,
                "bytes": sum(len(d) for d in data),
                "raw_sha256_seconds": raw_s,
                "chain_seconds": chain_s,
                "merkle_root_seconds": root_s,
                "merkle_vs_raw": root_s / raw_s,
            }
        )
    return out


def incremental(database: str, new: int) -> dict[str, Any]:
    """One checkpoint's tree work over ``new`` records after a checkpoint with a frontier."""
    with deployment(
        database, checkpoint_every=10**9, settings={"audit_checkpoint_minutes": 1440}
    ) as services:
        journal, clock = services.journal, services.clock
        with services.db.scope() as session:
            journal.checkpoint(session, clock())  # the frontier the next one extends
        progress(f"{database}: appending {new} records")
        with services.db.scope() as session:
            for n in range(new):
                event = Event(
                    category=Category.CA,
                    action="ca.issue",
                    outcome=Outcome.SUCCESS,
                    actor_account="bench",
                    object_serial=f"{n:040x}",
                    detail={"n": n},
                )
                journal.append(session, event, clock())
        with services.db.scope() as session:
            head = session.get(JournalHead, 1)
            assert head is not None
            previous = session.execute(
                select(Checkpoint.body, Checkpoint.merkle_frontier).where(
                    Checkpoint.seq == head.checkpoint_seq
                )
            ).first()
            signer = journal.signer
            assert signer is not None
            tree_runs, sign_runs = [], []
            for _ in range(REPEATS):
                seconds, tree = _timed(
                    lambda: checkpoint_tree(
                        leaf_reader(session), head.checkpoint_seq, previous, head.seq
                    )
                )
                assert tree is not None and tree.size == head.seq
                tree_runs.append(seconds)
                body = f"bench\n{head.seq}\n{tree.root().hex()}\n".encode()
                started = time.perf_counter()
                signer.sign(body)
                sign_runs.append(time.perf_counter() - started)
            rebuild_s, _ = _timed(
                lambda: checkpoint_tree(leaf_reader(session), head.checkpoint_seq, None, head.seq)
            )
            checkpoint_s, row = _timed(lambda: journal.checkpoint(session, clock()))
            assert row is not None
        return {
            "database": database,
            "new_records": new,
            "after_seq": head.checkpoint_seq,
            "incremental_root_seconds": statistics.median(tree_runs),
            "signature_seconds": statistics.median(sign_runs),
            "rebuild_from_record_1_seconds": rebuild_s,
            "whole_checkpoint_seconds": checkpoint_s,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.merkle",
        description="Merkle root time beside raw SHA-256 of the same bytes, and one "
        "checkpoint's incremental root, in the same run.",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=[100_000, 1_000_000],
        help="comma-separated record counts (default 100000,1000000)",
    )
    parser.add_argument("--new", type=int, default=1000, help="records per checkpoint (1000)")
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "both"), default="sqlite", help="(sqlite)"
    )
    args = parser.parse_args(argv)
    if any(s <= 0 or s > 10_000_000 for s in args.sizes):
        parser.error("--sizes must be between 1 and 10,000,000")
    if not 0 < args.new <= 100_000:
        parser.error("--new must be between 1 and 100,000")

    memory = in_memory(args.sizes)
    checkpoints, skipped = run_each_database(
        args.database, lambda database: incremental(database, args.new)
    )

    print("\nMerkle root over canonical records (leaf hash + frontier), one core")
    print(f"{'records':>10}{'raw SHA-256 s':>15}{'chain s':>9}{'root s':>8}{'root/raw':>10}")
    for run in memory:
        print(
            f"{run['records']:>10,}{run['raw_sha256_seconds']:>15.3f}{run['chain_seconds']:>9.3f}"
            f"{run['merkle_root_seconds']:>8.3f}{run['merkle_vs_raw']:>10.2f}"
        )
    print(f"\none checkpoint over {args.new} new records (median of {REPEATS})")
    for run in checkpoints:
        print(
            f"{run['database']}: incremental root {run['incremental_root_seconds'] * 1000:.1f} ms"
            f" (rebuilt from record 1: {run['rebuild_from_record_1_seconds'] * 1000:.1f} ms); "
            f"reference, the checkpoint's signature: {run['signature_seconds'] * 1000:.2f} ms; "
            f"whole checkpoint {run['whole_checkpoint_seconds'] * 1000:.1f} ms"
        )
    write_result(
        "merkle",
        {
            "in_memory": memory,
            "checkpoint": checkpoints,
            "skipped": skipped,
            "peak_rss_mib": peak_rss_mib(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
