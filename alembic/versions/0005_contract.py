"""Contract: verify every row, then make ciphertext mandatory and drop the plaintext.

1. Without locks, in batches: encrypt rows the legacy code wrote since the
   backfill, then check in SQL that every ciphertext decrypts to the plaintext
   beside it (or, for rows written by the new code, decrypts at all). Any
   failure stops the migration and names the row ids, never values.
2. In one short transaction: refuse if a legacy write slipped in meanwhile,
   then add NOT NULL and the CHECK constraints that make the database refuse
   anything but an AES-256, MDC-protected pgcrypto message, drop the sync
   trigger and the plaintext columns.

The downgrade restores the plaintext columns by decrypting (it needs the key).

Revision ID: 0005_contract
Revises: 0004_integration_status
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from princeps_db.crypto import pgp_message_check
from princeps_db.migration_steps import (
    DROP_SYNC_TRIGGER,
    SYNC_TRIGGER,
    SYNC_TRIGGER_FUNCTION,
    batch_connection,
    decrypt_to_plaintext,
    encrypt_plaintext,
    find_unverified_rows,
    migration_inputs,
)

revision: str = "0005_contract"
down_revision: str | None = "0004_integration_status"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACCESS_CHECK = "Integration_accessTokenEncrypted_check"
REFRESH_CHECK = "Integration_refreshTokenEncrypted_check"


def upgrade() -> None:
    keyring, batch_size = migration_inputs()
    with batch_connection() as connection:
        encrypt_plaintext(connection, key=keyring.current, batch_size=batch_size)
        failing = find_unverified_rows(connection, keyring=keyring, batch_size=batch_size)
    if failing:
        raise SystemExit(
            f"refusing to drop the plaintext: {len(failing)} row(s) do not decrypt to their "
            f"plaintext (ids: {', '.join(failing[:50])}); check INTEGRATION_TOKEN_ENCRYPTION_KEY "
            "and INTEGRATION_TOKEN_PREVIOUS_KEYS, fix those rows, and run the upgrade again"
        )

    op.execute('LOCK TABLE "Integration" IN ACCESS EXCLUSIVE MODE')
    late = (
        op.get_bind()
        .execute(
            sa.text(
                'SELECT id FROM "Integration" WHERE "accessTokenEncrypted" IS NULL '
                'OR "tokenKeyId" IS NULL ORDER BY id LIMIT 50'
            )
        )
        .scalars()
        .all()
    )
    if late:
        raise SystemExit(
            f"rows were written in plaintext during verification (ids: {', '.join(late)}); "
            "nothing was changed: run the upgrade again (stop the legacy writers first if "
            "this repeats)"
        )
    op.execute(DROP_SYNC_TRIGGER)
    op.alter_column("Integration", "accessTokenEncrypted", nullable=False)
    op.alter_column("Integration", "tokenKeyId", nullable=False)
    op.create_check_constraint(
        op.f(ACCESS_CHECK), "Integration", pgp_message_check("accessTokenEncrypted")
    )
    op.create_check_constraint(
        op.f(REFRESH_CHECK),
        "Integration",
        f'"refreshTokenEncrypted" IS NULL OR ({pgp_message_check("refreshTokenEncrypted")})',
    )
    op.drop_column("Integration", "accessToken")
    op.drop_column("Integration", "refreshToken")


def downgrade() -> None:
    keyring, batch_size = migration_inputs()
    # Idempotent DDL: a downgrade killed while decrypting can simply be run again.
    op.execute('ALTER TABLE "Integration" ADD COLUMN IF NOT EXISTS "accessToken" text')
    op.execute('ALTER TABLE "Integration" ADD COLUMN IF NOT EXISTS "refreshToken" text')
    op.execute(f'ALTER TABLE "Integration" DROP CONSTRAINT IF EXISTS "{ACCESS_CHECK}"')
    op.execute(f'ALTER TABLE "Integration" DROP CONSTRAINT IF EXISTS "{REFRESH_CHECK}"')
    op.alter_column("Integration", "accessTokenEncrypted", nullable=True)
    op.alter_column("Integration", "tokenKeyId", nullable=True)
    op.execute(SYNC_TRIGGER_FUNCTION)
    op.execute('DROP TRIGGER IF EXISTS "Integration_token_sync" ON "Integration"')
    op.execute(SYNC_TRIGGER)
    with batch_connection() as connection:
        decrypt_to_plaintext(connection, keyring=keyring, batch_size=batch_size)
