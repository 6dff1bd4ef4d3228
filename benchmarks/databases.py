"""Building the benchmark databases: legacy rows, migrations, the plaintext copy.

Everything is set-based (``generate_series``, ``INSERT ... SELECT``, ``COPY``)
so that a million rows take seconds, not minutes. Ids are random-looking
(md5), as application ids are, so that primary-key order is not table order.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from princeps_db.crypto import KeyRing, MasterKey, TokenKind
from princeps_db.pgserver import LocalPostgres

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("google_calendar", "google_drive")

# One user has two integrations (calendar on even rows, drive on odd rows).
_SEED_USERS = """
INSERT INTO "User" (id, email)
SELECT 'user-' || md5('u' || g), 'user-' || md5('u' || g) || '@example.com'
FROM generate_series(0, %(users)s - 1) AS g
"""
# Access tokens of about 200 characters and refresh tokens of about 100, as
# Google issues them.
_SEED_INTEGRATIONS = """
INSERT INTO "Integration"
    (id, "userId", provider, "accessToken", "refreshToken", "expiresAt", scope)
SELECT 'int-' || md5('i' || g),
       'user-' || md5('u' || (g / 2)),
       CASE g %% 2 WHEN 0 THEN 'google_calendar' ELSE 'google_drive' END,
       'ya29.' || encode(sha512(convert_to('a' || g, 'UTF8')), 'hex')
               || encode(sha256(convert_to('b' || g, 'UTF8')), 'hex'),
       '1//' || encode(sha256(convert_to('c' || g, 'UTF8')), 'hex') || md5('d' || g),
       now() + interval '30 days',
       CASE g %% 2 WHEN 0 THEN 'https://www.googleapis.com/auth/calendar.readonly'
                 ELSE 'https://www.googleapis.com/auth/drive.file' END
FROM generate_series(0, %(rows)s - 1) AS g
"""

PLAINTEXT_TABLE = "IntegrationPlain"
# The baseline: the head table's shape with the tokens in text columns.
_CREATE_PLAINTEXT_COPY = f"""
CREATE TABLE "{PLAINTEXT_TABLE}" (
    id text PRIMARY KEY,
    "userId" text NOT NULL REFERENCES "User"(id) ON DELETE CASCADE,
    provider text NOT NULL,
    "accessToken" text NOT NULL,
    "refreshToken" text,
    "tokenKeyId" text NOT NULL,
    "expiresAt" timestamptz,
    scope text,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'active',
    UNIQUE ("userId", provider)
);
INSERT INTO "{PLAINTEXT_TABLE}"
SELECT id, "userId", provider, "accessToken", "refreshToken", "tokenKeyId", "expiresAt",
       scope, "createdAt", "updatedAt"
FROM "Integration"
"""


def user_id(number: int) -> str:
    """The id of the ``number``-th seeded user (matches ``_SEED_USERS``)."""
    return "user-" + hashlib.md5(f"u{number}".encode(), usedforsecurity=False).hexdigest()


def seeded_identity(row: int) -> tuple[str, str]:
    """(user id, provider) of the ``row``-th seeded integration."""
    return user_id(row // 2), PROVIDERS[row % 2]


def dsn(server: LocalPostgres, dbname: str) -> str:
    """libpq connection string for psycopg."""
    return f"host={server.host} port={server.port} user={server.user} dbname={dbname}"


@contextmanager
def connect(server: LocalPostgres, dbname: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection."""
    with psycopg.connect(dsn(server, dbname), autocommit=True) as connection:
        yield connection


def create_database(server: LocalPostgres, name: str, *, template: str | None = None) -> None:
    """Create ``name`` (as a copy of ``template`` if given)."""
    with connect(server, "postgres") as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        connection.execute(f'CREATE DATABASE "{name}"{clause}')


