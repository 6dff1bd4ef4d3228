"""The operator's view: alembic upgrade/downgrade on databases full of real rows."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from princeps_db.crypto import KeyRing, TokenKind, generate_master_key
from princeps_db.migration_steps import MIGRATION_GUC
from princeps_db.models import Base
from princeps_db.pgserver import LocalPostgres, find_pg_bindir
from tests.conftest import TEST_KEY, TEST_KEYRING
from tests.support import (
    REPO_ROOT,
    alembic_cli,
    alembic_config,
    alembic_popen,
    alembic_run,
    decrypt_all,
    seed_legacy_rows,
)


def _columns(url: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        names = set(
            connection.execute(
                sa.text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'Integration'"
                )
            ).scalars()
        )
    engine.dispose()
    return names


def _plaintext(url: str) -> dict[str, tuple[str, str | None]]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text('SELECT id, "accessToken", "refreshToken" FROM "Integration"')
        ).all()
    engine.dispose()
    return {row.id: (row.accessToken, row.refreshToken) for row in rows}


def _pg_dump(url: str, local_postgres: LocalPostgres) -> str:
    dbname = url.rsplit("/", 1)[1]
    result = subprocess.run(
        [
            str(find_pg_bindir() / "pg_dump"),
            "-h",
            local_postgres.host,
            "-p",
            str(local_postgres.port),
            "-U",
            local_postgres.user,
            dbname,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_there_is_exactly_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1


def test_upgrade_downgrade_upgrade_round_trip_on_an_empty_database(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)
    assert "accessTokenEncrypted" in _columns(blank_url)
    alembic_run(blank_url, "downgrade", "base", keyring=TEST_KEYRING)
    assert _columns(blank_url) == set()
    alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)
    assert "accessToken" not in _columns(blank_url)


def test_models_match_the_migrated_schema(head_url: str) -> None:
    engine = sa.create_engine(head_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_backfill_encrypts_every_legacy_row_and_downgrade_restores_them(
    blank_url: str, local_postgres: LocalPostgres
) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    rows = seed_legacy_rows(blank_url, 3000)
    original = _plaintext(blank_url)
    assert sum(1 for r in rows if r.refresh_token is None) == 300

    alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)

    assert {"accessToken", "refreshToken"}.isdisjoint(_columns(blank_url))
    assert decrypt_all(blank_url, TEST_KEYRING) == original
    dump = _pg_dump(blank_url, local_postgres)
    assert 'COPY public."Integration"' in dump
    # Every seeded access token starts with ya29. and every refresh token with 1//.
    assert "ya29." not in dump
    assert "1//" not in dump
    assert not any(r.access_token[:40] in dump for r in rows[:200])

    alembic_run(blank_url, "downgrade", "0001_baseline", keyring=TEST_KEYRING)
    assert _plaintext(blank_url) == original
    assert "accessTokenEncrypted" not in _columns(blank_url)


def _encrypted_count(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        count: int = connection.execute(
            sa.text('SELECT count(*) FROM "Integration" WHERE "accessTokenEncrypted" IS NOT NULL')
        ).scalar_one()
    engine.dispose()
    return count


def test_legacy_and_new_writes_during_the_backfill_window_are_kept(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 40)
    alembic_run(blank_url, "upgrade", "0003_backfill", keyring=TEST_KEYRING)
    key = TEST_KEYRING.current
    engine = sa.create_engine(blank_url)
    with engine.begin() as connection:
        # The old application, still running, rotates a token in plaintext.
        connection.execute(
            sa.text(
                'UPDATE "Integration" SET "accessToken" = \'legacy-new-token\' '
                "WHERE id = 'int-000001'"
            )
        )
        # The new application writes only ciphertext to another row.
        row = connection.execute(
            sa.text('SELECT "userId", provider FROM "Integration" WHERE id = \'int-000002\'')
        ).one()
        derived = key.derive_token_key(
            user_id=row.userId, provider=row.provider, kind=TokenKind.ACCESS
        )
        connection.execute(
            sa.text(
                'UPDATE "Integration" SET "accessTokenEncrypted" = '
                "pgp_sym_encrypt('new-app-token', :k, 'cipher-algo=aes256'), "
                "\"refreshTokenEncrypted\" = NULL WHERE id = 'int-000002'"
            ),
            {"k": derived},
        )
        states = {
            r.id: r
            for r in connection.execute(
                sa.text(
                    'SELECT id, "accessToken", "accessTokenEncrypted" IS NULL AS voided '
                    "FROM \"Integration\" WHERE id IN ('int-000001', 'int-000002')"
                )
            )
        }
    engine.dispose()
    assert states["int-000001"].voided, "stale ciphertext beside new plaintext must be voided"
    assert states["int-000002"].accessToken is None, "stale plaintext must be voided"

    alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)
    tokens = decrypt_all(blank_url, TEST_KEYRING)
    assert tokens["int-000001"][0] == "legacy-new-token"
    assert tokens["int-000002"] == ("new-app-token", None)
    assert len(tokens) == 40


def test_contract_refuses_when_a_ciphertext_does_not_match_its_plaintext(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 20)
    alembic_run(blank_url, "upgrade", "0003_backfill", keyring=TEST_KEYRING)
    engine = sa.create_engine(blank_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"SET {MIGRATION_GUC} = 'on'"))
        connection.execute(
            sa.text(
                'UPDATE "Integration" SET "accessTokenEncrypted" = '
                '(SELECT "accessTokenEncrypted" FROM "Integration" WHERE id = \'int-000004\') '
                "WHERE id = 'int-000006'"
            )
        )
    engine.dispose()
    with pytest.raises(SystemExit, match="int-000006") as refused:
        alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)
    assert "ya29" not in str(refused.value)
    assert "accessToken" in _columns(blank_url), "nothing may be dropped after a refusal"


def test_upgrade_with_a_wrong_key_refuses_to_drop_the_plaintext(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 10)
    alembic_run(blank_url, "upgrade", "0003_backfill", keyring=TEST_KEYRING)
    other = KeyRing.from_texts(generate_master_key())
    with pytest.raises(SystemExit, match="10 row"):
        alembic_run(blank_url, "upgrade", "head", keyring=other)
    assert "accessToken" in _columns(blank_url)


def test_alembic_in_production_without_a_key_stops_before_touching_the_database(
    blank_url: str,
) -> None:
    result = alembic_cli(blank_url, "upgrade", "head", env={"PRINCEPS_ENV": "production"})
    assert result.returncode != 0
    assert "INTEGRATION_TOKEN_ENCRYPTION_KEY" in result.stderr
    assert "keygen" in result.stderr
    assert "Traceback" not in result.stderr
    assert _columns(blank_url) == set()


def test_alembic_with_a_short_key_fails_clearly(blank_url: str) -> None:
    result = alembic_cli(
        blank_url,
        "upgrade",
        "head",
        env={"PRINCEPS_ENV": "production", "INTEGRATION_TOKEN_ENCRYPTION_KEY": "c2hvcnQ"},
    )
    assert result.returncode != 0
    assert "malformed" in result.stderr
    assert "c2hvcnQ" not in result.stderr
    assert _columns(blank_url) == set()


def test_a_nonsense_batch_size_is_refused(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0002_expand", keyring=TEST_KEYRING)
    result = alembic_cli(
        blank_url,
        "-x",
        "batch_size=lots",
        "upgrade",
        "head",
        env={"INTEGRATION_TOKEN_ENCRYPTION_KEY": TEST_KEY},
    )
    assert result.returncode != 0
    assert re.search(r"batch_size must be a whole number", result.stderr)


def test_backfill_logs_progress_per_batch(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 120)
    result = alembic_cli(
        blank_url,
        "-x",
        "batch_size=50",
        "upgrade",
        "0003_backfill",
        env={"INTEGRATION_TOKEN_ENCRYPTION_KEY": TEST_KEY},
    )
    assert result.returncode == 0, result.stderr
    assert "encrypt: batch 3 committed, 120/120 rows" in result.stderr
    assert TEST_KEY not in result.stderr + result.stdout


def test_migration_files_do_not_import_the_live_models() -> None:
    for path in Path(REPO_ROOT / "alembic" / "versions").glob("*.py"):
        assert "princeps_db.models" not in path.read_text(), path.name


@pytest.mark.slow
def test_the_backfill_holds_no_table_lock_while_the_application_writes(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    seed_legacy_rows(blank_url, 3000)
    alembic_run(blank_url, "upgrade", "0002_expand", keyring=TEST_KEYRING)
    process = alembic_popen(
        blank_url, "-x", "batch_size=20", "upgrade", "0003_backfill", key=TEST_KEY
    )
    engine = sa.create_engine(blank_url)
    writes = 0
    try:
        while _encrypted_count(blank_url) < 300:
            assert process.poll() is None
            time.sleep(0.02)
        while process.poll() is None and writes < 20:
            with engine.begin() as connection:
                connection.execute(sa.text("SET LOCAL lock_timeout = '1s'"))
                strong_locks = connection.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.application_name = 'princeps-db-migrate' "
                        "AND l.locktype = 'relation' "
                        "AND l.relation = '\"Integration\"'::regclass "
                        "AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', "
                        "'ExclusiveLock', 'AccessExclusiveLock')"
                    )
                ).scalar_one()
                assert strong_locks == 0
                # A legacy writer keeps working: insert and update, each within 1 s.
                connection.execute(
                    sa.text(
                        'INSERT INTO "Integration" (id, "userId", provider, "accessToken") '
                        "VALUES (:id, 'user-000000', :p, 'ya29.written-during-backfill') "
                        "ON CONFLICT DO NOTHING"
                    ),
                    {"id": f"live-{writes}", "p": f"provider-{writes}"},
                )
                connection.execute(
                    sa.text('UPDATE "Integration" SET "accessToken" = :t WHERE id = :id'),
                    {"t": f"ya29.updated-{writes}", "id": f"int-{2999 - writes:06d}"},
                )
            writes += 1
    finally:
        process.wait(timeout=300)
        engine.dispose()
    assert process.returncode == 0
    assert writes > 0, "the backfill finished before the application could write"


def test_the_check_constraints_carry_the_names_the_downgrade_drops(head_url: str) -> None:
    engine = sa.create_engine(head_url)
    with engine.connect() as connection:
        names = set(
            connection.execute(
                sa.text(
                    "SELECT conname FROM pg_constraint "
                    "WHERE conrelid = '\"Integration\"'::regclass AND contype = 'c'"
                )
            ).scalars()
        )
    engine.dispose()
    assert names == {
        "Integration_accessTokenEncrypted_check",
        "Integration_refreshTokenEncrypted_check",
        "Integration_status_check",  # added and dropped by 0004_integration_status
    }


def test_the_new_code_runs_in_the_migration_window(blank_url: str) -> None:
    """After 0004 the new code reads and writes; a row the legacy code rewrote says what to do."""
    from princeps_db import TokenDecryptionError, create_session_factory, upsert_integration
    from princeps_db import get_valid_token as read_token

    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    rows = seed_legacy_rows(blank_url, 6)
    alembic_run(blank_url, "upgrade", "0004_integration_status", keyring=TEST_KEYRING)
    engine = sa.create_engine(blank_url, hide_parameters=True)
    sessions = create_session_factory(engine, keyring=TEST_KEYRING)
    with sessions() as session:
        assert read_token(session, user_id=rows[1].user_id, provider=rows[1].provider) == (
            rows[1].access_token
        )
        upsert_integration(
            session,
            user_id=rows[2].user_id,
            provider=rows[2].provider,
            access_token="ya29.new-code",
            refresh_token=None,
            expires_at=None,
        )
        session.commit()
        with engine.begin() as legacy:
            legacy.execute(
                sa.text('UPDATE "Integration" SET "accessToken" = \'ya29.legacy\' WHERE id = :id'),
                {"id": rows[3].id},
            )
        with pytest.raises(TokenDecryptionError, match="alembic upgrade head"):
            read_token(session, user_id=rows[3].user_id, provider=rows[3].provider)
    engine.dispose()
    alembic_run(blank_url, "upgrade", "head", keyring=TEST_KEYRING)
    tokens = decrypt_all(blank_url, TEST_KEYRING)
    assert tokens[rows[2].id] == ("ya29.new-code", rows[2].refresh_token)
    assert tokens[rows[3].id][0] == "ya29.legacy"
