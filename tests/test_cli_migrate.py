"""``princeps-db migrate``: the operator's one-command upgrade, with progress."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_KEY, TEST_KEYRING
from tests.support import REPO_ROOT, alembic_run, decrypt_all, seed_legacy_rows

CLI = str(Path(sys.executable).parent / "princeps-db")


def _migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INTEGRATION_TOKEN_")},
        "DATABASE_URL": url,
        "PRINCEPS_ENV": "production",
        "INTEGRATION_TOKEN_ENCRYPTION_KEY": TEST_KEY,
        "COLUMNS": "120",
    }
    return subprocess.run(
        [CLI, "migrate", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_migrate_shows_each_revision_and_the_backfill_progress(blank_url: str) -> None:
    alembic_run(blank_url, "upgrade", "0001_baseline", keyring=TEST_KEYRING)
    rows = seed_legacy_rows(blank_url, 450)

    result = _migrate(blank_url, "--batch-size", "100")

    assert result.returncode == 0, result.stderr
    assert "Running upgrade 0002_expand -> 0003_backfill" in result.stderr
    assert "Running upgrade 0004_integration_status -> 0005_contract" in result.stderr
    assert "450/450" in result.stderr
    assert result.stderr.rstrip().endswith("done")
    assert TEST_KEY not in result.stdout + result.stderr
    assert not any(r.access_token[:20] in result.stderr for r in rows)
    assert len(decrypt_all(blank_url, TEST_KEYRING)) == 450


def test_migrate_to_an_unreachable_database_prints_one_line(blank_url: str) -> None:
    result = _migrate("postgresql://app:pw-not-shown@127.0.0.1:1/princeps")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot connect to the database")
    assert "pw-not-shown" not in result.stderr
