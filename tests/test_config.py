"""Keys and settings: clear failures in production, a working default in development."""

from __future__ import annotations

import base64
import logging
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from princeps_db import (
    ConfigurationError,
    get_valid_token,
    list_integrations,
    load_settings,
    upsert_integration,
)
from princeps_db.config import DEFAULT_DEV_KEY_FILE, normalise_database_url
from princeps_db.crypto import MasterKey, generate_master_key
from tests.conftest import TEST_KEY


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement the engine sends, recorded."""
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine, "before_cursor_execute", record)


def test_production_without_a_key_fails_naming_the_variable_and_keygen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "production")
    with pytest.raises(ConfigurationError, match="INTEGRATION_TOKEN_ENCRYPTION_KEY") as raised:
        load_settings()
    assert "princeps-db keygen" in str(raised.value)


@pytest.mark.parametrize(
    "bad_key",
    [
        "too-short",
        base64.urlsafe_b64encode(b"\x07" * 31).decode().rstrip("="),
        "not base64 at all!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "ключ" * 12,
    ],
    ids=["short", "31-bytes", "not-base64", "non-ascii"],
)
def test_a_malformed_key_is_rejected_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, bad_key: str
) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "production")
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", bad_key)
    with pytest.raises(ConfigurationError, match="keygen") as raised:
        load_settings()
    assert bad_key not in str(raised.value)
    assert bad_key not in repr(raised.value)


def test_a_malformed_previous_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "production")
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", TEST_KEY)
    monkeypatch.setenv("INTEGRATION_TOKEN_PREVIOUS_KEYS", f"{generate_master_key()},oops")
    with pytest.raises(ConfigurationError, match="INTEGRATION_TOKEN_PREVIOUS_KEYS entry 2"):
        load_settings()


def test_repository_in_production_without_a_key_sends_no_statement(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, statements: list[str]
) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "production")
    with Session(engine) as bare:  # no key ring attached: settings decide
        with pytest.raises(ConfigurationError):
            get_valid_token(bare, user_id="u1", provider="google_drive")
        with pytest.raises(ConfigurationError):
            upsert_integration(
                bare,
                user_id="u1",
                provider="google_drive",
                access_token="ya29.x",
                refresh_token=None,
                expires_at=None,
            )
    assert statements == []


def test_settings_keep_secrets_out_of_their_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", TEST_KEY)
    monkeypatch.setenv("DATABASE_URL", "postgres://app:hunter2@db.internal/princeps")
    settings = load_settings()
    text = repr(settings) + str(settings) + repr(settings.keyring())
    assert TEST_KEY not in text
    assert "hunter2" not in text
    assert (
        settings.require_database_url() == "postgresql+psycopg://app:hunter2@db.internal/princeps"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql://u@h:5433/db", "postgresql+psycopg://u@h:5433/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_database_urls_are_normalised_to_psycopg3(given: str, expected: str) -> None:
    assert normalise_database_url(given) == expected


def test_a_non_postgres_url_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://u:secretpw@h/db")
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", TEST_KEY)
    with pytest.raises(ConfigurationError, match="DATABASE_URL") as raised:
        load_settings()
    assert "secretpw" not in str(raised.value)


def test_development_without_a_key_creates_a_private_key_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        first = load_settings()
    key_file = tmp_path / DEFAULT_DEV_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in caplog.text
    key_text = key_file.read_text().strip()
    assert key_text not in caplog.text
    assert len(MasterKey.from_text(key_text).secret) == 32
    second = load_settings()
    assert first.keyring().current.key_id == second.keyring().current.key_id


def test_the_test_environment_needs_an_explicit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "test")
    with pytest.raises(ConfigurationError):
        load_settings()


def test_a_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"PRINCEPS_ENV=production\nINTEGRATION_TOKEN_ENCRYPTION_KEY={TEST_KEY}\n"
    )
    settings = load_settings()
    assert settings.keyring().current.key_id == MasterKey.from_text(TEST_KEY).key_id


@pytest.mark.parametrize("entry", [["princeps-db"], [sys.executable, "-m", "princeps_db"]])
def test_keygen_prints_one_usable_key_and_nothing_else_on_stdout(entry: list[str]) -> None:
    executable = Path(sys.executable).parent / entry[0] if entry == ["princeps-db"] else None
    command = [str(executable)] if executable else entry
    result = subprocess.run([*command, "keygen"], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    key = MasterKey.from_text(lines[0])
    assert len(key.secret) == 32
    assert f"key id: {key.key_id}" in result.stderr


def test_listing_uses_no_key(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", TEST_KEY)
    with Session(engine) as bare:
        assert list_integrations(bare, user_id="u1") == []
        assert bare.execute(sa.text("SELECT 1")).scalar_one() == 1
