"""Keys and the pgcrypto expressions that use them: the one place that spells the options.

The master key never reaches the database server. Each token is encrypted by
pgcrypto under its own *derived* key, HMAC-SHA256(master key, context), where
the context names the token's user, provider and kind (see ``token_key_context``).
A ciphertext copied into another row or the other column therefore fails to
decrypt instead of yielding someone else's token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import LargeBinary, Text, func, literal
from sqlalchemy.sql.elements import ColumnElement

from princeps_db.errors import ConfigurationError, TokenDecryptionError

MASTER_KEY_BYTES = 32
KEY_ENV_VAR = "INTEGRATION_TOKEN_ENCRYPTION_KEY"
KEYGEN_HINT = "generate one with `princeps-db keygen` (or `python -m princeps_db keygen`)"

# Every derived key is 256 random-looking bits, not a human passphrase, so the
# iterated S2K (mode 3) would only burn CPU: mode 1 (salted, one hash) loses
# nothing. AES-256, no compression (it would leak length), MDC integrity on.
# Never mode 0 (unsalted), never bf/cast5, never disable-mdc=1.
PGP_OPTIONS = "cipher-algo=aes256, compress-algo=0, s2k-mode=1, s2k-digest-algo=sha256"

_KEY_ID_LABEL = b"princeps-db:v1:key-id"
_CONTEXT_PREFIX = "princeps-db:v1"


class TokenKind(StrEnum):
    """Which of an integration's two tokens a value is."""

    ACCESS = "access_token"
    REFRESH = "refresh_token"


def token_key_context(*, user_id: str, provider: str, kind: TokenKind) -> bytes:
    """Return the HMAC message that binds a derived key to one token of one row.

    Format (UTF-8): ``princeps-db:v1:<kind>:<provider>:<user id>``. Kind and
    provider never contain ``:``, and the user id comes last, so the context is
    unambiguous. ``docs/encryption.md`` shows how to reproduce it in SQL.
    """
    return f"{_CONTEXT_PREFIX}:{TokenKind(kind).value}:{provider}:{user_id}".encode()


def generate_master_key() -> str:
    """Return a new master key: 32 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).rstrip(b"=").decode()


def _decode_key_text(text: str) -> bytes:
    stripped = text.strip()
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < MASTER_KEY_BYTES or not stripped.isascii():
        raise ConfigurationError(
            f"an integration token key must be at least {MASTER_KEY_BYTES} random bytes "
            f"in base64url without padding; {KEYGEN_HINT}"
        )
    return raw


@dataclass(frozen=True)
class MasterKey:
    """A master key and its public key id. Its repr shows the key id only."""

    secret: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hmac.new(self.secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()
        object.__setattr__(self, "key_id", digest[:16])

    @classmethod
    def from_text(cls, text: str) -> MasterKey:
        """Parse a base64url key, rejecting anything shorter than 32 bytes."""
        return cls(_decode_key_text(text))

    def derive_token_key(self, *, user_id: str, provider: str, kind: TokenKind) -> str:
        """Return the pgcrypto password for one token: hex HMAC-SHA256 over its context."""
        context = token_key_context(user_id=user_id, provider=provider, kind=kind)
        return hmac.new(self.secret, context, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """The current master key, used for every write, and older keys still accepted for reads."""

    current: MasterKey
    previous: tuple[MasterKey, ...] = ()

    @classmethod
    def from_texts(cls, current: str, previous: Iterable[str] = ()) -> KeyRing:
        """Build a key ring from base64url key texts."""
        return cls(MasterKey.from_text(current), tuple(MasterKey.from_text(p) for p in previous))

    @property
    def keys(self) -> Sequence[MasterKey]:
        """Every configured key, current first."""
        return (self.current, *self.previous)

    def for_key_id(self, key_id: str | None) -> MasterKey:
        """Return the configured key with this id, or explain which key is missing."""
        for key in self.keys:
            if key.key_id == key_id:
                return key
        raise TokenDecryptionError(
            f"the row was encrypted under key id {key_id!r}, which is not configured; add that "
            f"key to INTEGRATION_TOKEN_PREVIOUS_KEYS (configured key ids: "
            f"{', '.join(k.key_id for k in self.keys)})"
        )


def pgp_message_check(column: str) -> str:
    """SQL that is true only for an AES-256, MDC-protected pgcrypto symmetric message.

    Reads the OpenPGP packet bytes (see docs/encryption.md): a symmetric-key
    session packet (0xC3) of version 4 naming cipher 9 (AES-256) and a salted
    S2K (mode 1 or 3), followed by an integrity-protected data packet (0xD2).
    CASE keeps ``get_byte`` from reading past a short value.
    """
    c = f'"{column}"'
    return (
        f"CASE WHEN length({c}) < 16 THEN false "
        f"WHEN get_byte({c}, 1) >= 192 OR length({c}) <= 2 + get_byte({c}, 1) THEN false "
        f"ELSE get_byte({c}, 0) = 195 AND get_byte({c}, 2) = 4 AND get_byte({c}, 3) = 9 "
        f"AND get_byte({c}, 4) IN (1, 3) AND get_byte({c}, 2 + get_byte({c}, 1)) = 210 END"
    )


def encrypt_sql(plaintext: Any, derived_key: Any) -> ColumnElement[bytes]:
    """Return the SQL expression that encrypts ``plaintext`` under ``derived_key`` server-side."""
    return func.pgp_sym_encrypt(plaintext, derived_key, literal(PGP_OPTIONS), type_=LargeBinary)


def decrypt_sql(ciphertext: Any, derived_key: Any) -> ColumnElement[str]:
    """Return the SQL expression that decrypts ``ciphertext`` server-side."""
    return func.pgp_sym_decrypt(ciphertext, derived_key, type_=Text)
