"""Backfill and rotation throughput against the floor pgcrypto sets, and migration memory.

The migration is the real command line (``alembic upgrade 0003_backfill``)
in a child process, on a fresh copy of a template database at
``0002_expand``. Its rows per second count the command's own time (reading
the revisions, connecting, locking, every batch), without the Python
interpreter's start-up; the end-to-end figure of the whole process is
reported beside it.

The floor is one set-based UPDATE over the same copy that encrypts the same
tokens with the same options, the derived keys already in a table: no
batching, no round trips, no key derivation. It is what pgcrypto itself
allows on this machine.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

from benchmarks.databases import (
    MigrationRun,
    ProcessRun,
    alembic_cli,
    build_legacy_at_expand,
    connect,
    create_database,
    drop_database,
    load_derived_keys,
    run_child,
)
from benchmarks.stats import ratios, summary
from princeps_db.crypto import PGP_OPTIONS, KeyRing, MasterKey
from princeps_db.migration_steps import MIGRATION_GUC
from princeps_db.pgserver import LocalPostgres

Progress = Callable[[str], None]

_FLOOR_ENCRYPT = """
UPDATE "Integration" AS i SET
    "accessTokenEncrypted" = pgp_sym_encrypt(i."accessToken", k.k0_access, %(options)s),
    "refreshTokenEncrypted" = pgp_sym_encrypt(i."refreshToken", k.k0_refresh, %(options)s),
    "tokenKeyId" = %(key_id)s
FROM bench_keys AS k WHERE k.id = i.id
"""

_FLOOR_REENCRYPT = """
UPDATE "Integration" AS i SET
    "accessTokenEncrypted" = pgp_sym_encrypt(
        pgp_sym_decrypt(i."accessTokenEncrypted", k.k1_access), k.k0_access, %(options)s),
    "refreshTokenEncrypted" = pgp_sym_encrypt(
        pgp_sym_decrypt(i."refreshTokenEncrypted", k.k1_refresh), k.k0_refresh, %(options)s),
    "tokenKeyId" = %(key_id)s
FROM bench_keys AS k WHERE k.id = i.id
"""


def _floor(
    server: LocalPostgres, dbname: str, rows: int, *, keys: list[MasterKey], statement: str
) -> float:
    """Seconds for the one-statement floor on ``dbname`` (keys loaded beforehand, untimed)."""
    with connect(server, dbname) as connection:
        load_derived_keys(connection, "bench_keys", rows, keys)
        # The sync trigger steps aside for the migration's session; same for the floor.
        connection.execute("SELECT set_config(%s, 'on', false)", (MIGRATION_GUC,))
        started = time.perf_counter()
        updated = connection.execute(
            statement, {"options": PGP_OPTIONS, "key_id": keys[0].key_id}
        ).rowcount
        elapsed = time.perf_counter() - started
    if updated != rows:
        raise RuntimeError(f"floor updated {updated} rows, expected {rows}")
    return elapsed


def _count_encrypted(server: LocalPostgres, dbname: str, key_id: str) -> int:
    with connect(server, dbname) as connection:
        row = connection.execute(
            'SELECT count(*) FROM "Integration" WHERE "tokenKeyId" = %s '
            'AND "accessTokenEncrypted" IS NOT NULL',
            (key_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def run_backfill(
    server: LocalPostgres, dbname: str, rows: int, *, key: str, batch_size: int | None
) -> MigrationRun:
    """The real backfill migration on ``dbname``; checks that every row got encrypted."""
    run = alembic_cli(server.database_url(dbname), "0003_backfill", key=key, batch_size=batch_size)
    encrypted = _count_encrypted(server, dbname, MasterKey.from_text(key).key_id)
    if encrypted != rows:
        raise RuntimeError(f"backfill encrypted {encrypted} of {rows} rows")
    return run


def measure_backfill(
    server: LocalPostgres,
    *,
    rows: int,
    key: str,
    repeat: int,
    batch_size: int | None,
    progress: Progress,
) -> dict[str, Any]:
    """Backfill rows/s (net and end to end) vs the floor, and the migration's peak RSS."""
    keyring = KeyRing.from_texts(key)
    template = "bench_backfill_template"
    progress(f"backfill: building {rows:,} plaintext rows at 0002_expand")
    build_legacy_at_expand(server, template, rows, keyring=keyring)
    runs: list[MigrationRun] = []
    floors: list[float] = []
    for number in range(repeat):
        progress(f"backfill: repetition {number + 1}/{repeat}")
        order = ("migration", "floor") if number % 2 == 0 else ("floor", "migration")
        for what in order:
            copy = f"bench_backfill_{what}"
            create_database(server, copy, template=template)
            try:
                if what == "migration":
                    runs.append(run_backfill(server, copy, rows, key=key, batch_size=batch_size))
                else:
                    floors.append(
                        _floor(server, copy, rows, keys=[keyring.current], statement=_FLOOR_ENCRYPT)
                    )
            finally:
                drop_database(server, copy)
    drop_database(server, template)
    command = [rows / r.command_s for r in runs]
    end_to_end = [rows / r.process.wall_s for r in runs]
    floor_rate = [rows / f for f in floors]
    return {
        "rows": rows,
        "batch_size": batch_size,
        "migration_rows_per_s": summary(command),
        "migration_end_to_end_rows_per_s": summary(end_to_end),
        "migration_command_s": summary([r.command_s for r in runs]),
        "migration_process_s": summary([r.process.wall_s for r in runs]),
        "floor_rows_per_s": summary(floor_rate),
        "floor_s": summary(floors),
        "ratio_to_floor": summary(ratios(command, floor_rate)),
        "ratio_to_floor_end_to_end": summary(ratios(end_to_end, floor_rate)),
        "peak_rss_mb": summary([r.process.peak_rss_mb for r in runs]),
    }


