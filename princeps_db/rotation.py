"""Key rotation and verification, online and server-side.

``rotate_keys`` re-encrypts every row that is not under the current master
key; ``verify_rows`` proves that every row decrypts under the key its
``"tokenKeyId"`` names. Both walk ``"Integration"`` in primary-key order, in
batches, on one connection. Only ids, key ids and derived keys travel as bind
parameters; plaintext never leaves the server.

How rotation stays safe while the application keeps writing:

- Each batch is one short transaction. It locks the batch's rows with
  ``FOR UPDATE SKIP LOCKED``: a row an application transaction (or another
  rotation) holds is skipped, never waited on, and retried at the end.
- The single ``UPDATE`` that decrypts under the old derived key and encrypts
  under the new one re-checks ``"tokenKeyId" = <old key id>``. A row the
  application rewrote meanwhile is already under the current key and is left
  alone, so a newer value is never overwritten with a stale one.
- A row that does not decrypt under its configured key (tampered, or a wrong
  key with a matching id) is detected by ``pg_temp.princeps_try_reencrypt``,
  which returns NULL instead of raising, and left untouched; a row whose key
  id matches no configured key is not touched either. Both are reported by id
  only.
- Every batch commits on its own and the walk only selects rows not yet under
  the current key, so a run killed at any point is finished by running it
  again, and two runs at once share the work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from princeps_db.crypto import PGP_OPTIONS, KeyRing, MasterKey
from princeps_db.migration_steps import (
    DEFAULT_BATCH_SIZE,
    TRY_DECRYPT_FUNCTION,
    RowRef,
    derived_keys,
    iter_batches,
)

if TYPE_CHECKING:
    from rich.console import Console

# At most this many failing rows are listed; all of them are counted.
DEFAULT_MAX_LISTED = 1000
# Rows locked by another transaction are retried this many times, with a short backoff.
LOCKED_ROW_RETRIES = 6

Progress = Callable[[int, int], None]
"""Called with (rows handled so far, rows that needed rotation at the start)."""

KeyStatus = Literal["current", "previous", "not configured"]

REASON_UNKNOWN_KEY = "key id not configured"
REASON_UNDECRYPTABLE = "does not decrypt under its key"


@dataclass(frozen=True)
class RowFailure:
    """A row that could not be decrypted: its id and key id, never a value."""

    id: str
    key_id: str | None
    reason: str


@dataclass(frozen=True)
class RotationResult:
    """What a rotation did (or, with ``dry_run``, would do)."""

    current_key_id: str
    dry_run: bool
    to_rotate: int
    """Rows not under the current key when the run started."""
    rotated: int
    """Rows this run re-encrypted under the current key (dry run: would re-encrypt)."""
    skipped: int
    """Rows still locked by another transaction when the run ended; run again to finish them."""
    failed: int
    """Rows left untouched because they do not decrypt or their key id is not configured."""
    failures: tuple[RowFailure, ...]
    """The failing rows, listed up to a limit, in id order."""
    seconds: float

    @property
    def failed_ids(self) -> list[str]:
        """Ids of the listed failing rows."""
        return [failure.id for failure in self.failures]

    @property
    def ok(self) -> bool:
        """True when no row failed."""
        return self.failed == 0


@dataclass(frozen=True)
class VerifyResult:
    """Whether every row decrypts under its key, with row counts per key id."""

    current_key_id: str
    previous_key_ids: tuple[str, ...]
    rows: int
    rows_per_key_id: dict[str, int]
    failed: int
    failures: tuple[RowFailure, ...]
    seconds: float

    @property
    def failed_ids(self) -> list[str]:
        """Ids of the listed failing rows."""
        return [failure.id for failure in self.failures]

    @property
    def ok(self) -> bool:
        """True when every row decrypts under its key."""
        return self.failed == 0

    def key_status(self, key_id: str) -> KeyStatus:
        """Say whether ``key_id`` is the current key, a previous key, or not configured."""
        if key_id == self.current_key_id:
            return "current"
        if key_id in self.previous_key_ids:
            return "previous"
        return "not configured"


@dataclass
class _Failures:
    limit: int
    count: int = 0
    listed: list[RowFailure] = field(default_factory=list)

    def add(self, rows: Sequence[RowRef], reason: str) -> None:
        self.count += len(rows)
        room = self.limit - len(self.listed)
        self.listed += [RowFailure(r.id, r.key_id, reason) for r in rows[: max(room, 0)]]

    def frozen(self) -> tuple[RowFailure, ...]:
        return tuple(sorted(self.listed, key=lambda failure: failure.id))


_NOT_CURRENT = '"tokenKeyId" IS DISTINCT FROM :current_key_id'

_CHECK_KEYS = (
    "unnest(CAST(:ids AS text[]), CAST(:access_keys AS text[]), CAST(:refresh_keys AS text[])) "
    "AS v(id, access_key, refresh_key)"
)

# Ids (of the given rows) whose tokens do not decrypt under the given derived keys.
_UNDECRYPTABLE = sa.text(
    f'SELECT v.id FROM {_CHECK_KEYS} JOIN "Integration" AS i ON i.id = v.id WHERE '
    'pg_temp.princeps_try_decrypt(i."accessTokenEncrypted", v.access_key) IS NULL '
    'OR (i."refreshTokenEncrypted" IS NOT NULL '
    '    AND pg_temp.princeps_try_decrypt(i."refreshTokenEncrypted", v.refresh_key) IS NULL)'
)

_LOCK_BATCH = sa.text(
    'SELECT id, "tokenKeyId" FROM "Integration" WHERE id = ANY(CAST(:ids AS text[])) '
    "ORDER BY id FOR UPDATE SKIP LOCKED"
)

# Re-encrypts one token in the server, or returns NULL if it does not decrypt
# under the old key, so one bad row never aborts the batch. The plaintext only
# ever exists inside this call.
TRY_REENCRYPT_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.princeps_try_reencrypt(
    message bytea, old_password text, new_password text, options text
) RETURNS bytea LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgp_sym_encrypt(pgp_sym_decrypt(message, old_password), new_password, options);
EXCEPTION WHEN external_routine_invocation_exception THEN
    RETURN NULL;  -- wrong key or corrupt data: reported by id, never raised mid-scan
END $$
"""

