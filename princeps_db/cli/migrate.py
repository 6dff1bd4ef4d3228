"""``princeps-db migrate``: ``alembic upgrade head`` with the project's alembic.ini."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Annotated

import typer
from alembic import command
from alembic.config import Config
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

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
        _upgrade_with_batch_size(config, revision, batch_size)
        err_console.print("[green]done[/]")


class _ProgressHandler(logging.Handler):
    """Shows each revision as a line and each batched data step as a progress bar."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}

    def emit(self, record: logging.LogRecord) -> None:
        step = getattr(record, "batch_progress", None)
        if step is None:
            if record.levelno >= logging.WARNING or record.getMessage().startswith("Running"):
                err_console.print(record.getMessage(), highlight=False)
            return
        label, done, total = step
        if total == 0:
            return  # nothing to do in this step: no bar
        if self.progress is None:
            # Started on the first batch, so an early failure prints one line, not a bar.
            self.progress = Progress(*_COLUMNS, console=err_console)
            self.progress.start()
        if label not in self.tasks or done == 0:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


_COLUMNS = (
    TextColumn("{task.description:>8}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
)


def _upgrade_with_batch_size(config: Config, revision: str, batch_size: int) -> None:
    # env.py reads -x arguments from cmd_opts; give it the batch size the same way.
    config.cmd_opts = Namespace(x=[f"batch_size={batch_size}"])
    config.attributes["own_logging"] = True
    handler = _ProgressHandler()
    loggers = [logging.getLogger(name) for name in ("alembic", "princeps_db")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        command.upgrade(config, revision)
    finally:
        handler.stop()
        for logger in loggers:
            logger.removeHandler(handler)
