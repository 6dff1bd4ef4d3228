"""Read and write path: the repository functions vs the same statements on plaintext.

The plaintext functions below mirror ``get_valid_token`` and
``upsert_integration`` statement for statement (same validation, same
SQLAlchemy constructs on an ORM-mapped class, built once and reused with
every value a bind parameter, same columns returned) on
``"IntegrationPlain"``, so the ratio isolates what encryption adds: deriving
the keys in Python, binding them, the extra SQL expressions, and pgcrypto on
the server.
"""

from __future__ import annotations

import gc
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import TIMESTAMP, Text, case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from benchmarks.databases import PLAINTEXT_TABLE, seeded_identity
from benchmarks.stats import percentile, ratios, summary
from princeps_db.crypto import KeyRing
from princeps_db.db import KEYRING_INFO_KEY
from princeps_db.errors import TokenExpiredError
from princeps_db.repository import (
    EXPIRY_SKEW,
    MAX_TEXT_CHARS,
    MAX_TOKEN_CHARS,
    IntegrationInfo,
    _check_expiry,
    _check_identity,
    _check_text,
    get_valid_token,
    upsert_integration,
)

PLAINTEXT_KEY_ID = "plaintext"


class _PlainBase(DeclarativeBase):
    pass


class IntegrationPlain(_PlainBase):
    """The plaintext copy, mapped like ``Integration`` so both go through the same ORM paths."""

    __tablename__ = PLAINTEXT_TABLE

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column("userId", Text)
    provider: Mapped[str] = mapped_column(Text)
    access_token: Mapped[str] = mapped_column("accessToken", Text)
    refresh_token: Mapped[str | None] = mapped_column("refreshToken", Text)
    token_key_id: Mapped[str] = mapped_column("tokenKeyId", Text)
    expires_at: Mapped[datetime | None] = mapped_column("expiresAt", TIMESTAMP(timezone=True))
    scope: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column("createdAt", TIMESTAMP(timezone=True))
    updated_at: Mapped[datetime] = mapped_column("updatedAt", TIMESTAMP(timezone=True))
    status: Mapped[str] = mapped_column(Text)


_PLAIN_INFO = (
    IntegrationPlain.id,
    IntegrationPlain.user_id,
    IntegrationPlain.provider,
    IntegrationPlain.scope,
    IntegrationPlain.expires_at,
    IntegrationPlain.token_key_id,
    IntegrationPlain.created_at,
    IntegrationPlain.updated_at,
    IntegrationPlain.status,
)


def _text_param(name: str) -> Any:
    return sa.bindparam(name, type_=Text)


@lru_cache(maxsize=1)
def _plaintext_read_statement() -> Any:
    """``get_valid_token``'s statement on the plaintext copy, built once like the real one."""
    plain = IntegrationPlain
    fresh = plain.expires_at.is_(None) | (
        plain.expires_at > func.statement_timestamp() + EXPIRY_SKEW
    )
    active = plain.status == "active"
    return select(
        plain.token_key_id,
        plain.status,
        fresh.label("fresh"),
        plain.refresh_token.is_not(None).label("refreshable"),
        case((fresh & active, plain.access_token)).label("token"),
    ).where(plain.user_id == _text_param("b_user_id"), plain.provider == _text_param("b_provider"))


def plaintext_get_token(session: Session, *, user_id: str, provider: str) -> str:
    """``get_valid_token``'s statement on the plaintext copy, without the decrypt."""
    user, prov = _check_identity(user_id, provider)
    row = session.execute(
        _plaintext_read_statement(), {"b_user_id": user, "b_provider": prov}
    ).one_or_none()
    if row is None or not row.fresh or row.status != "active":
        raise TokenExpiredError("missing or expired")
    token: str = row.token
    return token


