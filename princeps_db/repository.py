"""Reading and writing integrations. Tokens are encrypted and decrypted inside PostgreSQL.

Every function takes the caller's SQLAlchemy ``Session`` and never commits:
the caller owns the transaction (``with session.begin(): ...``). The one
exception is a token refresh inside ``get_valid_token``, which commits on its
own connection (see ``princeps_db.refresh``). Tokens and derived keys travel
only as bind parameters.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, Text, bindparam, case, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from princeps_db.crypto import KeyRing, TokenKind, decrypt_sql, encrypt_sql
from princeps_db.db import session_keyring
from princeps_db.errors import (
    IntegrationNotFoundError,
    InvalidInputError,
    ReauthorizationRequiredError,
    TokenDecryptionError,
    TokenExpiredError,
    UserNotFoundError,
)
from princeps_db.models import PROVIDERS, Integration, User

Provider = Literal["google_calendar", "google_drive"]
Status = Literal["active", "reauthorization_required"]

# A token this close to expiry would likely die in flight: treat it as expired.
EXPIRY_SKEW = timedelta(seconds=60)
# Google tokens are about 2 KB; anything far larger is a bug or an attack.
MAX_TOKEN_CHARS = 16 * 1024
MAX_TEXT_CHARS = 4 * 1024
_SQLSTATE_EXTERNAL_ROUTINE_EXCEPTION = "39000"


class IntegrationInfo(BaseModel):
    """What a client may see of an integration. It has no token field, by design."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    user_id: str
    provider: Provider
    scope: str | None
    expires_at: datetime | None
    key_id: str
    status: Status
    created_at: datetime
    updated_at: datetime


_INFO_COLUMNS = (
    Integration.id,
    Integration.user_id,
    Integration.provider,
    Integration.scope,
    Integration.expires_at,
    Integration.token_key_id,
    Integration.status,
    Integration.created_at,
    Integration.updated_at,
)


