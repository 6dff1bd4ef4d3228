"""Tampered ciphertext: the database refuses it, or the read raises. Never wrong plaintext.

Each case changes the stored access token of u1/google_calendar with plain
SQL, as someone with write access to the table could. Where the CHECK
constraints can tell (wrong cipher, no MDC, not a pgcrypto message), the
write itself fails with ``IntegrityError``; what they cannot tell (a valid
message under the wrong key, moved from another place, bit-flipped inside
the encrypted data) makes ``get_valid_token`` raise ``TokenDecryptionError``.
Either way the row is left as it was.

The refresh-token column gets the same read cases: an expired access token
makes the read decrypt the refresh token to send it to Google, and a
tampered one must raise ``TokenDecryptionError`` with nothing sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from princeps_db import (
    TokenDecryptionError,
    create_user,
    get_valid_token,
    upsert_integration,
)
from princeps_db.crypto import PGP_OPTIONS, MasterKey, TokenKind, generate_master_key
from princeps_db.oauth import GOOGLE_CONFIG_INFO_KEY
from princeps_db.refresh import refresh_access_token
from tests.conftest import TEST_KEYRING
from tests.google_support import RecordingGoogle

TOKEN = "ya29.tamper-target-token"
REFRESH_TOKEN = "1//u1-google_calendar"
TARGET = ("u1", "google_calendar")
WHERE_TARGET = "\"userId\" = 'u1' AND provider = 'google_calendar'"
Outcome = Literal["refused by CHECK", "refused on read"]


@dataclass(frozen=True)
class Stored:
    """The stored messages of the three integrations a case can draw on."""

    raw: sa.Connection
    access: bytes
    refresh: bytes

    def encrypt(self, plaintext: str, password: str, options: str) -> bytes:
        """A message made by this server's pgcrypto (None if the server refuses the options)."""
        value: bytes = self.raw.execute(
            sa.text("SELECT pgp_sym_encrypt(:p, :k, :o)"),
            {"p": plaintext, "k": password, "o": options},
        ).scalar_one()
        return bytes(value)

    def armored(self, plaintext: str, password: str) -> bytes:
        """The same message in OpenPGP ASCII armor, as text bytes."""
        value: str = self.raw.execute(
            sa.text("SELECT armor(pgp_sym_encrypt(:p, :k, :o))"),
            {"p": plaintext, "k": password, "o": PGP_OPTIONS},
        ).scalar_one()
        return value.encode()

    def legacy_cipher(self, options: str, cipher_byte: int) -> bytes:
        """A message in a legacy cipher (Blowfish, CAST5).

        Patched servers (15.19+) refuse to encrypt with these ciphers under
        OpenSSL 3; then the AES-256 message is relabelled with the legacy
        cipher's id, which is what the CHECK constraint inspects.
        """
        try:
            with self.raw.begin_nested():
                return self.encrypt(TOKEN, "k", options)
        except OperationalError:
            relabelled = bytearray(self.access)
            relabelled[3] = cipher_byte
            return bytes(relabelled)


def target_key(kind: TokenKind = TokenKind.ACCESS) -> str:
    """The derived key the target's token is really encrypted under."""
    return TEST_KEYRING.current.derive_token_key(user_id=TARGET[0], provider=TARGET[1], kind=kind)


def _data_packet(message: bytes) -> int:
    """Offset of the encrypted data packet (after the session key packet)."""
    return 2 + message[1]


