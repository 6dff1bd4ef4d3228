"""Batched, resumable data steps used by the token-encryption migrations.

Each step walks ``"Integration"`` in primary-key order, one short statement
and one commit per batch, on a connection in autocommit mode. Only ids and
derived keys travel; plaintext is encrypted and decrypted inside the server.
Every statement re-checks its own WHERE clause, so a step killed at any point
and run again finishes the job without redoing or losing anything.

Table and column names are spelled out here rather than taken from the live
models, so the migrations that call these keep working as the models change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.engine import Connection

from princeps_db.crypto import PGP_OPTIONS, KeyRing, MasterKey, TokenKind

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 2000
# Set for the migration's own session so the sync trigger leaves its writes alone.
MIGRATION_GUC = "princeps.token_migration"


# Between expand and contract, reconcile legacy (plaintext) and new (ciphertext)
# writers; see alembic/versions/0002_expand.py.
SYNC_TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION princeps_integration_token_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('princeps.token_migration', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF NEW."accessToken" IS DISTINCT FROM OLD."accessToken"
       OR NEW."refreshToken" IS DISTINCT FROM OLD."refreshToken" THEN
        IF NEW."accessTokenEncrypted" IS NOT DISTINCT FROM OLD."accessTokenEncrypted" THEN
            NEW."accessTokenEncrypted" := NULL;
            NEW."refreshTokenEncrypted" := NULL;
            NEW."tokenKeyId" := NULL;
        END IF;
    ELSIF NEW."accessTokenEncrypted" IS DISTINCT FROM OLD."accessTokenEncrypted"
          OR NEW."refreshTokenEncrypted" IS DISTINCT FROM OLD."refreshTokenEncrypted" THEN
        NEW."accessToken" := NULL;
        NEW."refreshToken" := NULL;
    END IF;
    RETURN NEW;
END $$
"""
SYNC_TRIGGER = (
    'CREATE TRIGGER "Integration_token_sync" BEFORE UPDATE ON "Integration" '
    "FOR EACH ROW EXECUTE FUNCTION princeps_integration_token_sync()"
)
DROP_SYNC_TRIGGER = (
    'DROP TRIGGER IF EXISTS "Integration_token_sync" ON "Integration"; '
    "DROP FUNCTION IF EXISTS princeps_integration_token_sync()"
)


@dataclass(frozen=True)
class RowRef:
    """What identifies a row's derived keys: never a token."""

    id: str
    user_id: str
    provider: str
    key_id: str | None


def parse_batch_size(raw: str | None) -> int:
    """Read ``-x batch_size=N``; reject nonsense before touching the database."""
    if raw is None:
        return DEFAULT_BATCH_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise SystemExit(f"batch_size must be a whole number from 1 to 100000, not {raw!r}")
    return int(raw)


def mark_migration_session(connection: Connection, *, on: bool) -> None:
    """Tell the sync trigger that this session's writes are the migration's own."""
    connection.execute(
        sa.text("SELECT set_config(:name, :value, false)"),
        {"name": MIGRATION_GUC, "value": "on" if on else "off"},
    )


def migration_inputs() -> tuple[KeyRing, int]:
    """The key ring env.py loaded, and ``-x batch_size`` (checked), for a data revision."""
    keyring: KeyRing = context.config.attributes["keyring"]
    batch_size = parse_batch_size(context.get_x_argument(as_dictionary=True).get("batch_size"))
    return keyring, batch_size


@contextmanager
def batch_connection() -> Iterator[Connection]:
    """The migration's connection in autocommit (one commit per statement), marked as ours."""
    with op.get_context().autocommit_block():
        connection = op.get_bind()
        mark_migration_session(connection, on=True)
        try:
            yield connection
        finally:
            mark_migration_session(connection, on=False)


