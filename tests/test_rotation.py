"""Key lifecycle: previous keys, online rotation, verification (real PostgreSQL)."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console
from sqlalchemy.engine import Engine

from princeps_db.crypto import PGP_OPTIONS, KeyRing, MasterKey, TokenKind, generate_master_key
from princeps_db.db import create_session_factory
from princeps_db.errors import TokenDecryptionError
from princeps_db.repository import get_valid_token, list_integrations, upsert_integration
from princeps_db.rotation import (
    REASON_UNDECRYPTABLE,
    REASON_UNKNOWN_KEY,
    demo_rotation,
    rotate_keys,
    verify_rows,
)
from tests.conftest import TEST_KEY, TEST_KEYRING
from tests.support import decrypt_all

OLD_KEY = TEST_KEY
OLD = TEST_KEYRING.current
NEW_KEY = generate_master_key()
NEW = MasterKey.from_text(NEW_KEY)
OLD_ONLY = TEST_KEYRING
ROTATING = KeyRing(NEW, (OLD,))
NEW_ONLY = KeyRing(NEW)
PROVIDERS = ("google_calendar", "google_drive")

Tokens = dict[str, tuple[str, str | None]]


def seed_rows(engine: Engine, count: int, *, key: MasterKey, start: int = 0) -> Tokens:
    """Insert ``count`` integrations encrypted under ``key``; return id -> (access, refresh)."""
    rng = random.Random(count + start)
    ids, users, providers, access, refresh, access_keys, refresh_keys = ([] for _ in range(7))
    expected: Tokens = {}
    for number in range(start, start + count):
        row_id, user = f"int-{number:06d}", f"user-{number // 2:06d}"
        provider = PROVIDERS[number % 2]
        token = f"ya29.{number}-" + "".join(rng.choices("abcdefXYZ0123456789", k=120))
        refresh_token = None if number % 10 == 0 else f"1//{number}-refresh-äö-🔑"
        ids.append(row_id)
        users.append(user)
        providers.append(provider)
        access.append(token)
        refresh.append(refresh_token)
        access_keys.append(
            key.derive_token_key(user_id=user, provider=provider, kind=TokenKind.ACCESS)
        )
        refresh_keys.append(
            key.derive_token_key(user_id=user, provider=provider, kind=TokenKind.REFRESH)
        )
        expected[row_id] = (token, refresh_token)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO \"User\" (id, email) SELECT DISTINCT u, u || '@example.com' "
                "FROM unnest(CAST(:users AS text[])) AS u ON CONFLICT DO NOTHING"
            ),
            {"users": users},
        )
        connection.execute(
            sa.text(
                'INSERT INTO "Integration" (id, "userId", provider, "accessTokenEncrypted", '
                '"refreshTokenEncrypted", "tokenKeyId", "expiresAt") '
                "SELECT v.id, v.u, v.p, pgp_sym_encrypt(v.a, v.ak, :options), "
                "pgp_sym_encrypt(v.r, v.rk, :options), :key_id, now() + interval '1 hour' "
                "FROM unnest(CAST(:ids AS text[]), CAST(:users AS text[]), "
                "CAST(:providers AS text[]), CAST(:access AS text[]), CAST(:refresh AS text[]), "
                "CAST(:access_keys AS text[]), CAST(:refresh_keys AS text[])) "
                "AS v(id, u, p, a, r, ak, rk)"
            ),
            {
                "ids": ids,
                "users": users,
                "providers": providers,
                "access": access,
                "refresh": refresh,
                "access_keys": access_keys,
                "refresh_keys": refresh_keys,
                "options": PGP_OPTIONS,
                "key_id": key.key_id,
            },
        )
    return expected


def key_ids(engine: Engine) -> dict[str, int]:
    """Rows per stored key id."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text('SELECT "tokenKeyId", count(*) FROM "Integration" GROUP BY 1')
        ).all()
    return {key_id: count for key_id, count in rows}


def ciphertexts(engine: Engine, ids: list[str]) -> dict[str, tuple[bytes, bytes | None, str]]:
    """The stored bytes and key id of some rows, to prove they were not touched."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                'SELECT id, "accessTokenEncrypted", "refreshTokenEncrypted", "tokenKeyId" '
                'FROM "Integration" WHERE id = ANY(CAST(:ids AS text[]))'
            ),
            {"ids": ids},
        ).all()
    return {r.id: (bytes(r[1]), None if r[2] is None else bytes(r[2]), r[3]) for r in rows}


def tamper(engine: Engine, row_id: str) -> None:
    """Flip a bit in the last byte of the access-token ciphertext (past the checked header)."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                'UPDATE "Integration" SET "accessTokenEncrypted" = set_byte('
                '"accessTokenEncrypted", length("accessTokenEncrypted") - 1, '
                'get_byte("accessTokenEncrypted", length("accessTokenEncrypted") - 1) # 1) '
                "WHERE id = :id"
            ),
            {"id": row_id},
        )


