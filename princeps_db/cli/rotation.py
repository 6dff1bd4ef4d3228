"""``princeps-db rotate-key`` and ``princeps-db verify``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from princeps_db.cli.app import app, err_console, friendly_errors, out_console
from princeps_db.config import get_settings
from princeps_db.db import create_engine
from princeps_db.migration_steps import DEFAULT_BATCH_SIZE
from princeps_db.rotation import (
    REASON_UNDECRYPTABLE,
    REASON_UNKNOWN_KEY,
    RotationResult,
    RowFailure,
    VerifyResult,
    rotate_keys,
    verify_rows,
)

EXIT_FAILED_ROWS = 1
# Enough ids to act on; the full count is always printed.
LISTED_IDS = 200

BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, max=100_000, help="Rows per batch (one commit each).")
]


@app.command("rotate-key")
def rotate_key(
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would change; write nothing.")
    ] = False,
) -> None:
    """Re-encrypt every row that is not under the current key, while the application runs.

    Rows are decrypted and re-encrypted inside the database, one committed batch
    at a time; a run that is interrupted is finished by running it again, and
    two runs at once share the work. Rows that do not decrypt are left untouched
    and listed by id; the exit status is then 1.

    Examples:

      # new key deployed, old key in INTEGRATION_TOKEN_PREVIOUS_KEYS
      princeps-db rotate-key --dry-run

      princeps-db rotate-key --batch-size 500
    """
    with friendly_errors():
        settings = get_settings()
        keyring = settings.keyring()
        engine = create_engine(settings, application_name="princeps-db rotate-key")
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
        )
        task = bar.add_task("checking" if dry_run else "rotating", total=None)

        def report(done: int, total: int) -> None:
            bar.start()  # only once connected: a connection error prints no empty bar
            bar.update(task, completed=done, total=total)

        try:
            result = rotate_keys(
                engine,
                keyring=keyring,
                batch_size=batch_size,
                dry_run=dry_run,
                progress=report,
                max_listed=LISTED_IDS,
            )
        finally:
            if bar.live.is_started:
                bar.stop()
            engine.dispose()
    _print_rotation_summary(result)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED_ROWS)


def _print_rotation_summary(result: RotationResult) -> None:
    verb = "would rotate" if result.dry_run else "rotated"
    lines = [
        f"current key id: {result.current_key_id}",
        f"rows not under the current key at start: {result.to_rotate}",
        f"{verb}: {result.rotated}",
        f"skipped (held by another transaction; run again): {result.skipped}",
        f"failed (left untouched): {result.failed}",
        f"time: {result.seconds:.2f} s",
    ]
    for line in lines:
        typer.echo(line)
    if result.failures:
        _print_failures(result.failures, result.failed)
        _print_remedy(result.failures, then="then run `princeps-db rotate-key` again")
    elif result.skipped:
        typer.echo("some rows were locked by other transactions: run it again to finish them")


def _print_failures(failures: Sequence[RowFailure], count: int) -> None:
    typer.echo("failing rows (id, key id, reason):")
    for failure in failures:
        typer.echo(f"  {failure.id}  {failure.key_id}  {failure.reason}")
    if count > len(failures):
        typer.echo(f"  ... and {count - len(failures)} more")


def _print_remedy(failures: Sequence[RowFailure], *, then: str) -> None:
    reasons = {failure.reason for failure in failures}
    if REASON_UNKNOWN_KEY in reasons:
        typer.echo(
            "rows under a key id that is not configured: add that key to "
            f"INTEGRATION_TOKEN_PREVIOUS_KEYS, {then}",
            err=True,
        )
    if REASON_UNDECRYPTABLE in reasons:
        typer.echo(
            "rows that do not decrypt under their key were altered, copied from another row, "
            "or a key with the right id is wrong: restore them from a backup (or delete them "
            f"and have those users reconnect), {then}",
            err=True,
        )


@app.command()
def verify(
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=100_000, help="Rows checked per query.")
    ] = DEFAULT_BATCH_SIZE,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing when every row decrypts.")
    ] = False,
) -> None:
    """Check that every row decrypts under its key (inside the database; no token is returned).

    Prints the number of rows under each key id and the ids of rows that fail.
    Exit status: 0 all rows decrypt, 1 some rows fail, 2 configuration or
    connection problem.

    Examples:

      princeps-db verify

      # from cron: silent unless something is wrong
      princeps-db verify --quiet

      princeps-db verify --json | jq .failed
    """
    with friendly_errors():
        settings = get_settings()
        keyring = settings.keyring()
        engine = create_engine(settings, application_name="princeps-db verify")
        try:
            result = verify_rows(
                engine, keyring=keyring, batch_size=batch_size, max_listed=LISTED_IDS
            )
        finally:
            engine.dispose()
    if as_json:
        typer.echo(json.dumps(_verify_json(result), indent=2))
    elif not (quiet and result.ok):
        _print_verify(result)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED_ROWS)


def _verify_json(result: VerifyResult) -> dict[str, object]:
    return {
        "ok": result.ok,
        "rows": result.rows,
        "current_key_id": result.current_key_id,
        "key_ids": {
            key_id: {"rows": count, "status": result.key_status(key_id)}
            for key_id, count in result.rows_per_key_id.items()
        },
        "failed": result.failed,
        "failing_rows": [
            {"id": f.id, "key_id": f.key_id, "reason": f.reason} for f in result.failures
        ],
        "seconds": round(result.seconds, 3),
    }


def _print_verify(result: VerifyResult) -> None:
    if out_console.is_terminal:
        table = Table("key id", "status", "rows", title=f"{result.rows} rows")
        for key_id, count in result.rows_per_key_id.items():
            table.add_row(key_id, result.key_status(key_id), str(count))
        out_console.print(table)
    else:
        typer.echo(f"rows: {result.rows}")
        for key_id, count in result.rows_per_key_id.items():
            typer.echo(f"key id {key_id} ({result.key_status(key_id)}): {count}")
    if result.ok:
        typer.echo(f"OK: every row decrypts under its key ({result.seconds:.2f} s)")
        return
    typer.echo(f"FAILED: {result.failed} row(s) cannot be decrypted")
    _print_failures(result.failures, result.failed)
    _print_remedy(result.failures, then="then run `princeps-db verify` again")
