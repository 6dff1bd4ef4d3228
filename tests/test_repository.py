"""The app developer's view: upsert, read, list and delete integrations."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from princeps_db import (
    IntegrationInfo,
    IntegrationNotFoundError,
    TokenDecryptionError,
    TokenExpiredError,
    UserNotFoundError,
    create_session_factory,
    create_user,
    delete_integration,
    get_valid_token,
    list_integrations,
    upsert_integration,
)
from princeps_db.crypto import KeyRing, generate_master_key

IN_AN_HOUR = datetime.now(UTC) + timedelta(hours=1)


def _connect(
    session: Session,
    *,
    user_id: str = "u1",
    provider: str = "google_calendar",
    access: str = "ya29.access-one",
    refresh: str | None = "1//refresh-one",
    expires_at: datetime | None = IN_AN_HOUR,
) -> IntegrationInfo:
    if (
        session.get_bind()
        and not session.execute(
            sa.text('SELECT 1 FROM "User" WHERE id = :id'), {"id": user_id}
        ).first()
    ):
        create_user(session, user_id=user_id, email=f"{user_id}@example.com")
    info = upsert_integration(
        session,
        user_id=user_id,
        provider=provider,
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        scope="calendar.readonly",
    )
    session.commit()
    return info


def _stored(raw: sa.Connection) -> list[Any]:
    raw.rollback()
    return list(raw.execute(sa.text('SELECT * FROM "Integration" ORDER BY id')).mappings())


def test_a_saved_token_reads_back_and_is_stored_only_as_ciphertext(
    session: Session, raw: sa.Connection
) -> None:
    info = _connect(session, access="ya29.secret-access", refresh="1//secret-refresh")

    assert (
        get_valid_token(session, user_id="u1", provider="google_calendar") == "ya29.secret-access"
    )
    (row,) = _stored(raw)
    assert row["tokenKeyId"] == info.key_id
    assert b"secret" not in bytes(row["accessTokenEncrypted"])
    assert b"secret" not in bytes(row["refreshTokenEncrypted"])
    assert bytes(row["accessTokenEncrypted"])[0] == 0xC3  # a pgcrypto symmetric message
    assert "accessToken" not in row


def test_integration_info_never_carries_a_token(session: Session) -> None:
    info = _connect(session, access="ya29.never-shown")
    dumped = info.model_dump_json()
    assert "ya29" not in dumped
    assert set(json.loads(dumped)) == {
        "id",
        "user_id",
        "provider",
        "scope",
        "expires_at",
        "key_id",
        "status",
        "created_at",
        "updated_at",
    }
    with pytest.raises(ValidationError):
        IntegrationInfo(**info.model_dump(), access_token="ya29.smuggled")
    listed = list_integrations(session, user_id="u1")
    assert listed == [info]


def test_an_update_replaces_tokens_and_keeps_the_refresh_token_when_none_is_given(
    session: Session,
) -> None:
    first = _connect(session, access="ya29.first", refresh="1//first")
    second = _connect(session, access="ya29.second", refresh=None)
    assert second.id == first.id
    assert second.updated_at >= first.updated_at
    assert get_valid_token(session, user_id="u1", provider="google_calendar") == "ya29.second"
    refresh = session.execute(
        sa.text('SELECT pgp_sym_decrypt("refreshTokenEncrypted", :k) FROM "Integration"'),
        {
            "k": session.info["princeps_db.keyring"].current.derive_token_key(
                user_id="u1", provider="google_calendar", kind="refresh_token"
            )
        },
    ).scalar_one()
    assert refresh == "1//first"


def test_each_provider_is_its_own_integration(session: Session) -> None:
    _connect(session, provider="google_calendar", access="ya29.cal")
    _connect(session, provider="google_drive", access="ya29.drive")
    assert get_valid_token(session, user_id="u1", provider="google_drive") == "ya29.drive"
    assert [i.provider for i in list_integrations(session, user_id="u1")] == [
        "google_calendar",
        "google_drive",
    ]


def test_an_expired_token_without_refresh_token_raises_token_expired(session: Session) -> None:
    # With a refresh token it is refreshed instead (tests/test_refresh.py).
    _connect(session, refresh=None, expires_at=datetime.now(UTC) - timedelta(minutes=5))
    with pytest.raises(TokenExpiredError):
        get_valid_token(session, user_id="u1", provider="google_calendar")


def test_a_token_without_expiry_is_always_valid(session: Session) -> None:
    _connect(session, access="ya29.forever", expires_at=None)
    assert get_valid_token(session, user_id="u1", provider="google_calendar") == "ya29.forever"


def test_missing_integrations_and_users_have_named_errors(session: Session) -> None:
    with pytest.raises(IntegrationNotFoundError):
        get_valid_token(session, user_id="nobody", provider="google_drive")
    with pytest.raises(UserNotFoundError):
        upsert_integration(
            session,
            user_id="ghost",
            provider="google_drive",
            access_token="ya29.x",
            refresh_token=None,
            expires_at=IN_AN_HOUR,
        )


def test_delete_reports_whether_an_integration_existed(session: Session) -> None:
    _connect(session)
    assert delete_integration(session, user_id="u1", provider="google_calendar") is True
    session.commit()
    assert delete_integration(session, user_id="u1", provider="google_calendar") is False
    assert list_integrations(session, user_id="u1") == []


def test_a_wrong_key_raises_decryption_error_and_changes_nothing(
    session: Session, session_factory: sessionmaker[Session], raw: sa.Connection
) -> None:
    _connect(session, access="ya29.right")
    before = _stored(raw)
    bind = session.get_bind()
    wrong = create_session_factory(
        bind,
        keyring=KeyRing.from_texts(generate_master_key()),  # type: ignore[arg-type]
    )
    # A key ring whose current key is different but claims the row's key id is
    # the realistic failure: same id, wrong secret (e.g. a mistyped secret store).
    impostor = KeyRing(current=_same_id_other_secret(session))
    for factory in (wrong, create_session_factory(bind, keyring=impostor)):  # type: ignore[arg-type]
        with factory() as other, pytest.raises(TokenDecryptionError) as raised:
            get_valid_token(other, user_id="u1", provider="google_calendar")
        assert "ya29" not in str(raised.value)
    assert _stored(raw) == before


def _same_id_other_secret(session: Session) -> Any:
    from princeps_db.crypto import MasterKey

    real: MasterKey = session.info["princeps_db.keyring"].current
    fake = MasterKey(b"\x01" * 32)
    object.__setattr__(fake, "key_id", real.key_id)
    return fake


def test_key_rings_of_every_shape_share_the_built_statements_and_bind_every_value(
    engine: sa.Engine,
) -> None:
    # The read and upsert statements are built once per number of keys and
    # reused: rings of different keys (and sizes) in one process must each get
    # their own values bound, and the SQL text must hold none of them.
    from sqlalchemy.dialects import postgresql

    from princeps_db.repository import _read_statement, _upsert_statement

    first, second, third = (generate_master_key() for _ in range(3))
    rings = [
        KeyRing.from_texts(first),
        KeyRing.from_texts(second, [first]),
        KeyRing.from_texts(third, [first, second]),
        KeyRing.from_texts(third, [second, first]),
    ]
    with create_session_factory(engine, keyring=rings[0])() as session:
        _connect(session, access="ya29.under-first", refresh="1//kept")
    for number, ring in enumerate(rings[1:], 1):
        with create_session_factory(engine, keyring=ring)() as session:
            # Written under the previous ring's current key: read through a previous key.
            assert get_valid_token(session, user_id="u1", provider="google_calendar") == (
                "ya29.under-first" if number == 1 else f"ya29.ring-{number - 1}"
            )
            info = _connect(session, access=f"ya29.ring-{number}", refresh=None)
            assert info.key_id == ring.current.key_id
            kept = session.execute(
                sa.text('SELECT pgp_sym_decrypt("refreshTokenEncrypted", :k) FROM "Integration"'),
                {
                    "k": ring.current.derive_token_key(
                        user_id="u1", provider="google_calendar", kind="refresh_token"
                    )
                },
            ).scalar_one()
            assert kept == "1//kept"
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    sql = " ".join(
        [str(_read_statement(n).compile(dialect=dialect)) for n in (1, 2, 3)]
        + [str(_upsert_statement(n).compile(dialect=dialect)) for n in (None, 0, 1, 2)]
    )
    for ring in rings:
        for key in ring.keys:
            assert key.key_id not in sql
            for kind in ("access_token", "refresh_token"):
                derived = key.derive_token_key(user_id="u1", provider="google_calendar", kind=kind)
                assert derived not in sql
    assert "ya29" not in sql and "u1" not in sql and "google_calendar" not in sql