# One UPDATE per batch: each token is decrypted under the old derived key and
# encrypted under the new one once, in the server; the subquery (not
# flattened, its function is VOLATILE) carries only the new ciphertexts. The
# WHERE re-checks the old key id, and that both tokens re-encrypted, so
# nothing stale or undecryptable is ever written.
_REENCRYPT = sa.text(
    'UPDATE "Integration" AS i SET '
    '"accessTokenEncrypted" = n.access, "refreshTokenEncrypted" = n.refresh, '
    '"tokenKeyId" = :current_key_id '
    'FROM (SELECT v.id, v.old_key_id, c."refreshTokenEncrypted" IS NULL AS no_refresh, '
    '    pg_temp.princeps_try_reencrypt(c."accessTokenEncrypted", v.old_access, '
    "        v.new_access, :options) AS access, "
    '    CASE WHEN c."refreshTokenEncrypted" IS NOT NULL THEN '
    '        pg_temp.princeps_try_reencrypt(c."refreshTokenEncrypted", v.old_refresh, '
    "            v.new_refresh, :options) END AS refresh "
    "  FROM unnest(CAST(:ids AS text[]), CAST(:old_key_ids AS text[]), "
    "      CAST(:old_access_keys AS text[]), CAST(:old_refresh_keys AS text[]), "
    "      CAST(:new_access_keys AS text[]), CAST(:new_refresh_keys AS text[])) "
    "      AS v(id, old_key_id, old_access, old_refresh, new_access, new_refresh) "
    '  JOIN "Integration" AS c ON c.id = v.id AND c."tokenKeyId" = v.old_key_id) AS n '
    'WHERE i.id = n.id AND i."tokenKeyId" = n.old_key_id AND n.access IS NOT NULL '
    "AND (n.no_refresh OR n.refresh IS NOT NULL) "
    "RETURNING i.id"
)


