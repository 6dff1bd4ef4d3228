"""Refreshing access tokens: exactly once among concurrent callers, committed on its own.

Many workers, in many processes, may find the same token about to expire at
the same moment. Google may rotate the refresh token on every refresh, so two
parallel refreshes could store an older refresh token over a newer one and
silently disconnect the user. The refresh therefore runs under a row lock:

1. On its own connection, in its own short transaction, lock the row with
   ``SELECT ... FOR UPDATE``. Other refreshers of the same row wait here;
   readers of a fresh token are never blocked (plain reads take no row lock).
2. Re-check freshness under the lock: a caller that waited finds the token
   another caller just stored and returns it without contacting the provider.
3. Otherwise decrypt the refresh token (server-side, only to send it), POST the
   ``refresh_token`` grant, and store the new access token, its expiry and the
   new refresh token if one came back (else the old one), all encrypted under
   the current key, in one UPDATE. Commit, then return the new access token.

The refresh commits by itself, independent of the caller's transaction: once
the provider has issued (and maybe rotated) tokens, rolling the caller back
must not lose them. It uses a connection outside the caller's pool, so a
refresh never waits for a pooled connection that another caller holds while
waiting for this very refresh.

How long the lock is held is bounded by the HTTP call inside it:
``GoogleConfig.max_call_seconds()`` (timeouts x attempts + backoff; 45.6 s with
the defaults, well under a second when Google answers). Waiters give up with
``lock_timeout`` a little longer than that, and PostgreSQL itself ends a
holder that stays idle in its transaction past the same limit (a hung
process), so a lock can never be held indefinitely.
"""

from __future__ import annotations

import hmac
import logging
import threading
from datetime import timedelta
from typing import Any
from weakref import WeakKeyDictionary

import sqlalchemy as sa
from sqlalchemy import case, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from princeps_db import oauth
from princeps_db.crypto import KeyRing, TokenKind, decrypt_sql, encrypt_sql
from princeps_db.db import session_keyring
from princeps_db.errors import (
    ConfigurationError,
    IntegrationNotFoundError,
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    TokenDecryptionError,
    TokenExpiredError,
)
from princeps_db.models import Integration
from princeps_db.repository import (
    EXPIRY_SKEW,
    MAX_TOKEN_CHARS,
    _check_identity,
    _raise_decryption_error,
    kept_refresh_token_sql,
    key_by_key_id_sql,
    key_parameters,
)

logger = logging.getLogger(__name__)

ACTIVE = "active"
REAUTHORIZATION_REQUIRED = "reauthorization_required"
# Slack on top of the longest provider call before a waiter or the server gives up.
LOCK_MARGIN = timedelta(seconds=5)
_SQLSTATE_LOCK_NOT_AVAILABLE = "55P03"

_refresh_engines: WeakKeyDictionary[Engine, Engine] = WeakKeyDictionary()
_refresh_engines_guard = threading.Lock()


def reauthorization_error(*, user_id: str, provider: str) -> ReauthorizationRequiredError:
    """The error for an integration marked ``reauthorization_required``."""
    return ReauthorizationRequiredError(
        f"the {provider} integration of user {user_id!r} needs re-authorisation (the provider "
        "refused its refresh token); ask the user to connect it again",
        code="invalid_grant",
    )


def _refresh_engine(session: Session) -> Engine:
    """An engine for refreshes on the caller's database, outside the caller's pool."""
    bind = session.get_bind(mapper=Integration)
    engine = bind if isinstance(bind, Engine) else bind.engine
    with _refresh_engines_guard:
        refresh_engine = _refresh_engines.get(engine)
        if refresh_engine is None:
            # Refreshes are rare (one per token per hour): a new connection each
            # time costs little and can never be starved by the main pool.
            refresh_engine = sa.create_engine(
                engine.url,
                poolclass=NullPool,
                hide_parameters=True,
                echo=engine.echo,
                connect_args={"application_name": "princeps-db-refresh"},
            )
            _refresh_engines[engine] = refresh_engine
    return refresh_engine


def _bound_lock(connection: Connection, config: oauth.GoogleConfig) -> None:
    limit = timedelta(seconds=config.max_call_seconds()) + LOCK_MARGIN
    milliseconds = f"{int(limit.total_seconds() * 1000)}ms"
    connection.execute(
        sa.text(
            "SELECT set_config('lock_timeout', :limit, true), "
            "set_config('idle_in_transaction_session_timeout', :limit, true)"
        ),
        {"limit": milliseconds},
    )


