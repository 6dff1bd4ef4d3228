"""The Typer application and the error handling every command shares."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import OperationalError

from princeps_db.errors import ConfigurationError, PrincepsDBError

app = typer.Typer(
    name="princeps-db",
    help="Encrypted-at-rest storage for Princeps integration tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Progress and tables go to stderr so stdout stays clean for pipes (keygen, --json).
err_console = Console(stderr=True)
out_console = Console()

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., object])


def fail(message: str, *, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit: no traceback, no secret."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn configuration and connection problems into one line and exit code 2."""
    try:
        yield
    except ConfigurationError as error:
        fail(f"ConfigurationError: {error}")
    except OperationalError as error:
        # The driver's text names host and port, never the password or a token.
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "connection failed"
        if isinstance(error.orig, psycopg.OperationalError) and type(error.orig) is not (
            psycopg.OperationalError
        ):
            # A server-side error with its own SQLSTATE (deadlock, serialization...),
            # not a connection problem.
            fail(f"database error: {reason}", code=1)
        fail(f"cannot connect to the database: {reason}")
    except PrincepsDBError as error:
        fail(f"{type(error).__name__}: {error}", code=1)


def main() -> None:
    """Console-script entry point: usage errors too become one line and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        # Click's exceptions (vendored by newer Typer releases, so matched by shape):
        # a usage error carries an exit code and a message meant for the user.
        message = getattr(error, "format_message", None)
        exit_code = getattr(error, "exit_code", None)
        if not callable(message) or not isinstance(exit_code, int):
            raise
        if type(error).__name__ == "NoArgsIsHelpError":
            err_console.print(message(), highlight=False, markup=False)
            sys.exit(exit_code)
        text = " ".join(str(message()).split())
        err_console.print(
            f"[bold red]error:[/] {escape(text)} (see --help)", highlight=False, soft_wrap=True
        )
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)