def drop_database(server: LocalPostgres, name: str) -> None:
    """Drop ``name`` if it exists."""
    with connect(server, "postgres") as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic_in_process(url: str, action: str, revision: str, *, keyring: KeyRing) -> None:
    """Run ``alembic upgrade|downgrade REVISION`` in this process (setup steps only)."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["keyring"] = keyring
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def seed_legacy(server: LocalPostgres, dbname: str, rows: int) -> None:
    """Insert ``rows`` plaintext integrations (and their users) at the baseline schema."""
    with connect(server, dbname) as connection:
        connection.execute(_SEED_USERS, {"users": (rows + 1) // 2})
        connection.execute(_SEED_INTEGRATIONS, {"rows": rows})
        connection.execute('VACUUM ANALYZE "User"')
        connection.execute('VACUUM ANALYZE "Integration"')


def build_legacy_at_expand(
    server: LocalPostgres, dbname: str, rows: int, *, keyring: KeyRing
) -> None:
    """A database at ``0002_expand`` holding ``rows`` plaintext integrations."""
    create_database(server, dbname)
    url = server.database_url(dbname)
    alembic_in_process(url, "upgrade", "0001_baseline", keyring=keyring)
    seed_legacy(server, dbname, rows)
    alembic_in_process(url, "upgrade", "0002_expand", keyring=keyring)


def add_plaintext_copy(server: LocalPostgres, dbname: str) -> None:
    """Copy the plaintext beside the ciphertext into the baseline table (before contract)."""
    with connect(server, dbname) as connection:
        connection.execute(_CREATE_PLAINTEXT_COPY)


def compact(server: LocalPostgres, dbname: str, tables: Sequence[str]) -> dict[str, float]:
    """Rewrite and analyze ``tables`` so both sides are measured on equally fresh heaps.

    Returns the seconds each table's ``VACUUM (FULL, ANALYZE)`` took.
    """
    seconds: dict[str, float] = {}
    with connect(server, dbname) as connection:
        for table in tables:
            started = time.perf_counter()
            connection.execute(f'VACUUM (FULL, ANALYZE) "{table}"')
            seconds[table] = time.perf_counter() - started
    return seconds


def load_derived_keys(
    connection: psycopg.Connection, table: str, rows: int, keys: Sequence[MasterKey]
) -> None:
    """Create ``table(id, <key>_access, <key>_refresh ...)`` holding each row's derived keys.

    Keys are derived in Python, exactly as the migration derives them, and
    loaded with COPY: the floor statement then finds them already in place.
    """
    columns = ", ".join(f"k{n}_access text, k{n}_refresh text" for n in range(len(keys)))
    connection.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, {columns})')
    with connection.cursor() as cursor, cursor.copy(f'COPY "{table}" FROM STDIN') as copy:
        for row in range(rows):
            user, provider = seeded_identity(row)
            record = ["int-" + hashlib.md5(f"i{row}".encode(), usedforsecurity=False).hexdigest()]
            for key in keys:
                record.append(
                    key.derive_token_key(user_id=user, provider=provider, kind=TokenKind.ACCESS)
                )
                record.append(
                    key.derive_token_key(user_id=user, provider=provider, kind=TokenKind.REFRESH)
                )
            copy.write_row(record)
    connection.execute(f'ANALYZE "{table}"')


@dataclass(frozen=True)
class ProcessRun:
    """One child process: how long it took, its peak memory, and how it ended."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    stderr_tail: str
    stdout: str


def run_child(arguments: Sequence[str], *, env: dict[str, str]) -> ProcessRun:
    """Run a child process from the repository root; return wall time and RSS high-water mark.

    ``os.wait4`` gives the resource usage of exactly this child, so the peak
    RSS is that of the migration process alone.
    """
    base_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("INTEGRATION_TOKEN_", "PRINCEPS_", "DATABASE_URL"))
    }
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *arguments],
            cwd=REPO_ROOT,
            env={**base_env, **env},
            stdout=stdout,
            stderr=stderr,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip()[-1500:]
        stdout.seek(0)
        output = stdout.read().decode(errors="replace")
    # ru_maxrss is in KiB on Linux.
    return ProcessRun(wall, usage.ru_maxrss / 1024, process.returncode, tail, output)


@dataclass(frozen=True)
class MigrationRun:
    """A migration command: the process figures and the command's own time."""

    process: ProcessRun
    command_s: float


def alembic_cli(url: str, revision: str, *, key: str, batch_size: int | None) -> MigrationRun:
    """Run the real ``alembic upgrade REVISION`` command line, as an operator would."""
    arguments = ["-m", "benchmarks.alembic_child", "-x", f"db_url={url}"]
    if batch_size is not None:
        arguments += ["-x", f"batch_size={batch_size}"]
    run = run_child(
        [*arguments, "upgrade", revision],
        env={"INTEGRATION_TOKEN_ENCRYPTION_KEY": key, "PRINCEPS_ENV": "test"},
    )
    if run.returncode != 0:
        raise RuntimeError(f"alembic upgrade {revision} failed: {run.stderr_tail}")
    last_line = run.stdout.strip().splitlines()[-1]
    return MigrationRun(run, float(json.loads(last_line)["seconds"]))


def server_version(server: LocalPostgres) -> str:
    """The server's version string, e.g. ``15.18 (Debian 15.18-0+deb12u1)``."""
    with connect(server, "postgres") as connection:
        row = connection.execute("SHOW server_version").fetchone()
    assert row is not None
    return str(row[0])