def _locked_row(
    connection: Connection, keyring: KeyRing, *, user: str, prov: str, force: bool
) -> Any:
    def key(kind: TokenKind) -> Any:
        return key_by_key_id_sql(len(keyring.keys), kind)

    fresh = Integration.expires_at.is_(None) | (
        Integration.expires_at > func.statement_timestamp() + EXPIRY_SKEW
    )
    active = Integration.status == ACTIVE
    # Decrypt only what may be used: the access token to hand back (or compare
    # with a rejected one), the refresh token only to send it to the provider.
    want_access = active if force else active & fresh
    want_refresh = active if force else active & ~fresh
    statement = (
        select(
            Integration.token_key_id.label("token_key_id"),
            Integration.status,
            fresh.label("fresh"),
            Integration.refresh_token_encrypted.is_not(None).label("refreshable"),
            func.statement_timestamp().label("locked_at"),
            case(
                (
                    want_access,
                    decrypt_sql(Integration.access_token_encrypted, key(TokenKind.ACCESS)),
                )
            ).label("access"),
            case(
                (
                    want_refresh,
                    decrypt_sql(Integration.refresh_token_encrypted, key(TokenKind.REFRESH)),
                )
            ).label("refresh"),
        )
        .where(Integration.user_id == user, Integration.provider == prov)
        .with_for_update()
    )
    try:
        return connection.execute(
            statement, key_parameters(keyring, user_id=user, provider=prov)
        ).one_or_none()
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == _SQLSTATE_LOCK_NOT_AVAILABLE:
            raise ProviderUnavailableError(
                f"another refresh of the {prov} token of user {user!r} held its lock longer than "
                "the provider timeouts allow; try again later",
                code="lock_timeout",
            ) from None
        _raise_decryption_error(error, user_id=user, provider=prov)


def _store_grant(
    connection: Connection,
    keyring: KeyRing,
    grant: oauth.TokenGrant,
    *,
    user: str,
    prov: str,
    requested_at: Any,
) -> None:
    current = keyring.current

    def key(kind: TokenKind) -> str:
        return current.derive_token_key(user_id=user, provider=prov, kind=kind)

    values: dict[Any, Any] = {
        # Every SET expression reads the old row, so the kept refresh token is
        # re-encrypted from whichever key the row was under before this UPDATE.
        Integration.refresh_token_encrypted: (
            encrypt_sql(grant.refresh_token, key(TokenKind.REFRESH))
            if grant.refresh_token is not None
            else kept_refresh_token_sql(len(keyring.previous))
        ),
        Integration.access_token_encrypted: encrypt_sql(grant.access_token, key(TokenKind.ACCESS)),
        Integration.token_key_id: current.key_id,
        # Counted from before the request: errs on the side of refreshing early.
        Integration.expires_at: requested_at + timedelta(seconds=grant.expires_in),
        Integration.updated_at: func.now(),
    }
    if grant.scope is not None:
        values[Integration.scope] = grant.scope
    try:
        connection.execute(
            update(Integration)
            .where(Integration.user_id == user, Integration.provider == prov)
            .values(values),
            key_parameters(keyring, user_id=user, provider=prov),
        )
    except DBAPIError as error:
        _raise_decryption_error(error, user_id=user, provider=prov)


