"""Per-token cost of our pgcrypto options vs pgcrypto's defaults vs AES-256-GCM in the app.

Server side, each figure is one set-based statement over N tokens minus the
same statement without the crypto call, divided by N: what one token costs
the database, without round trips (best of three executions per round).
Application side, it is a Python loop over the same tokens with the
`cryptography` package, one key object per token (each row has its own
derived key).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import psycopg

from benchmarks.stats import ratios, summary
from princeps_db.crypto import PGP_OPTIONS, MasterKey, TokenKind, generate_master_key

# AES-256 with pgcrypto's default S2K (mode 3, iterated SHA-1): what you get by
# asking only for aes256.
AES256_DEFAULT_S2K = "cipher-algo=aes256"

VARIANTS: dict[str, str | None] = {
    "ours": PGP_OPTIONS,
    "defaults": None,  # pgp_sym_encrypt(token, key)
    "aes256_s2k3": AES256_DEFAULT_S2K,
}


def _encrypt_call(options: str | None, token: str, key: str) -> str:
    return (
        f"pgp_sym_encrypt({token}, {key})"
        if options is None
        else f"pgp_sym_encrypt({token}, {key}, %(options)s)"
    )


def _timed(connection: psycopg.Connection, sql: str, params: dict[str, Any]) -> float:
    """Best of three executions: on a shared machine, interference only ever adds time."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        connection.execute(sql, params).fetchall()
        best = min(best, time.perf_counter() - started)
    return best


def _prepare(connection: psycopg.Connection, tokens: int) -> list[tuple[str, str]]:
    """Create bench_tokens with N tokens, their derived keys and each variant's ciphertext."""
    key = MasterKey.from_text(generate_master_key())
    pairs = []
    for number in range(tokens):
        token = "ya29." + os.urandom(96).hex()
        derived = key.derive_token_key(
            user_id=f"user-{number}", provider="google_calendar", kind=TokenKind.ACCESS
        )
        pairs.append((token, derived))
    connection.execute("DROP TABLE IF EXISTS bench_tokens")
    connection.execute(
        "CREATE TABLE bench_tokens (i int PRIMARY KEY, token text, key text, "
        + ", ".join(f"c_{name} bytea" for name in VARIANTS)
        + ")"
    )
    with (
        connection.cursor() as cursor,
        cursor.copy("COPY bench_tokens (i, token, key) FROM STDIN") as copy,
    ):
        for number, (token, derived) in enumerate(pairs):
            copy.write_row((number, token, derived))
    for name, options in VARIANTS.items():
        connection.execute(
            f"UPDATE bench_tokens SET c_{name} = {_encrypt_call(options, 'token', 'key')}",
            {"options": options},
        )
    connection.execute("VACUUM ANALYZE bench_tokens")
    return pairs


def _server_round(connection: psycopg.Connection, tokens: int) -> dict[str, float]:
    """One repetition of every server-side figure, in microseconds per token."""
    base_encrypt = _timed(
        connection, "SELECT sum(length(token) + length(key)) FROM bench_tokens", {}
    )
    figures: dict[str, float] = {}
    for name, options in VARIANTS.items():
        elapsed = _timed(
            connection,
            f"SELECT sum(length({_encrypt_call(options, 'token', 'key')})) FROM bench_tokens",
            {"options": options},
        )
        figures[f"{name}.encrypt"] = (elapsed - base_encrypt) / tokens * 1e6
    for name in VARIANTS:
        base_decrypt = _timed(
            connection, f"SELECT sum(length(c_{name}) + length(key)) FROM bench_tokens", {}
        )
        elapsed = _timed(
            connection,
            f"SELECT sum(length(pgp_sym_decrypt(c_{name}, key))) FROM bench_tokens",
            {},
        )
        figures[f"{name}.decrypt"] = (elapsed - base_decrypt) / tokens * 1e6
    return figures


def _app_round(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """AES-256-GCM in Python, per token: a key object per row, a random 96-bit nonce."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    material = [(token.encode(), bytes.fromhex(derived)) for token, derived in pairs]
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        sealed = []
        for data, key in material:
            nonce = os.urandom(12)
            sealed.append((key, nonce + AESGCM(key).encrypt(nonce, data, None)))
        encrypt = time.perf_counter() - started
        started = time.perf_counter()
        for key, message in sealed:
            AESGCM(key).decrypt(message[:12], message[12:], None).decode()
        decrypt = time.perf_counter() - started
    finally:
        gc.enable()
    return {
        "app_aes_gcm.encrypt": encrypt / len(pairs) * 1e6,
        "app_aes_gcm.decrypt": decrypt / len(pairs) * 1e6,
    }


def measure_options(connection: psycopg.Connection, *, tokens: int, repeat: int) -> dict[str, Any]:
    """Median per-token encrypt/decrypt cost of each variant over ``repeat`` rounds."""
    pairs = _prepare(connection, tokens)
    _server_round(connection, tokens)  # warm the cache and the plans
    rounds = []
    for _ in range(repeat):
        rounds.append({**_server_round(connection, tokens), **_app_round(pairs)})
    result: dict[str, Any] = {"tokens": tokens, "options": {**VARIANTS, "app_aes_gcm": None}}
    for name in (*VARIANTS, "app_aes_gcm"):
        result[name] = {
            "encrypt_us": summary([r[f"{name}.encrypt"] for r in rounds]),
            "decrypt_us": summary([r[f"{name}.decrypt"] for r in rounds]),
            "where": "application" if name == "app_aes_gcm" else "database",
        }
    result["decrypt_advantage_vs_defaults"] = summary(
        ratios([r["defaults.decrypt"] for r in rounds], [r["ours.decrypt"] for r in rounds])
    )
    result["encrypt_advantage_vs_defaults"] = summary(
        ratios([r["defaults.encrypt"] for r in rounds], [r["ours.encrypt"] for r in rounds])
    )
    connection.execute("DROP TABLE bench_tokens")
    return result
