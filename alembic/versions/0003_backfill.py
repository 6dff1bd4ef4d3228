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

from princeps_db.migration_steps import (
    batch_connection,
    clear_ciphertext,
    decrypt_to_plaintext,
    encrypt_plaintext,
    migration_inputs,
)

revision: str = "0003_backfill"
down_revision: str | None = "0002_expand"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    keyring, batch_size = migration_inputs()
    with batch_connection() as connection:
        encrypt_plaintext(connection, key=keyring.current, batch_size=batch_size)


def downgrade() -> None:
    keyring, batch_size = migration_inputs()
    with batch_connection() as connection:
        # Rows the new code wrote have only ciphertext: give them plaintext first.
        decrypt_to_plaintext(connection, keyring=keyring, batch_size=batch_size)
        clear_ciphertext(connection, batch_size=batch_size)