def _refresh(
    session: Session, *, user: str, prov: str, force: bool, rejected_token: str | None
) -> str:
    keyring = session_keyring(session)
    config = oauth.session_google_config(session)
    refused: ReauthorizationRequiredError | None = None
    with _refresh_engine(session).connect() as connection, connection.begin():
        _bound_lock(connection, config)
        row = _locked_row(connection, keyring, user=user, prov=prov, force=force)
        if row is None:
            raise IntegrationNotFoundError(f"user {user!r} has no {prov} integration")
        if row.status != ACTIVE:
            raise reauthorization_error(user_id=user, provider=prov)
        replaced = (
            rejected_token is not None
            and row.access is not None
            and not hmac.compare_digest(row.access.encode(), rejected_token.encode())
        )
        if row.fresh and (not force or replaced):
            if row.access is None:
                keyring.for_key_id(row.token_key_id)  # raises, naming the missing key id
                raise TokenDecryptionError(f"the stored {prov} token of user {user!r} is empty")
            logger.debug("the %s token of user %s was refreshed by another caller", prov, user)
            access: str = row.access
            return access
        if not row.refreshable:
            raise TokenExpiredError(
                f"the {prov} access token of user {user!r} has expired (or was rejected) and "
                "there is no refresh token; ask the user to connect the provider again"
            )
        if row.refresh is None:
            keyring.for_key_id(row.token_key_id)
            raise TokenDecryptionError(f"the stored {prov} refresh token of user {user!r} is empty")
        try:
            grant = oauth.refresh_grant(config, row.refresh, max_token_chars=MAX_TOKEN_CHARS)
        except ReauthorizationRequiredError:
            connection.execute(
                update(Integration)
                .where(Integration.user_id == user, Integration.provider == prov)
                .values({Integration.status: REAUTHORIZATION_REQUIRED})
            )
            refused = reauthorization_error(user_id=user, provider=prov)
        else:
            _store_grant(
                connection, keyring, grant, user=user, prov=prov, requested_at=row.locked_at
            )
    # Committed: the new tokens, or the reauthorisation mark.
    if refused is not None:
        logger.warning("the %s grant of user %s needs re-authorisation", prov, user)
        raise refused
    logger.info(
        "refreshed the %s access token of user %s (refresh token %s)",
        prov,
        user,
        "rotated" if grant.refresh_token is not None else "kept",
    )
    return grant.access_token


def refresh_expiring_token(session: Session, *, user_id: str, provider: str) -> str:
    """Refresh the token if it is still about to expire once locked; return a fresh one.

    Owns its transaction, on its own connection: it commits the new tokens
    before returning, whatever the caller's transaction does afterwards.
    """
    user, prov = _check_identity(user_id, provider)
    return _refresh(session, user=user, prov=prov, force=False, rejected_token=None)


def refresh_access_token(
    session: Session, *, user_id: str, provider: str, rejected_token: str | None = None
) -> str:
    """Refresh the access token now, even if it looks fresh, and return the new one.

    For a token the provider rejected (HTTP 401) before its expiry. Pass it as
    ``rejected_token``: if another caller has already replaced it, that newer
    token is returned without a second refresh. Owns its transaction, on its
    own connection, like ``refresh_expiring_token``.
    """
    user, prov = _check_identity(user_id, provider)
    return _refresh(session, user=user, prov=prov, force=True, rejected_token=rejected_token)


def revoke_before_delete(session: Session, *, user_id: str, provider: str) -> None:
    """Best effort: revoke the integration's grant at the provider. Never raises.

    Revokes the refresh token if there is one (that ends the whole grant), else
    the access token. Skipped when no Google client is configured (a local set-up
    without Google), for integrations already marked for re-authorisation, and
    when the stored token cannot be read. Failures are logged by code only.
    Reads through a savepoint, so a failed decryption leaves the caller's
    transaction usable for the delete.
    """
    try:
        config = oauth.session_google_config(session)
    except ConfigurationError as error:
        logger.warning("not revoking the %s grant of user %s: %s", provider, user_id, error)
        return
    if not config.client_configured:
        logger.debug("no Google client configured: not revoking the %s grant", provider)
        return
    keyring = session_keyring(session)

    def key(kind: TokenKind) -> Any:
        return key_by_key_id_sql(len(keyring.keys), kind)

    statement = select(
        Integration.status,
        func.coalesce(
            decrypt_sql(Integration.refresh_token_encrypted, key(TokenKind.REFRESH)),
            decrypt_sql(Integration.access_token_encrypted, key(TokenKind.ACCESS)),
        ).label("token"),
    ).where(Integration.user_id == user_id, Integration.provider == provider)
    try:
        with session.begin_nested():
            row = session.execute(
                statement, key_parameters(keyring, user_id=user_id, provider=provider)
            ).one_or_none()
    except DBAPIError as error:
        logger.warning(
            "not revoking the %s grant of user %s: its token does not decrypt (%s)",
            provider,
            user_id,
            type(error.orig).__name__,
        )
        return
    if row is None or row.status != ACTIVE:
        return
    if row.token is None:
        logger.warning(
            "not revoking the %s grant of user %s: its key is not configured", provider, user_id
        )
        return
    try:
        oauth.revoke_token(config, row.token)
    except ProviderError as error:
        logger.warning(
            "could not revoke the %s grant of user %s (%s); deleting it anyway",
            provider,
            user_id,
            error.code,
        )
    else:
        logger.info("revoked the %s grant of user %s at the provider", provider, user_id)
