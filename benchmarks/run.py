"""Measure what encryption costs: ``python -m benchmarks.run`` (or ``scripts/bench``).

Starts a throwaway PostgreSQL, runs every measurement in this one process
(children only for the migration command lines), prints a table and writes
``bench-results.json``. Every figure is the median of ``--repeat``
repetitions with the min-max spread; every comparison is a ratio of two
figures measured side by side in the same run. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console

from benchmarks.ciphers import measure_options
from benchmarks.databases import (
    PLAINTEXT_TABLE,
    add_plaintext_copy,
    alembic_cli,
    build_legacy_at_expand,
    compact,
    connect,
    drop_database,
    server_version,
)
from benchmarks.migrations import measure_backfill, measure_rotation, run_backfill
from benchmarks.report import print_report, targets
from benchmarks.request_path import measure_read, measure_write
from benchmarks.stats import ratios, summary
from princeps_db.config import Environment, Settings
from princeps_db.crypto import KeyRing, generate_master_key
from princeps_db.db import create_engine
from princeps_db.pgserver import LocalPostgres

DEFAULT_OUTPUT = Path("bench-results.json")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetitions of one run."""

    rows_small: int = 10_000
    rows_large: int = 1_000_000
    backfill_rows: int = 100_000
    read_calls: int = 1000
    write_calls: int = 500
    tokens: int = 2000
    repeat: int = 5
    batch_size: int | None = None


QUICK = BenchConfig(
    rows_small=1000,
    rows_large=4000,
    backfill_rows=2000,
    read_calls=100,
    write_calls=50,
    tokens=100,
    repeat=3,
)


class Store:
    """A database migrated to head through the real backfill, with a plaintext copy beside."""

    def __init__(self, server: LocalPostgres, name: str, rows: int, key: str) -> None:
        self.server, self.name, self.rows, self.key = server, name, rows, key

    def build(self, *, batch_size: int | None, progress: Console) -> dict[str, Any]:
        """Seed, run the backfill command line, copy the plaintext, contract, compact."""
        keyring = KeyRing.from_texts(self.key)
        progress.log(f"store {self.name}: {self.rows:,} plaintext rows at 0002_expand")
        build_legacy_at_expand(self.server, self.name, self.rows, keyring=keyring)
        progress.log(f"store {self.name}: alembic upgrade 0003_backfill")
        backfill = run_backfill(
            self.server, self.name, self.rows, key=self.key, batch_size=batch_size
        )
        add_plaintext_copy(self.server, self.name)
        progress.log(f"store {self.name}: alembic upgrade head (contract)")
        contract = alembic_cli(
            self.server.database_url(self.name), "head", key=self.key, batch_size=batch_size
        )
        # The contract drops the plaintext columns, but their bytes stay in the heap
        # until rows are rewritten; rewrite both tables so they are compared as equals.
        # Timed: after a real contract, this rewrite is what removes the dropped
        # plaintext from the table's files.
        rewrite = compact(self.server, self.name, ["Integration", PLAINTEXT_TABLE])
        return {
            "backfill_rows_per_s": summary([self.rows / backfill.command_s]),
            "backfill_peak_rss_mb": summary([backfill.process.peak_rss_mb]),
            "contract_s": summary([contract.command_s]),
            "vacuum_full_s": summary([rewrite["Integration"]]),
        }

    def settings(self) -> Settings:
        """Settings pointing at this store, with the benchmark key."""
        return Settings(
            database_url=SecretStr(self.server.database_url(self.name)),
            integration_token_encryption_key=SecretStr(self.key),
            princeps_env=Environment.TEST,
        )


