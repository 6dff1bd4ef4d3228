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


class ProviderError(PrincepsDBError):
    """The OAuth provider refused a request; ``code`` is its OAuth error code or HTTP status.

    The provider's response body is never part of the message: it can echo tokens.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ReauthorizationRequiredError(ProviderError):
    """The user's grant was revoked or has expired: they must connect the provider again.

    The integration is marked ``reauthorization_required``; calls fail fast
    without contacting the provider until ``upsert_integration`` stores new tokens.
    """


class ProviderUnavailableError(ProviderError):
    """The provider could not be reached or kept failing (network, timeout, 5xx, 429).

    Nothing stored changed; try again later.
    """
