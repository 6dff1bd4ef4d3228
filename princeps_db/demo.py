"""The end-to-end demo: a legacy plaintext database encrypted by the real migrations.

Runs on a throwaway local PostgreSQL (or in a scratch database on the server
of DATABASE_URL), prints what a person wants to see, never a token or a key,
and removes everything it created.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine, make_url

from princeps_db.audit import print_audit, run_audit
from princeps_db.config import get_settings
from princeps_db.crypto import KeyRing, generate_master_key
from princeps_db.db import create_session_factory
from princeps_db.demo_data import LegacyRow, seed_legacy_rows
from princeps_db.fake_google import demo_refresh
from princeps_db.pgserver import LocalPostgres, find_pg_bindir
from princeps_db.repository import create_user, get_valid_token
from princeps_db.rotation import demo_rotation


@dataclass(frozen=True)
class DemoDatabase:
    """Where the demo runs, and how to reach it with pg_dump."""

    url: str


@contextmanager
def demo_database(console: Console) -> Iterator[DemoDatabase]:
    """Yield a scratch database: a new local server, or a new database beside DATABASE_URL."""
    configured = os.environ.get("DATABASE_URL")
    if not configured:
        console.print("Starting a throwaway PostgreSQL on 127.0.0.1 ...")
        with LocalPostgres() as server:
            _create_database(server.url, "princeps_demo")
            yield DemoDatabase(server.database_url("princeps_demo"))
        console.print("Throwaway PostgreSQL stopped and removed.")
        return
    admin_url = get_settings().require_database_url()
    name = f"princeps_demo_{uuid.uuid4().hex[:8]}"
    console.print(f"Using the server of DATABASE_URL, in a scratch database [bold]{name}[/].")
    _create_database(admin_url, name)
    try:
        yield DemoDatabase(make_url(admin_url).set(database=name).render_as_string(False))
    finally:
        _drop_database(admin_url, name)
        console.print(f"Scratch database {name} dropped.")


def _create_database(admin_url: str, name: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def _drop_database(admin_url: str, name: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def run_alembic(url: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``alembic`` command line, as an operator would, in production mode."""
    from princeps_db.cli.migrate import find_alembic_ini

    ini = find_alembic_ini()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "INTEGRATION_TOKEN_ENCRYPTION_KEY": key,
        "PRINCEPS_ENV": "production",
    }
    env.pop("INTEGRATION_TOKEN_PREVIOUS_KEYS", None)
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), *args],
        cwd=ini.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _require_success(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{what} failed: {last[0]}")


def _table_state(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        columns = set(
            connection.execute(
                sa.text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'Integration'"
                )
            ).scalars()
        )
        total = connection.execute(sa.text('SELECT count(*) FROM "Integration"')).scalar_one()
        encrypted = 0
        if "accessTokenEncrypted" in columns:
            encrypted = connection.execute(
                sa.text(
                    'SELECT count(*) FROM "Integration" WHERE "accessTokenEncrypted" IS NOT NULL'
                )
            ).scalar_one()
    return {
        "rows": total,
        "encrypted": encrypted,
        "plaintext_columns": len(columns & {"accessToken", "refreshToken"}),
    }


def _tokens_in_dump(url: str, rows: list[LegacyRow]) -> tuple[int, int]:
    """Return (dump size in bytes, how many seeded tokens appear in it)."""
    parsed = make_url(url)
    result = subprocess.run(
        [
            str(find_pg_bindir() / "pg_dump"),
            "-h",
            parsed.host or "127.0.0.1",
            "-p",
            str(parsed.port or 5432),
            "-U",
            parsed.username or "postgres",
            parsed.database or "postgres",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PGPASSWORD": parsed.password or ""},
    )
    dump = result.stdout
    # Each token is long and random; its first 32 characters identify it.
    found = sum(
        1
        for row in rows
        for token in (row.access_token, row.refresh_token)
        if token and token[:32] in dump
    )
    return len(dump.encode()), found


def _show_audit(console: Console, engine: Engine, title: str) -> None:
    """Print the token checks of the audit (server settings are the operator's business)."""
    results = [r for r in run_audit(engine) if r.check.startswith(("coverage", "ciphertext"))]
    print_audit(console, results, title=title)


def _masked(token: str) -> str:
    return f"{token[:5]}… ({len(token)} characters)"


def run_demo(console: Console, *, rows: int = 5000, batch_size: int = 1000) -> None:
    """Run the whole demo, printing each step."""
    key = generate_master_key()
    keyring = KeyRing.from_texts(key)
    console.rule("[bold]princeps-db demo")
    console.print(
        f"A fresh master key was generated for this demo (key id [cyan]"
        f"{keyring.current.key_id}[/]); it is passed to Alembic through the environment."
    )
    with demo_database(console) as database:
        engine = sa.create_engine(database.url, hide_parameters=True)
        try:
            _run_steps(console, database, engine, key, keyring, rows=rows, batch_size=batch_size)
        finally:
            engine.dispose()
    console.rule("[bold green]demo finished")


def _run_steps(
    console: Console,
    database: DemoDatabase,
    engine: Engine,
    key: str,
    keyring: KeyRing,
    *,
    rows: int,
    batch_size: int,
) -> None:
    console.print("\n[bold]1. A legacy Princeps database[/] (alembic upgrade 0001_baseline)")
    _require_success(run_alembic(database.url, key, "upgrade", "0001_baseline"), "baseline")
    seeded = seed_legacy_rows(database.url, rows)
    size, found = _tokens_in_dump(database.url, seeded)
    console.print(
        f"   {len(seeded)} integrations written in plaintext; pg_dump ({size // 1024} KiB) "
        f"shows [red]{found}[/] readable tokens."
    )
    _show_audit(console, engine, "audit before the migration (princeps-db audit)")

    console.print(
        f"\n[bold]2. alembic upgrade head[/] (expand, backfill in batches of {batch_size}, "
        "contract)"
    )
    started = time.monotonic()
    result = run_alembic(database.url, key, "-x", f"batch_size={batch_size}", "upgrade", "head")
    elapsed = time.monotonic() - started
    _require_success(result, "alembic upgrade head")
    batches = sum(
        1 for line in result.stderr.splitlines() if "batch" in line and "committed" in line
    )
    state = _table_state(engine)
    table = Table(title="after the migration")
    table.add_column("rows")
    table.add_column("encrypted")
    table.add_column("plaintext columns left")
    table.add_column("time")
    table.add_column("rows/s")
    table.add_row(
        str(state["rows"]),
        str(state["encrypted"]),
        str(state["plaintext_columns"]),
        f"{elapsed:.1f} s ({batches} batches)",
        f"{state['encrypted'] / elapsed:,.0f}",
    )
    console.print(table)

    size, found = _tokens_in_dump(database.url, seeded)
    style = "green" if found == 0 else "red"
    console.print(
        f"   pg_dump ({size // 1024} KiB) now shows [{style}]{found}[/] readable tokens "
        f"out of {sum(1 for r in seeded for t in (r.access_token, r.refresh_token) if t)}."
    )

    _show_audit(console, engine, "audit after the migration (princeps-db audit)")

    console.print("\n[bold]3. The application reads a token[/] (get_valid_token)")
    sessions = create_session_factory(engine, keyring=keyring)
    sample = seeded[len(seeded) // 3]
    with sessions() as session, session.begin():
        create_user(session, user_id="user-demo-refresh", email="refresh@example.com")
    with sessions() as session:
        token = get_valid_token(session, user_id=sample.user_id, provider=sample.provider)
    verdict = "[green]matches[/]" if token == sample.access_token else "[red]DIFFERS from[/]"
    console.print(
        f"   {sample.provider} token of {sample.user_id}: {_masked(token)} {verdict} "
        "the original plaintext."
    )

    console.print("\n[bold]4. A token expires: refresh with the provider[/] (get_valid_token)")
    demo_refresh(console, sessions, user_id="user-demo-refresh")

    console.print("\n[bold]5. Rotate the master key[/] (princeps-db rotate-key, online)")
    new_keyring = KeyRing.from_texts(generate_master_key(), previous=[key])
    demo_rotation(console, engine, old_keyring=keyring, new_keyring=new_keyring)
    with create_session_factory(engine, keyring=KeyRing(new_keyring.current))() as session:
        token = get_valid_token(session, user_id=sample.user_id, provider=sample.provider)
    verdict = "[green]still matches[/]" if token == sample.access_token else "[red]DIFFERS[/]"
    console.print(f"   read back with the new key alone: {_masked(token)} {verdict}.")