def _read_and_write(
    store: Store, config: BenchConfig, *, write: bool, console: Console
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    engine = create_engine(store.settings(), application_name="princeps-db-bench")
    keyring = KeyRing.from_texts(store.key)
    try:
        console.log(f"read path on {store.rows:,} rows")
        read = measure_read(
            engine, keyring, rows=store.rows, calls=config.read_calls, repeat=config.repeat
        )
        written = None
        if write:
            console.log(f"write path on {store.rows:,} rows")
            written = measure_write(
                engine, keyring, rows=store.rows, calls=config.write_calls, repeat=config.repeat
            )
    finally:
        engine.dispose()
    return read, written


def _scale_entry(read: dict[str, Any]) -> dict[str, Any]:
    return {
        "rows": read["rows"],
        "encrypted_p50_us": read["encrypted"]["p50_us"],
        "plaintext_p50_us": read["plaintext"]["p50_us"],
        "ratio_p50": read["ratio_p50"],
    }


def run_benchmarks(
    config: BenchConfig, *, server: LocalPostgres | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run every measurement; return the results dictionary (see docs/performance.md)."""
    console = console or Console(stderr=True)
    if server is None:
        with LocalPostgres() as own:
            return run_benchmarks(config, server=own, console=console)
    key = generate_master_key()
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "postgresql_version": server_version(server),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "config": asdict(config),
        }
    }

    console.log(f"per-token cost, {config.tokens:,} tokens")
    drop_database(server, "bench_options")
    with connect(server, "postgres") as admin:
        admin.execute('CREATE DATABASE "bench_options"')
    with connect(server, "bench_options") as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        results["options"] = measure_options(connection, tokens=config.tokens, repeat=config.repeat)
    drop_database(server, "bench_options")

    small = Store(server, "bench_store_small", config.rows_small, key)
    small.build(batch_size=config.batch_size, progress=console)
    read_small, write_small = _read_and_write(small, config, write=True, console=console)
    drop_database(server, small.name)
    results["read"] = read_small
    results["write"] = write_small

    results["backfill"] = measure_backfill(
        server,
        rows=config.backfill_rows,
        key=key,
        repeat=config.repeat,
        batch_size=config.batch_size,
        progress=console.log,
    )
    results["rotation"] = measure_rotation(
        server, rows=config.backfill_rows, key=key, repeat=config.repeat, progress=console.log
    )
    if results["rotation"]["status"] != "measured":
        console.log(f"rotation {results['rotation']['status']}: {results['rotation']['reason']}")

    large = Store(server, "bench_store_large", config.rows_large, key)
    built = large.build(batch_size=config.batch_size, progress=console)
    read_large, _ = _read_and_write(large, config, write=False, console=console)
    drop_database(server, large.name)

    results["memory"] = {
        "small_rows": config.backfill_rows,
        "large_rows": config.rows_large,
        "small_peak_rss_mb": results["backfill"]["peak_rss_mb"],
        "large_peak_rss_mb": built["backfill_peak_rss_mb"],
        "growth": built["backfill_peak_rss_mb"]["median"]
        / results["backfill"]["peak_rss_mb"]["median"],
    }
    results["scale"] = {
        "small": _scale_entry(read_small),
        "large": {**_scale_entry(read_large), **built},
        "growth_encrypted_p50": summary(
            ratios(
                read_large["encrypted"]["p50_us"]["samples"],
                read_small["encrypted"]["p50_us"]["samples"],
            )
        ),
        "growth_plaintext_p50": summary(
            ratios(
                read_large["plaintext"]["p50_us"]["samples"],
                read_small["plaintext"]["p50_us"]["samples"],
            )
        ),
    }
    results["targets"] = targets(results)
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    return results


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path]:
    """Read the command line into a configuration and an output path."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="Measure the cost of encrypting integration tokens."
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--rows-large", type=int, help="rows for the scale and memory runs (default 1,000,000)"
    )
    parser.add_argument("--rows-small", type=int, help="rows for the read/write runs (10,000)")
    parser.add_argument("--backfill-rows", type=int, help="rows per backfill run (100,000)")
    parser.add_argument("--repeat", type=int, help="repetitions of each figure (5)")
    parser.add_argument("--read-calls", type=int, help="read calls per repetition (1000)")
    parser.add_argument("--write-calls", type=int, help="write calls per repetition (500)")
    parser.add_argument("--tokens", type=int, help="tokens for the per-token cost (2000)")
    parser.add_argument("--batch-size", type=int, help="backfill batch size (migration default)")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the JSON results (bench-results.json)",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else BenchConfig()
    overrides = {
        name: getattr(args, name)
        for name in (
            "rows_large",
            "rows_small",
            "backfill_rows",
            "repeat",
            "read_calls",
            "write_calls",
            "tokens",
            "batch_size",
        )
        if getattr(args, name) is not None
    }
    for name, value in overrides.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    config = BenchConfig(**{**asdict(base), **overrides})
    return config, args.output


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the table, write the JSON."""
    config, output = parse_args(argv)
    console = Console(stderr=True)
    results = run_benchmarks(config, console=console)
    print_report(results, Console())
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.log(f"wrote {output} in {results['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
