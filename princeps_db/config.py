"""Settings, read from the environment (and a ``.env`` file) by pydantic-settings."""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from princeps_db.crypto import KEY_ENV_VAR, KEYGEN_HINT, KeyRing, MasterKey, generate_master_key
from princeps_db.errors import ConfigurationError

logger = logging.getLogger(__name__)

PREVIOUS_KEYS_ENV_VAR = "INTEGRATION_TOKEN_PREVIOUS_KEYS"
DEFAULT_DEV_KEY_FILE = Path(".princeps") / "dev-integration-token-key"


class Environment(StrEnum):
    """Where the code runs; only development may invent a key."""

    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


def normalise_database_url(url: str) -> str:
    """Point ``postgres://`` and ``postgresql://`` URLs at the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("postgresql+psycopg://"):
        return url
    raise ValueError("DATABASE_URL must be a PostgreSQL URL (postgresql://user@host:port/dbname)")


class Settings(BaseSettings):
    """Everything princeps-db reads from its environment."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", hide_input_in_errors=True, frozen=True
    )

    database_url: SecretStr | None = None
    integration_token_encryption_key: SecretStr | None = None
    integration_token_previous_keys: SecretStr | None = None
    princeps_env: Environment = Environment.DEVELOPMENT
    princeps_dev_key_file: Path = Field(default=DEFAULT_DEV_KEY_FILE)

    # Google OAuth 2.0 (google_calendar and google_drive). Refreshing needs the
    # client id and secret; every URL can point at a local server for tests.
    google_client_id: str | None = None
    google_client_secret: SecretStr | None = None
    google_oauth_token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
    google_oauth_revoke_url: str = "https://oauth2.googleapis.com/revoke"
    google_calendar_api_url: str = "https://www.googleapis.com/calendar/v3"
    google_drive_api_url: str = "https://www.googleapis.com/drive/v3"
    # Each HTTP phase (connect, send, read) of one attempt; attempts and backoff
    # of the retries on network errors, timeouts, 5xx and 429. Together they
    # bound how long a refresh holds its row lock (see princeps_db.oauth).
    google_http_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    google_http_attempts: int = Field(default=3, ge=1, le=10)
    google_retry_backoff_seconds: float = Field(default=0.2, ge=0, le=10)

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return SecretStr(normalise_database_url(value.get_secret_value()))

    @field_validator(
        "integration_token_encryption_key",
        "integration_token_previous_keys",
        "google_client_secret",
    )
    @classmethod
    def _blank_is_missing(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    def require_database_url(self) -> str:
        """Return the SQLAlchemy URL, or explain how to set it."""
        if self.database_url is None:
            raise ConfigurationError(
                "DATABASE_URL is not set; set it to postgresql://user@host:port/dbname"
            )
        return self.database_url.get_secret_value()

    def keyring(self) -> KeyRing:
        """Return the parsed keys, failing clearly when the current key is missing or malformed."""
        if self.integration_token_encryption_key is None:
            raise ConfigurationError(
                f"{KEY_ENV_VAR} is not set (PRINCEPS_ENV={self.princeps_env.value}); {KEYGEN_HINT}"
            )
        try:
            current = MasterKey.from_text(self.integration_token_encryption_key.get_secret_value())
        except ConfigurationError as error:
            raise ConfigurationError(f"{KEY_ENV_VAR} is malformed: {error}") from None
        previous: list[MasterKey] = []
        if self.integration_token_previous_keys is not None:
            texts = self.integration_token_previous_keys.get_secret_value().split(",")
            for position, text in enumerate((t for t in texts if t.strip()), start=1):
                try:
                    previous.append(MasterKey.from_text(text))
                except ConfigurationError as error:
                    raise ConfigurationError(
                        f"{PREVIOUS_KEYS_ENV_VAR} entry {position} is malformed: {error}"
                    ) from None
        return KeyRing(current, tuple(previous))


def _development_key(path: Path) -> SecretStr:
    """Read the local development key, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(descriptor, "w") as key_file:
                key_file.write(generate_master_key() + "\n")
    logger.warning(
        "%s is not set: using the development key in %s (never use it in production)",
        KEY_ENV_VAR,
        path.resolve(),
    )
    return SecretStr(path.read_text().strip())


def load_settings(*, require_key: bool = True) -> Settings:
    """Read settings now; every problem becomes one ``ConfigurationError`` without secrets.

    ``require_key=False`` is for tools that read no token (the audit): the key
    settings are then neither required, nor parsed, nor created in development.
    """
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'settings'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in error.errors(include_input=False, include_url=False)
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
    if not require_key:
        return settings
    if (
        settings.integration_token_encryption_key is None
        and settings.princeps_env is Environment.DEVELOPMENT
    ):
        key = _development_key(settings.princeps_dev_key_file)
        settings = settings.model_copy(update={"integration_token_encryption_key": key})
    # Parse the keys now, so a bad key fails at start-up rather than at first use.
    settings.keyring()
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, loading them on first call."""
    return load_settings()
