"""Expand: pgcrypto, ciphertext columns, and a trigger that keeps both worlds honest.

Adds nullable ``bytea`` columns beside the plaintext ones (instant, no rewrite)
and lets ``"accessToken"`` be NULL so the new code can insert encrypted-only
rows while the old code still runs. Until the contract revision, a trigger
reconciles the two kinds of writers:
- a legacy write that changes plaintext voids the ciphertext beside it (the
  backfill or the contract's catch-up re-encrypts it);
- a new write that changes ciphertext voids the stale plaintext beside it.
The migration's own session sets ``princeps.token_migration`` and is left alone.

Revision ID: 0002_expand
Revises: 0001_baseline
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from princeps_db.migration_steps import DROP_SYNC_TRIGGER, SYNC_TRIGGER, SYNC_TRIGGER_FUNCTION

revision: str = "0002_expand"
down_revision: str | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    op.add_column("Integration", sa.Column("accessTokenEncrypted", sa.LargeBinary(), nullable=True))
    op.add_column(
        "Integration", sa.Column("refreshTokenEncrypted", sa.LargeBinary(), nullable=True)
    )
    op.add_column("Integration", sa.Column("tokenKeyId", sa.Text(), nullable=True))
    op.alter_column("Integration", "accessToken", nullable=True)
    op.execute(SYNC_TRIGGER_FUNCTION)
    op.execute(SYNC_TRIGGER)


def downgrade() -> None:
    missing = (
        op.get_bind()
        .execute(
            sa.text('SELECT id FROM "Integration" WHERE "accessToken" IS NULL ORDER BY id LIMIT 20')
        )
        .scalars()
        .all()
    )
    if missing:
        raise SystemExit(
            "cannot restore the plaintext schema: rows without a plaintext access token "
            f"(ids {', '.join(missing)}); downgrade through 0003_backfill first"
        )
    op.execute(DROP_SYNC_TRIGGER)
    op.alter_column("Integration", "accessToken", nullable=False)
    op.drop_column("Integration", "tokenKeyId")
    op.drop_column("Integration", "refreshTokenEncrypted")
    op.drop_column("Integration", "accessTokenEncrypted")
    # pgcrypto stays: other objects may use it, and dropping it gives nothing back.
