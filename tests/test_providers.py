"""Provider calls keep working across token refreshes, and nothing secret reaches the logs."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from pytest_httpserver import HTTPServer
from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from princeps_db.crypto import TokenKind
from princeps_db.db import create_engine
from princeps_db.errors import ProviderError, ProviderUnavailableError, ReauthorizationRequiredError
from princeps_db.fake_google import CALENDAR_SCOPE, FakeGoogle, demo_refresh
from princeps_db.oauth import GoogleConfig
from princeps_db.providers import list_drive_files, list_upcoming_events
from princeps_db.repository import delete_integration, get_valid_token, list_integrations
from tests.conftest import TEST_KEY, TEST_KEYRING, make_settings
from tests.google_support import (
    CLIENT_SECRET,
    NEW_ACCESS,
    OLD_ACCESS,
    OLD_REFRESH,
    ROTATED_REFRESH,
    USER,
    connect,
    decrypt_stored,
    factory_for,
    google_config,
    requests_to,
    token_response,
)

EXPIRED = timedelta(minutes=-5)
FRESH = timedelta(hours=1)
EVENTS = "/calendar/v3/calendars/primary/events"
EVENTS_BODY = {
    "items": [
        {"id": "e1", "summary": "Planning", "start": {"dateTime": "2026-12-05T09:00:00Z"}},
        {"id": "e2", "summary": "Holiday", "start": {"date": "2026-12-24"}},
    ]
}


@pytest.fixture
def google(httpserver: HTTPServer) -> GoogleConfig:
    """Google endpoints on the loopback test server."""
    return google_config(httpserver)


@pytest.fixture
def factory(engine: Engine, google: GoogleConfig) -> sessionmaker[Session]:
    """Sessions that call the loopback server."""
    return factory_for(engine, google)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_calendar_call_after_a_refresh_uses_the_new_token(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    httpserver.expect_request("/token", method="POST").respond_with_json(token_response())
    httpserver.expect_request(EVENTS, headers=bearer(NEW_ACCESS)).respond_with_json(EVENTS_BODY)

    with factory() as session:
        events = list_upcoming_events(session, user_id=USER, max_results=5)

    assert [(e.summary, e.start) for e in events] == [
        ("Planning", "2026-12-05T09:00:00Z"),
        ("Holiday", "2026-12-24"),
    ]
    assert len(requests_to(httpserver, "/token")) == 1
    (call,) = requests_to(httpserver, EVENTS)
    assert call.args["maxResults"] == "5" and call.args["singleEvents"] == "true"


def test_drive_call_with_a_fresh_token_does_not_refresh(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH, provider="google_drive")
    httpserver.expect_request("/drive/v3/files", headers=bearer(OLD_ACCESS)).respond_with_json(
        {"files": [{"id": "f1", "name": "Plan", "mimeType": "text/plain"}]}
    )
    with factory() as session:
        (file,) = list_drive_files(session, user_id=USER)
    assert (file.id, file.name, file.mime_type) == ("f1", "Plan", "text/plain")
    assert requests_to(httpserver, "/token") == []


def test_a_401_forces_one_refresh_and_one_retry(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)  # looks fresh, but the provider rejects it
    httpserver.expect_request(EVENTS, headers=bearer(OLD_ACCESS)).respond_with_json(
        {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
    )
    httpserver.expect_request("/token", method="POST").respond_with_json(
        token_response(refresh_token=ROTATED_REFRESH)
    )
    httpserver.expect_request(EVENTS, headers=bearer(NEW_ACCESS)).respond_with_json(EVENTS_BODY)

    with factory() as session:
        events = list_upcoming_events(session, user_id=USER)

    assert len(events) == 2
    assert len(requests_to(httpserver, "/token")) == 1
    assert [r.headers["Authorization"] for r in requests_to(httpserver, EVENTS)] == [
        f"Bearer {OLD_ACCESS}",
        f"Bearer {NEW_ACCESS}",
    ]
    assert decrypt_stored(engine, TEST_KEYRING) == (NEW_ACCESS, ROTATED_REFRESH)


def test_a_second_401_is_reported_after_a_single_refresh(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)
    httpserver.expect_request(EVENTS).respond_with_json(
        {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": NEW_ACCESS}}, status=401
    )
    httpserver.expect_request("/token", method="POST").respond_with_json(token_response())
    with factory() as session, pytest.raises(ProviderError) as raised:
        list_upcoming_events(session, user_id=USER)
    assert raised.value.code == "UNAUTHENTICATED"
    assert NEW_ACCESS not in str(raised.value)
    assert len(requests_to(httpserver, "/token")) == 1
    assert len(requests_to(httpserver, EVENTS)) == 2


def test_api_outage_is_retried_then_reported(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)
    httpserver.expect_request(EVENTS).respond_with_data("unavailable", status=503)
    with factory() as session, pytest.raises(ProviderUnavailableError):
        list_upcoming_events(session, user_id=USER)
    assert len(requests_to(httpserver, EVENTS)) == 3


def test_against_the_fake_google_refresh_rotation_and_revocation(engine: Engine) -> None:
    with FakeGoogle() as fake:
        factory = factory_for(engine, fake.config())
        grant = fake.consent(scope=CALENDAR_SCOPE)
        connect(
            factory,
            expires_in=EXPIRED,
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
        )
        fake.expire_access_tokens()
        with factory() as session:
            token = get_valid_token(session, user_id=USER, provider="google_calendar")
            assert token != grant.access_token
            assert len(list_upcoming_events(session, user_id=USER)) == 3
            session.commit()
        # The old refresh token is dead at the provider; the stored one is the rotated one.
        _, stored_refresh = decrypt_stored(engine, TEST_KEYRING)
        assert stored_refresh not in (None, grant.refresh_token)

        fake.revoke_all()
        fake.expire_access_tokens()
        with factory() as session, pytest.raises(ReauthorizationRequiredError):
            list_upcoming_events(session, user_id=USER)
        with factory() as session:
            (info,) = list_integrations(session, user_id=USER)
        assert info.status == "reauthorization_required"
        assert fake.token_requests == 2


def test_delete_revokes_at_the_fake_google(engine: Engine) -> None:
    with FakeGoogle() as fake:
        factory = factory_for(engine, fake.config())
        grant = fake.consent()
        connect(
            factory,
            expires_in=FRESH,
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
        )
        with factory() as session, session.begin():
            assert delete_integration(session, user_id=USER, provider="google_calendar")
        assert fake.revocations == 1


def test_demo_refresh_shows_a_refresh_and_a_working_call_without_tokens(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    connect(factory, expires_in=FRESH)
    console = Console(record=True, width=200)
    demo_refresh(console, factory, user_id=USER)
    text = console.export_text()
    assert "refreshed it" in text
    assert "3 upcoming events" in text
    assert "ya29" not in text and "1//" not in text


def test_no_token_secret_or_key_in_debug_logs(
    head_url: str,
    google: GoogleConfig,
    httpserver: HTTPServer,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    echoing = create_engine(make_settings(head_url), echo=True)
    try:
        factory = factory_for(echoing, google)
        connect(factory, expires_in=EXPIRED)
        httpserver.expect_oneshot_request("/token", method="POST").respond_with_json(
            token_response(refresh_token=ROTATED_REFRESH)
        )
        httpserver.expect_oneshot_request(EVENTS).respond_with_json(
            {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
        )
        httpserver.expect_oneshot_request("/token", method="POST").respond_with_json(
            {"error": "invalid_grant", "error_description": ROTATED_REFRESH}, status=400
        )
        httpserver.expect_request("/revoke", method="POST").respond_with_json(
            {"error": "server_error", "echo": ROTATED_REFRESH}, status=500
        )
        with factory() as session:
            with pytest.raises(ReauthorizationRequiredError):
                list_upcoming_events(session, user_id=USER)
            session.rollback()
            with session.begin():
                delete_integration(session, user_id=USER, provider="google_calendar")
    finally:
        echoing.dispose()

    captured = capfd.readouterr()
    everything = caplog.text + captured.out + captured.err
    assert "refreshed the google_calendar access token" in everything
    assert "SELECT" in everything  # the engine echo was captured too
    derived = [
        key.derive_token_key(user_id=USER, provider="google_calendar", kind=kind)
        for key in TEST_KEYRING.keys
        for kind in TokenKind
    ]
    for secret in [OLD_ACCESS, OLD_REFRESH, NEW_ACCESS, ROTATED_REFRESH, CLIENT_SECRET, TEST_KEY]:
        assert secret not in everything
    for key in derived:
        assert key not in everything
