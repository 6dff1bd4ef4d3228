"""Token refresh: one refresh among concurrent callers, stored encrypted, failures contained.

The provider is a real HTTP server on loopback (pytest-httpserver); the
database is a real PostgreSQL migrated to head.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qs

import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from werkzeug import Request, Response

from princeps_db.crypto import KeyRing, generate_master_key
from princeps_db.errors import (
    ConfigurationError,
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    TokenExpiredError,
)
from princeps_db.oauth import GoogleConfig
from princeps_db.refresh import LOCK_MARGIN, refresh_access_token
from princeps_db.repository import (
    delete_integration,
    get_valid_token,
    list_integrations,
    upsert_integration,
)
from tests.conftest import TEST_KEY, TEST_KEYRING, make_settings
from tests.google_support import (
    CALENDAR,
    CLIENT_ID,
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
    stored,
    token_response,
    unused_port,
)

EXPIRED = timedelta(minutes=-5)
FRESH = timedelta(hours=1)


@pytest.fixture
def google(httpserver: HTTPServer) -> GoogleConfig:
    """Google endpoints on the loopback test server."""
    return google_config(httpserver)


@pytest.fixture
def factory(engine: Engine, google: GoogleConfig) -> sessionmaker[Session]:
    """Sessions that refresh against the loopback server."""
    return factory_for(engine, google)


def token_for(factory: sessionmaker[Session]) -> str:
    with factory() as session, session.begin():
        return get_valid_token(session, user_id=USER, provider=CALENDAR)


def test_fresh_token_is_one_query_and_no_provider_call(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)
    statements: list[str] = []

    def record(*args: object) -> None:
        statements.append(str(args[2]))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        assert token_for(factory) == OLD_ACCESS
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert len(statements) == 1
    assert httpserver.log == []


def test_expired_token_is_refreshed_once_and_stored_encrypted(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    httpserver.expect_request("/token", method="POST").respond_with_json(token_response())

    assert token_for(factory) == NEW_ACCESS

    (request,) = requests_to(httpserver, "/token")
    form = parse_qs(request.get_data(as_text=True))
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": [OLD_REFRESH],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }
    after = stored(engine)
    assert NEW_ACCESS.encode() not in after.access_encrypted
    assert after.access_encrypted != before.access_encrypted
    assert after.expires_at is not None and before.expires_at is not None
    assert after.expires_at > before.expires_at + timedelta(minutes=50)
    # No refresh token in the answer: the stored one is kept.
    assert decrypt_stored(engine, TEST_KEYRING) == (NEW_ACCESS, OLD_REFRESH)
    # The next call uses the stored token without contacting the provider.
    assert token_for(factory) == NEW_ACCESS
    assert len(requests_to(httpserver, "/token")) == 1


def test_refresh_commits_even_if_the_caller_rolls_back(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    httpserver.expect_request("/token", method="POST").respond_with_json(
        token_response(refresh_token=ROTATED_REFRESH)
    )
    with factory() as session:
        assert get_valid_token(session, user_id=USER, provider=CALENDAR) == NEW_ACCESS
        session.rollback()
    assert decrypt_stored(engine, TEST_KEYRING) == (NEW_ACCESS, ROTATED_REFRESH)


def test_rotated_refresh_token_is_the_one_stored(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    httpserver.expect_request("/token", method="POST").respond_with_json(
        token_response(refresh_token=ROTATED_REFRESH)
    )
    assert token_for(factory) == NEW_ACCESS
    after = stored(engine)
    assert after.refresh_encrypted is not None
    assert ROTATED_REFRESH.encode() not in after.refresh_encrypted
    assert decrypt_stored(engine, TEST_KEYRING) == (NEW_ACCESS, ROTATED_REFRESH)


def test_row_under_a_previous_key_is_refreshed_under_the_current_key(
    engine: Engine, google: GoogleConfig, httpserver: HTTPServer
) -> None:
    connect(factory_for(engine, google), expires_in=EXPIRED)
    rotated = KeyRing.from_texts(generate_master_key(), [TEST_KEY])
    httpserver.expect_request("/token", method="POST").respond_with_json(token_response())

    assert token_for(factory_for(engine, google, rotated)) == NEW_ACCESS

    assert stored(engine).key_id == rotated.current.key_id
    current_only = KeyRing(rotated.current)
    assert decrypt_stored(engine, current_only) == (NEW_ACCESS, OLD_REFRESH)


def test_sixteen_concurrent_callers_cause_exactly_one_refresh(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)

    def slow_token_endpoint(request: Request) -> Response:
        time.sleep(0.3)  # keep the lock held while the others arrive
        return Response(
            json.dumps(token_response(refresh_token=ROTATED_REFRESH)),
            content_type="application/json",
        )

    httpserver.expect_request("/token", method="POST").respond_with_handler(slow_token_endpoint)
    start = threading.Barrier(16)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with factory() as session, session.begin():
                start.wait()
                results.append(get_valid_token(session, user_id=USER, provider=CALENDAR))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [NEW_ACCESS] * 16
    assert len(requests_to(httpserver, "/token")) == 1
    assert decrypt_stored(engine, TEST_KEYRING) == (NEW_ACCESS, ROTATED_REFRESH)


def test_invalid_grant_marks_the_integration_and_later_calls_fail_fast(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"error": "invalid_grant", "error_description": f"Bad token {OLD_REFRESH}"}, status=400
    )

    with pytest.raises(ReauthorizationRequiredError) as raised:
        token_for(factory)
    assert OLD_REFRESH not in str(raised.value)
    assert raised.value.code == "invalid_grant"

    after = stored(engine)
    assert after.status == "reauthorization_required"
    assert (after.access_encrypted, after.refresh_encrypted, after.expires_at) == (
        before.access_encrypted,
        before.refresh_encrypted,
        before.expires_at,
    )
    with factory() as session:
        (info,) = list_integrations(session, user_id=USER)
    assert info.status == "reauthorization_required"

    with pytest.raises(ReauthorizationRequiredError):
        token_for(factory)
    with factory() as session, pytest.raises(ReauthorizationRequiredError):
        refresh_access_token(session, user_id=USER, provider=CALENDAR)
    assert len(requests_to(httpserver, "/token")) == 1

    # Reconnecting stores new tokens and makes the integration active again.
    connect(factory, expires_in=FRESH, access_token=NEW_ACCESS, new_user=False)
    assert token_for(factory) == NEW_ACCESS
    assert stored(engine).status == "active"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_provider_errors_are_retried_then_reported_with_nothing_changed(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer, status: int
) -> None:
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"error": "backend_error", "echo": NEW_ACCESS}, status=status
    )

    with pytest.raises(ProviderUnavailableError) as raised:
        token_for(factory)

    assert NEW_ACCESS not in str(raised.value)
    assert len(requests_to(httpserver, "/token")) == 3
    assert stored(engine) == before


def test_timeouts_are_retried_then_reported_with_nothing_changed(
    engine: Engine, httpserver: HTTPServer
) -> None:
    google = google_config(httpserver, timeout_seconds=0.2, attempts=2)
    factory = factory_for(engine, google)
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)

    def too_slow(request: Request) -> Response:
        time.sleep(0.5)
        return Response("{}", status=200, content_type="application/json")

    httpserver.expect_request("/token", method="POST").respond_with_handler(too_slow)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailableError) as raised:
        token_for(factory)
    assert time.monotonic() - started < google.max_call_seconds() + 2
    assert raised.value.code == "ReadTimeout"
    assert stored(engine) == before


def test_connection_refused_is_retried_then_reported_with_nothing_changed(
    engine: Engine, httpserver: HTTPServer
) -> None:
    refused = f"http://127.0.0.1:{unused_port()}/token"
    factory = factory_for(engine, google_config(httpserver, token_url=refused))
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)

    with pytest.raises(ProviderUnavailableError) as raised:
        token_for(factory)
    assert raised.value.code == "ConnectError"
    assert stored(engine) == before


def test_other_refusals_change_nothing_and_name_the_code(
    engine: Engine, factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"error": "invalid_client"}, status=401
    )
    with pytest.raises(ProviderError) as raised:
        token_for(factory)
    assert raised.value.code == "invalid_client"
    assert "GOOGLE_CLIENT_SECRET" in str(raised.value)
    assert stored(engine) == before


def test_expired_token_without_refresh_token_still_raises_token_expired(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=EXPIRED, refresh_token=None)
    with pytest.raises(TokenExpiredError):
        token_for(factory)
    assert httpserver.log == []


def test_forced_refresh_of_an_already_replaced_token_reuses_the_new_one(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)
    httpserver.expect_request("/token", method="POST").respond_with_json(token_response())
    with factory() as session:
        first = refresh_access_token(
            session, user_id=USER, provider=CALENDAR, rejected_token=OLD_ACCESS
        )
        second = refresh_access_token(
            session, user_id=USER, provider=CALENDAR, rejected_token=OLD_ACCESS
        )
    assert first == second == NEW_ACCESS
    assert len(requests_to(httpserver, "/token")) == 1


def test_delete_revokes_the_grant_before_deleting(
    factory: sessionmaker[Session], httpserver: HTTPServer
) -> None:
    connect(factory, expires_in=FRESH)
    httpserver.expect_request("/revoke", method="POST").respond_with_data("")
    with factory() as session, session.begin():
        assert delete_integration(session, user_id=USER, provider=CALENDAR)
    (request,) = requests_to(httpserver, "/revoke")
    assert parse_qs(request.get_data(as_text=True)) == {"token": [OLD_REFRESH]}
    assert OLD_REFRESH not in request.full_path
    with factory() as session:
        assert list_integrations(session, user_id=USER) == []


def test_delete_still_deletes_when_revocation_fails(
    factory: sessionmaker[Session], httpserver: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    connect(factory, expires_in=FRESH)
    httpserver.expect_request("/revoke", method="POST").respond_with_json(
        {"error": "backend_error", "echo": OLD_REFRESH}, status=503
    )
    caplog.set_level(logging.DEBUG)
    with factory() as session, session.begin():
        assert delete_integration(session, user_id=USER, provider=CALENDAR)
    with factory() as session:
        assert list_integrations(session, user_id=USER) == []
    assert "could not revoke" in caplog.text
    assert OLD_REFRESH not in caplog.text


def test_delete_does_not_revoke_without_a_configured_client(
    engine: Engine, httpserver: HTTPServer
) -> None:
    factory = factory_for(engine, google_config(httpserver, client_id=None))
    connect(factory, expires_in=FRESH)
    with factory() as session, session.begin():
        assert delete_integration(session, user_id=USER, provider=CALENDAR)
    assert httpserver.log == []


def test_upsert_after_reauthorization_resets_status(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    connect(factory, expires_in=FRESH)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE \"Integration\" SET status = 'reauthorization_required'")
        )
    with factory() as session, session.begin():
        info = upsert_integration(
            session,
            user_id=USER,
            provider=CALENDAR,
            access_token=NEW_ACCESS,
            refresh_token=None,
            expires_at=None,
        )
    assert info.status == "active"


def test_status_column_refuses_unknown_values(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    connect(factory, expires_in=FRESH)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(sa.text("UPDATE \"Integration\" SET status = 'paused'"))


def test_a_refresh_behind_a_lock_held_too_long_gives_up(
    engine: Engine, httpserver: HTTPServer
) -> None:
    google = google_config(httpserver, timeout_seconds=0.1, attempts=1)
    factory = factory_for(engine, google)
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    with engine.connect() as holder:
        holder.execute(sa.text('SELECT 1 FROM "Integration" FOR UPDATE'))
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError) as raised:
            token_for(factory)
        waited = time.monotonic() - started
        holder.rollback()
    assert raised.value.code == "lock_timeout"
    limit = google.max_call_seconds() + LOCK_MARGIN.total_seconds()
    assert limit - 0.5 < waited < limit + 3
    assert httpserver.log == []
    assert stored(engine) == before


def test_google_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("GOOGLE_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("GOOGLE_OAUTH_TOKEN_URL", "http://127.0.0.1:9/token")
    monkeypatch.setenv("GOOGLE_HTTP_ATTEMPTS", "2")
    config = GoogleConfig.from_settings(make_settings("postgresql://x@localhost/x"))
    assert config.client_credentials() == (CLIENT_ID, CLIENT_SECRET)
    assert config.token_url == "http://127.0.0.1:9/token"
    assert config.revoke_url == "https://oauth2.googleapis.com/revoke"
    assert config.attempts == 2
    assert CLIENT_SECRET not in repr(config)


def test_refresh_without_client_credentials_fails_clearly(
    engine: Engine, httpserver: HTTPServer
) -> None:
    factory = factory_for(engine, google_config(httpserver, client_id="", client_secret=None))
    connect(factory, expires_in=EXPIRED)
    before = stored(engine)
    with pytest.raises(ConfigurationError, match="GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET"):
        token_for(factory)
    assert httpserver.log == []
    assert stored(engine) == before
