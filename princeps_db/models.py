"""SQLAlchemy models of the schema at the Alembic head.

Migrations never import this module; ``tests/test_migrations.py`` checks that
the two agree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    TIMESTAMP,
    CheckConstraint,
    ForeignKey,
    LargeBinary,
    MetaData,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from princeps_db.crypto import pgp_message_check

# Prisma's constraint names, so a database Prisma created can be adopted as is.
NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
}

PROVIDERS = ("google_calendar", "google_drive")
# "reauthorization_required": the provider refused the refresh token (invalid_grant);
# nothing calls the provider for this integration until the user reconnects.
STATUSES = ("active", "reauthorization_required")


class Base(DeclarativeBase):
    """Declarative base with Prisma-compatible constraint names."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A Princeps user; integrations belong to one."""

    __tablename__ = "User"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(
        "createdAt", TIMESTAMP(timezone=True), server_default=func.now()
    )


class Integration(Base):
    """One user's connection to one provider, with its tokens encrypted at rest."""

    __tablename__ = "Integration"
    __table_args__ = (
        UniqueConstraint("userId", "provider"),
        CheckConstraint(pgp_message_check("accessTokenEncrypted"), name="accessTokenEncrypted"),
        CheckConstraint(
            f'"refreshTokenEncrypted" IS NULL OR ({pgp_message_check("refreshTokenEncrypted")})',
            name="refreshTokenEncrypted",
        ),
        CheckConstraint("status IN ('active', 'reauthorization_required')", name="status"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column("userId", Text, ForeignKey("User.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(Text)
    access_token_encrypted: Mapped[bytes] = mapped_column("accessTokenEncrypted", LargeBinary)
    refresh_token_encrypted: Mapped[bytes | None] = mapped_column(
        "refreshTokenEncrypted", LargeBinary
    )
    token_key_id: Mapped[str] = mapped_column("tokenKeyId", Text)
    expires_at: Mapped[datetime | None] = mapped_column("expiresAt", TIMESTAMP(timezone=True))
    scope: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'active'"))
    created_at: Mapped[datetime] = mapped_column(
        "createdAt", TIMESTAMP(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        "updatedAt", TIMESTAMP(timezone=True), server_default=func.now()
    )
