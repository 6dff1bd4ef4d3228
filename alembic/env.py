"""Alembic environment: one advisory lock, timeouts, a transaction per migration.

The URL comes from, in order: a connection handed in through
``config.attributes["connection"]`` (tests), ``-x db_url=...``, then
DATABASE_URL. The key ring comes from ``config.attributes["keyring"]`` or the
settings, and is loaded before anything is sent to the database, so a
production deploy without a valid key stops here.
"""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

from princeps_db.config import get_settings, normalise_database_url
from princeps_db.errors import ConfigurationError
from princeps_db.models import Base

config = context.config
# Command-line runs log per-batch progress as alembic.ini says; code that hands
# in a connection (tests) or shows progress itself (princeps-db migrate) keeps
# its own logging set-up.
if (
    config.config_file_name is not None
    and "connection" not in config.attributes
    and not config.attributes.get("own_logging")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata

# Two deploys must not migrate at once; the number is an arbitrary constant.
MIGRATION_LOCK_ID = 7_431_021_993


def _x_arguments() -> dict[str, str]:
    return context.get_x_argument(as_dictionary=True)


def _load_keyring_and_url() -> str | None:
    """Return the URL to connect to (None when a connection was handed in)."""
    x_args = _x_arguments()
    try:
        if "keyring" not in config.attributes:
            config.attributes["keyring"] = get_settings().keyring()
        if config.attributes.get("connection") is not None:
            return None
        if "db_url" in x_args:
            return normalise_database_url(x_args["db_url"])
        return get_settings().require_database_url()
    except (ConfigurationError, ValueError) as error:
        # One clear line and a non-zero exit, not a traceback.
        raise SystemExit(f"ConfigurationError: {error}") from None


def _configure_and_run(connection: Connection) -> None:
    x_args = _x_arguments()
    connection.execute(
        sa.text(
            "SELECT set_config('lock_timeout', :lock, false), "
            "set_config('statement_timeout', :statement, false)"
        ),
        {
            "lock": x_args.get("lock_timeout", "10s"),
            "statement": x_args.get("statement_timeout", "30min"),
        },
    )
    connection.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            transaction_per_migration=True,
            compare_type=True,
        )
        context.run_migrations()
    finally:
        if connection.in_transaction():
            connection.rollback()
        connection.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()


def run_migrations_online() -> None:
    """Run migrations against a live database."""
    url = _load_keyring_and_url()
    handed_in = config.attributes.get("connection")
    if handed_in is not None:
        _configure_and_run(handed_in)
        return
    assert url is not None
    engine = sa.create_engine(
        url, hide_parameters=True, connect_args={"application_name": "princeps-db-migrate"}
    )
    try:
        with engine.connect() as connection:
            _configure_and_run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (--sql) mode is not supported: the data migrations derive a key per row"
    )
run_migrations_online()