def _flip(message: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(message)
    changed[position] ^= mask
    return bytes(changed)


ValueCase = Callable[[Stored], bytes | None]


def _from(column: str, where: str) -> str:
    return f'(SELECT "{column}" FROM "Integration" WHERE {where})'


@dataclass(frozen=True)
class Case:
    """One way of tampering: a new value for the column, or a SQL expression for it."""

    name: str
    outcome: Outcome
    value: ValueCase | None = None
    sql: str | None = None
    key_id: str | None = None


CASES = [
    # Bytes changed inside a valid-looking message: the CHECK passes, MDC or S2K fails.
    Case("flipped salt byte", "refused on read", value=lambda s: _flip(s.access, 6)),
    Case(
        "flipped first encrypted byte",
        "refused on read",
        value=lambda s: _flip(s.access, _data_packet(s.access) + 2),
    ),
    Case(
        "flipped byte mid-payload",
        "refused on read",
        value=lambda s: _flip(s.access, len(s.access) // 2 + 4),
    ),
    Case("flipped last byte (MDC)", "refused on read", value=lambda s: _flip(s.access, -1, 0x80)),
    # Truncation: what is too short for a message the CHECK refuses, the rest the read.
    Case("truncated by one byte", "refused on read", value=lambda s: s.access[:-1]),
    Case("MDC packet cut off", "refused on read", value=lambda s: s.access[:-22]),
    Case(
        "cut just after the data packet tag",
        "refused on read",
        value=lambda s: s.access[: _data_packet(s.access) + 2],
    ),
    Case("truncated to the session key packet", "refused by CHECK", value=lambda s: s.access[:15]),
    Case("truncated to one byte", "refused by CHECK", value=lambda s: s.access[:1]),
    Case("emptied", "refused by CHECK", value=lambda s: b""),
    Case("set to NULL", "refused by CHECK", value=lambda s: None),
    # Ciphertext moved from elsewhere: another derived key, so it does not decrypt.
    Case(
        "swapped with another user's row",
        "refused on read",
        sql=_from("accessTokenEncrypted", "\"userId\" = 'u2' AND provider = 'google_calendar'"),
    ),
    Case(
        "swapped with the user's other provider",
        "refused on read",
        sql=_from("accessTokenEncrypted", "\"userId\" = 'u1' AND provider = 'google_drive'"),
    ),
    Case(
        "swapped with the row's refresh token",
        "refused on read",
        sql=_from("refreshTokenEncrypted", WHERE_TARGET),
    ),
    # The right options under the wrong password.
    Case(
        "encrypted with a different master key",
        "refused on read",
        value=lambda s: s.encrypt(
            TOKEN,
            MasterKey.from_text(generate_master_key()).derive_token_key(
                user_id=TARGET[0], provider=TARGET[1], kind=TokenKind.ACCESS
            ),
            PGP_OPTIONS,
        ),
    ),
    Case(
        "encrypted with the master key itself",
        "refused on read",
        value=lambda s: s.encrypt(TOKEN, TEST_KEYRING.current.secret.hex(), PGP_OPTIONS),
    ),
    Case(
        "encrypted with the refresh token's derived key",
        "refused on read",
        value=lambda s: s.encrypt(TOKEN, target_key(TokenKind.REFRESH), PGP_OPTIONS),
    ),
    Case("row labelled with an unknown key id", "refused on read", key_id="0123456789abcdef"),
    # Right password, refused options: the CHECK constraint reads the header.
    Case(
        "Blowfish",
        "refused by CHECK",
        value=lambda s: s.legacy_cipher("cipher-algo=bf", 4),
    ),
    Case("CAST5", "refused by CHECK", value=lambda s: s.legacy_cipher("cipher-algo=cast5", 3)),
    Case(
        "AES-128",
        "refused by CHECK",
        value=lambda s: s.encrypt(TOKEN, target_key(), "cipher-algo=aes128"),
    ),
    Case(
        "pgcrypto defaults", "refused by CHECK", value=lambda s: s.encrypt(TOKEN, target_key(), "")
    ),
    Case(
        "AES-256 without MDC",
        "refused by CHECK",
        value=lambda s: s.encrypt(TOKEN, target_key(), "cipher-algo=aes256, disable-mdc=1"),
    ),
    Case(
        "unsalted S2K (mode 0)",
        "refused by CHECK",
        value=lambda s: s.encrypt(TOKEN, target_key(), "cipher-algo=aes256, s2k-mode=0"),
    ),
    Case(
        "ASCII-armored message",
        "refused by CHECK",
        value=lambda s: s.armored(TOKEN, target_key()),
    ),
    Case("plain token bytes", "refused by CHECK", value=lambda s: TOKEN.encode()),
    Case("a lone packet tag", "refused by CHECK", value=lambda s: b"\xc3"),
]


def _connect(session: Session) -> None:
    expiry = datetime.now(UTC) + timedelta(hours=1)
    for user_id in ("u1", "u2"):
        create_user(session, user_id=user_id, email=f"{user_id}@example.com")
    for user_id, provider, token in (
        ("u1", "google_calendar", TOKEN),
        ("u1", "google_drive", "ya29.u1-drive"),
        ("u2", "google_calendar", "ya29.u2-calendar"),
    ):
        upsert_integration(
            session,
            user_id=user_id,
            provider=provider,
            access_token=token,
            refresh_token=f"1//{user_id}-{provider}",  # the target's is REFRESH_TOKEN
            expires_at=expiry,
        )
    session.commit()


def _rows(raw: sa.Connection) -> list[tuple[object, ...]]:
    raw.rollback()
    return [tuple(r) for r in raw.execute(sa.text('SELECT * FROM "Integration" ORDER BY id'))]


def _stored(raw: sa.Connection) -> Stored:
    row = raw.execute(
        sa.text(
            'SELECT "accessTokenEncrypted" AS a, "refreshTokenEncrypted" AS r '
            f'FROM "Integration" WHERE {WHERE_TARGET}'
        )
    ).one()
    return Stored(raw, bytes(row.a), bytes(row.r))


def _tamper(raw: sa.Connection, case: Case, column: str) -> None:
    if case.key_id is not None:
        raw.execute(
            sa.text(f'UPDATE "Integration" SET "tokenKeyId" = :v WHERE {WHERE_TARGET}'),
            {"v": case.key_id},
        )
    elif case.sql is not None:
        raw.execute(
            sa.text(f'UPDATE "Integration" SET "{column}" = {case.sql} WHERE {WHERE_TARGET}')
        )
    else:
        assert case.value is not None
        new_value = case.value(_stored(raw))
        raw.execute(
            sa.text(f'UPDATE "Integration" SET "{column}" = :v WHERE {WHERE_TARGET}'),
            {"v": new_value},
        )


def test_the_table_covers_both_outcomes() -> None:
    refused_by_check = [c for c in CASES if c.outcome == "refused by CHECK"]
    refused_on_read = [c for c in CASES if c.outcome == "refused on read"]
    assert len(refused_by_check) >= 10
    assert len(refused_on_read) >= 10
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_access_token_is_refused_never_read_as_plaintext(
    session: Session, raw: sa.Connection, case: Case
) -> None:
    _connect(session)
    before = _rows(raw)
    if case.outcome == "refused by CHECK":
        with pytest.raises(IntegrityError):
            _tamper(raw, case, "accessTokenEncrypted")
        assert _rows(raw) == before
        assert get_valid_token(session, user_id=TARGET[0], provider=TARGET[1]) == TOKEN
        return
    _tamper(raw, case, "accessTokenEncrypted")
    raw.commit()
    tampered = _rows(raw)
    assert tampered != before
    with pytest.raises(TokenDecryptionError) as raised:
        get_valid_token(session, user_id=TARGET[0], provider=TARGET[1])
    assert TOKEN not in str(raised.value)
    session.rollback()
    assert _rows(raw) == tampered, "a failed read must not change anything"
    # The other integrations are untouched and still read.
    assert get_valid_token(session, user_id="u2", provider="google_calendar") == "ya29.u2-calendar"


CHECK_CASES = [c for c in CASES if c.outcome == "refused by CHECK" and c.name != "set to NULL"]


@pytest.mark.parametrize("case", CHECK_CASES, ids=[c.name for c in CHECK_CASES])
def test_the_refresh_column_refuses_the_same_values(
    session: Session, raw: sa.Connection, case: Case
) -> None:
    _connect(session)
    before = _rows(raw)
    with pytest.raises(IntegrityError):
        _tamper(raw, case, "refreshTokenEncrypted")
    assert _rows(raw) == before


def test_every_single_bit_flip_of_a_stored_message_is_refused(
    session: Session, raw: sa.Connection
) -> None:
    """Flip one bit (lowest, then highest) of every byte in turn: never a token back."""
    _connect(session)
    original = _stored(raw).access
    outcomes = {"refused by CHECK": 0, "refused on read": 0}
    update = sa.text(f'UPDATE "Integration" SET "accessTokenEncrypted" = :v WHERE {WHERE_TARGET}')
    for mask in (0x01, 0x80):
        for position in range(len(original)):
            try:
                raw.execute(update, {"v": _flip(original, position, mask)})
                raw.commit()
            except IntegrityError:
                raw.rollback()
                outcomes["refused by CHECK"] += 1
                continue
            with pytest.raises(TokenDecryptionError):
                get_valid_token(session, user_id=TARGET[0], provider=TARGET[1])
            session.rollback()
            outcomes["refused on read"] += 1
            raw.execute(update, {"v": original})
            raw.commit()
    assert sum(outcomes.values()) == 2 * len(original)
    assert outcomes["refused on read"] > outcomes["refused by CHECK"] > 0
    assert get_valid_token(session, user_id=TARGET[0], provider=TARGET[1]) == TOKEN
    print(f"bit flips: {len(original)} bytes x 2 masks -> {outcomes}")


# The refresh-token column is read only to refresh: an expired access token makes
# ``get_valid_token`` (and a forced ``refresh_access_token``) decrypt it and send it
# to the provider. Tampered, it must be refused before anything is sent.
REFRESH_READ_CASES = [
    Case("flipped salt byte", "refused on read", value=lambda s: _flip(s.refresh, 6)),
    Case(
        "flipped first encrypted byte",
        "refused on read",
        value=lambda s: _flip(s.refresh, _data_packet(s.refresh) + 2),
    ),
    Case(
        "flipped byte mid-payload",
        "refused on read",
        value=lambda s: _flip(s.refresh, len(s.refresh) // 2 + 4),
    ),
    Case("flipped last byte (MDC)", "refused on read", value=lambda s: _flip(s.refresh, -1, 0x80)),
    Case("truncated by one byte", "refused on read", value=lambda s: s.refresh[:-1]),
    Case("MDC packet cut off", "refused on read", value=lambda s: s.refresh[:-22]),
    Case(
        "swapped with another user's row",
        "refused on read",
        sql=_from("refreshTokenEncrypted", "\"userId\" = 'u2' AND provider = 'google_calendar'"),
    ),
    Case(
        "swapped with the user's other provider",
        "refused on read",
        sql=_from("refreshTokenEncrypted", "\"userId\" = 'u1' AND provider = 'google_drive'"),
    ),
    Case(
        "swapped with the row's access token",
        "refused on read",
        sql=_from("accessTokenEncrypted", WHERE_TARGET),
    ),
    Case(
        "encrypted with a different master key",
        "refused on read",
        value=lambda s: s.encrypt(
            REFRESH_TOKEN,
            MasterKey.from_text(generate_master_key()).derive_token_key(
                user_id=TARGET[0], provider=TARGET[1], kind=TokenKind.REFRESH
            ),
            PGP_OPTIONS,
        ),
    ),
    Case(
        "encrypted with the master key itself",
        "refused on read",
        value=lambda s: s.encrypt(REFRESH_TOKEN, TEST_KEYRING.current.secret.hex(), PGP_OPTIONS),
    ),
    Case(
        "encrypted with the access token's derived key",
        "refused on read",
        value=lambda s: s.encrypt(REFRESH_TOKEN, target_key(TokenKind.ACCESS), PGP_OPTIONS),
    ),
    Case("row labelled with an unknown key id", "refused on read", key_id="0123456789abcdef"),
]

REFRESH_READERS = {
    "get_valid_token (expired)": lambda session: get_valid_token(
        session, user_id=TARGET[0], provider=TARGET[1]
    ),
    "refresh_access_token (forced)": lambda session: refresh_access_token(
        session, user_id=TARGET[0], provider=TARGET[1]
    ),
}


@pytest.fixture
def google() -> Iterator[RecordingGoogle]:
    """Google on loopback, counting token requests."""
    with RecordingGoogle() as fake:
        yield fake


@pytest.mark.parametrize("case", REFRESH_READ_CASES, ids=[c.name for c in REFRESH_READ_CASES])
def test_tampered_refresh_token_is_refused_before_anything_is_sent(
    session: Session, raw: sa.Connection, google: RecordingGoogle, case: Case
) -> None:
    _connect(session)
    session.info[GOOGLE_CONFIG_INFO_KEY] = google.config()
    # The access token has expired: the next read needs the refresh token.
    raw.execute(
        sa.text(
            f'UPDATE "Integration" SET "expiresAt" = now() - interval \'5 minutes\' '
            f"WHERE {WHERE_TARGET}"
        )
    )
    _tamper(raw, case, "refreshTokenEncrypted")
    raw.commit()
    tampered = _rows(raw)

    for read in REFRESH_READERS.values():
        with pytest.raises(TokenDecryptionError) as raised:
            read(session)
        assert REFRESH_TOKEN not in str(raised.value) and TOKEN not in str(raised.value)
        session.rollback()
    assert google.token_requests == 0, "a refresh token that does not decrypt was sent"
    assert google.token_log == []
    assert _rows(raw) == tampered, "a failed read must not change anything"
    assert get_valid_token(session, user_id="u2", provider="google_calendar") == "ya29.u2-calendar"
