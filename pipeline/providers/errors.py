"""Provider errors: one exception hierarchy for every HTTP failure of a provider API.

`ProviderError(status, code, message)`: `status` is the HTTP status (0 when no response arrived, e.g. a
connection reset), `code` the provider's error code (gRPC int for Fireworks, a string for OpenAI-style
envelopes, None when the body had none) and `message` names the request (method + path) and never secrets.
"""

from __future__ import annotations


class ProviderError(Exception):
    """A provider request failed; see the module docstring for the fields."""

    def __init__(self, status: int, code: int | str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status}, code {self.code})"


class NotFound(ProviderError):
    """HTTP 404 / gRPC NOT_FOUND (5)."""


class AlreadyExists(ProviderError):
    """HTTP 409 / gRPC ALREADY_EXISTS (6): a create named an id that is taken."""


class RateLimited(ProviderError):
    """HTTP 429 / gRPC RESOURCE_EXHAUSTED (8), still failing after the retries."""


class AuthError(ProviderError):
    """HTTP 401/403: missing or invalid API key, or no permission."""


class ProviderUnavailable(ProviderError):
    """5xx, connection errors, timeouts or truncated bodies, still failing after the retries."""


class ServerDown(ProviderUnavailable):
    """The provider's server does not answer at all (e.g. a local server that is not running): nothing can be sent
    until it is back; what was done so far is kept."""


def error_for_status(status: int, code: int | str | None, message: str) -> ProviderError:
    """The most specific ProviderError subclass for an HTTP status (0 = no response)."""
    if status == 404:
        return NotFound(status, code, message)
    if status == 409:
        return AlreadyExists(status, code, message)
    if status == 429:
        return RateLimited(status, code, message)
    if status in (401, 403):
        return AuthError(status, code, message)
    if status == 0 or status >= 500:
        return ProviderUnavailable(status, code, message)
    return ProviderError(status, code, message)
