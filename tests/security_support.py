"""Building blocks of the security and reliability suite (leaks, tampering, faults).

Two ideas keep the suite extensible:

- ``LIFECYCLE`` is the ordered list of steps the leak tests run: everything a
  deployment does with keys and tokens. A new operation (a refresh, a key
  rotation, ``verify``, an audit) joins every leak test by appending one
  ``Step`` that calls it through a ``Lifecycle``.
- ``FaultScenario`` describes a long-running, resumable command: how to build
  the database it starts from, how to run it, how to measure its progress and
  what every row must decrypt to afterwards. The fault tests interrupt each
  scenario in ``FAULT_SCENARIOS`` at many points; a rotation scenario joins
  them by adding one entry.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from princeps_db import (
    TokenDecryptionError,
    create_engine,
    create_session_factory,
    create_user,
    delete_integration,
    get_valid_token,
    list_integrations,
    upsert_integration,
)
from princeps_db.config import Environment, Settings
from princeps_db.crypto import KeyRing, MasterKey, TokenKind, generate_master_key
from princeps_db.demo_data import LegacyRow, seed_legacy_rows
from princeps_db.fake_google import CALENDAR_SCOPE, DRIVE_SCOPE
from princeps_db.oauth import GOOGLE_CONFIG_INFO_KEY, GoogleConfig
from princeps_db.pgserver import LocalPostgres
from princeps_db.providers import list_drive_files, list_upcoming_events
from tests.google_support import RecordingGoogle
from tests.support import REPO_ROOT, alembic_config, alembic_run

Tokens = dict[str, tuple[str, str | None]]
"""Integration id -> (access token, refresh token)."""

# ---------------------------------------------------------------------------
# Secrets and the forms they could leak in


def key_forms(key_text: str) -> dict[str, str]:
    """Every spelling of a master key worth searching a log for, labelled.

    The labels name the encoding, never the value, so a failing assertion
    does not print the secret it found.
    """
    raw = MasterKey.from_text(key_text).secret
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    return {
        "as configured": key_text,
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
        "bytea escape": "\\x" + raw.hex(),
        "base64": standard,
        "base64 unpadded": standard.rstrip("="),
        "base64url": urlsafe,
        "base64url unpadded": urlsafe.rstrip("="),
    }


def raw_key_bytes(key_text: str) -> bytes:
    """The decoded 32 bytes of a master key, to search binary output for."""
    return MasterKey.from_text(key_text).secret


def find_secrets(text: str, secrets: Mapping[str, str]) -> list[str]:
    """Return the labels of the secrets that occur in ``text`` (labels only, never values)."""
    return sorted(label for label, value in secrets.items() if value and value in text)


def derived_keys_for(keyring: KeyRing, rows: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every derived key of every (user id, provider) under every key of ``keyring``, labelled."""
    found: dict[str, str] = {}
    for user_id, provider in rows:
        for position, key in enumerate(keyring.keys):
            for kind in TokenKind:
                label = f"derived key {kind.value} of {user_id}/{provider} under key #{position}"
                found[label] = key.derive_token_key(user_id=user_id, provider=provider, kind=kind)
    return found


# ---------------------------------------------------------------------------
# Databases


def admin_connection(server: LocalPostgres) -> psycopg.Connection:
    """An autocommit superuser connection to the ``postgres`` database of ``server``."""
    return psycopg.connect(
        host=server.host, port=server.port, user=server.user, dbname="postgres", autocommit=True
    )


def create_database(server: LocalPostgres, name: str, *, template: str | None = None) -> str:
    """Create ``name`` (optionally as a copy of ``template``) and return its URL."""
    with admin_connection(server) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        suffix = f' TEMPLATE "{template}"' if template else ""
        connection.execute(f'CREATE DATABASE "{name}"{suffix}')
    return server.database_url(name)


