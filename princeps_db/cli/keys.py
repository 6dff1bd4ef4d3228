"""``princeps-db keygen``."""

from __future__ import annotations

import typer

from princeps_db.cli.app import app, err_console
from princeps_db.crypto import MasterKey, generate_master_key


@app.command()
def keygen() -> None:
    """Print a new master key on stdout, and its key id on stderr.

    Example: princeps-db keygen > /run/secrets/integration_token_key
    """
    key = generate_master_key()
    typer.echo(key)
    err_console.print(f"key id: {MasterKey.from_text(key).key_id}", highlight=False)