def iter_batches(
    connection: Connection,
    *,
    where: str,
    batch_size: int,
    params: Mapping[str, object] | None = None,
) -> Iterator[list[RowRef]]:
    """Yield rows matching ``where`` in primary-key order, in batches.

    ``where`` is fixed SQL; any value it needs comes in ``params`` as a bind
    parameter. Each batch is read when it is asked for, so a caller may open a
    transaction around ``next()`` and its own statements for that batch.
    """
    last_id = ""
    query = sa.text(
        'SELECT id, "userId", provider, "tokenKeyId" FROM "Integration" '
        f"WHERE id > :last_id AND ({where}) ORDER BY id LIMIT :limit"
    )
    while True:
        rows = connection.execute(
            query, {**(params or {}), "last_id": last_id, "limit": batch_size}
        ).all()
        if not rows:
            return
        yield [RowRef(r.id, r.userId, r.provider, r.tokenKeyId) for r in rows]
        last_id = rows[-1].id


def derived_keys(
    rows: Sequence[RowRef], key_for: Callable[[RowRef], MasterKey]
) -> dict[str, list[str]]:
    """Bind parameters for a batch: ids and each row's two derived keys."""
    access, refresh = [], []
    for row in rows:
        key = key_for(row)
        access.append(
            key.derive_token_key(user_id=row.user_id, provider=row.provider, kind=TokenKind.ACCESS)
        )
        refresh.append(
            key.derive_token_key(user_id=row.user_id, provider=row.provider, kind=TokenKind.REFRESH)
        )
    return {"ids": [r.id for r in rows], "access_keys": access, "refresh_keys": refresh}


_BATCH_KEYS = (
    "unnest(CAST(:ids AS text[]), CAST(:access_keys AS text[]), CAST(:refresh_keys AS text[])) "
    "AS v(id, access_key, refresh_key)"
)


def _run_batches(
    connection: Connection,
    *,
    label: str,
    where: str,
    statement: sa.TextClause,
    key_for: Callable[[RowRef], MasterKey],
    batch_size: int,
    extra: dict[str, str] | None = None,
) -> int:
    # The token columns are new (or just rewritten), so the planner has no
    # statistics for them and guesses that few rows match ``where``: it then
    # reads the whole table on every batch (a seq scan and sort for the next
    # ids) instead of walking the primary key. Fresh statistics fix the plan;
    # ANALYZE samples a bounded number of rows and blocks neither reads nor writes.
    connection.execute(sa.text('ANALYZE "Integration"'))
    remaining = connection.execute(
        sa.text(f'SELECT count(*) FROM "Integration" WHERE {where}')
    ).scalar_one()
    logger.info(
        "%s: %d rows to process in batches of %d",
        label,
        remaining,
        batch_size,
        extra={"batch_progress": (label, 0, remaining)},
    )
    done, started = 0, time.monotonic()
    for number, rows in enumerate(iter_batches(connection, where=where, batch_size=batch_size), 1):
        params = {**derived_keys(rows, key_for), **(extra or {})}
        done += connection.execute(statement, params).rowcount
        logger.info(
            "%s: batch %d committed, %d/%d rows, %.1f s",
            label,
            number,
            done,
            remaining,
            time.monotonic() - started,
            extra={"batch_progress": (label, done, remaining)},
        )
    return done


def encrypt_plaintext(connection: Connection, *, key: MasterKey, batch_size: int) -> int:
    """Encrypt every row that has plaintext and no ciphertext yet; return how many."""
    where = '"accessTokenEncrypted" IS NULL AND "accessToken" IS NOT NULL'
    statement = sa.text(
        'UPDATE "Integration" AS i SET '
        '"accessTokenEncrypted" = pgp_sym_encrypt(i."accessToken", v.access_key, :options), '
        '"refreshTokenEncrypted" = pgp_sym_encrypt(i."refreshToken", v.refresh_key, :options), '
        '"tokenKeyId" = :key_id '
        f'FROM {_BATCH_KEYS} WHERE i.id = v.id AND i."accessTokenEncrypted" IS NULL '
        'AND i."accessToken" IS NOT NULL'
    )
    return _run_batches(
        connection,
        label="encrypt",
        where=where,
        statement=statement,
        key_for=lambda _row: key,
        batch_size=batch_size,
        extra={"options": PGP_OPTIONS, "key_id": key.key_id},
    )


