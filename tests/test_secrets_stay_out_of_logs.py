"""Nothing secret reaches a log line, an exception or a repr, even at DEBUG with echo on."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from princeps_db import (
    TokenDecryptionError,
    create_engine,
    create_session_factory,
    create_user,
    get_valid_token,
    upsert_integration,
)
from princeps_db.crypto import KeyRing, TokenKind, generate_master_key
from tests.conftest import TEST_KEY, TEST_KEYRING, make_settings

ACCESS = "ya29.AccessTokenThatMustNeverBeLogged"
REFRESH = "1//RefreshTokenThatMustNeverBeLogged"


def test_debug_logs_and_errors_carry_no_key_token_or_derived_key(
    head_url: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger().setLevel(logging.DEBUG)
    engine = create_engine(make_settings(head_url), echo=True)
    sessions = create_session_factory(engine, keyring=TEST_KEYRING)
    wrong = create_session_factory(engine, keyring=KeyRing.from_texts(generate_master_key()))
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with sessions() as session:
            create_user(session, user_id="u1", email="u1@example.com")
            info = upsert_integration(
                session,
                user_id="u1",
                provider="google_drive",
                access_token=ACCESS,
                refresh_token=REFRESH,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
            session.commit()
            assert get_valid_token(session, user_id="u1", provider="google_drive") == ACCESS
            messages.append(repr(info))
        with wrong() as session, pytest.raises(TokenDecryptionError) as raised:
            get_valid_token(session, user_id="u1", provider="google_drive")
        messages += [str(raised.value), repr(raised.value)]
        with Session(engine) as session, pytest.raises(Exception) as db_error:
            session.execute(
                __import__("sqlalchemy").text("SELECT pgp_sym_decrypt('\\x00'::bytea, :k)"),
                {"k": TEST_KEY},
            )
        messages.append(str(db_error.value))
    engine.dispose()
    captured = capfd.readouterr()
    everything = "\n".join([caplog.text, captured.out, captured.err, *messages])
    assert "pgp_sym_encrypt" in everything  # echo really was on
    derived = TEST_KEYRING.current.derive_token_key(
        user_id="u1", provider="google_drive", kind=TokenKind.ACCESS
    )
    for secret in (TEST_KEY, ACCESS, REFRESH, derived, TEST_KEYRING.current.secret.hex()):
        assert secret not in everything
