"""Bad input, table-driven: a named error (or a one-line CLI message), and nothing changed.

Every public repository function is called with each bad value in each of
its parameters; every command with each bad setting or argument. The
database is compared before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from princeps_db import (
    ConfigurationError,
    InvalidInputError,
    create_engine,
    create_session_factory,
    create_user,
    delete_integration,
    get_valid_token,
    list_integrations,
    load_settings,
    upsert_integration,
)
from princeps_db.pgserver import LocalPostgres
from tests.conftest import TEST_KEY, TEST_KEYRING, make_settings
from tests.security_support import (
    command_env,
    create_database,
    drop_database,
    princeps_db_argv,
    run_command,
    snapshot,
)
from tests.support import alembic_run

IN_AN_HOUR = datetime.now(UTC) + timedelta(hours=1)
ONE_MB = "x" * 1_000_000

GOOD_CALLS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "upsert_integration": (
        upsert_integration,
        {
            "user_id": "u1",
            "provider": "google_calendar",
            "access_token": "ya29.ok",
            "refresh_token": "1//ok",
            "expires_at": IN_AN_HOUR,
            "scope": "calendar",
        },
    ),
    "get_valid_token": (get_valid_token, {"user_id": "u1", "provider": "google_calendar"}),
    "list_integrations": (list_integrations, {"user_id": "u1"}),
    "delete_integration": (delete_integration, {"user_id": "u1", "provider": "google_calendar"}),
    "create_user": (create_user, {"email": "new@example.com", "user_id": "u-new"}),
}
# Parameters where None is a meaningful value, not a bad one.
NONE_ALLOWED = {"refresh_token", "expires_at", "scope", "create_user.user_id"}
TEXT_PARAMS = {"user_id", "provider", "access_token", "refresh_token", "scope", "email"}

BAD_VALUES: dict[str, Callable[[str, str], object]] = {
    "None": lambda fn, param: None if f"{fn}.{param}" not in NONE_ALLOWED else ...,
    "empty": lambda fn, param: "" if param in TEXT_PARAMS else ...,
    "blank": lambda fn, param: "   " if param in TEXT_PARAMS else ...,
    "int": lambda fn, param: 42,
    "bytes": lambda fn, param: b"ya29.bytes",
    "naive datetime": lambda fn, param: datetime(2030, 1, 1),
    "unknown provider": lambda fn, param: "dropbox" if param == "provider" else ...,
    "1 MB": lambda fn, param: ONE_MB if param in TEXT_PARAMS else ...,
    "NUL": lambda fn, param: "ya29.\x00evil" if param in TEXT_PARAMS else ...,
    "date as text": lambda fn, param: "2030-01-01T00:00:00Z" if param == "expires_at" else ...,
}


def _applies(fn: str, param: str, bad: str) -> object:
    value = BAD_VALUES[bad](fn, param)
    if bad == "None" and param in NONE_ALLOWED:
        return ...
    if bad == "naive datetime" and param in TEXT_PARAMS:
        return ...  # covered by "wrong type" for text parameters
    return value


FUNCTION_CASES = [
    (fn, param, bad, value)
    for fn, (_, good) in GOOD_CALLS.items()
    for param in good
    for bad in BAD_VALUES
    if (value := _applies(fn, param, bad)) is not ...
]


@pytest.fixture(scope="module")
def shared_url(local_postgres: LocalPostgres) -> Iterator[str]:
    """One database for the whole table: bad input never writes, and each test checks that."""
    url = create_database(local_postgres, "bad_input")
    alembic_run(url, "upgrade", "head", keyring=TEST_KEYRING)
    engine = create_engine(make_settings(url))
    with create_session_factory(engine, keyring=TEST_KEYRING)() as session:
        create_user(session, user_id="u1", email="u1@example.com")
        upsert_integration(
            session,
            user_id="u1",
            provider="google_calendar",
            access_token="ya29.existing",
            refresh_token="1//existing",
            expires_at=IN_AN_HOUR,
        )
        session.commit()
    engine.dispose()
    yield url
    drop_database(local_postgres, "bad_input")


@pytest.fixture(scope="module")
def shared_engine(shared_url: str) -> Iterator[Engine]:
    """The application's engine on the shared database."""
    engine = create_engine(make_settings(shared_url))
    yield engine
    engine.dispose()


@pytest.fixture
def seeded(shared_engine: Engine) -> Iterator[Session]:
    """A session on a database holding one user with one integration."""
    with create_session_factory(shared_engine, keyring=TEST_KEYRING)() as session:
        yield session


@pytest.mark.parametrize(
    ("fn", "param", "bad", "value"),
    FUNCTION_CASES,
    ids=[f"{fn}-{param}-{bad}" for fn, param, bad, _ in FUNCTION_CASES],
)
def test_each_function_refuses_each_bad_value_and_changes_nothing(
    seeded: Session, shared_url: str, fn: str, param: str, bad: str, value: object
) -> None:
    function, good = GOOD_CALLS[fn]
    before = snapshot(shared_url)
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(args[2])

    engine = seeded.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        with pytest.raises(InvalidInputError) as raised:
            function(seeded, **{**good, param: value})
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert len(message) < 300 and "\n" not in message
    assert "ya29" not in message
    assert sent == [], "bad input must be refused before any statement is sent"
    seeded.rollback()
    assert snapshot(shared_url) == before