def cli(
    url: str,
    *args: str,
    key: str = NEW_KEY,
    previous: str | None = OLD_KEY,
    cwd: Path | None = None,
) -> subprocess.Popen[str]:
    """Start ``princeps-db ARGS`` with the environment a deploy would give it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INTEGRATION_TOKEN_", "PRINCEPS_", "DATABASE_URL"))
    }
    env.update({"DATABASE_URL": url, "INTEGRATION_TOKEN_ENCRYPTION_KEY": key})
    env["PRINCEPS_ENV"] = "test"
    if previous is not None:
        env["INTEGRATION_TOKEN_PREVIOUS_KEYS"] = previous
    return subprocess.Popen(
        [sys.executable, "-m", "princeps_db", *args],
        cwd=cwd or Path.cwd(),  # the test's own empty directory: no stray .env
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(url: str, *args: str, **kwargs: object) -> tuple[int, str, str]:
    process = cli(url, *args, **kwargs)  # type: ignore[arg-type]
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


# --- previous keys in the repository ---------------------------------------------------------


def test_rows_under_a_previous_key_read_and_writes_move_them_to_the_current_key(
    engine: Engine,
) -> None:
    seeded = seed_rows(engine, 4, key=OLD)
    sessions = create_session_factory(engine, keyring=ROTATING)
    with sessions() as session, session.begin():
        token = get_valid_token(session, user_id="user-000000", provider="google_calendar")
        assert token == seeded["int-000000"][0]
        assert {i.key_id for i in list_integrations(session, user_id="user-000001")} == {OLD.key_id}
        # Without a refresh token: the stored one is kept, re-encrypted under the new key.
        info = upsert_integration(
            session,
            user_id="user-000001",
            provider="google_calendar",
            access_token="ya29.new-access",
            refresh_token=None,
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
        assert info.key_id == NEW.key_id
    stored = decrypt_all(engine.url.render_as_string(hide_password=False), ROTATING)
    assert stored["int-000002"] == ("ya29.new-access", seeded["int-000002"][1])
    assert key_ids(engine) == {OLD.key_id: 3, NEW.key_id: 1}
    # The rewritten row no longer needs the old key at all.
    with create_session_factory(engine, keyring=NEW_ONLY)() as session:
        assert get_valid_token(session, user_id="user-000001", provider="google_calendar") == (
            "ya29.new-access"
        )


def test_a_row_under_an_unconfigured_key_names_its_key_id_and_the_remedy(engine: Engine) -> None:
    seed_rows(engine, 2, key=OLD)
    with (
        create_session_factory(engine, keyring=NEW_ONLY)() as session,
        pytest.raises(TokenDecryptionError) as raised,
    ):
        get_valid_token(session, user_id="user-000000", provider="google_calendar")
    message = str(raised.value)
    assert OLD.key_id in message
    assert "INTEGRATION_TOKEN_PREVIOUS_KEYS" in message
    assert OLD_KEY not in message and NEW_KEY not in message


# --- rotate_keys / verify_rows ----------------------------------------------------------------


def test_rotation_moves_every_row_to_the_current_key_and_the_old_key_can_be_removed(
    engine: Engine,
) -> None:
    seeded = seed_rows(engine, 500, key=OLD)
    url = engine.url.render_as_string(hide_password=False)

    dry = rotate_keys(engine, keyring=ROTATING, batch_size=64, dry_run=True)
    assert (dry.to_rotate, dry.rotated, dry.failed) == (500, 500, 0)
    assert key_ids(engine) == {OLD.key_id: 500}, "a dry run changes nothing"

    calls: list[tuple[int, int]] = []
    result = rotate_keys(
        engine, keyring=ROTATING, batch_size=64, progress=lambda d, t: calls.append((d, t))
    )
    assert (result.rotated, result.skipped, result.failed) == (500, 0, 0)
    assert calls[0] == (0, 500) and calls[-1] == (500, 500)
    assert key_ids(engine) == {NEW.key_id: 500}

    again = rotate_keys(engine, keyring=ROTATING, batch_size=64)
    assert (again.to_rotate, again.rotated, again.failed) == (0, 0, 0), "running twice is a no-op"

    assert decrypt_all(url, NEW_ONLY) == seeded
    checked = verify_rows(engine, keyring=NEW_ONLY, batch_size=64)
    assert checked.ok and checked.rows == 500
    assert checked.rows_per_key_id == {NEW.key_id: 500}
    with create_session_factory(engine, keyring=NEW_ONLY)() as session:
        token = get_valid_token(session, user_id="user-000123", provider="google_drive")
        assert token == seeded["int-000247"][0]


def test_rotation_leaves_a_row_that_does_not_decrypt_untouched_and_reports_it(
    engine: Engine,
) -> None:
    seeded = seed_rows(engine, 50, key=OLD)
    tamper(engine, "int-000017")
    before = ciphertexts(engine, ["int-000017"])

    result = rotate_keys(engine, keyring=ROTATING, batch_size=8)

    assert (result.rotated, result.failed) == (49, 1)
    assert [(f.id, f.key_id, f.reason) for f in result.failures] == [
        ("int-000017", OLD.key_id, REASON_UNDECRYPTABLE)
    ]
    assert ciphertexts(engine, ["int-000017"]) == before
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM \"Integration\" WHERE id = 'int-000017'"))
    del seeded["int-000017"]
    assert decrypt_all(engine.url.render_as_string(hide_password=False), NEW_ONLY) == seeded


def test_verify_counts_rows_per_key_id_and_names_failing_rows(engine: Engine) -> None:
    seed_rows(engine, 30, key=OLD)
    seed_rows(engine, 20, key=NEW, start=30)
    stranger = MasterKey.from_text(generate_master_key())
    seed_rows(engine, 2, key=stranger, start=50)
    tamper(engine, "int-000035")

    result = verify_rows(engine, keyring=ROTATING, batch_size=7)

    assert result.rows == 52
    assert result.rows_per_key_id == {OLD.key_id: 30, NEW.key_id: 20, stranger.key_id: 2}
    assert result.key_status(stranger.key_id) == "not configured"
    assert [(f.id, f.reason) for f in result.failures] == [
        ("int-000035", REASON_UNDECRYPTABLE),
        ("int-000050", REASON_UNKNOWN_KEY),
        ("int-000051", REASON_UNKNOWN_KEY),
    ]


@pytest.mark.slow
def test_rotation_while_the_application_keeps_writing_loses_nothing(engine: Engine) -> None:
    """Two rotations and two writers at once: every row ends current, holding its newest value."""
    expected = seed_rows(engine, 3000, key=OLD)
    url = engine.url.render_as_string(hide_password=False)
    sessions = create_session_factory(engine, keyring=ROTATING)
    stop = threading.Event()
    lock = threading.Lock()
    writes = [0]
    errors: list[BaseException] = []

    def writer(parity: int) -> None:
        # Each writer owns half of the rows, so the last value it commits is the newest.
        rng = random.Random(parity)
        try:
            while not stop.is_set():
                number = rng.randrange(parity, 3000, 2)
                row_id = f"int-{number:06d}"
                access = f"ya29.rewritten-{number}-{rng.random()}"
                refresh = None if rng.random() < 0.5 else f"1//rewritten-{rng.random()}"
                with sessions() as session, session.begin():
                    upsert_integration(
                        session,
                        user_id=f"user-{number // 2:06d}",
                        provider=PROVIDERS[number % 2],
                        access_token=access,
                        refresh_token=refresh,
                        expires_at=datetime.now(UTC) + timedelta(hours=1),
                    )
                with lock:
                    kept = expected[row_id][1] if refresh is None else refresh
                    expected[row_id] = (access, kept)
                    writes[0] += 1
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for thread in writers:
        thread.start()
    while writes[0] < 50 and not errors:
        time.sleep(0.01)

    results = []

    def rotator() -> None:
        try:
            results.append(rotate_keys(engine, keyring=ROTATING, batch_size=25))
        except BaseException as error:
            errors.append(error)

    rotators = [threading.Thread(target=rotator) for _ in range(2)]
    for thread in rotators:
        thread.start()
    for thread in rotators:
        thread.join()
    time.sleep(0.2)
    stop.set()
    for thread in writers:
        thread.join()

    assert not errors, errors
    assert all(r.failed == 0 and r.skipped == 0 for r in results)
    assert writes[0] > 100, "the writers really ran during the rotation"
    assert key_ids(engine) == {NEW.key_id: 3000}
    assert decrypt_all(url, NEW_ONLY) == expected


# --- the command line -------------------------------------------------------------------------


def rotated_count(engine: Engine) -> int:
    return key_ids(engine).get(NEW.key_id, 0)


@pytest.mark.slow
def test_rotate_key_killed_mid_way_and_run_again_completes(engine: Engine, head_url: str) -> None:
    seeded = seed_rows(engine, 2000, key=OLD)
    process = cli(head_url, "rotate-key", "--batch-size", "2")
    deadline = time.monotonic() + 120
    while rotated_count(engine) < 100 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    done = rotated_count(engine)
    assert 0 < done < 2000, "killed part-way"

    code, out, err = run_cli(head_url, "rotate-key", "--batch-size", "50")

    assert code == 0, err
    assert "failed (left untouched): 0" in out
    assert f"rotated: {2000 - done}" in out
    assert key_ids(engine) == {NEW.key_id: 2000}
    assert decrypt_all(head_url, NEW_ONLY) == seeded


def test_rotate_key_with_a_wrong_previous_key_lists_the_rows_changes_nothing_and_fails(
    engine: Engine, head_url: str
) -> None:
    seed_rows(engine, 20, key=OLD)
    seed_rows(engine, 5, key=NEW, start=20)
    before = ciphertexts(engine, [f"int-{n:06d}" for n in range(25)])
    wrong = generate_master_key()

    code, out, err = run_cli(head_url, "rotate-key", "--batch-size", "3", previous=wrong)

    assert code == 1, err
    assert "failed (left untouched): 20" in out
    for number in range(20):
        assert f"int-{number:06d}  {OLD.key_id}  {REASON_UNKNOWN_KEY}" in out
    assert "int-000020" not in out
    assert "INTEGRATION_TOKEN_PREVIOUS_KEYS" in err
    assert ciphertexts(engine, [f"int-{n:06d}" for n in range(25)]) == before


def test_rotate_key_dry_run_reports_without_writing(engine: Engine, head_url: str) -> None:
    seed_rows(engine, 30, key=OLD)
    code, out, err = run_cli(head_url, "rotate-key", "--dry-run")
    assert code == 0, err
    assert "would rotate: 30" in out
    assert key_ids(engine) == {OLD.key_id: 30}


def test_verify_names_a_tampered_row_and_exits_non_zero(engine: Engine, head_url: str) -> None:
    seed_rows(engine, 40, key=NEW)
    code, out, err = run_cli(head_url, "verify", "--quiet")
    assert (code, out) == (0, ""), err

    tamper(engine, "int-000013")
    code, out, _err = run_cli(head_url, "verify")
    assert code == 1
    assert f"key id {NEW.key_id} (current): 40" in out
    assert "int-000013" in out and "int-000012" not in out

    code, out, _err = run_cli(head_url, "verify", "--json")
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False and report["rows"] == 40
    assert [row["id"] for row in report["failing_rows"]] == ["int-000013"]
    assert report["key_ids"] == {NEW.key_id: {"rows": 40, "status": "current"}}


def test_commands_exit_2_with_one_line_on_configuration_errors(tmp_path: Path) -> None:
    code, _out, err = run_cli(
        "postgresql://nobody@127.0.0.1:1/none", "verify", key="too-short", cwd=tmp_path
    )
    assert code == 2
    assert err.count("\n") == 1 and "INTEGRATION_TOKEN_ENCRYPTION_KEY" in err
    code, _out, err = run_cli("postgresql://nobody@127.0.0.1:1/none", "rotate-key", cwd=tmp_path)
    assert code == 2
    assert "cannot connect to the database" in err and err.count("\n") == 1


def _forms(secret: str) -> list[str]:
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    return [
        secret,
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
    ]


def test_command_output_never_contains_a_key_or_a_token(engine: Engine, head_url: str) -> None:
    seeded = seed_rows(engine, 60, key=OLD)
    tamper(engine, "int-000007")
    stranger = MasterKey.from_text(generate_master_key())
    seed_rows(engine, 1, key=stranger, start=60)

    outputs = [
        run_cli(head_url, "rotate-key", "--dry-run"),
        run_cli(head_url, "rotate-key", "--batch-size", "7"),
        run_cli(head_url, "verify"),
        run_cli(head_url, "verify", "--json"),
        run_cli(head_url, "verify", previous=None),
    ]

    text = "\n".join(out + err for _code, out, err in outputs)
    assert "int-000007" in text and stranger.key_id in text, "the failures were reported"
    secrets = [*_forms(OLD_KEY), *_forms(NEW_KEY)]
    for key in (OLD, NEW):
        secrets += [
            key.derive_token_key(user_id="user-000003", provider="google_calendar", kind=kind)
            for kind in TokenKind
        ]
    for access, refresh in seeded.values():
        secrets += [access, *([refresh] if refresh else [])]
    leaked = [secret for secret in secrets if secret in text]
    assert not leaked


def test_demo_rotation_rotates_and_prints_no_secret(engine: Engine) -> None:
    seeded = seed_rows(engine, 100, key=OLD)
    console = Console(record=True, width=200)

    result = demo_rotation(console, engine, old_keyring=OLD_ONLY, new_keyring=ROTATING)

    assert (result.rotated, result.failed) == (100, 0)
    text = console.export_text()
    assert OLD.key_id in text and NEW.key_id in text and "all decrypt" in text
    assert OLD_KEY not in text and NEW_KEY not in text
    assert not any(access in text for access, _ in seeded.values())
