"""Realistic plaintext integrations as the old Princeps schema held them (demo and tests)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa


@dataclass(frozen=True)
class LegacyRow:
    """A plaintext integration as the old Princeps schema held it."""

    id: str
    user_id: str
    provider: str
    access_token: str
    refresh_token: str | None


def _token(rng: random.Random, length: int) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~"
    return "ya29." + "".join(rng.choice(alphabet) for _ in range(length))


def seed_legacy_rows(url: str, count: int, *, seed: int = 7) -> list[LegacyRow]:
    """Insert users and plaintext integrations at the baseline schema; return what was written.

    Every 10th row has no refresh token, every 7th a non-ASCII access token,
    every 50th a 4 KB one.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible fake data, not key material
    rows: list[LegacyRow] = []
    for number in range(count):
        user_id = f"user-{number // 2:06d}"
        provider = ("google_calendar", "google_drive")[number % 2]
        access = _token(rng, 4000 if number % 50 == 0 else 150)
        if number % 7 == 0:
            access += "-äöü-日本語-🔑"
        refresh = None if number % 10 == 0 else "1//" + _token(rng, 100)
        rows.append(LegacyRow(f"int-{number:06d}", user_id, provider, access, refresh))
    engine = sa.create_engine(url)
    expiry = datetime.now(UTC) + timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO \"User\" (id, email) SELECT DISTINCT u, u || '@example.com' "
                "FROM unnest(CAST(:users AS text[])) AS u"
            ),
            {"users": sorted({r.user_id for r in rows})},
        )
        connection.execute(
            sa.text(
                'INSERT INTO "Integration" (id, "userId", provider, "accessToken", '
                '"refreshToken", "expiresAt") VALUES (:id, :user_id, :provider, :access, '
                ":refresh, :expires)"
            ),
            [
                {
                    "id": r.id,
                    "user_id": r.user_id,
                    "provider": r.provider,
                    "access": r.access_token,
                    "refresh": r.refresh_token,
                    "expires": expiry,
                }
                for r in rows
            ],
        )
    engine.dispose()
    return rows
