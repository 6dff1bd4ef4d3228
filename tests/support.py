"""Helpers shared by the tests: running Alembic, seeding legacy rows, reading the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from princeps_db.crypto import KeyRing, MasterKey, TokenKind
from princeps_db.demo_data import LegacyRow, seed_legacy_rows

__all__ = ["LegacyRow", "seed_legacy_rows"]

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


def _alembic_env(url: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATION_TOKEN_")}
    env.update({"DATABASE_URL": url, "PRINCEPS_ENV": "test", **(extra or {})})
    return env


def alembic_popen(url: str, *args: str, key: str) -> subprocess.Popen[bytes]:
    """Start the real ``alembic`` command line in the background (to kill or race it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=_alembic_env(url, {"INTEGRATION_TOKEN_ENCRYPTION_KEY": key}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def alembic_cli(
    url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``alembic`` command line from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=_alembic_env(url, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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
