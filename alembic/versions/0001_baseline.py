"""Baseline: the plaintext schema Princeps already has.

An existing Princeps database is adopted with ``alembic stamp 0001_baseline``.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_baseline"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "User",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column(
            "createdAt", sa.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="User_pkey"),
        sa.UniqueConstraint("email", name="User_email_key"),
    )
    op.create_table(
        "Integration",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("userId", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("accessToken", sa.Text(), nullable=False),
        sa.Column("refreshToken", sa.Text(), nullable=True),
        sa.Column("expiresAt", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column(
            "createdAt", sa.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updatedAt", sa.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="Integration_pkey"),
        sa.ForeignKeyConstraint(
            ["userId"], ["User.id"], name="Integration_userId_fkey", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("userId", "provider", name="Integration_userId_provider_key"),
    )


def downgrade() -> None:
    op.drop_table("Integration")
    op.drop_table("User")
