"""Engines and sessions. Nothing here is created at import time."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from princeps_db.config import Settings, get_settings
from princeps_db.crypto import KeyRing

KEYRING_INFO_KEY = "princeps_db.keyring"


def create_engine(
    settings: Settings, *, application_name: str = "princeps-db", echo: bool = False
) -> Engine:
    """Create an engine for ``settings.database_url``.

    ``hide_parameters`` keeps bound tokens and derived keys out of exception
    messages and echo output.
    """
    return sa.create_engine(
        settings.require_database_url(),
        hide_parameters=True,
        echo=echo,
        pool_pre_ping=True,
        connect_args={"application_name": application_name},
    )


def create_session_factory(engine: Engine, *, keyring: KeyRing) -> sessionmaker[Session]:
    """Return a session factory whose sessions carry ``keyring`` for the repository."""
    return sessionmaker(bind=engine, info={KEYRING_INFO_KEY: keyring}, expire_on_commit=False)


def session_keyring(session: Session) -> KeyRing:
    """Return the key ring attached to ``session``, or the one from the process settings."""
    keyring = session.info.get(KEYRING_INFO_KEY)
    if isinstance(keyring, KeyRing):
        return keyring
    return get_settings().keyring()
