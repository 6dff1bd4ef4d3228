"""Helpers shared by the tests: running Alembic, seeding legacy rows, reading the table."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from princeps_db.crypto import KeyRing, MasterKey, TokenKind

REPO_ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> Config:
    """The project's alembic.ini, as the CLI would read it."""
    return Config(str(REPO_ROOT / "alembic.ini"))


def alembic_run(url: str, action: str, revision: str, *, keyring: KeyRing) -> None:
    """Run ``alembic upgrade|downgrade REVISION`` in-process on ``url``."""
    config = alembic_config()
    config.attributes["keyring"] = keyring
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def alembic_cli(
    url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``alembic`` command line from the repository root."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATION_TOKEN_")}
    full_env.update({"DATABASE_URL": url, "PRINCEPS_ENV": "test", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class LegacyRow:
    """A plaintext integration as the old Princeps schema held it."""

    id: str
    user_id: str
    provider: str
    access_token: str
    refresh_token: str | None


def _token(rng: random.Random, length: int) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~"
    return "ya29." + "".join(rng.choice(alphabet) for _ in range(length))


def seed_legacy_rows(url: str, count: int, *, seed: int = 7) -> list[LegacyRow]:
    """Insert users and plaintext integrations at the baseline schema; return what was written.

    Every 10th row has no refresh token, every 7th a non-ASCII access token,
    every 50th a 4 KB one.
    """
    rng = random.Random(seed)
    rows: list[LegacyRow] = []
    for number in range(count):
        user_id = f"user-{number // 2:06d}"
        provider = ("google_calendar", "google_drive")[number % 2]
        access = _token(rng, 4000 if number % 50 == 0 else 150)
        if number % 7 == 0:
            access += "-äöü-日本語-🔑"
        refresh = None if number % 10 == 0 else "1//" + _token(rng, 100)
        rows.append(LegacyRow(f"int-{number:06d}", user_id, provider, access, refresh))
    engine = sa.create_engine(url)
    expiry = datetime.now(UTC) + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO \"User\" (id, email) SELECT DISTINCT u, u || '@example.com' "
                "FROM unnest(CAST(:users AS text[])) AS u"
            ),
            {"users": sorted({r.user_id for r in rows})},
        )
        connection.execute(
            sa.text(
                'INSERT INTO "Integration" (id, "userId", provider, "accessToken", '
                '"refreshToken", "expiresAt") VALUES (:id, :user_id, :provider, :access, '
                ":refresh, :expires)"
            ),
            [
                {
                    "id": r.id,
                    "user_id": r.user_id,
                    "provider": r.provider,
                    "access": r.access_token,
                    "refresh": r.refresh_token,
                    "expires": expiry,
                }
                for r in rows
            ],
        )
    engine.dispose()
    return rows


def decrypt_all(url: str, keyring: KeyRing) -> dict[str, tuple[str, str | None]]:
    """Decrypt every row server-side with its derived keys: id -> (access, refresh)."""
    engine = sa.create_engine(url, hide_parameters=True)
    result: dict[str, tuple[str, str | None]] = {}
    with engine.connect() as connection:
        refs = connection.execute(
            sa.text('SELECT id, "userId", provider, "tokenKeyId" FROM "Integration" ORDER BY id')
        ).all()
        for ref in refs:
            key: MasterKey = keyring.for_key_id(ref.tokenKeyId)
            access_key = key.derive_token_key(
                user_id=ref.userId, provider=ref.provider, kind=TokenKind.ACCESS
            )
            refresh_key = key.derive_token_key(
                user_id=ref.userId, provider=ref.provider, kind=TokenKind.REFRESH
            )
            access, refresh = connection.execute(
                sa.text(
                    'SELECT pgp_sym_decrypt("accessTokenEncrypted", :ak), '
                    'pgp_sym_decrypt("refreshTokenEncrypted", :rk) '
                    'FROM "Integration" WHERE id = :id'
                ),
                {"ak": access_key, "rk": refresh_key, "id": ref.id},
            ).one()
            result[ref.id] = (access, refresh)
    engine.dispose()
    return result
