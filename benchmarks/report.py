"""The printed table and the targets, from the results dictionary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "rows/s":
        return f"{value:,.0f}"
    if unit == "MB":
        return f"{value:.1f}"
    if unit == "s":
        return f"{value:.2f}"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _row(table: Table, label: str, figure: dict[str, Any] | None, unit: str) -> None:
    if figure is None:
        table.add_row(label, "n/a", "", "", unit)
        return
    spread = (
        f"{_fmt(figure['min'], unit)} to {_fmt(figure['max'], unit)}" if figure["n"] > 1 else "—"
    )
    table.add_row(label, _fmt(figure["median"], unit), spread, str(figure["n"]), unit)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS/MISS."""
    out: list[dict[str, Any]] = []

    def add(name: str, threshold: str, value: float, ok: bool) -> None:
        out.append(
            {"name": name, "target": threshold, "value": value, "status": "PASS" if ok else "MISS"}
        )

    read = results["read"]["ratio_p50"]["median"]
    add("read ratio (p50, encrypted / plaintext)", "<= 1.15", read, read <= 1.15)
    write = results["write"]["ratio_p50"]["median"]
    add("write ratio (p50, encrypted / plaintext)", "<= 1.30", write, write <= 1.30)
    backfill = results["backfill"]["ratio_to_floor"]["median"]
    add("backfill rows/s vs floor", ">= 0.50", backfill, backfill >= 0.5)
    rotation = results["rotation"]
    if rotation.get("status") == "measured":
        value = rotation["ratio_to_floor"]["median"]
        add("rotation rows/s vs floor", ">= 0.50", value, value >= 0.5)
    advantage = results["options"]["decrypt_advantage_vs_defaults"]["median"]
    add("our decrypt vs pgcrypto defaults", ">= 10x cheaper", advantage, advantage >= 10)
    memory = results["memory"]["growth"]
    add("migration peak RSS, large / small table", "<= 1.10 (flat)", memory, memory <= 1.10)
    growth = results["scale"]["growth_encrypted_p50"]["median"]
    add("read p50, large / small table", "<= 1.25 (flat)", growth, growth <= 1.25)
    return out


