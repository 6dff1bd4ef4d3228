"""A stand-in for Google on 127.0.0.1: token, revoke, Calendar events and Drive files.

For the demo and tests, never for production. It is a real HTTP server (the
standard library's, in a thread), so the code under test makes real requests:
refreshes issue new access tokens and rotate the refresh token (the old one
stops working, as the strictest provider would), API calls check the bearer
token and its expiry, revocation ends the grant.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from princeps_db.oauth import GOOGLE_CONFIG_INFO_KEY, GoogleConfig

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.readonly"
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive.readonly"


@dataclass(frozen=True)
class FakeGrant:
    """Tokens as the consent screen would hand them to Princeps. Its repr hides them."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    scope: str


@dataclass
class _Grant:
    refresh_token: str
    scope: str
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    revoked: bool = False


class FakeGoogle:
    """Google's OAuth token and revoke endpoints, Calendar and Drive, on loopback."""

    def __init__(
        self,
        *,
        client_id: str = "princeps-demo.apps.googleusercontent.com",
        access_token_lifetime: int = 3599,
        rotate_refresh_tokens: bool = True,
    ) -> None:
        self.client_id = client_id
        self.client_secret = "GOCSPX-" + secrets.token_urlsafe(24)
        self.access_token_lifetime = access_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.token_requests = 0
        self.api_requests = 0
        self.revocations = 0
        self._grants: list[_Grant] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeGoogle:
        """Start serving on a free port of 127.0.0.1."""
        fake = self

        class Handler(_Handler):
            google = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-google", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeGoogle:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def serving(self) -> bool:
        """Whether the server is running."""
        return self._server is not None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._server is None:
            raise RuntimeError("the fake Google server is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def config(self, **overrides: Any) -> GoogleConfig:
        """A GoogleConfig pointing at this server, with this server's client credentials."""
        values: dict[str, Any] = {
            "client_id": self.client_id,
            "client_secret": SecretStr(self.client_secret),
            "token_url": f"{self.base_url}/token",
            "revoke_url": f"{self.base_url}/revoke",
            "calendar_api_url": f"{self.base_url}/calendar/v3",
            "drive_api_url": f"{self.base_url}/drive/v3",
            "timeout_seconds": 2.0,
            "attempts": 2,
            "backoff_seconds": 0.05,
            **overrides,
        }
        return GoogleConfig(**values)

    # -- what the tests and the demo drive -----------------------------------------

    def consent(self, *, scope: str = CALENDAR_SCOPE) -> FakeGrant:
        """Simulate the user granting access: a new grant with fresh tokens."""
        with self._lock:
            grant = _Grant(refresh_token=_new_token("1//fake-refresh-"), scope=scope)
            access = _new_token("ya29.fake-access-")
            grant.access_tokens[access] = time.monotonic() + self.access_token_lifetime
            self._grants.append(grant)
        return FakeGrant(access, grant.refresh_token, self.access_token_lifetime, scope)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (as an hour passing would)."""
        with self._lock:
            for grant in self._grants:
                for token in grant.access_tokens:
                    grant.access_tokens[token] = 0.0

    def revoke_all(self) -> None:
        """Simulate the user revoking access in their Google account."""
        with self._lock:
            for grant in self._grants:
                grant.revoked = True

    # -- endpoint logic (called from the handler threads) ------------------------

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.token_requests += 1
            if (form.get("client_id"), form.get("client_secret")) != (
                self.client_id,
                self.client_secret,
            ):
                return 401, {"error": "invalid_client"}
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type"}
            grant = next(
                (g for g in self._grants if g.refresh_token == form.get("refresh_token")), None
            )
            if grant is None or grant.revoked:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            access = _new_token("ya29.fake-access-")
            grant.access_tokens[access] = time.monotonic() + self.access_token_lifetime
            body: dict[str, Any] = {
                "access_token": access,
                "expires_in": self.access_token_lifetime,
                "token_type": "Bearer",
                "scope": grant.scope,
            }
            if self.rotate_refresh_tokens:
                grant.refresh_token = _new_token("1//fake-refresh-")
                body["refresh_token"] = grant.refresh_token
            return 200, body

    def _revoke(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = form.get("token")
        with self._lock:
            for grant in self._grants:
                if not grant.revoked and (
                    token == grant.refresh_token or token in grant.access_tokens
                ):
                    grant.revoked = True
                    self.revocations += 1
                    return 200, {}
        return 400, {"error": "invalid_token"}

    def _authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        token = header.removeprefix("Bearer ")
        with self._lock:
            self.api_requests += 1
            return any(
                not grant.revoked and grant.access_tokens.get(token, 0.0) > time.monotonic()
                for grant in self._grants
            )


def _new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def _events() -> dict[str, Any]:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    items = [
        ("Weekly planning", 0),
        ("Lunch with Ada", 3),
        ("Board review", 26),
    ]
    return {
        "kind": "calendar#events",
        "items": [
            {
                "id": f"evt{number}",
                "summary": summary,
                "start": {"dateTime": (start + timedelta(hours=offset)).isoformat()},
            }
            for number, (summary, offset) in enumerate(items, start=1)
        ],
    }


def _files() -> dict[str, Any]:
    return {
        "files": [
            {
                "id": "file1",
                "name": "Quarterly plan.docx",
                "mimeType": "application/vnd.google-apps.document",
                "modifiedTime": "2026-11-30T09:12:00Z",
            },
            {
                "id": "file2",
                "name": "Budget 2027",
                "mimeType": "application/vnd.google-apps.spreadsheet",
                "modifiedTime": "2026-11-28T16:40:00Z",
            },
        ]
    }


class _Server(ThreadingHTTPServer):
    # The standard library's backlog of 5 resets connections when dozens of
    # workers refresh at once; Google's endpoints accept them.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    google: FakeGoogle

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the default writes every request line to stderr."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        return {name: values[0] for name, values in parse_qs(raw).items()}

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/token":
            self._send(*self.google._token(self._form()))
        elif path == "/revoke":
            self._send(*self.google._revoke(self._form()))
        else:
            self._send(404, {"error": "not_found"})

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        known = path.startswith("/calendar/v3/calendars/") and path.endswith("/events")
        if not (known or path == "/drive/v3/files"):
            self._send(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
        elif not self.google._authorised(self.headers.get("Authorization")):
            self._send(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        else:
            self._send(200, _events() if known else _files())


def demo_refresh(console: Console, session_factory: sessionmaker[Session], *, user_id: str) -> None:
    """Show a token refresh against a local fake Google, then a Calendar call that works.

    Connects ``user_id``'s Google Calendar with tokens from the fake provider,
    lets an hour pass (the access token expires), asks ``get_valid_token`` for
    a token (it refreshes, rotating the refresh token) and lists upcoming
    events with it. Prints expiries, counts and key ids, never a token.
    """
    from princeps_db.providers import list_upcoming_events
    from princeps_db.refresh import refresh_access_token
    from princeps_db.repository import get_valid_token, list_integrations, upsert_integration

    provider = "google_calendar"
    with FakeGoogle() as google, session_factory() as session:
        session.info[GOOGLE_CONFIG_INFO_KEY] = google.config()
        console.print(f"A stand-in for Google answers on [bold]{google.base_url}[/].")

        grant = google.consent(scope=CALENDAR_SCOPE)
        with session.begin():
            upsert_integration(
                session,
                user_id=user_id,
                provider=provider,
                access_token=grant.access_token,
                refresh_token=grant.refresh_token,
                expires_at=datetime.now(UTC) - timedelta(minutes=5),
                scope=grant.scope,
            )
        google.expire_access_tokens()
        with session.begin():
            (before,) = [
                i for i in list_integrations(session, user_id=user_id) if i.provider == provider
            ]
        console.print(
            f"User {user_id} connected Google Calendar; an hour later its access token has "
            f"expired (expiry {before.expires_at:%H:%M:%S} UTC)."
        )

        started = time.perf_counter()
        with session.begin():
            token = get_valid_token(session, user_id=user_id, provider=provider)
        elapsed = (time.perf_counter() - started) * 1000
        with session.begin():
            (after,) = [
                i for i in list_integrations(session, user_id=user_id) if i.provider == provider
            ]
        console.print(
            f"get_valid_token refreshed it in {elapsed:.0f} ms with "
            f"{google.token_requests} request to the token endpoint: new expiry "
            f"{after.expires_at:%H:%M:%S} UTC, status {after.status}, both tokens stored "
            f"encrypted under key {after.key_id} (the provider rotated the refresh token)."
        )

        with session.begin():
            events = list_upcoming_events(session, user_id=user_id, max_results=5)
        console.print(
            f"Google Calendar call with the refreshed token: {len(events)} upcoming events"
        )
        for event in events:
            console.print(f"  {event.start}  {event.summary}")

        # The old refresh token no longer works at the provider: a second refresh
        # succeeds only because the rotated one is what was stored.
        with session.begin():
            again = refresh_access_token(session, user_id=user_id, provider=provider)
        console.print(
            f"A second refresh uses the stored, rotated refresh token: "
            f"{'a new access token' if again != token else 'the same token?!'}, "
            f"{google.token_requests} token requests in all."
        )