@lru_cache(maxsize=2)
def _plaintext_upsert_statement(keep_refresh: bool) -> Any:
    """``upsert_integration``'s statement on the plaintext copy, built once like the real one."""
    plain = IntegrationPlain
    statement = insert(plain).values(
        id=_text_param("b_id"),
        user_id=_text_param("b_user_id"),
        provider=_text_param("b_provider"),
        access_token=_text_param("b_access_token"),
        refresh_token=_text_param("b_refresh_token"),
        token_key_id=_text_param("b_key_id"),
        expires_at=sa.bindparam("b_expires_at", type_=TIMESTAMP(timezone=True)),
        scope=_text_param("b_scope"),
    )
    new_refresh = plain.refresh_token if keep_refresh else statement.excluded.refreshToken
    upsert = statement.on_conflict_do_update(
        index_elements=[plain.user_id, plain.provider],
        set_={
            plain.refresh_token: new_refresh,
            plain.access_token: statement.excluded.accessToken,
            plain.token_key_id: statement.excluded.tokenKeyId,
            plain.expires_at: statement.excluded.expiresAt,
            plain.scope: statement.excluded.scope,
            plain.status: "active",
            plain.updated_at: func.now(),
        },
    ).returning(*_PLAIN_INFO)
    return upsert.execution_options(dml_strategy="orm")


def plaintext_upsert(
    session: Session,
    *,
    user_id: str,
    provider: str,
    access_token: str,
    refresh_token: str | None,
    expires_at: datetime | None,
    scope: str | None = None,
) -> IntegrationInfo:
    """``upsert_integration``'s statement on the plaintext copy, without encrypting."""
    user, prov = _check_identity(user_id, provider)
    access = _check_text("access_token", access_token, max_chars=MAX_TOKEN_CHARS)
    refresh = _check_text("refresh_token", refresh_token, max_chars=MAX_TOKEN_CHARS, optional=True)
    expiry = _check_expiry(expires_at)
    checked_scope = _check_text("scope", scope, max_chars=MAX_TEXT_CHARS, optional=True)
    params = {
        "b_id": str(uuid.uuid4()),
        "b_user_id": user,
        "b_provider": prov,
        "b_access_token": access,
        "b_refresh_token": refresh,
        "b_key_id": PLAINTEXT_KEY_ID,
        "b_expires_at": expiry,
        "b_scope": checked_scope,
    }
    row = session.execute(_plaintext_upsert_statement(refresh is None), params).one()
    return IntegrationInfo(
        id=row.id,
        user_id=row.user_id,
        provider=row.provider,
        scope=row.scope,
        expires_at=row.expires_at,
        key_id=row.token_key_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        status=row.status,
    )


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a local server backend has used, from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: field 3 is fields[0], so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class Side:
    """One side of a comparison: a session on its own connection (its own backend)."""

    session: Session
    backend_pid: int


