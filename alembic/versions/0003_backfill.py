"""Backfill: encrypt every plaintext row, in batches, one commit per batch.

Resumable: a row is encrypted only while its ciphertext is NULL, so a run
killed at any point and started again carries on where it stopped. Only ids
and derived keys travel; pgcrypto encrypts the plaintext inside the server.
``-x batch_size=N`` sets the batch size (default 2000).

Revision ID: 0003_backfill
Revises: 0002_expand
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import context, op

from princeps_db.crypto import KeyRing
from princeps_db.migration_steps import (
    clear_ciphertext,
    decrypt_to_plaintext,
    encrypt_plaintext,
    mark_migration_session,
    parse_batch_size,
)

revision: str = "0003_backfill"
down_revision: str | None = "0002_expand"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _keyring() -> KeyRing:
    keyring: KeyRing = context.config.attributes["keyring"]
    return keyring


def upgrade() -> None:
    batch_size = parse_batch_size(context.get_x_argument(as_dictionary=True).get("batch_size"))
    keyring = _keyring()
    with op.get_context().autocommit_block():
        connection = op.get_bind()
        mark_migration_session(connection, on=True)
        try:
            encrypt_plaintext(connection, key=keyring.current, batch_size=batch_size)
        finally:
            mark_migration_session(connection, on=False)


def downgrade() -> None:
    batch_size = parse_batch_size(context.get_x_argument(as_dictionary=True).get("batch_size"))
    keyring = _keyring()
    with op.get_context().autocommit_block():
        connection = op.get_bind()
        mark_migration_session(connection, on=True)
        try:
            # Rows the new code wrote have only ciphertext: give them plaintext first.
            decrypt_to_plaintext(connection, keyring=keyring, batch_size=batch_size)
            clear_ciphertext(connection, batch_size=batch_size)
        finally:
            mark_migration_session(connection, on=False)
