"""The exceptions m2m-agent raises.

Every exception derives from one root, so ``except M2MAgentError`` catches all of them::

    M2MAgentError
    ├── ConfigurationError (also ValueError)   a missing, malformed or wrong-kind key; a bad URL
    ├── ClerkAPIError                          Clerk answered with an error (or with garbage)
    │   ├── BadRequestError                    400 / 422
    │   ├── AuthenticationError                401
    │   ├── PermissionDeniedError              403
    │   ├── NotFoundError                      404
    │   ├── RateLimitError                     429
    │   ├── ServerError                        5xx
    │   └── MalformedResponseError             a response that is not what the contract says
    ├── TransportError                         the API could not be reached (connect, timeout, drop)
    ├── TokenUnavailableError                  no usable token within the wait budget
    ├── StoreError                             a shared token store failed (managers fall back)
    └── InvalidTokenError                      a presented token did not verify (see ``.reason``)

Every exception pickles (Celery moves them between processes) and none carries a machine secret
key or a token string: messages name token ids or short fingerprints only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ClerkAPIError",
    "ConfigurationError",
    "InvalidTokenError",
    "M2MAgentError",
    "MalformedResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "StoreError",
    "TokenUnavailableError",
    "TransportError",
]


class M2MAgentError(Exception):
    """The root of every exception m2m-agent raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the message, then restore the keyword fields: keeps subclasses with
        # keyword-only constructors picklable without a __reduce__ each.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[M2MAgentError], message: str, state: dict[str, Any]) -> M2MAgentError:
    error = cls.__new__(cls)
    M2MAgentError.__init__(error, message)
    error.__dict__.update(state)
    return error


class ConfigurationError(M2MAgentError, ValueError):
    """A setting is missing or wrong: the message says which one and how to fix it."""


class ClerkAPIError(M2MAgentError):
    """Clerk's Backend API answered with an error.

    Attributes:
        status_code: The HTTP status of the response.
        code: Clerk's machine-readable error code (``errors[0].code``), when the body had one.
        long_message: Clerk's longer explanation, when the body had one.
        trace_id: ``clerk_trace_id`` from the body (or the ``cf-ray`` header), for Clerk support.
        retry_after: Seconds the server asked us to wait (``Retry-After``), if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 0,
        code: str | None = None,
        long_message: str | None = None,
        trace_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.long_message = long_message
        self.trace_id = trace_id
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code}, code={self.code!r}, "
            f"message={self.message!r}, trace_id={self.trace_id!r})"
        )


class BadRequestError(ClerkAPIError):
    """400 or 422: the request was malformed (a bad parameter); retrying will not help."""


class AuthenticationError(ClerkAPIError):
    """401: the machine secret key was rejected (wrong, revoked or rotated away)."""


class PermissionDeniedError(ClerkAPIError):
    """403: the key is valid but may not do this (for example list another machine's tokens)."""


class NotFoundError(ClerkAPIError):
    """404: no such token for this machine (unknown, revoked, expired or out of scope)."""


class RateLimitError(ClerkAPIError):
    """429: too many requests; ``retry_after`` says how long to wait when Clerk said."""


class ServerError(ClerkAPIError):
    """5xx: Clerk (or a proxy in front of it) failed; worth retrying with backoff."""


class MalformedResponseError(ClerkAPIError):
    """The response broke the wire contract: not JSON, the wrong shape, too large."""


class TransportError(M2MAgentError):
    """The API could not be reached: connection refused or dropped, DNS, TLS, timeout."""


class TokenUnavailableError(M2MAgentError):
    """No usable token could be had within the wait budget.

    Its ``__cause__`` is the last failure (a ``ClerkAPIError`` or ``TransportError``).
    """


class StoreError(M2MAgentError):
    """A shared token store could not be read or written (Redis down, a file unreadable).

    Token managers never let it reach a caller: they log it, mint on their own, and share again
    once the store is back.
    """


class InvalidTokenError(M2MAgentError):
    """A presented token did not verify.

    Attributes:
        reason: Why, one of ``"not_m2m_token"``, ``"unknown"``, ``"revoked"``, ``"expired"``,
            ``"bad_signature"``, ``"missing_scope"``, ``"malformed"``.
    """

    def __init__(self, message: str, *, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"