def drop_database(server: LocalPostgres, name: str) -> None:
    """Drop ``name``, disconnecting whoever is still on it."""
    with admin_connection(server) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def snapshot(url: str) -> list[tuple[object, ...]]:
    """Every row of both tables, in a stable order: compare before and after to prove no change."""
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            users = connection.execute(sa.text('SELECT * FROM "User" ORDER BY id')).all()
            integrations = connection.execute(
                sa.text('SELECT * FROM "Integration" ORDER BY id')
            ).all()
    finally:
        engine.dispose()
    return [("User", *row) for row in users] + [("Integration", *row) for row in integrations]


def decrypt_all_at_once(url: str, keyring: KeyRing) -> Tokens:
    """Decrypt every row in one statement (ids and derived keys as arrays): id -> tokens.

    Raises if any row does not decrypt, so a lost or corrupted row cannot hide.
    """
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            refs = connection.execute(
                sa.text('SELECT id, "userId", provider, "tokenKeyId" FROM "Integration"')
            ).all()
            ids, access_keys, refresh_keys = [], [], []
            for ref in refs:
                key = keyring.for_key_id(ref.tokenKeyId)
                ids.append(ref.id)
                access_keys.append(
                    key.derive_token_key(
                        user_id=ref.userId, provider=ref.provider, kind=TokenKind.ACCESS
                    )
                )
                refresh_keys.append(
                    key.derive_token_key(
                        user_id=ref.userId, provider=ref.provider, kind=TokenKind.REFRESH
                    )
                )
            rows = connection.execute(
                sa.text(
                    'SELECT i.id, pgp_sym_decrypt(i."accessTokenEncrypted", v.ak) AS access, '
                    'pgp_sym_decrypt(i."refreshTokenEncrypted", v.rk) AS refresh '
                    "FROM unnest(CAST(:ids AS text[]), CAST(:aks AS text[]), "
                    "CAST(:rks AS text[])) AS v(id, ak, rk) "
                    'JOIN "Integration" AS i ON i.id = v.id'
                ),
                {"ids": ids, "aks": access_keys, "rks": refresh_keys},
            ).all()
    finally:
        engine.dispose()
    return {row.id: (row.access, row.refresh) for row in rows}


def plaintext_rows(url: str) -> Tokens:
    """The plaintext columns of a database below the contract revision: id -> tokens."""
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text('SELECT id, "accessToken", "refreshToken" FROM "Integration"')
            ).all()
    finally:
        engine.dispose()
    return {row.id: (row.accessToken, row.refreshToken) for row in rows}


def count(url: str, sql: str) -> int:
    """Run a ``SELECT count(*)``-like query and return the number."""
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            value: int = connection.execute(sa.text(sql)).scalar_one()
    finally:
        engine.dispose()
    return value


# ---------------------------------------------------------------------------
# Commands


