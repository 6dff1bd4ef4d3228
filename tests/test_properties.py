"""Property: any token PostgreSQL can store comes back exactly as it was written.

PostgreSQL text holds any Unicode scalar value except NUL (surrogates are not
valid UTF-8). The repository accepts tokens of 1 to 16 KiB characters that
are not blank, so that is the domain: astral characters, combining marks,
line and paragraph separators, byte order marks, surrounding whitespace.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from princeps_db import create_user, delete_integration, get_valid_token, upsert_integration
from princeps_db.repository import MAX_TOKEN_CHARS

EXAMPLES = 200

STORABLE = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
TOKENS = st.one_of(
    st.text(STORABLE, min_size=1, max_size=64),
    st.text(STORABLE, min_size=1, max_size=MAX_TOKEN_CHARS),
    # Near the limit: Hypothesis draws short texts only, so repeat one to the size wanted.
    st.tuples(st.text(STORABLE, min_size=1, max_size=32), st.integers(0, 16)).map(
        lambda drawn: (drawn[0] * MAX_TOKEN_CHARS)[: MAX_TOKEN_CHARS - drawn[1]]
    ),
).filter(lambda token: token.strip() != "")
PROVIDERS = st.sampled_from(["google_calendar", "google_drive"])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(access=TOKENS, refresh=st.none() | TOKENS, provider=PROVIDERS, fresh=st.booleans())
@example(access="🔑" * MAX_TOKEN_CHARS, refresh=None, provider="google_drive", fresh=True)
@example(
    access="e\u0301" * 8000 + "\u0301",
    refresh="1//\u2028\u2029",
    provider="google_drive",
    fresh=False,
)
@example(
    access=" \ufeffya29.padded\r\n ", refresh="\t1//x\t", provider="google_calendar", fresh=True
)
@example(access="\U0010ffff\U000e0001\u200d", refresh=None, provider="google_calendar", fresh=False)
def test_any_storable_token_round_trips_exactly(
    session: Session, access: str, refresh: str | None, provider: str, fresh: bool
) -> None:
    if session.info.get("user_created") is None:
        create_user(session, user_id="prop-user", email="prop@example.com")
        session.commit()
        session.info["user_created"] = True
    if fresh:
        delete_integration(session, user_id="prop-user", provider=provider)
    upsert_integration(
        session,
        user_id="prop-user",
        provider=provider,
        access_token=access,
        refresh_token=refresh,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    session.commit()
    assert get_valid_token(session, user_id="prop-user", provider=provider) == access
