"""Helpers for tests that talk to a Google stand-in on loopback."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from pytest_httpserver import HTTPServer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from werkzeug import Request

from princeps_db.crypto import KeyRing, TokenKind
from princeps_db.db import KEYRING_INFO_KEY
from princeps_db.fake_google import FakeGoogle
from princeps_db.oauth import GOOGLE_CONFIG_INFO_KEY, GoogleConfig
from princeps_db.repository import create_user, upsert_integration
from tests.conftest import TEST_KEYRING

CLIENT_ID = "princeps-test.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-test-client-secret-5f0c2a9b"
OLD_ACCESS = "ya29.a0-old-access-token-" + "A" * 40
OLD_REFRESH = "1//0g-old-refresh-token-" + "B" * 40
NEW_ACCESS = "ya29.a0-new-access-token-" + "C" * 40
ROTATED_REFRESH = "1//0g-rotated-refresh-token-" + "D" * 40
USER = "user-1"
CALENDAR = "google_calendar"


def google_config(httpserver: HTTPServer, **overrides: Any) -> GoogleConfig:
    """A GoogleConfig pointing every endpoint at ``httpserver``, with fast retries."""
    values: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": SecretStr(CLIENT_SECRET),
        "token_url": httpserver.url_for("/token"),
        "revoke_url": httpserver.url_for("/revoke"),
        "calendar_api_url": httpserver.url_for("/calendar/v3"),
        "drive_api_url": httpserver.url_for("/drive/v3"),
        "timeout_seconds": 2.0,
        "attempts": 3,
        "backoff_seconds": 0.01,
        **overrides,
    }
    return GoogleConfig(**values)


def factory_for(
    engine: Engine, config: GoogleConfig, keyring: KeyRing = TEST_KEYRING
) -> sessionmaker[Session]:
    """Sessions carrying a key ring and a Google configuration."""
    return sessionmaker(
        bind=engine,
        info={KEYRING_INFO_KEY: keyring, GOOGLE_CONFIG_INFO_KEY: config},
        expire_on_commit=False,
    )


def connect(
    factory: sessionmaker[Session],
    *,
    expires_in: timedelta,
    user_id: str = USER,
    provider: str = CALENDAR,
    access_token: str = OLD_ACCESS,
    refresh_token: str | None = OLD_REFRESH,
    new_user: bool = True,
) -> None:
    """Store an integration whose access token expires ``expires_in`` from now."""
    with factory() as session, session.begin():
        if new_user:
            create_user(session, email=f"{user_id}@example.com", user_id=user_id)
        upsert_integration(
            session,
            user_id=user_id,
            provider=provider,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=datetime.now(UTC) + expires_in,
            scope="https://www.googleapis.com/auth/calendar.readonly",
        )


@dataclass(frozen=True)
class StoredRow:
    """What is in the table for one integration, ciphertext as stored."""

    access_encrypted: bytes
    refresh_encrypted: bytes | None
    key_id: str
    status: str
    expires_at: datetime | None


def stored(engine: Engine, *, user_id: str = USER, provider: str = CALENDAR) -> StoredRow:
    """Read one integration's raw columns."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                'SELECT "accessTokenEncrypted", "refreshTokenEncrypted", "tokenKeyId", status, '
                '"expiresAt" FROM "Integration" WHERE "userId" = :u AND provider = :p'
            ),
            {"u": user_id, "p": provider},
        ).one()
    return StoredRow(bytes(row[0]), None if row[1] is None else bytes(row[1]), *row[2:])


def decrypt_stored(
    engine: Engine, keyring: KeyRing, *, user_id: str = USER, provider: str = CALENDAR
) -> tuple[str, str | None]:
    """Decrypt one integration's tokens server-side with the key its row names."""
    row = stored(engine, user_id=user_id, provider=provider)
    key = keyring.for_key_id(row.key_id)
    with engine.connect() as connection:
        access, refresh = connection.execute(
            sa.text(
                'SELECT pgp_sym_decrypt("accessTokenEncrypted", :ak), '
                'pgp_sym_decrypt("refreshTokenEncrypted", :rk) '
                'FROM "Integration" WHERE "userId" = :u AND provider = :p'
            ),
            {
                "ak": key.derive_token_key(
                    user_id=user_id, provider=provider, kind=TokenKind.ACCESS
                ),
                "rk": key.derive_token_key(
                    user_id=user_id, provider=provider, kind=TokenKind.REFRESH
                ),
                "u": user_id,
                "p": provider,
            },
        ).one()
    return access, refresh


def requests_to(httpserver: HTTPServer, path: str) -> list[Request]:
    """Requests the stand-in received on ``path``."""
    return [request for request, _ in httpserver.log if request.path == path]


def token_response(
    access_token: str = NEW_ACCESS, refresh_token: str | None = None, expires_in: int = 3599
) -> dict[str, Any]:
    """A Google-shaped token endpoint answer."""
    body: dict[str, Any] = {
        "access_token": access_token,
        "expires_in": expires_in,
        "token_type": "Bearer",
        "scope": "https://www.googleapis.com/auth/calendar.readonly",
    }
    if refresh_token is not None:
        body["refresh_token"] = refresh_token
    return body


def unused_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True)
class TokenRequest:
    """One request to the fake token endpoint, as the provider saw it."""

    refresh_token: str | None
    status: int
    access_token: str | None
    new_refresh_token: str | None
    at: float


class RecordingGoogle(FakeGoogle):
    """The loopback Google stand-in, keeping a log of its token endpoint's requests."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.token_log: list[TokenRequest] = []
        self._log_lock = threading.Lock()

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status, body = super()._token(form)
        request = TokenRequest(
            refresh_token=form.get("refresh_token"),
            status=status,
            access_token=body.get("access_token"),
            new_refresh_token=body.get("refresh_token"),
            at=time.monotonic(),
        )
        with self._log_lock:
            self.token_log.append(request)
        return status, body

    def issued(self) -> dict[str, str]:
        """Every token the token endpoint handed out, labelled (never the value in a label)."""
        found: dict[str, str] = {}
        with self._log_lock:
            for number, request in enumerate(self.token_log):
                if request.access_token:
                    found[f"refreshed access token #{number}"] = request.access_token
                if request.new_refresh_token:
                    found[f"rotated refresh token #{number}"] = request.new_refresh_token
        return found