def print_report(results: dict[str, Any], console: Console) -> None:
    """Print every figure (median, spread over repetitions) and the targets."""
    meta = results["meta"]
    table = Table(
        title=f"princeps-db benchmarks — PostgreSQL {meta['postgresql_version']}, "
        f"{meta['cpus']} CPUs, {meta['date']}",
        title_justify="left",
    )
    for column, justify in (
        ("figure", "left"),
        ("median", "right"),
        ("spread (min to max)", "right"),
        ("n", "right"),
        ("unit", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    for section, title in (
        ("read", "read: get_valid_token"),
        ("write", "write: upsert_integration"),
    ):
        data = results[section]
        table.add_section()
        table.add_row(
            f"[bold]{title}[/] ({data['rows']:,} rows, "
            f"{data['calls_per_repetition']} calls per repetition)",
            "",
            "",
            "",
            "",
        )
        for side in ("encrypted", "plaintext"):
            _row(table, f"  {side} p50", data[side]["p50_us"], "µs")
            _row(table, f"  {side} p95", data[side]["p95_us"], "µs")
            _row(
                table, f"  {side} database CPU per call", data[side]["server_cpu_us_per_call"], "µs"
            )
        _row(table, "  ratio p50", data["ratio_p50"], "x")
        _row(table, "  ratio p95", data["ratio_p95"], "x")

    backfill = results["backfill"]
    table.add_section()
    table.add_row(
        f"[bold]backfill[/] ({backfill['rows']:,} rows, alembic upgrade 0003_backfill)",
        "",
        "",
        "",
        "",
    )
    _row(table, "  migration (the command's own time)", backfill["migration_rows_per_s"], "rows/s")
    _row(table, "  migration end to end", backfill["migration_end_to_end_rows_per_s"], "rows/s")
    _row(table, "  floor: one set-based UPDATE", backfill["floor_rows_per_s"], "rows/s")
    _row(table, "  ratio to floor", backfill["ratio_to_floor"], "x")
    _row(table, "  ratio to floor (end to end)", backfill["ratio_to_floor_end_to_end"], "x")
    _row(table, "  migration command time", backfill["migration_command_s"], "s")
    _row(table, "  floor statement time", backfill["floor_s"], "s")
    memory = results["memory"]
    _row(
        table,
        f"  peak RSS of the migration, {memory['small_rows']:,} rows",
        memory["small_peak_rss_mb"],
        "MB",
    )
    _row(
        table,
        f"  peak RSS of the migration, {memory['large_rows']:,} rows",
        memory["large_peak_rss_mb"],
        "MB",
    )

    rotation = results["rotation"]
    table.add_section()
    if rotation.get("status") == "measured":
        table.add_row(f"[bold]rotation[/] ({rotation['rows']:,} rows)", "", "", "", "")
        _row(table, "  rotate_keys (the work itself)", rotation["rotation_rows_per_s"], "rows/s")
        _row(table, "  rotate-key end to end", rotation["rotation_end_to_end_rows_per_s"], "rows/s")
        _row(table, "  floor: one set-based UPDATE", rotation["floor_rows_per_s"], "rows/s")
        _row(table, "  ratio to floor", rotation["ratio_to_floor"], "x")
        _row(table, "  ratio to floor, end to end", rotation["ratio_to_floor_end_to_end"], "x")
    else:
        table.add_row(
            f"[bold]rotation[/]: {rotation['status']}: {rotation['reason']}", "", "", "", ""
        )

    options = results["options"]
    table.add_section()
    table.add_row(
        f"[bold]per-token cost[/] ({options['tokens']:,} tokens of ~200 chars)", "", "", "", ""
    )
    labels = {
        "ours": "ours (aes256, s2k-mode 1) in the database",
        "defaults": "pgcrypto defaults (aes128, s2k-mode 3)",
        "aes256_s2k3": "aes256 with the default s2k-mode 3",
        "app_aes_gcm": "AES-256-GCM in the application (Python)",
    }
    for name, label in labels.items():
        _row(table, f"  {label}: encrypt", options[name]["encrypt_us"], "µs")
        _row(table, f"  {label}: decrypt", options[name]["decrypt_us"], "µs")
    _row(table, "  decrypt: defaults / ours", options["decrypt_advantage_vs_defaults"], "x")
    _row(table, "  encrypt: defaults / ours", options["encrypt_advantage_vs_defaults"], "x")

    scale = results["scale"]
    table.add_section()
    table.add_row("[bold]scale[/]: read path by table size", "", "", "", "")
    for size in ("small", "large"):
        data = scale[size]
        _row(table, f"  {data['rows']:,} rows: encrypted p50", data["encrypted_p50_us"], "µs")
        _row(table, f"  {data['rows']:,} rows: plaintext p50", data["plaintext_p50_us"], "µs")
        _row(table, f"  {data['rows']:,} rows: ratio p50", data["ratio_p50"], "x")
    _row(table, "  encrypted p50, large / small", scale["growth_encrypted_p50"], "x")
    _row(
        table,
        f"  backfill of {scale['large']['rows']:,} rows",
        scale["large"]["backfill_rows_per_s"],
        "rows/s",
    )
    _row(
        table,
        f"  contract of {scale['large']['rows']:,} rows (verify + constraints)",
        scale["large"]["contract_s"],
        "s",
    )
    if "vacuum_full_s" in scale["large"]:
        _row(
            table,
            f"  VACUUM FULL of {scale['large']['rows']:,} rows after the contract",
            scale["large"]["vacuum_full_s"],
            "s",
        )
    console.print(table)

    verdicts = Table(title="targets", title_justify="left")
    for column in ("target", "threshold", "measured", "result"):
        verdicts.add_column(column)
    for target in results["targets"]:
        colour = "green" if target["status"] == "PASS" else "red"
        verdicts.add_row(
            target["name"],
            target["target"],
            f"{target['value']:.2f}",
            f"[{colour}]{target['status']}[/]",
        )
    console.print(verdicts)