def _install_try_decrypt(connection: Connection) -> None:
    connection.execute(sa.text(TRY_DECRYPT_FUNCTION))
    connection.execute(sa.text(TRY_REENCRYPT_FUNCTION))
    connection.commit()


def _undecryptable(
    connection: Connection, rows: Sequence[RowRef], keys: Mapping[str, MasterKey]
) -> list[RowRef]:
    """Return the rows (all under configured keys) whose tokens do not decrypt."""
    if not rows:
        return []
    params = derived_keys(rows, lambda row: keys[str(row.key_id)])
    failing = set(connection.execute(_UNDECRYPTABLE, params).scalars())
    return [row for row in rows if row.id in failing]


def rotate_keys(
    engine: Engine,
    *,
    keyring: KeyRing,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    max_listed: int = DEFAULT_MAX_LISTED,
) -> RotationResult:
    """Re-encrypt every row not under ``keyring.current``, one committed batch at a time."""
    started = time.monotonic()
    current = keyring.current
    old_keys = {key.key_id: key for key in keyring.previous if key.key_id != current.key_id}
    failures = _Failures(max_listed)
    rotated = handled = 0
    not_current = {"current_key_id": current.key_id}

    with engine.connect() as connection:
        _install_try_decrypt(connection)
        to_rotate = connection.execute(
            sa.text(f'SELECT count(*) FROM "Integration" WHERE {_NOT_CURRENT}'), not_current
        ).scalar_one()
        connection.commit()
        if progress:
            progress(0, to_rotate)

        def run_pass(where: str, params: Mapping[str, object]) -> list[str]:
            """Rotate the rows matching ``where``; return the ids another transaction held."""
            nonlocal rotated, handled
            held: list[str] = []
            batches = iter_batches(connection, where=where, batch_size=batch_size, params=params)
            while True:
                with connection.begin():  # one transaction, one commit, per batch
                    rows = next(batches, None)
                    if rows is None:
                        return held
                    unknown = [row for row in rows if row.key_id not in old_keys]
                    failures.add(unknown, REASON_UNKNOWN_KEY)
                    candidates = [row for row in rows if row.key_id in old_keys]
                    busy: list[str] = []
                    if dry_run:
                        bad = _undecryptable(connection, candidates, old_keys)
                        done = len(candidates) - len(bad)
                    else:
                        done, bad, busy = _rotate_batch(connection, candidates, old_keys, current)
                failures.add(bad, REASON_UNDECRYPTABLE)
                rotated += done
                held += busy
                handled = min(handled + len(rows) - len(busy), to_rotate)
                if progress:
                    progress(handled, to_rotate)

        held = run_pass(_NOT_CURRENT, not_current)
        for attempt in range(LOCKED_ROW_RETRIES):
            if not held:
                break
            time.sleep(0.05 * 2**attempt)
            retry = f"id = ANY(CAST(:held AS text[])) AND {_NOT_CURRENT}"
            held = run_pass(retry, {**not_current, "held": held})

    if progress:
        progress(to_rotate, to_rotate)
    return RotationResult(
        current_key_id=current.key_id,
        dry_run=dry_run,
        to_rotate=to_rotate,
        rotated=rotated,
        skipped=len(held),
        failed=failures.count,
        failures=failures.frozen(),
        seconds=time.monotonic() - started,
    )