def decrypt_to_plaintext(connection: Connection, *, keyring: KeyRing, batch_size: int) -> int:
    """Fill the plaintext columns from the ciphertext where they are empty; return how many."""
    where = '"accessToken" IS NULL AND "accessTokenEncrypted" IS NOT NULL'
    statement = sa.text(
        'UPDATE "Integration" AS i SET '
        '"accessToken" = pgp_sym_decrypt(i."accessTokenEncrypted", v.access_key), '
        '"refreshToken" = pgp_sym_decrypt(i."refreshTokenEncrypted", v.refresh_key) '
        f'FROM {_BATCH_KEYS} WHERE i.id = v.id AND i."accessToken" IS NULL'
    )
    return _run_batches(
        connection,
        label="decrypt",
        where=where,
        statement=statement,
        key_for=lambda row: keyring.for_key_id(row.key_id),
        batch_size=batch_size,
    )


def clear_ciphertext(connection: Connection, *, batch_size: int) -> int:
    """Remove ciphertext from rows whose plaintext is present; return how many."""
    where = '"accessTokenEncrypted" IS NOT NULL AND "accessToken" IS NOT NULL'
    total = 0
    while True:
        count = connection.execute(
            sa.text(
                'UPDATE "Integration" SET "accessTokenEncrypted" = NULL, '
                '"refreshTokenEncrypted" = NULL, "tokenKeyId" = NULL WHERE id IN ('
                f'SELECT id FROM "Integration" WHERE {where} ORDER BY id LIMIT :limit)'
            ),
            {"limit": batch_size},
        ).rowcount
        if count == 0:
            return total
        total += count


TRY_DECRYPT_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.princeps_try_decrypt(message bytea, password text)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgp_sym_decrypt(message, password);
EXCEPTION WHEN external_routine_invocation_exception THEN
    RETURN NULL;  -- wrong key or corrupt data: reported by id, never raised mid-scan
END $$
"""


def find_unverified_rows(
    connection: Connection, *, keyring: KeyRing, batch_size: int, limit: int = 1000
) -> list[str]:
    """Return ids of rows whose ciphertext does not decrypt to the plaintext beside it.

    A row with no plaintext (written by the new code) must simply decrypt. Only
    ids leave the server; the comparison happens in SQL.
    """
    connection.execute(sa.text(TRY_DECRYPT_FUNCTION))
    check = sa.text(
        f'SELECT v.id FROM {_BATCH_KEYS} JOIN "Integration" AS i ON i.id = v.id WHERE '
        'CASE WHEN i."accessToken" IS NOT NULL THEN '
        '  pg_temp.princeps_try_decrypt(i."accessTokenEncrypted", v.access_key) '
        '    IS DISTINCT FROM i."accessToken" '
        '  OR pg_temp.princeps_try_decrypt(i."refreshTokenEncrypted", v.refresh_key) '
        '    IS DISTINCT FROM i."refreshToken" '
        'ELSE i."accessTokenEncrypted" IS NULL '
        '  OR pg_temp.princeps_try_decrypt(i."accessTokenEncrypted", v.access_key) IS NULL '
        '  OR (i."refreshTokenEncrypted" IS NOT NULL AND '
        '      pg_temp.princeps_try_decrypt(i."refreshTokenEncrypted", v.refresh_key) IS NULL) '
        "END ORDER BY v.id"
    )
    failing: list[str] = []
    configured = {key.key_id for key in keyring.keys}
    for rows in iter_batches(connection, where="true", batch_size=batch_size):
        failing += [row.id for row in rows if row.key_id not in configured]
        known = [row for row in rows if row.key_id in configured]
        if known:
            params = derived_keys(known, lambda row: keyring.for_key_id(row.key_id))
            failing += connection.execute(check, params).scalars().all()
        if len(failing) >= limit:
            break
    return sorted(failing)[:limit]
