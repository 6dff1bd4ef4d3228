"""Load: 32 threads mixing upserts, reads and refreshes over 100 integrations.

Every thread has its own session from one engine. Google is the loopback
stand-in, issuing access tokens that the repository considers expired about
two seconds after they are stored (a lifetime of ``EXPIRY_SKEW`` + 2 s), so
reads keep finding expired tokens and refreshing them while other threads
read and overwrite the same rows. The stand-in rotates the refresh token on
every refresh, so a second refresh of one expiry would present a refresh
token that no longer works.

Each write is recorded while its row lock is held: an upsert just after its
statement (before its commit), a refresh by the stand-in when it receives the
token request (the refresher holds ``SELECT ... FOR UPDATE`` around the HTTP
call). So each integration's recorded events are in the order the database
applied them, and the test checks:

- no exception at all reaches a caller (no deadlock, no lock timeout);
- each refresh presents the refresh token of the event just before it (an
  upsert or the previous refresh): never a stale one, never one twice, so
  exactly one refresh per expiry; every token request succeeds;
- no refresh happens while the stored token is still fresh;
- the final stored tokens of every integration are those of its last event
  (no lost update), and every read returned a token of its own integration.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from princeps_db.fake_google import CALENDAR_SCOPE
from princeps_db.repository import EXPIRY_SKEW, create_user, get_valid_token, upsert_integration
from tests.conftest import TEST_KEYRING
from tests.google_support import RecordingGoogle, factory_for
from tests.security_support import decrypt_all_at_once

THREADS = 32
USERS = 50
PROVIDERS = ("google_calendar", "google_drive")
INTEGRATIONS = USERS * len(PROVIDERS)
DURATION_SECONDS = 12.0
MAX_OPERATIONS_PER_THREAD = 2000
UPSERT_SHARE = 0.2
# Half of the operations go to a tenth of the integrations, to make threads collide.
HOT = 10
FRESH_SECONDS = 2
LIFETIME = int(EXPIRY_SKEW.total_seconds()) + FRESH_SECONDS

Integration = tuple[str, str]


@dataclass(frozen=True)
class Written:
    """An upsert, recorded while its row lock was held."""

    integration: Integration
    access_token: str
    refresh_token: str
    at: float


@dataclass
class Journal:
    """What the threads did, in a form the checks can replay."""

    writes: list[Written]
    reads: list[tuple[Integration, str]]
    errors: list[BaseException]
    owner: dict[str, Integration]
    """Refresh token -> the integration it was stored for."""
    lock: threading.Lock

    def record_write(self, written: Written) -> None:
        with self.lock:
            self.writes.append(written)

    def record_read(self, integration: Integration, token: str) -> None:
        with self.lock:
            self.reads.append((integration, token))


@pytest.fixture
def google() -> Iterator[RecordingGoogle]:
    """Google on loopback with access tokens that are fresh for FRESH_SECONDS once stored."""
    with RecordingGoogle(access_token_lifetime=LIFETIME) as fake:
        yield fake


@pytest.fixture
def pooled_engine(head_url: str) -> Iterator[Engine]:
    """One engine with a connection for every thread."""
    engine = sa.create_engine(
        head_url,
        hide_parameters=True,
        pool_size=THREADS,
        max_overflow=0,
        connect_args={"application_name": "princeps-load"},
    )
    yield engine
    engine.dispose()


def _integrations() -> list[Integration]:
    return [(f"load-user-{n:03d}", provider) for n in range(USERS) for provider in PROVIDERS]


def _upsert(
    factory: sessionmaker[Session], google: RecordingGoogle, journal: Journal, key: Integration
) -> None:
    grant = google.consent(scope=CALENDAR_SCOPE)
    with journal.lock:
        journal.owner[grant.refresh_token] = key
    with factory() as session, session.begin():
        upsert_integration(
            session,
            user_id=key[0],
            provider=key[1],
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            expires_at=datetime.now(UTC) + timedelta(seconds=LIFETIME),
            scope=grant.scope,
        )
        # The row lock is held until the commit: record now, in the database's order.
        journal.record_write(
            Written(key, grant.access_token, grant.refresh_token, time.monotonic())
        )


def _worker(
    number: int,
    factory: sessionmaker[Session],
    google: RecordingGoogle,
    journal: Journal,
    keys: list[Integration],
    start: threading.Barrier,
    deadline: list[float],
) -> None:
    rng = random.Random(number)
    try:
        start.wait()
        for _ in range(MAX_OPERATIONS_PER_THREAD):
            if time.monotonic() > deadline[0]:
                break
            key = rng.choice(keys[:HOT] if rng.random() < 0.5 else keys)
            if rng.random() < UPSERT_SHARE:
                _upsert(factory, google, journal, key)
            else:
                with factory() as session, session.begin():
                    token = get_valid_token(session, user_id=key[0], provider=key[1])
                journal.record_read(key, token)
    except BaseException as error:  # every error is a failure, reported below
        journal.errors.append(error)


@pytest.mark.slow
def test_32_threads_mixing_upserts_reads_and_refreshes_lose_nothing_and_refresh_once(
    pooled_engine: Engine,
    head_url: str,
    google: RecordingGoogle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="princeps_db.refresh")
    config = google.config(timeout_seconds=10.0, attempts=1)
    factory = factory_for(pooled_engine, config)
    journal = Journal([], [], [], {}, threading.Lock())
    keys = _integrations()
    with factory() as session, session.begin():
        for user in sorted({user for user, _ in keys}):
            create_user(session, user_id=user, email=f"{user}@example.com")
    for key in keys:
        _upsert(factory, google, journal, key)
    assert len(journal.writes) == INTEGRATIONS

    start = threading.Barrier(THREADS)
    deadline = [0.0]
    threads = [
        threading.Thread(
            target=_worker,
            args=(n, factory, google, journal, keys, start, deadline),
            name=f"load-{n}",
        )
        for n in range(THREADS)
    ]
    deadline[0] = time.monotonic() + DURATION_SECONDS + 5  # until every thread has started
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + DURATION_SECONDS
    for thread in threads:
        thread.join(timeout=DURATION_SECONDS + 120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"

    # Nothing surfaced to any caller: no deadlock, no lock timeout, no provider error.
    assert journal.errors == []

    # Replay each integration's events in the order the database applied them.
    requests = sorted(google.token_log, key=lambda request: request.at)
    assert requests, "no token was refreshed: the test proves nothing"
    assert Counter(request.status for request in requests) == {200: len(requests)}
    presented = Counter(request.refresh_token for request in requests)
    assert presented.most_common(1)[0][1] == 1, "a refresh token was presented twice"

    events: dict[Integration, list[tuple[float, str, str, str | None]]] = {k: [] for k in keys}
    for written in journal.writes:
        events[written.integration].append(
            (written.at, written.access_token, written.refresh_token, None)
        )
    owner = dict(journal.owner)
    for request in requests:
        assert request.refresh_token is not None and request.access_token is not None
        assert request.new_refresh_token is not None
        key = owner[request.refresh_token]
        owner[request.new_refresh_token] = key
        events[key].append(
            (request.at, request.access_token, request.new_refresh_token, request.refresh_token)
        )

    refreshes = 0
    shortest_gap = float("inf")
    issued_to: dict[str, Integration] = {}
    for key, history in events.items():
        history.sort()
        for before, after in itertools.pairwise(history):
            issued_to[before[1]] = key
            presented_token = after[3]
            if presented_token is None:
                continue  # an upsert: it replaces whatever was stored
            refreshes += 1
            # The refresh used the refresh token stored just before it: no stale or
            # repeated refresh, so one refresh per expiry.
            assert presented_token == before[2], f"stale refresh of {key}"
            # And only once the stored token had expired.
            shortest_gap = min(shortest_gap, after[0] - before[0])
        issued_to[history[-1][1]] = key
    assert refreshes == len(requests)
    assert shortest_gap >= FRESH_SECONDS / 2, "a token was refreshed while still fresh"

    # No lost update: what is stored is the last event of each integration.
    stored = decrypt_all_at_once(head_url, TEST_KEYRING)
    engine = sa.create_engine(head_url)
    try:
        with engine.connect() as connection:
            row_ids = {
                (row.userId, row.provider): row.id
                for row in connection.execute(
                    sa.text('SELECT id, "userId", provider FROM "Integration"')
                )
            }
    finally:
        engine.dispose()
    assert len(row_ids) == len(stored) == INTEGRATIONS
    for key, history in events.items():
        _, access, refresh, _ = history[-1]
        assert stored[row_ids[key]] == (access, refresh), f"lost update on {key}"

    # Every read returned a token issued to its own integration.
    for key, token in journal.reads:
        assert issued_to.get(token) == key

    # Readers did collide on expired tokens: they waited for the lock and found the new one.
    waited = sum("was refreshed by another caller" in r.getMessage() for r in caplog.records)

    print(
        f"load: {THREADS} threads, {DURATION_SECONDS:.0f} s, {INTEGRATIONS} integrations: "
        f"{len(journal.reads)} reads, {len(journal.writes) - INTEGRATIONS} upserts, "
        f"{refreshes} refreshes ({len(requests)} token requests, each refresh token once), "
        f"{waited} readers served by a refresh in progress, shortest gap between a write "
        f"and the refresh of its token {shortest_gap:.2f} s, 0 errors"
    )
