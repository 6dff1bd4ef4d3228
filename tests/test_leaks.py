"""No key, and with the recommended server setting no token, ever reaches a log.

Server side: a PostgreSQL that logs every statement with its parameters in
full runs the whole lifecycle (``LIFECYCLE`` in security_support). Derived
per-token keys and tokens do appear in such a log (they are bind
parameters); the master keys never do, in any encoding. With
``log_parameter_max_length = 0`` no token appears either.

The Google client secret never reaches the database at all, so it is in
neither server log.

Python side: the same lifecycle at DEBUG with SQLAlchemy echo on: no key,
derived key, token or client secret in logs, captured output, exception
messages, reprs or command output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from princeps_db.crypto import generate_master_key
from princeps_db.pgserver import LocalPostgres
from tests.security_support import (
    LIFECYCLE,
    Lifecycle,
    create_database,
    derived_keys_for,
    find_secrets,
    key_forms,
    princeps_db_argv,
    raw_key_bytes,
    run_command,
    run_lifecycle,
)

ALWAYS_LOGGED = {"log_statement": "all", "log_min_duration_statement": "0"}
FULL_PARAMETERS = {
    **ALWAYS_LOGGED,
    "log_parameter_max_length": "-1",
    "log_parameter_max_length_on_error": "-1",
}
RECOMMENDED = {**ALWAYS_LOGGED, "log_parameter_max_length": "0"}


@pytest.fixture(scope="module")
def verbose_server() -> Iterator[LocalPostgres]:
    """A server that logs every statement and every bound parameter in full."""
    with LocalPostgres(server_settings=FULL_PARAMETERS) as server:
        yield server


@pytest.fixture(scope="module")
def recommended_server() -> Iterator[LocalPostgres]:
    """A server that logs every statement, with parameter logging off as recommended."""
    with LocalPostgres(server_settings=RECOMMENDED) as server:
        yield server


def _lifecycle(server: LocalPostgres, name: str, **options: object) -> Lifecycle:
    url = create_database(server, name)
    return Lifecycle(
        url=url,
        key_text=generate_master_key(),
        previous_key_texts=(generate_master_key(),),
        **options,  # type: ignore[arg-type]
    )


def _master_key_forms(life: Lifecycle) -> dict[str, str]:
    texts = [life.key_text, *life.previous_key_texts, *life.other_key_texts]
    return {
        f"key #{position} {form}": value
        for position, text in enumerate(texts)
        for form, value in key_forms(text).items()
    }


@pytest.mark.slow
def test_the_master_keys_never_reach_a_server_that_logs_every_parameter(
    verbose_server: LocalPostgres,
) -> None:
    life = _lifecycle(verbose_server, "leaks_full")
    steps = run_lifecycle(life)
    log = verbose_server.read_log()
    log_bytes = verbose_server.log_path.read_bytes()

    # The log really holds bound values: derived keys and tokens are there by design.
    derived = derived_keys_for(life.keyring, sorted(life.identities))
    assert find_secrets(log, derived), "parameter logging is not on: the test proves nothing"
    assert find_secrets(log, life.tokens), "tokens travel as parameters, so they must show here"
    assert "Wrong key or corrupt data" in log, "the wrong-key read did not reach the server"
    assert "FOR UPDATE SKIP LOCKED" in log, "the rotation did not run against this server"

    forms = _master_key_forms(life)
    searched = len(forms)
    # current (since the rotation), the key it replaced, an older previous key and a
    # wrong key; 8 spellings each
    assert searched == 8 * 4
    assert find_secrets(log, forms) == [], f"master key found in the server log after {steps}"
    for text in (life.key_text, *life.previous_key_texts, *life.other_key_texts):
        assert raw_key_bytes(text) not in log_bytes
    assert life.google.client_secret not in log
    print(f"full parameter logging: {searched} master-key spellings searched, {steps}")


@pytest.mark.slow
def test_no_token_reaches_a_server_logging_statements_with_parameter_logging_off(
    recommended_server: LocalPostgres,
) -> None:
    life = _lifecycle(recommended_server, "leaks_recommended")
    run_lifecycle(life)
    log = recommended_server.read_log()

    assert 'UPDATE "Integration"' in log, "statement logging is not on: the test proves nothing"
    # (the audit's own SQL comments mention "parameters:"; a logged value reads "parameters: $1")
    assert "parameters: $" not in log
    tokens = {f"token {label}": value for label, value in life.tokens.items()}
    searched = len(tokens)
    assert searched > 100
    assert any("refreshed" in label for label in tokens), "no refreshed token was searched for"
    assert find_secrets(log, tokens) == []
    derived = derived_keys_for(life.keyring, sorted(life.identities))
    assert find_secrets(log, derived) == []
    assert find_secrets(log, _master_key_forms(life)) == []
    assert life.google.client_secret not in log
    print(f"parameter logging off: {searched} tokens, {len(derived)} derived keys searched")


@pytest.mark.slow
def test_nothing_secret_in_python_logs_output_errors_or_reprs_at_debug_with_echo(
    recommended_server: LocalPostgres,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    life = _lifecycle(recommended_server, "leaks_python", echo=True)
    logging.getLogger().setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG):
        run_lifecycle(life)
        life.note(life.settings(), life.keyring, life.engine, life.sessions())
        life.close()
    captured = capfd.readouterr()

    keygen = run_command(princeps_db_argv("keygen"), life.env())
    assert keygen.returncode == 0
    own_key = keygen.stdout.strip()
    assert keygen.stdout == own_key + "\n"
    assert own_key not in keygen.stderr

    everything = "\n".join([caplog.text, captured.out, captured.err, keygen.stderr, *life.outputs])
    assert "pgp_sym_encrypt" in caplog.text + captured.out + captured.err, "echo was not on"
    assert "Running upgrade" in everything, "the CLI output was not captured"
    assert "refreshed the google_calendar access token" in caplog.text, "no refresh was logged"
    assert "rotated: " in everything and "OK: every row decrypts" in everything
    assert "log_parameter_max_length" in everything, "the audit output was not captured"
    secrets = life.secrets()
    searched = len(secrets)  # a number, so a failure never prints the values themselves
    assert searched > 300
    assert "Google client secret" in secrets
    print(f"Python side: {searched} values searched, {len(life.outputs)} outputs")
    assert find_secrets(everything, secrets) == []
    assert find_secrets(keygen.stdout, {k: v for k, v in secrets.items() if "token" in k}) == []


def test_the_lifecycle_covers_every_operation_available() -> None:
    names = [step.name for step in LIFECYCLE]
    assert names[0] == "baseline + seed"
    assert {"backfill migration", "upserts", "wrong-key read"} <= set(names)
    assert {"refresh and provider calls", "rotate-key", "verify", "audit"} <= set(names)
    assert names.index("rotate-key") < names.index("verify")
    assert "downgrade to baseline and up" in names
