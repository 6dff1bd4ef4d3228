"""princeps-db: Princeps OAuth integration tokens, encrypted at rest with pgcrypto."""

from princeps_db.config import Environment, Settings, get_settings, load_settings
from princeps_db.crypto import KeyRing, MasterKey, generate_master_key
from princeps_db.db import create_engine, create_session_factory
from princeps_db.errors import (
    ConfigurationError,
    IntegrationNotFoundError,
    InvalidInputError,
    PrincepsDBError,
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    TokenDecryptionError,
    TokenExpiredError,
    UserNotFoundError,
)
from princeps_db.refresh import refresh_access_token
from princeps_db.repository import (
    IntegrationInfo,
    create_user,
    delete_integration,
    get_valid_token,
    list_integrations,
    upsert_integration,
)

__all__ = [
    "ConfigurationError",
    "Environment",
    "IntegrationInfo",
    "IntegrationNotFoundError",
    "InvalidInputError",
    "KeyRing",
    "MasterKey",
    "PrincepsDBError",
    "ProviderError",
    "ProviderUnavailableError",
    "ReauthorizationRequiredError",
    "Settings",
    "TokenDecryptionError",
    "TokenExpiredError",
    "UserNotFoundError",
    "create_engine",
    "create_session_factory",
    "create_user",
    "delete_integration",
    "generate_master_key",
    "get_settings",
    "get_valid_token",
    "list_integrations",
    "load_settings",
    "refresh_access_token",
    "upsert_integration",
]
