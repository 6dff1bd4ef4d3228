"""``princeps-db demo``: the README's first command."""

from __future__ import annotations

from typing import Annotated

import typer

from princeps_db.cli.app import app, fail, friendly_errors, out_console


@app.command()
def demo(
    rows: Annotated[int, typer.Option(min=10, max=2_000_000, help="Legacy rows to seed.")] = 5000,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="Backfill batch.")] = 1000,
) -> None:
    """Encrypt a legacy plaintext database with the real migrations, then clean up.

    Starts a throwaway PostgreSQL on 127.0.0.1 (or, when DATABASE_URL is set,
    uses a scratch database on that server and drops it afterwards).

    Example: princeps-db demo --rows 20000
    """
    from princeps_db.demo import run_demo

    with friendly_errors():
        try:
            run_demo(out_console, rows=rows, batch_size=batch_size)
        except RuntimeError as error:
            fail(str(error), code=1)