def open_side(connection: Connection, keyring: KeyRing) -> Side:
    """A session bound to one held connection, carrying the key ring like the app's sessions."""
    pid = int(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    connection.commit()
    factory = sessionmaker(bind=connection, info={KEYRING_INFO_KEY: keyring})
    return Side(factory(), pid)


@dataclass
class Repetition:
    """Per-call figures of one batch of calls."""

    p50_us: float
    p95_us: float
    server_cpu_us: float | None
    client_cpu_us: float


Call = Callable[[Session, dict[str, Any]], object]


def _finish(durations: list[float], server: float | None, client: float, calls: int) -> Repetition:
    return Repetition(
        percentile(durations, 0.5),
        percentile(durations, 0.95),
        None if server is None else server / calls * 1e6,
        client / calls * 1e6,
    )


def timed_pairs(
    encrypted: tuple[Side, Call], plaintext: tuple[Side, Call], arguments: Sequence[dict[str, Any]]
) -> tuple[Repetition, Repetition]:
    """Time each call of both functions, alternating call by call; commit after each, untimed.

    Alternating per call (and flipping which side goes first) means both sides
    see the same machine: on a shared host, load that comes and goes lands
    on both equally. One transaction per call, as a request would have; the
    COMMIT round trip is the same on both sides and is left out of the call
    time, which makes the ratio stricter.
    """
    sides = (encrypted, plaintext)
    durations: tuple[list[float], list[float]] = ([], [])
    client = [0.0, 0.0]
    server_before = [backend_cpu_seconds(side.backend_pid) for side, _ in sides]
    gc.collect()
    gc.disable()
    try:
        for number, kwargs in enumerate(arguments):
            for index in (0, 1) if number % 2 == 0 else (1, 0):
                side, call = sides[index]
                cpu = time.process_time()
                started = time.perf_counter_ns()
                call(side.session, kwargs)
                durations[index].append((time.perf_counter_ns() - started) / 1000)
                side.session.commit()
                client[index] += time.process_time() - cpu
    finally:
        gc.enable()
    results = []
    for index, (side, _) in enumerate(sides):
        after, before = backend_cpu_seconds(side.backend_pid), server_before[index]
        server = None if after is None or before is None else after - before
        results.append(_finish(durations[index], server, client[index], len(arguments)))
    return results[0], results[1]


def _side_summary(reps: Sequence[Repetition]) -> dict[str, Any]:
    server = [r.server_cpu_us for r in reps if r.server_cpu_us is not None]
    return {
        "p50_us": summary([r.p50_us for r in reps]),
        "p95_us": summary([r.p95_us for r in reps]),
        "server_cpu_us_per_call": summary(server) if server else None,
        "client_cpu_us_per_call": summary([r.client_cpu_us for r in reps]),
    }


def compare(
    engine: Engine,
    keyring: KeyRing,
    *,
    encrypted: Call,
    plaintext: Call,
    make_arguments: Callable[[random.Random, int], list[dict[str, Any]]],
    calls: int,
    repeat: int,
    seed: int,
) -> dict[str, Any]:
    """Encrypted and plaintext calls, interleaved; ratios are per repetition."""
    rng = random.Random(seed)
    with engine.connect() as enc_conn, engine.connect() as plain_conn:
        enc, pln = open_side(enc_conn, keyring), open_side(plain_conn, keyring)
        warm = make_arguments(rng, min(calls, 200))
        timed_pairs((enc, encrypted), (pln, plaintext), warm)
        enc_reps, plain_reps = [], []
        for _ in range(repeat):
            enc_rep, plain_rep = timed_pairs(
                (enc, encrypted), (pln, plaintext), make_arguments(rng, calls)
            )
            enc_reps.append(enc_rep)
            plain_reps.append(plain_rep)
        enc.session.close()
        pln.session.close()
    return {
        "calls_per_repetition": calls,
        "encrypted": _side_summary(enc_reps),
        "plaintext": _side_summary(plain_reps),
        "ratio_p50": summary(ratios([r.p50_us for r in enc_reps], [r.p50_us for r in plain_reps])),
        "ratio_p95": summary(ratios([r.p95_us for r in enc_reps], [r.p95_us for r in plain_reps])),
    }


def read_arguments(rows: int) -> Callable[[random.Random, int], list[dict[str, Any]]]:
    """Random existing (user, provider) pairs, uniformly over the table."""

    def make(rng: random.Random, count: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            user, provider = seeded_identity(rng.randrange(rows))
            out.append({"user_id": user, "provider": provider})
        return out

    return make


def write_arguments(rows: int) -> Callable[[random.Random, int], list[dict[str, Any]]]:
    """Token refreshes of random existing rows: new access and refresh token, new expiry."""

    def make(rng: random.Random, count: int) -> list[dict[str, Any]]:
        out = []
        expiry = datetime.now(UTC) + timedelta(days=30)
        for _ in range(count):
            user, provider = seeded_identity(rng.randrange(rows))
            out.append(
                {
                    "user_id": user,
                    "provider": provider,
                    "access_token": "ya29." + rng.randbytes(96).hex(),
                    "refresh_token": "1//" + rng.randbytes(48).hex(),
                    "expires_at": expiry,
                    "scope": "https://www.googleapis.com/auth/calendar.readonly",
                }
            )
        return out

    return make


def measure_read(
    engine: Engine, keyring: KeyRing, *, rows: int, calls: int, repeat: int
) -> dict[str, Any]:
    """get_valid_token vs the plaintext read, on a table of ``rows`` integrations."""
    result = compare(
        engine,
        keyring,
        encrypted=lambda session, kw: get_valid_token(session, **kw),
        plaintext=lambda session, kw: plaintext_get_token(session, **kw),
        make_arguments=read_arguments(rows),
        calls=calls,
        repeat=repeat,
        seed=rows,
    )
    return {"rows": rows, **result}


def measure_write(
    engine: Engine, keyring: KeyRing, *, rows: int, calls: int, repeat: int
) -> dict[str, Any]:
    """upsert_integration vs the plaintext upsert (update of an existing row, both tokens)."""
    result = compare(
        engine,
        keyring,
        encrypted=lambda session, kw: upsert_integration(session, **kw),
        plaintext=lambda session, kw: plaintext_upsert(session, **kw),
        make_arguments=write_arguments(rows),
        calls=calls,
        repeat=repeat,
        seed=rows + 1,
    )
    return {"rows": rows, **result}
