"""The audit suite (sql/audit and ``princeps-db audit``) on real PostgreSQL servers.

Checks that change cluster-wide state (roles, role settings, server settings)
run on servers of their own, so the shared test server stays untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from princeps_db.audit import AuditResult, Status, audit_files, run_audit
from princeps_db.crypto import generate_master_key
from princeps_db.db import create_session_factory
from princeps_db.pgserver import LocalPostgres
from princeps_db.repository import create_user, upsert_integration
from tests.conftest import TEST_KEY, TEST_KEYRING
from tests.support import REPO_ROOT, alembic_run, seed_legacy_rows

PACKAGED_AUDIT_DIR = REPO_ROOT / "princeps_db" / "sql" / "audit"
TOP_LEVEL_AUDIT_DIR = REPO_ROOT / "sql" / "audit"
PSQL = os.environ.get("PRINCEPS_PSQL", "/usr/bin/psql")


def libpq_url(url: str) -> str:
    """The psql spelling of a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def audit(url: str, **kwargs: object) -> list[AuditResult]:
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        return run_audit(engine, **kwargs)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def rows_of(results: list[AuditResult], check: str) -> list[AuditResult]:
    return [r for r in results if r.check == check]


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]


def cli(url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INTEGRATION_TOKEN_", "DATABASE_URL", "PRINCEPS_"))
    }
    env["PRINCEPS_ENV"] = "production"  # the audit must not need a key
    if url is not None:
        env["DATABASE_URL"] = libpq_url(url)
    return subprocess.run(
        [sys.executable, "-m", "princeps_db", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def psql(
    url: str, script: Path, *variables: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATION_TOKEN_")}
    env.pop("PGOPTIONS", None)
    if key is not None:
        env["INTEGRATION_TOKEN_ENCRYPTION_KEY"] = key
    command = [PSQL, "-X", "-v", "ON_ERROR_STOP=1", "-d", libpq_url(url)]
    for variable in variables:
        command += ["-v", variable]
    return subprocess.run(
        [*command, "-f", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- servers and databases of our own ---------------------------------------------


class Cluster:
    """A LocalPostgres with a migrated template; every test gets a fresh copy."""

    def __init__(self, server: LocalPostgres) -> None:
        self.server = server
        execute(server.url, "CREATE DATABASE audit_template")
        alembic_run(server.database_url("audit_template"), "upgrade", "head", keyring=TEST_KEYRING)

    def fresh_database(self) -> str:
        name = f"audit_{uuid.uuid4().hex[:8]}"
        execute(self.server.url, f"CREATE DATABASE {name} TEMPLATE audit_template")
        return self.server.database_url(name)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A server with default settings, for checks that create roles and role settings."""
    with LocalPostgres() as server:
        yield Cluster(server)


@pytest.fixture(scope="module")
def leaky_cluster() -> Iterator[Cluster]:
    """A server that logs every statement and keeps pg_stat_statements."""
    settings = {"log_statement": "all", "shared_preload_libraries": "pg_stat_statements"}
    with LocalPostgres(server_settings=settings) as server:
        yield Cluster(server)


@pytest.fixture
def roles(cluster: Cluster) -> Iterator[list[str]]:
    """Role names a test creates on ``cluster``; they are dropped afterwards."""
    created: list[str] = []
    yield created
    for role in created:
        with psycopg.connect(libpq_url(cluster.server.url), autocommit=True) as connection:
            databases = connection.execute(
                "SELECT datname FROM pg_database WHERE datallowconn"
            ).fetchall()
        for (database,) in databases:
            execute(cluster.server.database_url(database), f"DROP OWNED BY {role}")
        execute(cluster.server.url, f"DROP ROLE {role}")


def owned_by_dedicated_role(url: str, roles: list[str]) -> None:
    """Give "Integration" the owner a production database would have: not a superuser."""
    role = f"princeps_owner_{uuid.uuid4().hex[:6]}"
    roles.append(role)
    execute(url, f"CREATE ROLE {role}", f'ALTER TABLE "Integration" OWNER TO {role}')


def store_tokens(url: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    """Write integrations through the repository; return (user, provider) -> tokens."""
    engine = sa.create_engine(url, hide_parameters=True)
    tokens = {
        ("user-a", "google_calendar"): ("ya29.access-a-calendar-ÄÖ", "1//refresh-a-calendar"),
        ("user-a", "google_drive"): ("ya29.access-a-drive", None),
        ("user-b", "google_calendar"): ("ya29.access-b-calendar", "1//refresh-b-calendar"),
    }
    factory = create_session_factory(engine, keyring=TEST_KEYRING)
    with factory() as session, session.begin():
        for user in ("user-a", "user-b"):
            create_user(session, user_id=user, email=f"{user}@example.com")
        for (user, provider), (access, refresh) in tokens.items():
            upsert_integration(
                session,
                user_id=user,
                provider=provider,
                access_token=access,
                refresh_token=refresh,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
    engine.dispose()
    return tokens


@pytest.fixture
def backfilled_url(blank_url: str) -> str:
    """A database stopped after the backfill: ciphertext written, plaintext still beside it."""
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 40)
    alembic_run(blank_url, "upgrade", "0003_backfill", keyring=TEST_KEYRING)
    return blank_url


# --- the files ----------------------------------------------------------------------


def test_top_level_sql_is_an_identical_copy_of_the_packaged_sql() -> None:
    packaged = {p.name: p.read_bytes() for p in PACKAGED_AUDIT_DIR.glob("*.sql")}
    top_level = {p.name: p.read_bytes() for p in TOP_LEVEL_AUDIT_DIR.glob("*.sql")}
    assert packaged, "no packaged audit SQL"
    assert top_level == packaged, (
        "sql/audit must be a copy of princeps_db/sql/audit: "
        "cp princeps_db/sql/audit/*.sql sql/audit/"
    )


def test_all_sql_runs_every_check_except_break_glass() -> None:
    files = {p.name for p in PACKAGED_AUDIT_DIR.glob("*.sql")}
    assert set(audit_files()) == files - {"all.sql", "break_glass_decrypt.sql"}


@pytest.mark.parametrize("path", sorted(PACKAGED_AUDIT_DIR.glob("*.sql")), ids=lambda p: p.name)
def test_every_file_starts_with_what_how_to_run_and_how_to_read(path: Path) -> None:
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
    assert text.startswith("-- princeps-db")
    for heading in ("HOW TO RUN", "HOW TO READ"):
        assert heading in header
    assert "WHAT IT CHECKS" in header or "WHAT IT DOES" in header


# --- a clean database -------------------------------------------------------------------


def test_clean_database_passes_every_check(cluster: Cluster, roles: list[str]) -> None:
    url = cluster.fresh_database()
    owned_by_dedicated_role(url, roles)
    store_tokens(url)

    results = audit(url)

    version = rows_of(results, "server version")
    with psycopg.connect(libpq_url(url)) as connection:
        version_num = int(connection.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    assert [r.status for r in version] == [Status.PASS if version_num >= 150019 else Status.WARN]
    others = [r for r in results if r.check != "server version"]
    assert {r.check for r in others} >= {
        "coverage",
        "ciphertext format",
        "server setting",
        "role/database override",
        "pg_stat_statements",
        "privileges",
    }
    assert [r for r in others if r.status is not Status.PASS] == []
    coverage = {r.subject for r in rows_of(results, "coverage")}
    key_id = TEST_KEYRING.current.key_id
    assert f"2 row(s) encrypted: provider google_calendar, key id {key_id}" in coverage


# --- coverage and format ------------------------------------------------------------------


def test_plaintext_left_at_the_backfill_stage_fails_coverage(backfilled_url: str) -> None:
    results = audit(backfilled_url)

    coverage = rows_of(results, "coverage")
    failing = [r for r in coverage if r.status is Status.FAIL]
    assert {r.subject.split(":")[0] for r in failing} == {"20 row(s) plaintext beside ciphertext"}
    assert any("int-000000" in r.subject for r in failing)
    assert any(r.status is Status.WARN and "still exist" in r.subject for r in coverage)
    assert any(
        r.status is Status.WARN and "no CHECK constraint" in r.subject
        for r in rows_of(results, "ciphertext format")
    )


def test_rows_never_encrypted_fail_coverage_at_the_baseline(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 4)

    failing = [r for r in audit(blank_url) if r.status is Status.FAIL]

    assert {r.subject.split(":")[0] for r in failing} == {"2 row(s) plaintext"}
    assert {r.check for r in failing} == {"coverage"}


def test_foreign_ciphertext_fails_the_format_check(backfilled_url: str) -> None:
    execute(
        backfilled_url,
        # Blowfish cannot be written on a patched server: forge its header byte.
        """UPDATE "Integration" SET "accessTokenEncrypted" =
           set_byte(pgp_sym_encrypt('t', 'k', 'cipher-algo=aes256'), 3, 4)
           WHERE id = 'int-000001'""",
        """UPDATE "Integration" SET "accessTokenEncrypted" =
           pgp_sym_encrypt('t', 'k', 'cipher-algo=aes256, disable-mdc=1')
           WHERE id = 'int-000002'""",
        """UPDATE "Integration" SET "refreshTokenEncrypted" =
           pgp_sym_encrypt('t', 'k', 'cipher-algo=aes128') WHERE id = 'int-000003'""",
        """UPDATE "Integration" SET "refreshTokenEncrypted" =
           pgp_sym_encrypt('t', 'k', 'cipher-algo=aes256, s2k-mode=0') WHERE id = 'int-000004'""",
        """UPDATE "Integration" SET "accessTokenEncrypted" =
           convert_to('ya29.stored-as-bytes', 'UTF8') WHERE id = 'int-000005'""",
    )

    failing = {
        r.subject
        for r in rows_of(audit(backfilled_url), "ciphertext format")
        if r.status is Status.FAIL
    }

    assert failing == {
        '1 "accessTokenEncrypted" value(s): cipher Blowfish (bf), not AES-256 (ids: int-000001)',
        '1 "accessTokenEncrypted" value(s): no MDC integrity check (ids: int-000002)',
        '1 "refreshTokenEncrypted" value(s): cipher AES-128, not AES-256 (ids: int-000003)',
        '1 "refreshTokenEncrypted" value(s): S2K mode 0 (unsalted), not 1 or 3 (ids: int-000004)',
        '1 "accessTokenEncrypted" value(s): not a pgcrypto symmetric message (ids: int-000005)',
    }


def test_format_check_fails_at_head_once_the_constraint_is_gone(head_url: str) -> None:
    store_tokens(head_url)
    with psycopg.connect(libpq_url(head_url), autocommit=True) as connection:
        names = connection.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = '\"Integration\"'::regclass "
            "AND contype = 'c'"
        ).fetchall()
        for (name,) in names:
            connection.execute(f'ALTER TABLE "Integration" DROP CONSTRAINT "{name}"')  # type: ignore[arg-type]
        connection.execute(
            """UPDATE "Integration" SET "accessTokenEncrypted" =
               pgp_sym_encrypt('t', 'k', 'cipher-algo=aes256, disable-mdc=1')
               WHERE "userId" = 'user-b'"""
        )

    fmt = rows_of(audit(head_url), "ciphertext format")

    assert [r.status for r in fmt if "no MDC" in r.subject] == [Status.FAIL]
    assert [r.status for r in fmt if "no CHECK constraint" in r.subject] == [Status.WARN]


# --- server settings ---------------------------------------------------------------------


def test_role_and_database_overrides_are_reported(cluster: Cluster, roles: list[str]) -> None:
    url = cluster.fresh_database()
    database = url.rsplit("/", 1)[1]
    role = f"leaky_{uuid.uuid4().hex[:6]}"
    roles.append(role)
    execute(
        url,
        f"CREATE ROLE {role} LOGIN",
        f"ALTER ROLE {role} IN DATABASE {database} SET log_parameter_max_length_on_error = -1",
        f"ALTER DATABASE {database} SET debug_print_plan = on",
        f"ALTER ROLE {role} IN DATABASE {database} SET princeps.token_key = 'do-not-print-me'",
    )

    overrides = {
        r.subject: r
        for r in rows_of(audit(url), "role/database override")
        if r.status is not Status.PASS
    }

    on_error = overrides[
        f"log_parameter_max_length_on_error = '-1' for role {role} in database {database}"
    ]
    assert on_error.status is Status.FAIL
    assert on_error.remedy == (
        f"ALTER ROLE {role} IN DATABASE {database} RESET log_parameter_max_length_on_error"
    )
    assert overrides[f"debug_print_plan = 'on' for database {database}"].status is Status.FAIL
    secret = overrides[
        f"princeps.token_key is set for role {role} in database {database} (value not shown)"
    ]
    assert secret.status is Status.FAIL
    assert all("do-not-print-me" not in r.subject + r.remedy for r in overrides.values())


def test_a_server_that_logs_every_statement_fails(leaky_cluster: Cluster) -> None:
    url = leaky_cluster.fresh_database()

    settings = rows_of(audit(url), "server setting")

    log_statement = [r for r in settings if r.subject.startswith("log_statement")]
    assert [(r.status, r.remedy) for r in log_statement] == [
        (Status.FAIL, "ALTER SYSTEM SET log_statement = 'ddl'")
    ]


def test_log_parameter_max_length_zero_keeps_statement_logging_from_failing(
    leaky_cluster: Cluster,
) -> None:
    url = leaky_cluster.fresh_database()
    database = url.rsplit("/", 1)[1]
    execute(url, f"ALTER DATABASE {database} SET log_parameter_max_length = 0")

    overrides = rows_of(audit(url), "role/database override")
    settings = rows_of(audit(url), "server setting")

    assert [r.status for r in settings if r.subject.startswith("log_statement")] == [Status.PASS]
    assert all(r.status is Status.PASS for r in overrides)


def test_pg_stat_statements_entries_with_literal_keys_fail(leaky_cluster: Cluster) -> None:
    url = leaky_cluster.fresh_database()
    execute(
        url,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        "SELECT pg_stat_statements_reset()",
        "CREATE TEMP TABLE leaked AS "
        "SELECT pgp_sym_encrypt('ya29.leaked-token', 'literal-key-0123')",
    )

    (row,) = rows_of(audit(url), "pg_stat_statements")
    assert row.status is Status.FAIL
    assert "literal" in row.subject
    assert "literal-key-0123" not in row.subject + row.remedy

    execute(url, "SELECT pg_stat_statements_reset()")
    (row,) = rows_of(audit(url), "pg_stat_statements")
    assert row.status is Status.PASS


# --- privileges --------------------------------------------------------------------------


def test_privileges_warn_on_unexpected_roles_and_fail_on_public(
    cluster: Cluster, roles: list[str]
) -> None:
    url = cluster.fresh_database()
    owned_by_dedicated_role(url, roles)
    app_role, reader = f"app_{uuid.uuid4().hex[:6]}", f"reader_{uuid.uuid4().hex[:6]}"
    roles += [app_role, reader]
    execute(
        url,
        f"CREATE ROLE {app_role} LOGIN",
        f"CREATE ROLE {reader} LOGIN",
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON "Integration" TO {app_role}',
        f'GRANT SELECT ("accessTokenEncrypted") ON "Integration" TO {reader}',
    )

    def statuses(results: list[AuditResult]) -> dict[str, Status]:
        return {r.subject.split(":")[0]: r.status for r in rows_of(results, "privileges")}

    found = statuses(audit(url))
    assert found[f"role {app_role}"] is Status.WARN
    assert found[f"role {reader}"] is Status.WARN

    found = statuses(audit(url, allowed_roles=[app_role]))
    assert found[f"role {app_role}"] is Status.PASS
    assert found[f"role {reader}"] is Status.WARN

    execute(url, 'GRANT SELECT ON "Integration" TO PUBLIC')
    found = statuses(audit(url, allowed_roles=[app_role, reader]))
    assert found["PUBLIC (every role)"] is Status.FAIL


# --- psql ----------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["0001_baseline", "0002_expand", "0003_backfill", "head"])
def test_psql_runs_all_sql_at_every_migration_stage(blank_url: str, revision: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 6)
    alembic_run(blank_url, "upgrade", revision, keyring=TEST_KEYRING)

    result = psql(blank_url, TOP_LEVEL_AUDIT_DIR / "all.sql")

    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stderr
    for title in ("coverage", "ciphertext format", "server settings", "privileges"):
        assert title in result.stdout
    expected = "PASS   | coverage" if revision == "head" else "FAIL   | coverage"
    assert expected in result.stdout


def test_break_glass_prints_the_right_token_with_the_key_from_the_environment(
    head_url: str, local_postgres: LocalPostgres
) -> None:
    tokens = store_tokens(head_url)
    script = TOP_LEVEL_AUDIT_DIR / "break_glass_decrypt.sql"
    common = ("user_id=user-a", "provider=google_calendar", "reason=INC-1: test")

    access = psql(head_url, script, *common, key=TEST_KEY)
    refresh = psql(head_url, script, *common, "token=refresh", key=TEST_KEY)

    assert access.returncode == 0, access.stderr
    assert access.stdout.strip() == tokens[("user-a", "google_calendar")][0]
    assert refresh.stdout.strip() == tokens[("user-a", "google_calendar")][1]
    assert "princeps-db break-glass: access_token of integration" in access.stderr
    assert "reason: INC-1: test" in access.stderr
    assert TEST_KEY not in access.stdout + access.stderr
    server_log = local_postgres.read_log()
    assert "LOG:  princeps-db break-glass: access_token of integration" in server_log
    assert TEST_KEY not in server_log


@pytest.mark.parametrize(
    ("key", "variables", "reason"),
    [
        ("other", ("user_id=user-a", "provider=google_calendar", "reason=x"), "key id"),
        (None, ("user_id=user-a", "provider=google_calendar", "reason=x"), "not set"),
        ("short", ("user_id=user-a", "provider=google_calendar", "reason=x"), "base64url"),
        ("test", ("user_id=user-a", "provider=google_calendar"), "reason"),
        ("test", ("user_id=nobody", "provider=google_calendar", "reason=x"), "no integration"),
        ("test", ("user_id=user-a", "provider=google_drive", "reason=x", "token=refresh"), "no"),
    ],
)
def test_break_glass_refuses_without_printing_a_token(
    head_url: str, key: str | None, variables: tuple[str, ...], reason: str
) -> None:
    tokens = store_tokens(head_url)
    keys = {"other": generate_master_key(), "test": TEST_KEY, "short": "c2hvcnQ"}
    key_text = keys.get(key) if key else None

    result = psql(
        head_url, TOP_LEVEL_AUDIT_DIR / "break_glass_decrypt.sql", *variables, key=key_text
    )

    assert result.returncode == 3
    assert "break-glass refused" in result.stderr
    assert reason in result.stderr
    for access, refresh in tokens.values():
        assert access not in result.stdout + result.stderr
        assert refresh is None or refresh not in result.stdout + result.stderr


def test_break_glass_refuses_on_a_logging_server_before_the_key_is_sent(
    leaky_cluster: Cluster,
) -> None:
    url = leaky_cluster.fresh_database()
    store_tokens(url)

    result = psql(
        url,
        TOP_LEVEL_AUDIT_DIR / "break_glass_decrypt.sql",
        "user_id=user-a",
        "provider=google_calendar",
        "reason=x",
        key=TEST_KEY,
    )

    assert result.returncode == 3
    assert "log_statement = all" in result.stderr
    assert TEST_KEY not in leaky_cluster.server.read_log()


# --- the command line ----------------------------------------------------------------------


def test_cli_fails_with_exit_1_and_reveals_no_token(backfilled_url: str) -> None:
    table = cli(backfilled_url)
    report = cli(backfilled_url, "--json")

    assert table.returncode == 1, table.stderr
    assert "FAIL" in table.stdout and "coverage" in table.stdout
    assert report.returncode == 1
    parsed = json.loads(report.stdout)
    assert parsed["status"] == "FAIL"
    assert parsed["counts"]["FAIL"] >= 2
    assert {"status", "check", "subject", "remedy", "source"} <= set(parsed["results"][0])
    engine = sa.create_engine(backfilled_url)
    with engine.connect() as connection:
        secrets = connection.execute(
            sa.text('SELECT "accessToken", "refreshToken" FROM "Integration"')
        ).all()
    engine.dispose()
    output = table.stdout + table.stderr + report.stdout + report.stderr
    for access, refresh in secrets:
        assert access not in output
        assert refresh is None or refresh not in output


def test_cli_exits_0_when_nothing_fails(cluster: Cluster, roles: list[str]) -> None:
    url = cluster.fresh_database()
    owned_by_dedicated_role(url, roles)

    result = cli(url, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] in {"PASS", "WARN"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "DATABASE_URL is not set"),
        ("mysql://db/princeps", "must be a PostgreSQL URL"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/princeps", "cannot connect"),
    ],
)
def test_cli_configuration_errors_are_one_line_with_exit_2(url: str | None, message: str) -> None:
    result = cli(url)

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_on_a_database_without_the_table_exits_2(blank_url: str) -> None:
    result = cli(blank_url)

    assert result.returncode == 2
    assert 'no "Integration" table' in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_has_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "princeps_db", "audit", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0
    assert "Examples" in result.stdout
    assert "--json" in result.stdout


def test_run_audit_can_be_called_with_an_application_engine(engine: Engine) -> None:
    results = run_audit(engine)

    assert results
    assert all(isinstance(r.status, Status) for r in results)