def _rotate_batch(
    connection: Connection,
    rows: Sequence[RowRef],
    old_keys: Mapping[str, MasterKey],
    current: MasterKey,
) -> tuple[int, list[RowRef], list[str]]:
    """Lock and re-encrypt one batch; return (rotated, undecryptable rows, ids held elsewhere)."""
    if not rows:
        return 0, [], []
    lock = connection.execute(_LOCK_BATCH, {"ids": [row.id for row in rows]})
    locked: dict[str, str] = {row.id: row.tokenKeyId for row in lock}
    # Rows we now hold that are still under the key we read. A row rewritten
    # meanwhile under the current key is done; one held by another transaction,
    # or rewritten under yet another key, is retried later.
    mine = [row for row in rows if row.id in locked and locked[row.id] == row.key_id]
    held = [
        row.id
        for row in rows
        if row.id not in locked or locked[row.id] not in (row.key_id, current.key_id)
    ]
    if not mine:
        return 0, [], held
    old = derived_keys(mine, lambda row: old_keys[str(row.key_id)])
    new = derived_keys(mine, lambda _row: current)
    updated = set(
        connection.execute(
            _REENCRYPT,
            {
                "ids": old["ids"],
                "old_key_ids": [row.key_id for row in mine],
                "old_access_keys": old["access_keys"],
                "old_refresh_keys": old["refresh_keys"],
                "new_access_keys": new["access_keys"],
                "new_refresh_keys": new["refresh_keys"],
                "options": PGP_OPTIONS,
                "current_key_id": current.key_id,
            },
        ).scalars()
    )
    # We hold every row in ``mine``, so the only reason one was not updated is
    # that it does not decrypt under its key.
    bad = [row for row in mine if row.id not in updated]
    return len(updated), bad, held


def verify_rows(
    engine: Engine,
    *,
    keyring: KeyRing,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_listed: int = DEFAULT_MAX_LISTED,
) -> VerifyResult:
    """Check server-side that every row decrypts under its key; count rows per key id."""
    started = time.monotonic()
    keys = {key.key_id: key for key in keyring.keys}
    per_key: dict[str, int] = {}
    failures = _Failures(max_listed)
    rows_seen = 0
    with engine.connect() as connection:
        _install_try_decrypt(connection)
        # Each batch is read and checked in one snapshot, so an application
        # write between the two statements cannot look like a failure.
        connection.execution_options(isolation_level="REPEATABLE READ")
        batches = iter_batches(connection, where="true", batch_size=batch_size)
        while True:
            with connection.begin():
                rows = next(batches, None)
                if rows is None:
                    break
                known = [row for row in rows if row.key_id in keys]
                bad = _undecryptable(connection, known, keys)
            rows_seen += len(rows)
            for row in rows:
                per_key[str(row.key_id)] = per_key.get(str(row.key_id), 0) + 1
            failures.add([row for row in rows if row.key_id not in keys], REASON_UNKNOWN_KEY)
            failures.add(bad, REASON_UNDECRYPTABLE)
    return VerifyResult(
        current_key_id=keyring.current.key_id,
        previous_key_ids=tuple(key.key_id for key in keyring.previous),
        rows=rows_seen,
        rows_per_key_id=dict(sorted(per_key.items(), key=lambda item: (-item[1], item[0]))),
        failed=failures.count,
        failures=failures.frozen(),
        seconds=time.monotonic() - started,
    )


def demo_rotation(
    console: Console, engine: Engine, *, old_keyring: KeyRing, new_keyring: KeyRing
) -> RotationResult:
    """Rotate the demo database from ``old_keyring`` to ``new_keyring`` and show before/after.

    ``new_keyring`` must list the old current key among its previous keys, as a
    deploy would. After rotating, every row is verified with the new key alone,
    which shows the old key can be removed. Prints key ids and counts, never a key.
    """
    before = verify_rows(engine, keyring=new_keyring)
    console.print(
        f"[bold]Key rotation[/]: {before.rows} rows; "
        + ", ".join(
            f"{count} under {key_id} ({before.key_status(key_id)})"
            for key_id, count in before.rows_per_key_id.items()
        ),
        highlight=False,
    )
    console.print(
        f"  old key id {old_keyring.current.key_id} -> new key id {new_keyring.current.key_id}",
        highlight=False,
    )
    result = rotate_keys(engine, keyring=new_keyring)
    console.print(
        f"  rotated {result.rotated} rows in {result.seconds:.2f} s "
        f"(skipped {result.skipped}, failed {result.failed}); "
        "each row was re-encrypted inside one UPDATE, no token left the server",
        highlight=False,
    )
    after = verify_rows(engine, keyring=KeyRing(new_keyring.current))
    status = "[green]all decrypt[/]" if after.ok else f"[red]{after.failed} failing[/]"
    console.print(
        f"  verified with the new key alone: {after.rows} rows, {status}; "
        "the old key can now be removed",
        highlight=False,
    )
    return result
