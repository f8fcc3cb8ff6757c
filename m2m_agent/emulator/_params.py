"""Validation of request bodies and query strings, with Clerk's 400 errors."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Literal

from ._ids import MACHINE_ID_PATTERN

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ApiError",
    "CreateParams",
    "ListParams",
    "parse_create",
    "parse_list",
    "parse_revoke",
    "parse_verify",
]


class ApiError(Exception):
    """An error answer: raised by validation and endpoint code, turned into an envelope.

    Args:
        status: The HTTP status.
        code: The Clerk error code.
        message: The short message.
        long_message: The long message.
        meta: The error's ``meta`` object.
        headers: Extra response headers (``Allow``, ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        long_message: str,
        meta: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.long_message = long_message
        self.meta = dict(meta or {})
        self.headers = dict(headers or {})


def _unknown(name: str) -> ApiError:
    return ApiError(
        400,
        "form_param_unknown",
        "is unknown",
        f"{name} is not a valid parameter for this request.",
        {"param_name": name},
    )


def _missing(name: str) -> ApiError:
    return ApiError(
        400, "form_param_missing", "is missing", f"{name} must be included.", {"param_name": name}
    )


def _invalid(name: str, why: str) -> ApiError:
    return ApiError(
        400, "form_param_value_invalid", "is invalid", f"{name} {why}.", {"param_name": name}
    )


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            400,
            "request_body_invalid",
            "Invalid request body",
            "The request body could not be parsed as JSON.",
        ) from None
    if not isinstance(value, dict):
        raise ApiError(
            400,
            "request_body_invalid",
            "Invalid request body",
            "The request body must be a JSON object.",
        )
    return value


def _only(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for name in body:
        if name not in allowed:
            raise _unknown(name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class CreateParams:
    """A validated create request (``lifetime`` still unresolved when ``None``)."""

    token_format: Literal["opaque", "jwt"]
    seconds_until_expiration: float | None
    claims: Any
    min_remaining_ttl_seconds: int | None


def parse_create(body: bytes) -> CreateParams:
    """Validate a create body (``additionalProperties: false``).

    Raises:
        ApiError: 400 for bad JSON, unknown fields or bad values.
    """
    data = _json_object(body)
    _only(data, ("token_format", "seconds_until_expiration", "claims", "min_remaining_ttl_seconds"))
    raw_format = data.get("token_format")
    token_format: Literal["opaque", "jwt"]
    if raw_format is None or raw_format == "opaque":
        token_format = "opaque"
    elif raw_format == "jwt":
        token_format = "jwt"
    else:
        raise _invalid("token_format", "must be one of: opaque, jwt")
    seconds = data.get("seconds_until_expiration")
    if seconds is not None and not (_is_number(seconds) and seconds > 0):
        raise _invalid("seconds_until_expiration", "must be a number greater than 0")
    min_remaining = data.get("min_remaining_ttl_seconds")
    if min_remaining is not None:
        if not (
            _is_number(min_remaining) and min_remaining >= 0 and min_remaining == int(min_remaining)
        ):
            raise _invalid(
                "min_remaining_ttl_seconds", "must be an integer greater than or equal to 0"
            )
        min_remaining = int(min_remaining)
    return CreateParams(
        token_format=token_format,
        seconds_until_expiration=None if seconds is None else float(seconds),
        claims=data.get("claims"),
        min_remaining_ttl_seconds=min_remaining,
    )


def parse_verify(body: bytes) -> str:
    """The token of a verify body ``{"token": ...}`` (or the legacy ``{"secret": ...}``).

    Raises:
        ApiError: 400 for bad JSON, unknown fields, or a missing or non-string token.
    """
    data = _json_object(body)
    _only(data, ("token", "secret"))
    name = "token" if "token" in data else "secret"
    token = data.get(name)
    if token is None:
        raise _missing("token")
    if not isinstance(token, str) or not token:
        raise _invalid(name, "must be a non-empty string")
    return token


def parse_revoke(body: bytes) -> str | None:
    """The reason of a revoke body: ``{"revocation_reason": str | null}``, ``{}`` or empty.

    Raises:
        ApiError: 400 for bad JSON, unknown fields or a non-string reason.
    """
    data = _json_object(body)
    _only(data, ("revocation_reason",))
    reason = data.get("revocation_reason")
    if reason is not None and not isinstance(reason, str):
        raise _invalid("revocation_reason", "must be a string or null")
    return reason


@dataclasses.dataclass(frozen=True)
class ListParams:
    """A validated list query."""

    subject: str
    revoked: bool
    expired: bool
    limit: int
    offset: int


def _flag(query: Mapping[str, str], name: str) -> bool:
    raw = query.get(name, "").strip().lower()
    if raw in ("", "null", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise _invalid(name, "must be a boolean")


def _whole(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    raw = query.get(name, "").strip()
    if raw in ("", "null"):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, "must be an integer") from None
    if not math.isfinite(value) or value != int(value):
        raise _invalid(name, "must be an integer")
    if value < low or (high is not None and value > high):
        bound = (
            f"between {low} and {high}" if high is not None else f"greater than or equal to {low}"
        )
        raise _invalid(name, f"must be {bound}")
    return int(value)


def parse_list(query: Mapping[str, str]) -> ListParams:
    """Validate a list query (``limit`` and ``offset`` may come as ``"10.0"``).

    Raises:
        ApiError: 400 for a missing or malformed subject or an out-of-range value.
    """
    subject = query.get("subject")
    if not subject:
        raise _missing("subject")
    if not MACHINE_ID_PATTERN.match(subject):
        raise _invalid("subject", "must be a machine id (mch_...)")
    return ListParams(
        subject=subject,
        revoked=_flag(query, "revoked"),
        expired=_flag(query, "expired"),
        limit=_whole(query, "limit", 10, 1, 100),
        offset=_whole(query, "offset", 0, 0, None),
    )
