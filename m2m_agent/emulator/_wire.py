"""Clerk's wire format: JSON responses, the error envelope and the M2M token object."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import httpx

from ._ids import new_trace_id

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._records import TokenRecord

__all__ = [
    "STATUS_ERRORS",
    "error_response",
    "json_response",
    "millis",
    "opaque_token_object",
    "token_object",
]

#: The code, message and long message of a generic error with this status.
STATUS_ERRORS: Mapping[int, tuple[str, str, str]] = {
    400: ("bad_request", "Bad request", "The request was invalid."),
    401: ("authentication_invalid", "Unauthenticated", "The request could not be authenticated."),
    403: (
        "authorization_invalid",
        "Unauthorized request",
        "You are not authorized to perform this request.",
    ),
    404: ("resource_not_found", "Not found", "The requested resource was not found."),
    405: (
        "method_not_allowed",
        "Method not allowed",
        "This method is not allowed on this resource.",
    ),
    408: ("request_timeout", "Request timeout", "The request timed out."),
    409: ("conflict", "Conflict", "The request conflicts with the current state of the resource."),
    422: ("unprocessable_entity", "Unprocessable entity", "The request could not be processed."),
    429: ("too_many_requests", "Too many requests", "Too many requests, please try again later."),
    500: (
        "internal_clerk_error",
        "Oops, an unexpected error occurred",
        "There was an internal error on our servers. We've been notified and are working on it.",
    ),
    502: (
        "bad_gateway",
        "Bad gateway",
        "The server received an invalid response from an upstream server.",
    ),
    503: (
        "service_unavailable",
        "Service unavailable",
        "The service is temporarily unavailable, please try again later.",
    ),
    504: ("gateway_timeout", "Gateway timeout", "The upstream server did not answer in time."),
}


def json_response(
    status: int, body: Any, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """A response with a compact JSON body and ``Content-Type: application/json``.

    Args:
        status: The HTTP status code.
        body: A JSON-compatible value.
        headers: Extra headers.

    Returns:
        The response, its body already in memory.
    """
    content = json.dumps(body, separators=(",", ":")).encode("utf-8")
    all_headers = {"content-type": "application/json"}
    all_headers.update(headers or {})
    return httpx.Response(status, headers=all_headers, content=content)


def error_response(
    status: int,
    code: str | None = None,
    message: str | None = None,
    long_message: str | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """A Clerk error envelope: ``{"errors": [{message, long_message, code, meta}], ...}``.

    Missing parts default to the generic error for ``status`` (see :data:`STATUS_ERRORS`).

    Args:
        status: The HTTP status code.
        code: The machine-readable error code.
        message: The short message.
        long_message: The long message.
        meta: The error's ``meta`` object (``{}`` when not given).
        headers: Extra headers, e.g. ``Retry-After``.

    Returns:
        The response.
    """
    default = STATUS_ERRORS.get(
        status, ("unexpected_error", "Unexpected error", "An unexpected error occurred.")
    )
    error = {
        "message": message or default[1],
        "long_message": long_message or message or default[2],
        "code": code or default[0],
        "meta": dict(meta or {}),
    }
    return json_response(status, {"errors": [error], "clerk_trace_id": new_trace_id()}, headers)


def millis(seconds: float) -> int:
    """Seconds to Unix milliseconds."""
    return round(seconds * 1000)


def _optional_millis(seconds: float | None) -> int | None:
    return None if seconds is None else millis(seconds)


def token_object(
    *,
    id: str,
    subject: str,
    claims: Any,
    scopes: tuple[str, ...],
    revoked: bool,
    revocation_reason: str | None,
    expired: bool,
    expiration: int | None,
    last_used_at: int | None,
    created_at: int,
    updated_at: int,
    token: str | None = None,
) -> dict[str, Any]:
    """The M2M token object, with ``token`` only when given (create responses).

    Timestamps are Unix milliseconds. Nullable keys are always present.
    """
    body: dict[str, Any] = {
        "object": "machine_to_machine_token",
        "id": id,
        "subject": subject,
        "claims": copy.deepcopy(claims),
        "scopes": list(scopes),
    }
    if token is not None:
        body["token"] = token
    body.update(
        revoked=revoked,
        revocation_reason=revocation_reason,
        expired=expired,
        expiration=expiration,
        last_used_at=last_used_at,
        created_at=created_at,
        updated_at=updated_at,
    )
    return body


def opaque_token_object(
    record: TokenRecord, now: float, *, include_token: bool = False
) -> dict[str, Any]:
    """The token object of a stored opaque token at time ``now``.

    Args:
        record: The stored token.
        now: Seconds on the emulator's clock, to compute ``expired``.
        include_token: Whether to include the ``token`` string (create responses only).

    Returns:
        The JSON object.
    """
    return token_object(
        id=record.id,
        subject=record.subject,
        claims=record.claims,
        scopes=record.scopes,
        revoked=record.revoked,
        revocation_reason=record.revocation_reason,
        expired=record.is_expired(now),
        expiration=_optional_millis(record.expires_at),
        last_used_at=_optional_millis(record.last_used_at),
        created_at=millis(record.created_at),
        updated_at=millis(record.updated_at),
        token=record.token if include_token else None,
    )
