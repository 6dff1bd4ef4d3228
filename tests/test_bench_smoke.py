"""The benchmark machinery runs end to end and reports every figure (timings are not judged)."""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks.report import print_report
from benchmarks.run import QUICK, BenchConfig, parse_args, run_benchmarks
from princeps_db.pgserver import LocalPostgres

TINY = BenchConfig(
    rows_small=60,
    rows_large=120,
    backfill_rows=60,
    read_calls=5,
    write_calls=5,
    tokens=10,
    repeat=2,
    batch_size=25,
)


def _is_figure(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value["median"], Real)
        and value["min"] <= value["median"] <= value["max"]
        and value["n"] >= 1
    )


@pytest.fixture(scope="module")
def results(local_postgres: LocalPostgres) -> dict[str, Any]:
    return run_benchmarks(TINY, server=local_postgres, console=Console(quiet=True))


def test_every_section_reports_numeric_figures(results: dict[str, Any], tmp_path: Path) -> None:
    for section in ("read", "write"):
        for side in ("encrypted", "plaintext"):
            assert _is_figure(results[section][side]["p50_us"])
            assert _is_figure(results[section][side]["p95_us"])
        assert _is_figure(results[section]["ratio_p50"])
    backfill = results["backfill"]
    for name in ("migration_rows_per_s", "floor_rows_per_s", "ratio_to_floor", "peak_rss_mb"):
        assert _is_figure(backfill[name]), name
    assert backfill["rows"] == TINY.backfill_rows
    assert _is_figure(results["memory"]["small_peak_rss_mb"])
    assert _is_figure(results["memory"]["large_peak_rss_mb"])
    assert isinstance(results["memory"]["growth"], Real)
    for variant in ("ours", "defaults", "aes256_s2k3", "app_aes_gcm"):
        assert _is_figure(results["options"][variant]["encrypt_us"]), variant
        assert _is_figure(results["options"][variant]["decrypt_us"]), variant
    assert _is_figure(results["options"]["decrypt_advantage_vs_defaults"])
    assert results["scale"]["small"]["rows"] == TINY.rows_small
    assert results["scale"]["large"]["rows"] == TINY.rows_large
    assert _is_figure(results["scale"]["growth_encrypted_p50"])
    assert results["rotation"]["status"] in {"skipped", "measured"}
    assert {t["status"] for t in results["targets"]} <= {"PASS", "MISS"}
    assert all(isinstance(t["value"], Real) for t in results["targets"])
    # The results survive a JSON round trip and print without error.
    assert json.loads(json.dumps(results)) == results
    print_report(results, Console(file=(tmp_path / "table.txt").open("w"), width=120))
    assert "targets" in (tmp_path / "table.txt").read_text()


def test_the_command_line_reads_sizes_and_quick_mode() -> None:
    config, output = parse_args(["--quick", "--rows-large", "5000", "--repeat", "4"])
    assert config.rows_large == 5000
    assert config.repeat == 4
    assert config.backfill_rows == QUICK.backfill_rows
    assert output == Path("bench-results.json")
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
