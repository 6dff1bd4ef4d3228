"""A throwaway local PostgreSQL server for the demo, the benchmarks and the tests.

PostgreSQL refuses to run as root, so when this process is root the server
runs as the unprivileged ``nobody`` account in a private temporary directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from princeps_db.errors import ConfigurationError

SUPERUSER = "postgres"
_UNPRIVILEGED_USER = "nobody"
_UNPRIVILEGED_GROUP = "nogroup"


def find_pg_bindir() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``, preferring the newest major."""
    override = os.environ.get("PRINCEPS_PG_BINDIR")
    candidates = [override] if override else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ConfigurationError(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found; run scripts/bootstrap "
        "or set PRINCEPS_PG_BINDIR to the directory that holds them."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LocalPostgres:
    """A PostgreSQL server in a temporary directory, listening on 127.0.0.1 only.

    ``server_settings`` are passed as ``-c name=value`` at start, e.g.
    ``{"log_statement": "all"}`` for a server whose log a test inspects.
    """

    def __init__(self, *, server_settings: Mapping[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.user = SUPERUSER
        self.server_settings = dict(server_settings or {})
        self._bindir = find_pg_bindir()
        self._as_root = os.geteuid() == 0
        self._base = Path(tempfile.mkdtemp(prefix="princeps-pg-"))
        self.data_dir = self._base / "data"
        self.log_path = self._base / "server.log"
        self._initialised = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database on this server."""
        return self.database_url("postgres")

    def database_url(self, dbname: str) -> str:
        """SQLAlchemy URL of ``dbname`` on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def start(self) -> None:
        """Initialise the cluster on first use, then start the server and wait for it."""
        if not self._initialised:
            self._initdb()
        options = [f"-p {self.port}", f"-k {self._base}", "-c listen_addresses=127.0.0.1"]
        # A throwaway server never needs durability; skipping fsync keeps tests fast.
        options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options += [f"-c {name}={value}" for name, value in self.server_settings.items()]
        self._run_as_owner(
            [
                str(self._bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-o",
                " ".join(options),
            ]
        )

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``mode`` is pg_ctl's: smart, fast or immediate)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run_as_owner(
                [str(self._bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data_dir)]
            )

    def restart(self, *, mode: str = "fast") -> None:
        """Stop and start again on the same port and data directory."""
        self.stop(mode=mode)
        self.start()

    def read_log(self) -> str:
        """Return everything the server has logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()

    def _initdb(self) -> None:
        if self._as_root:
            shutil.chown(self._base, user=_UNPRIVILEGED_USER, group=_UNPRIVILEGED_GROUP)
        self._run_as_owner(
            [
                str(self._bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        self._initialised = True

    def _run_as_owner(self, command: list[str]) -> None:
        # The server directory belongs to ``nobody`` when we are root; cwd must be
        # somewhere that account can enter.
        if self._as_root:
            result = subprocess.run(
                command,
                cwd=self._base,
                capture_output=True,
                text=True,
                check=False,
                user=_UNPRIVILEGED_USER,
                group=_UNPRIVILEGED_GROUP,
                extra_groups=[],
            )
        else:
            result = subprocess.run(
                command, cwd=self._base, capture_output=True, text=True, check=False
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} {command[1] if len(command) > 1 else ''} failed "
                f"(exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
