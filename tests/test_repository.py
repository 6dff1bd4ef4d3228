"""The app developer's view: upsert, read, list and delete integrations."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from princeps_db import (
    IntegrationInfo,
    IntegrationNotFoundError,
    InvalidInputError,
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


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (
            ("u2", "google_calendar", "accessTokenEncrypted"),
            ("u1", "google_calendar", "accessTokenEncrypted"),
        ),
        (
            ("u1", "google_drive", "accessTokenEncrypted"),
            ("u1", "google_calendar", "accessTokenEncrypted"),
        ),
        (
            ("u1", "google_calendar", "refreshTokenEncrypted"),
            ("u1", "google_calendar", "accessTokenEncrypted"),
        ),
    ],
    ids=["between-users", "between-providers", "between-columns"],
)
def test_a_ciphertext_moved_to_another_place_does_not_decrypt(
    session: Session,
    raw: sa.Connection,
    source: tuple[str, str, str],
    target: tuple[str, str, str],
) -> None:
    _connect(session, user_id="u1", provider="google_calendar", access="ya29.mine")
    _connect(session, user_id="u1", provider="google_drive", access="ya29.drive")
    _connect(session, user_id="u2", provider="google_calendar", access="ya29.theirs")
    raw.execute(
        sa.text(
            f'UPDATE "Integration" SET "{target[2]}" = (SELECT "{source[2]}" FROM "Integration" '
            'WHERE "userId" = :su AND provider = :sp) WHERE "userId" = :tu AND provider = :tp'
        ),
        {"su": source[0], "sp": source[1], "tu": target[0], "tp": target[1]},
    )
    raw.commit()
    before = _stored(raw)
    with pytest.raises(TokenDecryptionError):
        get_valid_token(session, user_id=target[0], provider=target[1])
    session.rollback()
    assert _stored(raw) == before


def _message(raw: sa.Connection, options: str) -> bytes:
    value: bytes = raw.execute(
        sa.text("SELECT pgp_sym_encrypt('ya29.x', 'k', :o)"), {"o": options}
    ).scalar_one()
    return value


def _with_cipher_byte(message: bytes, cipher: int) -> bytes:
    # Patched servers refuse to encrypt with Blowfish at all (CVE-2026-14663), so
    # a Blowfish message is made by relabelling the cipher byte of a real one.
    return message[:3] + bytes([cipher]) + message[4:]


MESSAGES = {
    "blowfish": lambda raw: _with_cipher_byte(_message(raw, "cipher-algo=aes256"), 4),
    "cast5": lambda raw: _with_cipher_byte(_message(raw, "cipher-algo=aes256"), 3),
    "no-mdc": lambda raw: _message(raw, "cipher-algo=aes256, disable-mdc=1"),
    "aes128": lambda raw: _message(raw, "cipher-algo=aes128"),
    "defaults": lambda raw: _message(raw, ""),
    "unsalted-s2k": lambda raw: _message(raw, "cipher-algo=aes256, s2k-mode=0"),
}


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_the_database_refuses_ciphertext_that_is_not_aes256_with_mdc(
    session: Session, raw: sa.Connection, kind: str
) -> None:
    _connect(session)
    value = MESSAGES[kind](raw)
    raw.rollback()
    with pytest.raises(IntegrityError):
        raw.execute(sa.text('UPDATE "Integration" SET "accessTokenEncrypted" = :v'), {"v": value})
    raw.rollback()
    with pytest.raises(IntegrityError):
        raw.execute(sa.text('UPDATE "Integration" SET "refreshTokenEncrypted" = :v'), {"v": value})
    raw.rollback()


@pytest.mark.parametrize(
    "value", [b"ya29.plain-token", b"", b"\xc3"], ids=["plain", "empty", "short"]
)
def test_the_database_refuses_plain_bytes(
    session: Session, raw: sa.Connection, value: bytes
) -> None:
    _connect(session)
    with pytest.raises(IntegrityError):
        raw.execute(sa.text('UPDATE "Integration" SET "accessTokenEncrypted" = :v'), {"v": value})
    raw.rollback()


GOOD: dict[str, Any] = {
    "user_id": "u1",
    "provider": "google_calendar",
    "access_token": "ya29.ok",
    "refresh_token": "1//ok",
    "expires_at": IN_AN_HOUR,
    "scope": None,
}
BAD_UPSERTS = [
    ("unknown provider", {"provider": "dropbox"}),
    ("provider None", {"provider": None}),
    ("empty access token", {"access_token": ""}),
    ("blank access token", {"access_token": "   "}),
    ("access token None", {"access_token": None}),
    ("access token bytes", {"access_token": b"ya29.bytes"}),
    ("access token int", {"access_token": 42}),
    ("empty refresh token", {"refresh_token": ""}),
    ("NUL in token", {"access_token": "ya29.\x00evil"}),
    ("1 MB token", {"access_token": "x" * 1_000_000}),
    ("naive datetime", {"expires_at": datetime(2030, 1, 1)}),
    ("expiry as string", {"expires_at": "2030-01-01T00:00:00Z"}),
    ("empty user id", {"user_id": ""}),
    ("user id None", {"user_id": None}),
]


@pytest.mark.parametrize(("case", "override"), BAD_UPSERTS, ids=[c for c, _ in BAD_UPSERTS])
def test_bad_input_is_refused_with_a_value_error_and_writes_nothing(
    session: Session, raw: sa.Connection, case: str, override: dict[str, Any]
) -> None:
    _connect(session)
    before = _stored(raw)
    with pytest.raises(InvalidInputError) as raised:
        upsert_integration(session, **{**GOOD, **override})
    assert isinstance(raised.value, ValueError)
    assert "ya29" not in str(raised.value)
    session.rollback()
    assert _stored(raw) == before


def test_bad_lookups_are_refused(session: Session) -> None:
    with pytest.raises(InvalidInputError):
        get_valid_token(session, user_id="u1", provider="github")
    with pytest.raises(InvalidInputError):
        list_integrations(session, user_id=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        delete_integration(session, user_id="u1", provider="")
