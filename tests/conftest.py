"""Fixtures: one real PostgreSQL server per test run, a fresh database per test.

The server is a throwaway ``LocalPostgres`` (run as ``nobody`` when the tests
run as root); pytest-postgresql builds template databases on it and clones
one for each test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from princeps_db.config import Environment, Settings, get_settings
from princeps_db.crypto import KeyRing, generate_master_key
from princeps_db.db import create_engine, create_session_factory
from princeps_db.pgserver import LocalPostgres
from tests.support import alembic_run

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = generate_master_key()
TEST_KEYRING = KeyRing.from_texts(TEST_KEY)

_ISOLATED_ENV_PREFIXES = ("INTEGRATION_TOKEN_", "PRINCEPS_", "DATABASE_URL", "GOOGLE_")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Keep the developer's own environment and .env out of every test."""
    for name in list(os.environ):
        if name.startswith(_ISOLATED_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def local_postgres() -> Iterator[LocalPostgres]:
    """The PostgreSQL server every test database lives on."""
    with LocalPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server(local_postgres: LocalPostgres) -> NoopExecutor:
    """The server, in the shape pytest-postgresql's factories expect.

    Databases built on it start from ``princeps_tmpl``, an empty template.
    """
    executor = NoopExecutor(
        host=local_postgres.host,
        port=local_postgres.port,
        user=local_postgres.user,
        options="",
        dbname="princeps",
    )
    with psycopg.connect(
        host=executor.host,
        port=executor.port,
        user=executor.user,
        dbname="postgres",
        autocommit=True,
    ) as connection:
        connection.execute(f'CREATE DATABASE "{executor.template_dbname}" IS_TEMPLATE true')
    return executor


def _migrate_template(*, host: str, port: int, user: str, dbname: str, **_: object) -> None:
    """Build the template database with the real migrations."""
    url = f"postgresql+psycopg://{user}@{host}:{port}/{dbname}"
    alembic_run(url, "upgrade", "head", keyring=TEST_KEYRING)


pg_head = factories.postgresql_noproc(
    depends_on="pg_server", dbname="head", load=[_migrate_template]
)
pg_blank = factories.postgresql_noproc(depends_on="pg_server", dbname="blank")
head_db = factories.postgresql("pg_head")
blank_db = factories.postgresql("pg_blank")


def connection_url(connection: psycopg.Connection) -> str:
    """SQLAlchemy URL of the database a psycopg connection is attached to."""
    info = connection.info
    return f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{info.dbname}"


@pytest.fixture
def head_url(head_db: psycopg.Connection) -> str:
    """URL of a fresh database migrated to head."""
    return connection_url(head_db)


@pytest.fixture
def blank_url(blank_db: psycopg.Connection) -> str:
    """URL of a fresh, empty database (no migrations applied)."""
    return connection_url(blank_db)


def make_settings(url: str, key: str = TEST_KEY, **overrides: object) -> Settings:
    """Settings for a test database; nothing is read from the environment that matters."""
    values: dict[str, object] = {
        "database_url": SecretStr(url),
        "integration_token_encryption_key": SecretStr(key),
        "princeps_env": Environment.TEST,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def engine(head_url: str) -> Iterator[Engine]:
    """An engine on a fresh migrated database."""
    created = create_engine(make_settings(head_url), application_name="princeps-db-tests")
    yield created
    created.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions carrying the test key ring."""
    return create_session_factory(engine, keyring=TEST_KEYRING)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session; the test commits what it wants to keep."""
    with session_factory() as opened:
        yield opened


@pytest.fixture
def raw(engine: Engine) -> Iterator[sa.Connection]:
    """A plain connection for looking at (and tampering with) what is stored."""
    with engine.connect() as connection:
        yield connection