def _info_from_row(row: Any) -> IntegrationInfo:
    return IntegrationInfo(
        id=row.id,
        user_id=row.user_id,
        provider=row.provider,
        scope=row.scope,
        expires_at=row.expires_at,
        key_id=row.token_key_id,
        status=row.status,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_text(name: str, value: object, *, max_chars: int, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidInputError(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidInputError(f"{name} must not contain a NUL character")
    if len(value) > max_chars:
        raise InvalidInputError(f"{name} is longer than {max_chars} characters")
    return value


def _check_identity(user_id: object, provider: object) -> tuple[str, str]:
    checked_user = _check_text("user_id", user_id, max_chars=MAX_TEXT_CHARS)
    if provider not in PROVIDERS:
        raise InvalidInputError(f"unknown provider; expected one of {', '.join(PROVIDERS)}")
    assert checked_user is not None
    return checked_user, str(provider)


def _check_expiry(expires_at: object) -> datetime | None:
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime):
        raise InvalidInputError(f"expires_at must be a datetime, not {type(expires_at).__name__}")
    if expires_at.tzinfo is None or expires_at.utcoffset() is None:
        raise InvalidInputError("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    return expires_at


def _raise_decryption_error(error: DBAPIError, *, user_id: str, provider: str) -> NoReturn:
    if getattr(error.orig, "sqlstate", None) == _SQLSTATE_EXTERNAL_ROUTINE_EXCEPTION:
        raise TokenDecryptionError(
            f"the stored token of user {user_id!r} for {provider} does not decrypt: wrong key, "
            "or the ciphertext was tampered with or moved from another row; roll back, then "
            "check the keys and run `princeps-db verify`"
        ) from None
    raise error


# The read and upsert statements are built once per key-ring shape (how many
# keys), with every value a bind parameter, and reused: each call only derives
# its keys and binds values. SQLAlchemy memoizes a statement's cache key on the
# statement object, so reusing it also skips recomputing the key and finds the
# compiled SQL in the engine's cache. Key ids, derived keys, tokens, user and
# provider are all bind parameters; the SQL text never holds a value.


def _text_param(name: str) -> BindParameter[str]:
    return bindparam(name, type_=Text)


def key_by_key_id_sql(keys: int, kind: TokenKind) -> ColumnElement[str]:
    """SQL choosing a row's derived key by its ``"tokenKeyId"`` (NULL if unknown).

    Key ids and derived keys are parameters: bind ``key_parameters(...)``.
    """
    return case(
        *(
            (
                Integration.token_key_id == _text_param(f"b_key_id_{number}"),
                _text_param(f"b_{_short(kind)}_key_{number}"),
            )
            for number in range(keys)
        ),
        else_=None,
    )


@lru_cache(maxsize=16)
def _read_statement(keys: int) -> Select[Any]:
    """``get_valid_token``'s one query, for a key ring of ``keys`` keys (current first)."""
    fresh = Integration.expires_at.is_(None) | (
        Integration.expires_at > func.statement_timestamp() + EXPIRY_SKEW
    )
    active = Integration.status == "active"
    derived_key = key_by_key_id_sql(keys, TokenKind.ACCESS)
    return select(
        Integration.token_key_id,
        Integration.status,
        fresh.label("fresh"),
        Integration.refresh_token_encrypted.is_not(None).label("refreshable"),
        # Decrypt only what will be returned: an expired token never leaves the server.
        case((fresh & active, decrypt_sql(Integration.access_token_encrypted, derived_key))).label(
            "token"
        ),
    ).where(
        Integration.user_id == _text_param("b_user_id"),
        Integration.provider == _text_param("b_provider"),
    )


def kept_refresh_token_sql(previous: int) -> ColumnElement[bytes]:
    """SQL for an update without a refresh token: keep the stored one, under the current key.

    ``previous`` is how many previous keys the row may be under; every value is a
    parameter: bind ``key_parameters(...)``.
    """
    current_key = _text_param("b_refresh_key")
    stored = Integration.refresh_token_encrypted
    reencrypt = [
        (
            Integration.token_key_id == _text_param(f"b_old_key_id_{number}"),
            encrypt_sql(
                decrypt_sql(stored, _text_param(f"b_old_refresh_key_{number}")), current_key
            ),
        )
        for number in range(previous)
    ]
    return case(
        (stored.is_(None), None),
        (Integration.token_key_id == _text_param("b_key_id"), stored),
        *reencrypt,
        # An unknown key id: decrypting under the current key fails loudly instead
        # of silently dropping the refresh token.
        else_=encrypt_sql(decrypt_sql(stored, current_key), current_key),
    )


def key_parameters(keyring: KeyRing, *, user_id: str, provider: str) -> dict[str, str]:
    """Values for the key parameters of the statements below: key ids and derived keys.

    Key 0 is the current key; ``b_old_*_{n}`` name previous key ``n`` (key ``n + 1``).
    """
    values: dict[str, str] = {}
    for number, key in enumerate(keyring.keys):
        values[f"b_key_id_{number}"] = key.key_id
        for kind in TokenKind:
            values[f"b_{_short(kind)}_key_{number}"] = key.derive_token_key(
                user_id=user_id, provider=provider, kind=kind
            )
        if number:
            values[f"b_old_key_id_{number - 1}"] = key.key_id
            values[f"b_old_refresh_key_{number - 1}"] = values[f"b_refresh_key_{number}"]
    values["b_key_id"] = values["b_key_id_0"]
    values["b_access_key"] = values["b_access_key_0"]
    values["b_refresh_key"] = values["b_refresh_key_0"]
    return values


def _short(kind: TokenKind) -> str:
    return kind.value.removesuffix("_token")


@lru_cache(maxsize=16)
def _upsert_statement(kept_previous: int | None) -> ReturningInsert[*tuple[Any, ...]]:
    """``upsert_integration``'s statement.

    ``kept_previous`` is None when the call brings a refresh token, else the
    number of previous keys the kept refresh token may be stored under.
    """
    statement = insert(Integration).values(
        id=_text_param("b_id"),
        user_id=_text_param("b_user_id"),
        provider=_text_param("b_provider"),
        access_token_encrypted=encrypt_sql(
            _text_param("b_access_token"), _text_param("b_access_key")
        ),
        refresh_token_encrypted=encrypt_sql(
            _text_param("b_refresh_token"), _text_param("b_refresh_key")
        ),
        token_key_id=_text_param("b_key_id"),
        expires_at=bindparam("b_expires_at", type_=Integration.expires_at.type),
        scope=_text_param("b_scope"),
    )
    new_refresh = (
        statement.excluded.refreshTokenEncrypted
        if kept_previous is None
        else kept_refresh_token_sql(kept_previous)
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[Integration.user_id, Integration.provider],
        set_={
            # Order matters: the refresh expression reads the row's old key id.
            Integration.refresh_token_encrypted: new_refresh,
            Integration.access_token_encrypted: statement.excluded.accessTokenEncrypted,
            Integration.token_key_id: statement.excluded.tokenKeyId,
            Integration.expires_at: statement.excluded.expiresAt,
            Integration.scope: statement.excluded.scope,
            # New tokens from the user reconnecting end a reauthorisation state.
            Integration.status: "active",
            Integration.updated_at: func.now(),
        },
    ).returning(*_INFO_COLUMNS)
    # With its values in bind parameters, an ORM insert would otherwise take the
    # parameters for a bulk insert: "orm" runs the statement as written.
    return upsert.execution_options(dml_strategy="orm")


def create_user(session: Session, *, email: str, user_id: str | None = None) -> str:
    """Insert a user and return its id."""
    checked_email = _check_text("email", email, max_chars=MAX_TEXT_CHARS)
    checked_id = _check_text("user_id", user_id, max_chars=MAX_TEXT_CHARS, optional=True)
    new_id = checked_id or str(uuid.uuid4())
    session.add(User(id=new_id, email=checked_email))
    session.flush()
    return new_id


def upsert_integration(
    session: Session,
    *,
    user_id: str,
    provider: str,
    access_token: str,
    refresh_token: str | None,
    expires_at: datetime | None,
    scope: str | None = None,
) -> IntegrationInfo:
    """Insert or update the user's integration, encrypting both tokens in the statement itself.

    A ``refresh_token`` of None keeps the stored refresh token (providers send
    one only on first consent). Writes always use the current key.
    """
    user, prov = _check_identity(user_id, provider)
    access = _check_text("access_token", access_token, max_chars=MAX_TOKEN_CHARS)
    refresh = _check_text("refresh_token", refresh_token, max_chars=MAX_TOKEN_CHARS, optional=True)
    expiry = _check_expiry(expires_at)
    checked_scope = _check_text("scope", scope, max_chars=MAX_TEXT_CHARS, optional=True)
    keyring = session_keyring(session)
    params: dict[str, Any] = {
        **key_parameters(keyring, user_id=user, provider=prov),
        "b_id": str(uuid.uuid4()),
        "b_user_id": user,
        "b_provider": prov,
        "b_access_token": access,
        "b_refresh_token": refresh,
        "b_expires_at": expiry,
        "b_scope": checked_scope,
    }
    # Without a new refresh token the stored one is kept, re-encrypted from
    # whichever key it is under.
    upsert = _upsert_statement(None if refresh is not None else len(keyring.previous))
    try:
        row = session.execute(upsert, params).one()
    except IntegrityError as error:
        if getattr(error.orig, "sqlstate", None) == "23503":
            raise UserNotFoundError(f"no user with id {user!r}; create the user first") from None
        raise
    except DBAPIError as error:
        _raise_decryption_error(error, user_id=user, provider=prov)
    return _info_from_row(row)


def get_valid_token(session: Session, *, user_id: str, provider: str) -> str:
    """Return a usable access token, refreshing it with the provider when it is about to expire.

    A fresh token costs one query in the caller's transaction. A token within
    ``EXPIRY_SKEW`` of expiry is refreshed once among all concurrent callers,
    under a row lock, on a separate connection whose transaction the refresh
    owns and commits (see ``princeps_db.refresh``). Raises
    ``ReauthorizationRequiredError`` (without contacting the provider) for an
    integration marked ``reauthorization_required``, ``TokenExpiredError`` for
    an expired token without a refresh token, and ``ProviderUnavailableError``
    when the provider cannot refresh it right now.
    """
    user, prov = _check_identity(user_id, provider)
    keyring = session_keyring(session)
    params: dict[str, Any] = {
        **key_parameters(keyring, user_id=user, provider=prov),
        "b_user_id": user,
        "b_provider": prov,
    }
    statement = _read_statement(len(keyring.keys))
    try:
        row = session.execute(statement, params).one_or_none()
    except DBAPIError as error:
        _raise_decryption_error(error, user_id=user, provider=prov)
    if row is None:
        raise IntegrationNotFoundError(f"user {user!r} has no {prov} integration")
    if row.status != "active":
        raise ReauthorizationRequiredError(
            f"the {prov} integration of user {user!r} needs re-authorisation (the provider "
            "refused its refresh token); ask the user to connect it again",
            code="invalid_grant",
        )
    if not row.fresh:
        if not row.refreshable:
            raise TokenExpiredError(
                f"the {prov} access token of user {user!r} has expired and there is no refresh "
                "token; ask the user to connect the provider again"
            )
        # Imported here: the refresh module builds on this one.
        from princeps_db.refresh import refresh_expiring_token

        return refresh_expiring_token(session, user_id=user, provider=prov)
    if row.token is None:
        if row.token_key_id is None:
            # Only possible in the migration window, before the contract revision.
            raise TokenDecryptionError(
                f"the {prov} integration of user {user!r} was last written by the "
                "pre-encryption code and has no ciphertext yet; run `alembic upgrade head`"
            )
        keyring.for_key_id(row.token_key_id)  # raises, naming the missing key id
        raise TokenDecryptionError(f"the stored {prov} token of user {user!r} is empty")
    token: str = row.token
    return token


def list_integrations(session: Session, *, user_id: str) -> list[IntegrationInfo]:
    """Return the user's integrations, without tokens, ordered by provider."""
    user = _check_text("user_id", user_id, max_chars=MAX_TEXT_CHARS)
    rows = session.execute(
        select(*_INFO_COLUMNS).where(Integration.user_id == user).order_by(Integration.provider)
    ).all()
    return [_info_from_row(row) for row in rows]


def delete_integration(session: Session, *, user_id: str, provider: str) -> bool:
    """Revoke the grant at the provider (best effort), delete the integration, say if it existed.

    A failed revocation is logged by its error code and does not keep the row.
    """
    user, prov = _check_identity(user_id, provider)
    # Imported here: the refresh module builds on this one.
    from princeps_db.refresh import revoke_before_delete

    revoke_before_delete(session, user_id=user, provider=prov)
    result = session.execute(
        delete(Integration)
        .where(Integration.user_id == user, Integration.provider == prov)
        .returning(Integration.id)
    )
    return result.first() is not None