def command_env(url: str, key_text: str | None, **extra: str) -> dict[str, str]:
    """Environment for a ``princeps-db`` / ``alembic`` subprocess: this database, this key only."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("INTEGRATION_TOKEN_", "PRINCEPS_", "DATABASE_URL", "GOOGLE_"))
    }
    env.update({"DATABASE_URL": url, "PRINCEPS_ENV": "test"})
    if key_text is not None:
        env["INTEGRATION_TOKEN_ENCRYPTION_KEY"] = key_text
    env.update(extra)
    return env


def princeps_db_argv(*args: str) -> list[str]:
    """argv of the installed ``princeps-db`` console script."""
    script = Path(sys.executable).parent / "princeps-db"
    return [str(script) if script.exists() else shutil.which("princeps-db") or "princeps-db", *args]


def alembic_argv(*args: str) -> list[str]:
    """argv of the real ``alembic`` command line (run from the repository root)."""
    return [sys.executable, "-m", "alembic", *args]


def run_command(
    argv: Sequence[str], env: Mapping[str, str], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root and capture its output."""
    return subprocess.run(
        list(argv),
        cwd=REPO_ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------
# The lifecycle the leak tests run


@dataclass
class Lifecycle:
    """One deployment's life on one database, recording what a leak test must search.

    ``outputs`` collects CLI output, exception messages and reprs. ``tokens``
    maps a label to every token value written, and ``identities`` every
    (user id, provider) whose derived keys exist.
    """

    url: str
    key_text: str
    previous_key_texts: tuple[str, ...] = ()
    echo: bool = False
    batch_size: int = 16
    seed_rows: int = 60
    outputs: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    identities: set[tuple[str, str]] = field(default_factory=set)
    other_key_texts: list[str] = field(default_factory=list)
    expected: dict[tuple[str, str], str] = field(default_factory=dict)
    google: RecordingGoogle = field(default_factory=RecordingGoogle)
    """Google on loopback, serving while the lifecycle runs; its client is always configured."""
    _engine: Engine | None = None

    @property
    def keyring(self) -> KeyRing:
        """The deployment's key ring: current key first, then the previous ones."""
        return KeyRing.from_texts(self.key_text, self.previous_key_texts)

    def settings(self, key_text: str | None = None) -> Settings:
        """Settings as the application would load them for this database (and Google)."""
        previous = ",".join(self.previous_key_texts) or None
        # Never the real Google: the stand-in, or (once it stopped) a port nothing listens on.
        base = self.google.base_url if self.google.serving else "http://127.0.0.1:9"
        endpoints = {
            "google_oauth_token_url": f"{base}/token",
            "google_oauth_revoke_url": f"{base}/revoke",
            "google_calendar_api_url": f"{base}/calendar/v3",
            "google_drive_api_url": f"{base}/drive/v3",
        }
        return Settings(
            database_url=SecretStr(self.url),
            integration_token_encryption_key=SecretStr(key_text or self.key_text),
            integration_token_previous_keys=SecretStr(previous) if previous else None,
            princeps_env=Environment.TEST,
            google_client_id=self.google.client_id,
            google_client_secret=SecretStr(self.google.client_secret),
            **endpoints,
        )

    @property
    def engine(self) -> Engine:
        """The application's engine (echo on when the test asks for it)."""
        if self._engine is None:
            self._engine = create_engine(
                self.settings(), application_name="princeps-app", echo=self.echo
            )
        return self._engine

    def sessions(self, keyring: KeyRing | None = None) -> sessionmaker[Session]:
        """A session factory with this deployment's key ring (or another one) and Google client."""
        factory = create_session_factory(self.engine, keyring=keyring or self.keyring)
        factory.kw["info"][GOOGLE_CONFIG_INFO_KEY] = GoogleConfig.from_settings(self.settings())
        return factory

    def env(self, key_text: str | None = None) -> dict[str, str]:
        """Environment of a command run by the operator of this deployment."""
        extra = {
            "GOOGLE_CLIENT_ID": self.google.client_id,
            "GOOGLE_CLIENT_SECRET": self.google.client_secret,
        }
        if self.previous_key_texts:
            extra["INTEGRATION_TOKEN_PREVIOUS_KEYS"] = ",".join(self.previous_key_texts)
        return command_env(self.url, key_text or self.key_text, **extra)

    def run(
        self, argv: Sequence[str], *, key_text: str | None = None, exit_codes: Sequence[int] = (0,)
    ) -> str:
        """Run a command as the operator would; record and return its output; fail loudly."""
        result = run_command(argv, self.env(key_text))
        output = result.stdout + result.stderr
        self.outputs.append(output)
        # The output may legitimately hold nothing secret, so it is safe to show on failure.
        assert result.returncode in exit_codes, f"{' '.join(argv[1:3])} failed:\n{output}"
        return output

    def note(self, *values: object) -> None:
        """Record the str and repr of values a user could see (results, errors)."""
        for value in values:
            self.outputs += [str(value), repr(value)]

    def remember(
        self, label: str, *, user_id: str, provider: str, access: str, refresh: str | None
    ) -> None:
        """Record a token written for (user, provider), and what a read must return."""
        self.identities.add((user_id, provider))
        self.tokens[f"{label} access"] = access
        if refresh is not None:
            self.tokens[f"{label} refresh"] = refresh
        self.expected[(user_id, provider)] = access

    def secrets(self) -> dict[str, str]:
        """Every value that must never appear in a Python-side log or output."""
        found: dict[str, str] = {}
        for position, text in enumerate((self.key_text, *self.previous_key_texts)):
            found |= {f"key #{position} {f}": v for f, v in key_forms(text).items()}
        for position, text in enumerate(self.other_key_texts):
            found |= {f"other key #{position} {f}": v for f, v in key_forms(text).items()}
        found |= derived_keys_for(self.keyring, sorted(self.identities))
        found |= {f"token {label}": value for label, value in self.tokens.items()}
        found["Google client secret"] = self.google.client_secret
        return found

    def close(self) -> None:
        """Release the application's connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


@dataclass(frozen=True)
class Step:
    """One named operation of the lifecycle."""

    name: str
    run: Callable[[Lifecycle], None]


def _in_an_hour() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def step_baseline_and_seed(life: Lifecycle) -> None:
    """The legacy schema (as Prisma made it) holding plaintext tokens."""
    life.run(alembic_argv("upgrade", "0001_baseline"))
    rows: list[LegacyRow] = seed_legacy_rows(life.url, life.seed_rows, seed=11)
    for row in rows:
        life.remember(
            f"seeded {row.id}",
            user_id=row.user_id,
            provider=row.provider,
            access=row.access_token,
            refresh=row.refresh_token,
        )


def step_backfill(life: Lifecycle) -> None:
    """The real migrations: alembic to the backfill, then ``princeps-db migrate`` to head."""
    life.run(alembic_argv("-x", f"batch_size={life.batch_size}", "upgrade", "0003_backfill"))
    life.run(princeps_db_argv("migrate", "head", "--batch-size", str(life.batch_size)))


def step_upserts(life: Lifecycle) -> None:
    """New integrations, a token replaced, a refresh token kept."""
    with life.sessions()() as session:
        for number in range(3):
            user_id = f"app-user-{number}"
            create_user(session, user_id=user_id, email=f"{user_id}@example.com")
            for provider in ("google_calendar", "google_drive"):
                access = f"ya29.AppAccess{number}{provider}-ÄÖÜ-🔐-{generate_master_key()}"
                refresh = f"1//AppRefresh{number}{provider}-{generate_master_key()}"
                info = upsert_integration(
                    session,
                    user_id=user_id,
                    provider=provider,
                    access_token=access,
                    refresh_token=refresh,
                    expires_at=_in_an_hour(),
                    scope="https://www.googleapis.com/auth/calendar.readonly",
                )
                life.remember(
                    f"upserted {user_id}/{provider}",
                    user_id=user_id,
                    provider=provider,
                    access=access,
                    refresh=refresh,
                )
                life.note(info, info.model_dump_json())
        # A seeded integration gets a new access token and keeps its refresh token.
        (user_id, provider) = sorted(i for i in life.identities if i[0].startswith("user-"))[0]
        access = f"ya29.Replaced-{generate_master_key()}"
        info = upsert_integration(
            session,
            user_id=user_id,
            provider=provider,
            access_token=access,
            refresh_token=None,
            expires_at=_in_an_hour(),
        )
        life.remember(
            f"replaced {user_id}/{provider}",
            user_id=user_id,
            provider=provider,
            access=access,
            refresh=None,
        )
        life.note(info)
        session.commit()


def step_reads(life: Lifecycle) -> None:
    """Every token read back, the integrations listed, one deleted."""
    with life.sessions()() as session:
        for (user_id, provider), expected in sorted(life.expected.items()):
            assert get_valid_token(session, user_id=user_id, provider=provider) == expected
        life.note(list_integrations(session, user_id="app-user-0"))
        assert delete_integration(session, user_id="app-user-2", provider="google_drive")
        session.commit()
    del life.expected[("app-user-2", "google_drive")]


def step_wrong_key_read(life: Lifecycle) -> None:
    """A deployment configured with the wrong key gets a named error, not a token."""
    wrong_text = generate_master_key()
    life.other_key_texts.append(wrong_text)
    wrong = KeyRing.from_texts(wrong_text)
    # Same key id, other secret: the read reaches pgcrypto and fails there.
    impostor = MasterKey(MasterKey.from_text(generate_master_key()).secret)
    object.__setattr__(impostor, "key_id", life.keyring.current.key_id)
    (user_id, provider) = sorted(life.expected)[0]
    for keyring in (wrong, KeyRing(impostor)):
        with life.sessions(keyring)() as session, pytest.raises(TokenDecryptionError) as raised:
            get_valid_token(session, user_id=user_id, provider=provider)
        life.note(raised.value)


def step_refresh_and_provider_calls(life: Lifecycle) -> None:
    """Tokens from Google's consent expire; reads refresh them; Calendar and Drive are called.

    Covers the refresh inside ``get_valid_token`` (with refresh-token rotation)
    and the forced refresh after an API answers 401 despite a fresh-looking token.
    """
    google = life.google
    user_id = "google-user"
    scopes = {"google_calendar": CALENDAR_SCOPE, "google_drive": DRIVE_SCOPE}
    with life.sessions()() as session:
        create_user(session, user_id=user_id, email=f"{user_id}@example.com")
        for provider, scope in scopes.items():
            grant = google.consent(scope=scope)
            upsert_integration(
                session,
                user_id=user_id,
                provider=provider,
                access_token=grant.access_token,
                refresh_token=grant.refresh_token,
                expires_at=datetime.now(UTC) - timedelta(minutes=5),
                scope=grant.scope,
            )
            life.remember(
                f"consented {provider}",
                user_id=user_id,
                provider=provider,
                access=grant.access_token,
                refresh=grant.refresh_token,
            )
        session.commit()
        google.expire_access_tokens()
        # Expired: the read refreshes (the provider rotates the refresh token).
        refreshed = get_valid_token(session, user_id=user_id, provider="google_calendar")
        events = list_upcoming_events(session, user_id=user_id)
        # The Drive token is expired too: the provider call refreshes it first.
        files = list_drive_files(session, user_id=user_id)
        # Revoked early at the provider: the call gets a 401, refreshes by force, retries.
        google.expire_access_tokens()
        again = list_upcoming_events(session, user_id=user_id)
        life.note(events, files, again)
        session.commit()
        latest = {p: get_valid_token(session, user_id=user_id, provider=p) for p in scopes}
    assert [request.status for request in google.token_log] == [200, 200, 200]
    assert events and files and again
    assert refreshed == google.token_log[0].access_token
    for label, value in google.issued().items():
        life.tokens[label] = value
    for provider, access in latest.items():
        assert access in google.issued().values()
        life.expected[(user_id, provider)] = access


def step_rotate_key(life: Lifecycle) -> None:
    """A new master key is deployed (the old one kept as previous) and every row rotated."""
    life.previous_key_texts = (life.key_text, *life.previous_key_texts)
    life.key_text = generate_master_key()
    output = life.run(princeps_db_argv("rotate-key", "--batch-size", str(life.batch_size)))
    assert "failed (left untouched): 0" in output
    assert "rotated: 0" not in output


def step_verify(life: Lifecycle) -> None:
    """``princeps-db verify``: every row decrypts under its key, as text and as JSON."""
    assert "OK: every row decrypts" in life.run(princeps_db_argv("verify"))
    life.run(princeps_db_argv("verify", "--json"))


def step_audit(life: Lifecycle) -> None:
    """``princeps-db audit``: findings (exit 1) are expected on a server logging everything."""
    life.run(princeps_db_argv("audit"), exit_codes=(0, 1))
    life.run(princeps_db_argv("audit", "--json"), exit_codes=(0, 1))


def step_downgrade_and_up(life: Lifecycle) -> None:
    """Back to the plaintext baseline (decrypting every row) and up to head again."""
    life.close()  # the downgrade drops columns: no idle application connection in the way
    life.run(alembic_argv("-x", f"batch_size={life.batch_size}", "downgrade", "0001_baseline"))
    life.run(alembic_argv("-x", f"batch_size={life.batch_size}", "upgrade", "head"))


def step_everything_decrypts(life: Lifecycle) -> None:
    """Every live integration still reads back its latest token."""
    with life.sessions()() as session:
        for (user_id, provider), expected in sorted(life.expected.items()):
            assert get_valid_token(session, user_id=user_id, provider=provider) == expected


LIFECYCLE: list[Step] = [
    Step("baseline + seed", step_baseline_and_seed),
    Step("backfill migration", step_backfill),
    Step("upserts", step_upserts),
    Step("reads, list, delete", step_reads),
    Step("wrong-key read", step_wrong_key_read),
    Step("refresh and provider calls", step_refresh_and_provider_calls),
    Step("rotate-key", step_rotate_key),
    Step("verify", step_verify),
    Step("audit", step_audit),
    Step("downgrade to baseline and up", step_downgrade_and_up),
    Step("every token still decrypts", step_everything_decrypts),
]
"""Append a Step and every leak test runs it."""


def run_lifecycle(life: Lifecycle, steps: Sequence[Step] = ()) -> list[str]:
    """Run every step in order; return the step names run."""
    chosen = list(steps) or LIFECYCLE
    life.google.start()
    try:
        for step in chosen:
            step.run(life)
    finally:
        life.close()
        life.google.stop()
    return [step.name for step in chosen]


# ---------------------------------------------------------------------------
# Faults: interrupting long-running, resumable commands


@dataclass(frozen=True)
class FaultScenario:
    """A resumable command to interrupt, and what must hold after it is run again.

    ``build`` fills a fresh database (given its URL) and returns the tokens every
    row must decrypt to under ``keyring_after`` once ``argv`` has completed.
    ``progress_sql`` counts rows already processed (``total`` when done);
    ``finished_sql`` tells whether the command completed (a run killed early
    must leave it false, or the interruption proved nothing).
    """

    name: str
    build: Callable[[str], Tokens]
    argv: Sequence[str]
    env: Callable[[str], dict[str, str]]
    progress_sql: str
    total: int
    keyring_after: KeyRing
    finished_sql: str
    """A query that is true once the command has done all its work."""
    application_name: str = "princeps-db-migrate"

    def kill_points(self, how_many: int) -> list[int]:
        """``how_many`` progress thresholds spread evenly inside the run."""
        step = self.total / (how_many + 1)
        return [max(1, round(step * n)) for n in range(1, how_many + 1)]


@contextlib.contextmanager
def started(scenario: FaultScenario, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start the scenario's command on ``url``; make sure it is gone afterwards."""
    process = subprocess.Popen(
        list(scenario.argv),
        cwd=REPO_ROOT,
        env=scenario.env(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def wait_for_progress(
    scenario: FaultScenario,
    url: str,
    process: subprocess.Popen[bytes],
    threshold: int,
    *,
    timeout: float = 60,
) -> int:
    """Poll until at least ``threshold`` rows are processed; return the count seen.

    Fails if the command exits first: the interruption would then prove nothing.
    """
    engine = sa.create_engine(url, hide_parameters=True)
    deadline = time.monotonic() + timeout
    try:
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            while True:
                done: int = connection.execute(sa.text(scenario.progress_sql)).scalar_one()
                if done >= threshold:
                    return done
                if process.poll() is not None:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    raise AssertionError(
                        f"{scenario.name} exited ({process.returncode}) at {done}/"
                        f"{scenario.total} before reaching {threshold}: {stderr[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"{scenario.name} stalled at {done}/{scenario.total}")
                time.sleep(0.005)
    finally:
        engine.dispose()


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """Kill the command at once, as the OOM killer or a lost node would."""
    process.send_signal(signal.SIGKILL)
    process.wait()


def terminate_backend(server: LocalPostgres, application_name: str) -> int:
    """``pg_terminate_backend`` every backend of ``application_name``; return how many."""
    with admin_connection(server) as connection:
        killed = connection.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    return int(killed[0]) if killed else 0


def rerun_to_completion(scenario: FaultScenario, url: str) -> subprocess.CompletedProcess[str]:
    """Run the scenario's command again, as an operator would after the failure."""
    return run_command(scenario.argv, scenario.env(url))


def backfill_scenario(*, rows: int, batch_size: int, key_text: str) -> FaultScenario:
    """``alembic upgrade head`` from 0002_expand over ``rows`` seeded legacy rows."""

    def build(url: str) -> Tokens:
        keyring = KeyRing.from_texts(key_text)
        alembic_run(url, "upgrade", "0001_baseline", keyring=keyring)
        seed_legacy_rows(url, rows)
        expected = plaintext_rows(url)
        alembic_run(url, "upgrade", "0002_expand", keyring=keyring)
        return expected

    return FaultScenario(
        name="backfill (alembic upgrade head)",
        build=build,
        argv=alembic_argv("-x", f"batch_size={batch_size}", "upgrade", "head"),
        env=lambda url: command_env(url, key_text),
        progress_sql=(
            'SELECT count(*) FROM "Integration" WHERE "accessTokenEncrypted" IS NOT NULL'
        ),
        total=rows,
        keyring_after=KeyRing.from_texts(key_text),
        finished_sql=(
            f"SELECT coalesce(max(version_num), '') = '{alembic_head()}' FROM alembic_version"
        ),
    )


def rotation_scenario(
    *, rows: int, batch_size: int, old_key_text: str, new_key_text: str
) -> FaultScenario:
    """``princeps-db rotate-key`` over ``rows`` integrations under ``old_key_text``.

    The starting database is the backfill's result: legacy rows encrypted under
    the old key by the real migrations. The command runs with the new key
    current and the old one in ``INTEGRATION_TOKEN_PREVIOUS_KEYS``, as a deploy
    would; afterwards every row must decrypt under the new key alone.
    """
    new_key_id = MasterKey.from_text(new_key_text).key_id

    def build(url: str) -> Tokens:
        keyring = KeyRing.from_texts(old_key_text)
        alembic_run(url, "upgrade", "0001_baseline", keyring=keyring)
        seed_legacy_rows(url, rows)
        expected = plaintext_rows(url)
        alembic_run(url, "upgrade", "head", keyring=keyring)
        return expected

    under_new_key = f"\"tokenKeyId\" = '{new_key_id}'"
    return FaultScenario(
        name="rotation (princeps-db rotate-key)",
        build=build,
        argv=princeps_db_argv("rotate-key", "--batch-size", str(batch_size)),
        env=lambda url: command_env(
            url, new_key_text, INTEGRATION_TOKEN_PREVIOUS_KEYS=old_key_text
        ),
        progress_sql=f'SELECT count(*) FROM "Integration" WHERE {under_new_key}',
        total=rows,
        keyring_after=KeyRing.from_texts(new_key_text),
        finished_sql=f'SELECT bool_and({under_new_key}) FROM "Integration"',
        application_name="princeps-db rotate-key",
    )


def alembic_head() -> str:
    """The newest revision of the migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
