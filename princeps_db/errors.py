"""Errors raised by princeps-db. Messages name the problem and the remedy, never a secret."""

from __future__ import annotations


class PrincepsDBError(Exception):
    """Base class of every error princeps-db raises on purpose."""


class ConfigurationError(PrincepsDBError):
    """Settings are missing or malformed (database URL, encryption keys, environment)."""


class IntegrationNotFoundError(PrincepsDBError, LookupError):
    """No integration exists for the given user and provider."""


class UserNotFoundError(PrincepsDBError, LookupError):
    """The user an integration is being saved for does not exist."""


class TokenDecryptionError(PrincepsDBError):
    """A stored token could not be decrypted: wrong key, or tampered or moved ciphertext.

    Raised instead of ever returning wrong plaintext. The database transaction
    that raised it is aborted; the caller rolls it back.
    """


class TokenExpiredError(PrincepsDBError):
    """The stored access token has expired and cannot be refreshed here."""


class InvalidInputError(PrincepsDBError, ValueError):
    """An argument is not acceptable (unknown provider, empty token, naive datetime...)."""