def test_the_table_covers_every_function_and_bad_value() -> None:
    assert {fn for fn, *_ in FUNCTION_CASES} == set(GOOD_CALLS)
    assert {bad for _, _, bad, _ in FUNCTION_CASES} == set(BAD_VALUES)
    assert len(FUNCTION_CASES) >= 80


KEYED = ["upsert_integration", "get_valid_token"]


@pytest.mark.parametrize("fn", KEYED)
@pytest.mark.parametrize(
    "bad_key", ["c2hvcnQ", "not base64 !!!", ""], ids=["short", "junk", "empty"]
)
def test_functions_that_use_the_key_refuse_a_malformed_one_before_any_statement(
    seeded: Session,
    shared_url: str,
    monkeypatch: pytest.MonkeyPatch,
    fn: str,
    bad_key: str,
) -> None:
    monkeypatch.setenv("PRINCEPS_ENV", "production")
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", bad_key)
    function, good = GOOD_CALLS[fn]
    before = snapshot(shared_url)
    with Session(seeded.get_bind()) as bare, pytest.raises(ConfigurationError) as raised:
        function(bare, **good)  # no key ring attached: the settings decide
    assert "keygen" in str(raised.value)
    assert not bad_key or bad_key not in str(raised.value)
    assert snapshot(shared_url) == before


WRONG_URLS = {
    "unreachable port": ("postgresql://app:pw-in-url@127.0.0.1:1/princeps", OperationalError),
    "non-postgres scheme": ("mysql://app:pw-in-url@127.0.0.1/princeps", ConfigurationError),
    "not a URL": ("pw-in-url", ConfigurationError),
}


@pytest.mark.parametrize("fn", list(GOOD_CALLS))
@pytest.mark.parametrize("case", list(WRONG_URLS))
def test_a_wrong_database_url_is_a_named_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, fn: str, case: str
) -> None:
    url, expected = WRONG_URLS[case]
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INTEGRATION_TOKEN_ENCRYPTION_KEY", TEST_KEY)
    function, good = GOOD_CALLS[fn]
    with pytest.raises(expected) as raised:
        engine = create_engine(load_settings())
        try:
            with Session(engine) as session:
                function(session, **good)
        finally:
            engine.dispose()
    assert "pw-in-url" not in str(raised.value)


# The command line. NUL cannot be passed at all (the OS refuses it in argv and
# the environment), and one argument is limited to 128 KiB, so "huge" is 100 KB.
CLI_CASES: dict[str, tuple[list[str], dict[str, str | None]]] = {
    "migrate: no DATABASE_URL": (["migrate"], {"DATABASE_URL": None}),
    "migrate: empty DATABASE_URL": (["migrate"], {"DATABASE_URL": ""}),
    "migrate: unreachable DATABASE_URL": (
        ["migrate"],
        {"DATABASE_URL": "postgresql://app:pw-in-url@127.0.0.1:1/princeps"},
    ),
    "migrate: non-postgres DATABASE_URL": (
        ["migrate"],
        {"DATABASE_URL": "mysql://app:pw-in-url@127.0.0.1/princeps"},
    ),
    "migrate: no key (production)": (
        ["migrate"],
        {"INTEGRATION_TOKEN_ENCRYPTION_KEY": None, "PRINCEPS_ENV": "production"},
    ),
    "migrate: malformed key": (["migrate"], {"INTEGRATION_TOKEN_ENCRYPTION_KEY": "c2hvcnQ"}),
    "migrate: unknown PRINCEPS_ENV": (["migrate"], {"PRINCEPS_ENV": "staging"}),
    "migrate: batch size not a number": (["migrate", "--batch-size", "lots"], {}),
    "migrate: batch size zero": (["migrate", "--batch-size", "0"], {}),
    "migrate: empty batch size": (["migrate", "--batch-size", ""], {}),
    "migrate: huge argument": (["migrate", "--batch-size", "9" * 100_000], {}),
    "migrate: unexpected argument": (["migrate", "head", "extra"], {}),
    "keygen: unexpected argument": (["keygen", "extra"], {}),
    "keygen: unknown option": (["keygen", "--length", "16"], {}),
    "unknown command": (["rotate-everything"], {}),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_each_command_answers_bad_input_with_one_line_and_exit_code_2(
    blank_url: str, case: str
) -> None:
    args, overrides = CLI_CASES[case]
    env = command_env(blank_url, TEST_KEY)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = run_command(princeps_db_argv(*args), env, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for secret in ("pw-in-url", "c2hvcnQ", TEST_KEY):
        assert secret not in result.stderr
    assert snapshot_tables(blank_url) == set()


def snapshot_tables(url: str) -> set[str]:
    """Tables in the public schema: a refused migrate must not have created any."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return set(
                connection.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
    finally:
        engine.dispose()