def rotation_available() -> bool:
    """Whether this checkout has key rotation (``princeps_db.rotation``)."""
    return importlib.util.find_spec("princeps_db.rotation") is not None


def _rotate_in_process(server: LocalPostgres, dbname: str, rows: int, keyring: KeyRing) -> float:
    """Seconds of ``rotate_keys`` itself (what the command runs, without interpreter start-up)."""
    import sqlalchemy as sa

    from princeps_db.rotation import rotate_keys

    engine = sa.create_engine(server.database_url(dbname))
    try:
        started = time.perf_counter()
        result = rotate_keys(engine, keyring=keyring)
        elapsed = time.perf_counter() - started
    finally:
        engine.dispose()
    if result.rotated != rows or not result.ok or result.skipped:
        raise RuntimeError(f"rotate_keys rotated {result.rotated} of {rows} rows")
    return elapsed


def measure_rotation(
    server: LocalPostgres, *, rows: int, key: str, repeat: int, progress: Progress
) -> dict[str, Any]:
    """Key rotation rows/s vs a one-statement re-encryption floor.

    ``rotate_keys`` in this process (the work itself, as the backfill figure
    counts the command's own time) and ``princeps-db rotate-key`` end to end
    (with interpreter start-up), alternating with the floor.
    """
    if not rotation_available():
        return {"status": "skipped", "reason": "rotation not available"}
    from princeps_db.crypto import generate_master_key

    old_ring = KeyRing.from_texts(key)
    new_key = generate_master_key()
    new_ring = KeyRing.from_texts(new_key, [key])
    template = "bench_rotation_template"
    progress(f"rotation: building {rows:,} rows encrypted under the old key")
    build_legacy_at_expand(server, template, rows, keyring=old_ring)
    alembic_cli(server.database_url(template), "head", key=key, batch_size=None)
    runs: list[ProcessRun] = []
    in_process: list[float] = []
    floors: list[float] = []
    env = {
        "INTEGRATION_TOKEN_ENCRYPTION_KEY": new_key,
        "INTEGRATION_TOKEN_PREVIOUS_KEYS": key,
        "PRINCEPS_ENV": "test",
    }
    for number in range(repeat):
        progress(f"rotation: repetition {number + 1}/{repeat}")
        order = (
            ("rotation", "floor", "library")
            if number % 2 == 0
            else ("library", "floor", "rotation")
        )
        for what in order:
            copy = f"bench_rotation_{what}"
            create_database(server, copy, template=template)
            try:
                if what == "rotation":
                    run = run_child(
                        ["-m", "princeps_db", "rotate-key"],
                        env={**env, "DATABASE_URL": server.database_url(copy)},
                    )
                    if run.returncode != 0:
                        return {"status": "error", "reason": run.stderr_tail[-500:]}
                    if _count_encrypted(server, copy, new_ring.current.key_id) != rows:
                        return {"status": "error", "reason": "rotate-key left rows behind"}
                    runs.append(run)
                elif what == "library":
                    in_process.append(_rotate_in_process(server, copy, rows, new_ring))
                else:
                    floors.append(
                        _floor(
                            server,
                            copy,
                            rows,
                            keys=[new_ring.current, old_ring.current],
                            statement=_FLOOR_REENCRYPT,
                        )
                    )
            finally:
                drop_database(server, copy)
    drop_database(server, template)
    end_to_end = [rows / r.wall_s for r in runs]
    library = [rows / seconds for seconds in in_process]
    floor_rate = [rows / f for f in floors]
    return {
        "status": "measured",
        "rows": rows,
        "rotation_rows_per_s": summary(library),
        "rotation_end_to_end_rows_per_s": summary(end_to_end),
        "floor_rows_per_s": summary(floor_rate),
        "ratio_to_floor": summary(ratios(library, floor_rate)),
        "ratio_to_floor_end_to_end": summary(ratios(end_to_end, floor_rate)),
        "peak_rss_mb": summary([r.peak_rss_mb for r in runs]),
    }
