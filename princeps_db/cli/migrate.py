"""``princeps-db migrate``: ``alembic upgrade head`` with the project's alembic.ini."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Annotated

import typer
from alembic import command
from alembic.config import Config

from princeps_db.cli.app import app, err_console, fail, friendly_errors
from princeps_db.config import get_settings


def find_alembic_ini(start: Path | None = None) -> Path:
    """Return the alembic.ini of this checkout (current directory or a parent)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "alembic.ini"
        if candidate.exists() and (folder / "alembic" / "env.py").exists():
            return candidate
    package_root = Path(__file__).resolve().parents[2] / "alembic.ini"
    if package_root.exists():
        return package_root
    fail("alembic.ini not found; run this from the princeps-db checkout")


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per batch.")] = 2000,
) -> None:
    """Run the Alembic migrations (``alembic upgrade REVISION``).

    Example: DATABASE_URL=postgresql://app@db/princeps princeps-db migrate
    """
    with friendly_errors():
        settings = get_settings()
        settings.require_database_url()
        config = Config(str(find_alembic_ini()))
        config.attributes["keyring"] = settings.keyring()
        err_console.print(f"migrating to [bold]{revision}[/] (batches of {batch_size})")
        _upgrade_with_batch_size(config, revision, batch_size)
        err_console.print("[green]done[/]")


def _upgrade_with_batch_size(config: Config, revision: str, batch_size: int) -> None:
    # env.py reads -x arguments from cmd_opts; give it the batch size the same way.
    config.cmd_opts = Namespace(x=[f"batch_size={batch_size}"])
    command.upgrade(config, revision)
