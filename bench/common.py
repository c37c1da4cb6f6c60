"""Shared benchmark plumbing: throwaway deployments (SQLite or a temporary PostgreSQL cluster,
the tests' ``PgCluster`` with production durability unless asked otherwise), progress output,
peak RSS, running each chosen database, and the JSON results file.

Nothing here is measured; it only builds what the benchmarks measure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sekisho.bootstrap import InitPlan, initialise
from sekisho.context import Actor
from sekisho.services import Services, build_services, ensure_data_dir
from sekisho.settings import load_settings
from tests.support import pg

RESULTS_DIR = Path(__file__).with_name("results")
BASE_URL = "http://pki.example.com"
BENCH_ACTOR = Actor(account="bench:operator", client_ip="127.0.0.1")


def progress(message: str) -> None:
    """Progress goes to stderr so stdout keeps only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (the payload and the machine) and say where."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    print(f"results written to {path}")
    return path


def parse_sizes(parser: argparse.ArgumentParser, text: str, minimum: int = 1) -> list[int]:
    """``--sizes``: numbers separated by commas, each at least ``minimum`` (else a usage
    error through ``parser``)."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers separated by commas")
    if not sizes or any(s < minimum for s in sizes):
        parser.error(f"--sizes must be at least {minimum}")
    return sizes


def databases(choice: str) -> list[str]:
    return ["sqlite", "postgres"] if choice == "both" else [choice]


def run_each_database(
    choice: str, bench: Callable[[str], dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``bench(database)`` for each chosen database: (results, {database: why skipped})."""
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for database in databases(choice):
        try:
            results.append(bench(database))
        except PgUnavailable as exc:
            print(f"{database}: skipped, PostgreSQL could not be started: {exc}")
            skipped[database] = str(exc)
    return results, skipped


@contextlib.contextmanager
def deployment(
    database: str,
    *,
    pg_fast: bool = False,
    checkpoint_every: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Iterator[Services]:
    """An initialised Sekisho deployment (root + issuing CAs ``admin`` and ``device``) in a
    temporary data directory, on SQLite or on a throwaway PostgreSQL; removed afterwards.
    ``settings`` adds setting overrides (e.g. the pkcs11 key backend)."""
    tmp = Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    server: pg.PgCluster | None = None
    services: Services | None = None
    try:
        overrides: dict[str, Any] = {"data_dir": tmp / "data", "base_url": BASE_URL}
        if checkpoint_every is not None:
            overrides["audit_checkpoint_every"] = checkpoint_every
        overrides.update(settings or {})
        if database == "postgres":
            why = pg.available()
            if why is not None:
                raise PgUnavailable(why)
            progress("starting a throwaway PostgreSQL cluster")
            # PostgreSQL's durability defaults (fsync, synchronous_commit on) unless pg_fast:
            # the benchmark should see what a production deployment pays per commit.
            server = pg.PgCluster(fast=pg_fast)
            try:
                server.start()
            except (OSError, pg.PgError, subprocess.SubprocessError) as exc:
                raise PgUnavailable(str(exc)) from exc
            overrides["database_url"] = server.create_database("sekisho_bench")
        loaded = load_settings(env={}, overrides=overrides)
        progress(f"initialising a deployment on {database} (keys, root, issuing CAs)")
        ensure_data_dir(loaded, create=True)
        services = build_services(loaded)
        initialise(services, InitPlan(organization="Bench Corp"), BENCH_ACTOR)
        yield services
    finally:
        if services is not None:
            services.close()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


class PgUnavailable(RuntimeError):
    """PostgreSQL could not be started here; the benchmark skips it and says why."""
