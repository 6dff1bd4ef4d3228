"""Google OAuth 2.0 over HTTP: the refresh grant, revocation, and bounded retries.

The protocol here is two form POSTs (RFC 6749 section 6, RFC 7009), so this is
plain httpx with small functions rather than a full OAuth client library.

Nothing in this module logs or raises with a response body: an OAuth error
body can echo the token that was sent. Only the ``error`` code is kept, and
only when it looks like one (lower-case letters and underscores).

How long one call can take is bounded, and that bounds how long a refresh
holds its row lock (see ``princeps_db.refresh``): each attempt is limited by
the httpx timeouts of its connect, send and read phases, there are at most
``attempts`` attempts, and the pauses between them add up to at most
``backoff * (2**(attempts - 1) - 1)``. ``GoogleConfig.max_call_seconds``
computes that bound: 45.6 s with the defaults (5 s, 3 attempts, 0.2 s).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy.orm import Session

from princeps_db.config import Settings, get_settings
from princeps_db.errors import (
    ConfigurationError,
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
)

logger = logging.getLogger(__name__)

# Where a session (or a session factory's ``info``) may carry its own GoogleConfig.
GOOGLE_CONFIG_INFO_KEY = "princeps_db.google"

DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
DEFAULT_REVOKE_URL = "https://oauth2.googleapis.com/revoke"
DEFAULT_CALENDAR_API_URL = "https://www.googleapis.com/calendar/v3"
DEFAULT_DRIVE_API_URL = "https://www.googleapis.com/drive/v3"
# Used only when a token response omits expires_in (Google always sends it).
DEFAULT_EXPIRES_IN = 3600
# Connect, send and read each get the full timeout in one attempt.
_TIMED_PHASES = 3
_ERROR_CODE = re.compile(r"[A-Za-z_]{1,64}")


@dataclass(frozen=True)
class GoogleConfig:
    """Endpoints, client credentials and retry policy for Google. Its repr hides the secret."""

    client_id: str | None = None
    client_secret: SecretStr | None = field(default=None, repr=False)
    token_url: str = DEFAULT_TOKEN_URL
    revoke_url: str = DEFAULT_REVOKE_URL
    calendar_api_url: str = DEFAULT_CALENDAR_API_URL
    drive_api_url: str = DEFAULT_DRIVE_API_URL
    timeout_seconds: float = 5.0
    attempts: int = 3
    backoff_seconds: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> GoogleConfig:
        """Build the configuration from ``GOOGLE_*`` settings."""
        return cls(
            client_id=(settings.google_client_id or "").strip() or None,
            client_secret=settings.google_client_secret,
            token_url=settings.google_oauth_token_url,
            revoke_url=settings.google_oauth_revoke_url,
            calendar_api_url=settings.google_calendar_api_url,
            drive_api_url=settings.google_drive_api_url,
            timeout_seconds=settings.google_http_timeout_seconds,
            attempts=settings.google_http_attempts,
            backoff_seconds=settings.google_retry_backoff_seconds,
        )

    @property
    def client_configured(self) -> bool:
        """Whether a client id and secret are set (needed to refresh tokens)."""
        return bool(self.client_id) and self.client_secret is not None

    def client_credentials(self) -> tuple[str, str]:
        """Return the client id and secret, or explain which settings are missing."""
        if not self.client_id or self.client_secret is None:
            raise ConfigurationError(
                "GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET must be set to refresh Google tokens; "
                "use the OAuth client of the Google Cloud project Princeps signs in with"
            )
        return self.client_id, self.client_secret.get_secret_value()

    def backoff_before(self, attempt: int) -> float:
        """Longest pause before retry number ``attempt`` (2, 3, ...): exponential."""
        return float(self.backoff_seconds * 2 ** (attempt - 2))

    def max_call_seconds(self) -> float:
        """Upper bound of one call with all its retries: timeouts x attempts + pauses."""
        pauses = sum(self.backoff_before(attempt) for attempt in range(2, self.attempts + 1))
        return self.attempts * _TIMED_PHASES * self.timeout_seconds + pauses


def session_google_config(session: Session) -> GoogleConfig:
    """Return the GoogleConfig attached to ``session``, or the one from the process settings."""
    config = session.info.get(GOOGLE_CONFIG_INFO_KEY)
    if isinstance(config, GoogleConfig):
        return config
    return GoogleConfig.from_settings(get_settings())


@dataclass(frozen=True)
class TokenGrant:
    """A successful token response. Its repr shows no token."""

    access_token: str = field(repr=False)
    expires_in: int
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None


def error_code(response: httpx.Response) -> str:
    """Return the provider's error code from a response, never any other part of the body.

    OAuth endpoints answer ``{"error": "invalid_grant", ...}``; Google APIs answer
    ``{"error": {"status": "UNAUTHENTICATED", ...}}``. Anything else becomes
    ``http_<status>``.
    """
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    code: Any = body.get("error") if isinstance(body, dict) else None
    if isinstance(code, dict):
        code = code.get("status")
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return code
    return f"http_{response.status_code}"


def send_with_retries(
    config: GoogleConfig, what: str, send: Callable[[httpx.Client], httpx.Response]
) -> httpx.Response:
    """Send a request, retrying network errors, timeouts, 5xx and 429 with backoff.

    Returns the first response that is not 5xx or 429 (the caller judges it);
    raises ``ProviderUnavailableError`` once every attempt has failed.
    """
    reason = "no attempt"
    with httpx.Client(timeout=config.timeout_seconds, follow_redirects=False) as client:
        for attempt in range(1, config.attempts + 1):
            if attempt > 1:
                # Jitter spreads the retries of many workers hitting one outage.
                delay = config.backoff_before(attempt) * random.uniform(0.5, 1.0)  # noqa: S311
                logger.warning(
                    "%s failed (%s); retry %d of %d in %.2f s",
                    what,
                    reason,
                    attempt - 1,
                    config.attempts - 1,
                    delay,
                )
                time.sleep(delay)
            try:
                response = send(client)
            except httpx.TransportError as error:
                # The class name only: httpx messages can carry request details.
                reason = type(error).__name__
                continue
            if response.status_code >= 500 or response.status_code == 429:
                reason = f"HTTP {response.status_code}"
                continue
            return response
    logger.warning("%s failed after %d attempt(s) (%s)", what, config.attempts, reason)
    raise ProviderUnavailableError(
        f"{what} failed after {config.attempts} attempt(s) ({reason}); nothing stored was "
        "changed: try again later",
        code=reason,
    )


def _parse_grant(response: httpx.Response, *, max_token_chars: int) -> TokenGrant:
    def malformed(detail: str) -> ProviderError:
        logger.warning("the token endpoint sent a malformed response (%s)", detail)
        return ProviderError(
            f"the token endpoint sent a malformed response ({detail}); nothing was stored",
            code="malformed_response",
        )

    try:
        body: Any = response.json()
    except ValueError:
        raise malformed("not JSON") from None
    if not isinstance(body, dict):
        raise malformed("not a JSON object")
    access = body.get("access_token")
    if not isinstance(access, str) or not access.strip() or len(access) > max_token_chars:
        raise malformed("no usable access_token")
    refresh = body.get("refresh_token")
    if refresh is not None and (
        not isinstance(refresh, str) or not refresh.strip() or len(refresh) > max_token_chars
    ):
        raise malformed("unusable refresh_token")
    expires_in: Any = body.get("expires_in", DEFAULT_EXPIRES_IN)
    try:
        seconds = int(expires_in)
    except (TypeError, ValueError):
        raise malformed("expires_in is not a number") from None
    if seconds <= 0:
        raise malformed("expires_in is not positive")
    scope = body.get("scope")
    return TokenGrant(
        access_token=access,
        expires_in=seconds,
        refresh_token=refresh,
        scope=scope if isinstance(scope, str) and scope.strip() else None,
    )


def refresh_grant(config: GoogleConfig, refresh_token: str, *, max_token_chars: int) -> TokenGrant:
    """Exchange a refresh token for a new access token (``grant_type=refresh_token``).

    Raises ``ReauthorizationRequiredError`` on ``invalid_grant``,
    ``ProviderUnavailableError`` when the endpoint cannot be reached or keeps
    failing, and ``ProviderError`` for any other refusal.
    """
    client_id, client_secret = config.client_credentials()
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    response = send_with_retries(
        config,
        "token refresh",
        lambda client: client.post(
            config.token_url, data=form, headers={"Accept": "application/json"}
        ),
    )
    if response.status_code == 200:
        return _parse_grant(response, max_token_chars=max_token_chars)
    code = error_code(response)
    logger.warning("the token endpoint refused the refresh (%s)", code)
    if code == "invalid_grant":
        raise ReauthorizationRequiredError(
            "the provider refused the refresh token (invalid_grant): the user revoked access "
            "or the grant expired; ask the user to connect the provider again",
            code=code,
        )
    hint = (
        "check GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET"
        if code in ("invalid_client", "unauthorized_client")
        else "nothing stored was changed"
    )
    raise ProviderError(f"the token endpoint refused the refresh ({code}); {hint}", code=code)


def revoke_token(config: GoogleConfig, token: str) -> None:
    """Revoke a token at the provider (RFC 7009); a refresh token revokes the whole grant.

    The token travels in the form body, never in the URL (URLs get logged).
    A token the provider no longer knows (``invalid_token``) counts as revoked.
    """
    response = send_with_retries(
        config,
        "token revocation",
        lambda client: client.post(config.revoke_url, data={"token": token}),
    )
    if response.status_code == 200:
        return
    code = error_code(response)
    if code == "invalid_token":
        logger.info("the provider no longer knew the token (invalid_token): already revoked")
        return
    raise ProviderError(f"the provider refused the revocation ({code})", code=code)
