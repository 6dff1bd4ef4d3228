"""Calls to Google Calendar and Google Drive with the user's stored, refreshed token.

Each call takes its token from ``get_valid_token`` (which refreshes a token
about to expire). If the API still answers 401 (the token was revoked early,
or clocks disagree), the token is refreshed once by force and the call is
retried once. Network errors, timeouts, 5xx and 429 are retried with the same
bounded backoff as refreshes. Response bodies of failed calls are never logged
or raised, only their error code.

Like the repository, these take the caller's ``Session``; a refresh they
trigger commits on its own connection. Do not call them while holding a long
transaction open: the HTTP call happens in the middle of it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from princeps_db.errors import ProviderError
from princeps_db.oauth import GoogleConfig, error_code, send_with_retries, session_google_config
from princeps_db.refresh import refresh_access_token
from princeps_db.repository import get_valid_token

logger = logging.getLogger(__name__)


class CalendarEvent(BaseModel):
    """An upcoming Google Calendar event, as much as a list view needs."""

    model_config = ConfigDict(frozen=True)

    id: str
    summary: str | None
    start: str | None  # RFC 3339 date-time, or a date for all-day events


class DriveFile(BaseModel):
    """A Google Drive file, as much as a list view needs."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    mime_type: str | None
    modified_time: str | None


def _get(config: GoogleConfig, what: str, url: str, params: dict[str, Any], token: str) -> Any:
    return send_with_retries(
        config,
        what,
        lambda client: client.get(url, params=params, headers={"Authorization": f"Bearer {token}"}),
    )


def _get_json(
    session: Session, *, user_id: str, provider: str, url: str, params: dict[str, Any]
) -> dict[str, Any]:
    """GET a Google API with the user's token; on a 401, refresh once by force and retry once."""
    config = session_google_config(session)
    what = f"{provider} API call"
    token = get_valid_token(session, user_id=user_id, provider=provider)
    response: httpx.Response = _get(config, what, url, params, token)
    if response.status_code == 401:
        logger.info(
            "the %s API rejected the token of user %s; refreshing it and retrying once",
            provider,
            user_id,
        )
        token = refresh_access_token(
            session, user_id=user_id, provider=provider, rejected_token=token
        )
        response = _get(config, what, url, params, token)
    if response.status_code != 200:
        code = error_code(response)
        logger.warning("%s failed with HTTP %d (%s)", what, response.status_code, code)
        raise ProviderError(
            f"{what} failed with HTTP {response.status_code} ({code})"
            + (" even after a token refresh" if response.status_code == 401 else ""),
            code=code,
        )
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProviderError(
            f"{what} returned something that is not a JSON object", code="malformed"
        )
    return body


def list_upcoming_events(
    session: Session,
    *,
    user_id: str,
    max_results: int = 10,
    calendar_id: str = "primary",
    now: datetime | None = None,
) -> list[CalendarEvent]:
    """Return the next events of the user's calendar, soonest first."""
    config = session_google_config(session)
    since = (now or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
    body = _get_json(
        session,
        user_id=user_id,
        provider="google_calendar",
        url=f"{config.calendar_api_url.rstrip('/')}/calendars/{quote(calendar_id, safe='')}/events",
        params={
            "timeMin": since,
            "singleEvents": "true",
            "orderBy": "startTime",
            "maxResults": max_results,
        },
    )
    events: list[CalendarEvent] = []
    for item in body.get("items") or []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        raw_start: Any = item.get("start")
        start: dict[str, Any] = raw_start if isinstance(raw_start, dict) else {}
        events.append(
            CalendarEvent(
                id=item["id"],
                summary=item.get("summary") if isinstance(item.get("summary"), str) else None,
                start=start.get("dateTime") or start.get("date"),
            )
        )
    return events


def list_drive_files(session: Session, *, user_id: str, page_size: int = 10) -> list[DriveFile]:
    """Return the user's most recently modified Drive files."""
    config = session_google_config(session)
    body = _get_json(
        session,
        user_id=user_id,
        provider="google_drive",
        url=f"{config.drive_api_url.rstrip('/')}/files",
        params={
            "pageSize": page_size,
            "orderBy": "modifiedTime desc",
            "fields": "files(id,name,mimeType,modifiedTime)",
        },
    )
    files: list[DriveFile] = []
    for item in body.get("files") or []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        files.append(
            DriveFile(
                id=item["id"],
                name=str(item.get("name") or ""),
                mime_type=item.get("mimeType"),
                modified_time=item.get("modifiedTime"),
            )
        )
    return files
