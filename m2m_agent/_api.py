"""The sans-IO half of the Backend API client: request builders, response parsers, error mapping.

Nothing here sends, sleeps or reads a clock: each builder returns an :class:`ApiCall` holding the
``httpx.Request`` to send and the function that turns the bytes that came back into a result or a
typed error. The sync and async clients differ only in how they send.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
import platform
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

import httpx

from m2m_agent import _version
from m2m_agent._config import finite_number
from m2m_agent._secrets import Secret
from m2m_agent._token import M2MToken, M2MTokenList, TokenFormat
from m2m_agent.errors import (
    AuthenticationError,
    BadRequestError,
    ClerkAPIError,
    ConfigurationError,
    InvalidTokenError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

__all__ = [
    "CLERK_API_VERSION",
    "MAX_RESPONSE_BYTES",
    "ApiCall",
    "ApiResponse",
    "BodyReader",
    "Endpoints",
    "error_from_response",
    "parse_retry_after",
    "parse_token_object",
    "with_timeout",
]

T = TypeVar("T")

CLERK_API_VERSION = "2026-05-12"
"""The Backend API version we speak (sent as ``Clerk-API-Version``)."""

MAX_RESPONSE_BYTES = 1024 * 1024
"""A token object is under 2 KiB and a full list page under 200 KiB: more than this is not Clerk."""

USER_AGENT = (
    f"m2m-agent/{_version.__version__} httpx/{httpx.__version__} python/{platform.python_version()}"
)

_TOKEN_ID = re.compile(r"^mt_[0-9A-Fa-f]{32}$")
_MACHINE_ID = re.compile(r"^mch_\w{27}$")
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_FORMATS: tuple[TokenFormat, ...] = ("opaque", "jwt")


@dataclasses.dataclass(frozen=True, slots=True)
class ApiResponse:
    """What came back, fully read: status, headers, the (size-capped) body, and when."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    received_at: float
    """Wall-clock seconds when the response arrived (only for ``Retry-After`` dates)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ApiCall(Generic[T]):
    """One API operation: the request to send and how to read its answer."""

    operation: str
    request: httpx.Request
    parse: Callable[[ApiResponse], T]


def with_timeout(call: ApiCall[T], seconds: float) -> ApiCall[T]:
    """``call`` with every phase of its request limited to ``seconds`` (for bounded shutdowns)."""
    call.request.extensions["timeout"] = httpx.Timeout(max(0.001, seconds)).as_dict()
    return call


class BodyReader:
    """Accumulates a response body, refusing one larger than the contract allows."""

    __slots__ = ("_chunks", "_limit", "_size")

    def __init__(self, limit: int = MAX_RESPONSE_BYTES) -> None:
        self._chunks: list[bytes] = []
        self._limit = limit
        self._size = 0

    def feed(self, chunk: bytes, *, status_code: int) -> None:
        """Take the next chunk.

        Raises:
            MalformedResponseError: the body grew past the limit.
        """
        self._size += len(chunk)
        if self._size > self._limit:
            raise MalformedResponseError(
                f"The API response body exceeded {self._limit} bytes; this is not a Clerk "
                "response. Check api_url (a proxy or a wrong host?).",
                status_code=status_code,
                code="response_too_large",
            )
        self._chunks.append(chunk)

    @property
    def content(self) -> bytes:
        """The body so far."""
        return b"".join(self._chunks)


class Endpoints:
    """Builds the four M2M calls against one API URL with one key."""

    __slots__ = ("_base", "_headers", "_timeout")

    def __init__(self, api_url: httpx.URL, key: Secret, *, timeout: httpx.Timeout) -> None:
        self._base = api_url
        self._timeout = timeout.as_dict()
        self._headers = {
            "Authorization": f"Bearer {key.reveal()}",
            "Accept": "application/json",
            "Clerk-API-Version": CLERK_API_VERSION,
            "User-Agent": USER_AGENT,
        }

    @property
    def api_url(self) -> httpx.URL:
        """The base URL the paths are appended to."""
        return self._base

    def _url(self, path: str) -> httpx.URL:
        base = self._base.path.rstrip("/")
        return self._base.copy_with(path=f"{base}{path}")

    def _request(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None
    ) -> httpx.Request:
        headers = dict(self._headers)
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, separators=(",", ":")).encode()
        return httpx.Request(
            method,
            self._url(path),
            headers=headers,
            content=content,
            params=params,
            # httpx only applies a client's timeout in build_request; carry ours explicitly so
            # a bring-your-own client can never wait forever.
            extensions={"timeout": self._timeout},
        )

    def create(
        self,
        *,
        seconds_until_expiration: float | None,
        claims: Mapping[str, Any] | None,
        token_format: TokenFormat,
        min_remaining_ttl_seconds: int | None,
    ) -> ApiCall[M2MToken]:
        """``POST /m2m_tokens``: mint (or, with ``min_remaining_ttl_seconds``, reuse) a token."""
        if token_format not in _FORMATS:
            raise ConfigurationError(
                f"token_format must be 'opaque' or 'jwt', got {token_format!r}."
            )
        body: dict[str, Any] = {"token_format": token_format}
        if seconds_until_expiration is not None:
            if not _positive_number(seconds_until_expiration):
                raise ConfigurationError(
                    "seconds_until_expiration must be a positive number of seconds, "
                    f"got {seconds_until_expiration!r}."
                )
            body["seconds_until_expiration"] = seconds_until_expiration
        else:
            body["seconds_until_expiration"] = None
        if claims is not None:
            if not isinstance(claims, Mapping):
                raise ConfigurationError(
                    f"claims must be a mapping of JSON values, got {type(claims).__name__}."
                )
            try:
                body["claims"] = json.loads(json.dumps(dict(claims)))
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"claims must be JSON-serialisable: {exc}") from None
        if min_remaining_ttl_seconds is not None:
            if token_format != "opaque":
                raise ConfigurationError(
                    "min_remaining_ttl_seconds only applies to opaque tokens; Clerk never "
                    "reuses JWT-format tokens."
                )
            if (
                isinstance(min_remaining_ttl_seconds, bool)
                or not isinstance(min_remaining_ttl_seconds, int)
                or min_remaining_ttl_seconds < 0
            ):
                raise ConfigurationError(
                    "min_remaining_ttl_seconds must be a non-negative int, "
                    f"got {min_remaining_ttl_seconds!r}."
                )
            if (
                seconds_until_expiration is not None
                and min_remaining_ttl_seconds >= seconds_until_expiration
            ):
                raise ConfigurationError(
                    "min_remaining_ttl_seconds must be less than seconds_until_expiration."
                )
            body["min_remaining_ttl_seconds"] = min_remaining_ttl_seconds
        request = self._request("POST", "/m2m_tokens", body=body)
        return ApiCall("create", request, lambda r: _parse_token(r, with_secret=True))

    def revoke(self, token_id: str, *, reason: str | None = None) -> ApiCall[M2MToken]:
        """``POST /m2m_tokens/{id}/revoke``."""
        if not isinstance(token_id, str) or not _TOKEN_ID.match(token_id):
            raise ConfigurationError(
                "revoke_token takes a token id ('mt_' followed by 32 hex characters, the "
                "M2MToken.id), not the token itself or anything else."
            )
        if reason is not None and not isinstance(reason, str):
            raise ConfigurationError(f"reason must be a str, got {type(reason).__name__}.")
        request = self._request(
            "POST", f"/m2m_tokens/{token_id}/revoke", body={"revocation_reason": reason}
        )
        return ApiCall("revoke", request, lambda r: _parse_token(r, with_secret=False))

    def verify(self, token: str) -> ApiCall[M2MToken]:
        """``POST /m2m_tokens/verify``: ask Clerk whether a presented token is good."""
        if not isinstance(token, str) or not token or token != token.strip():
            raise ConfigurationError("verify_token takes a non-empty token string without spaces.")
        request = self._request("POST", "/m2m_tokens/verify", body={"token": token})
        token_format: TokenFormat = "jwt" if _JWT_SHAPE.match(token) else "opaque"
        return ApiCall("verify", request, lambda r: _parse_verified(r, token_format))

    def list(
        self, *, subject: str, revoked: bool, expired: bool, limit: int, offset: int
    ) -> ApiCall[M2MTokenList]:
        """``GET /m2m_tokens?subject=...``: a page of one machine's stored (opaque) tokens."""
        if not isinstance(subject, str) or not _MACHINE_ID.match(subject):
            raise ConfigurationError(
                "subject must be a machine id: 'mch_' followed by 27 letters or digits."
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ConfigurationError(f"limit must be an int from 1 to 100, got {limit!r}.")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigurationError(f"offset must be a non-negative int, got {offset!r}.")
        params = {
            "subject": subject,
            "revoked": "true" if revoked else "false",
            "expired": "true" if expired else "false",
            "limit": str(limit),
            "offset": str(offset),
        }
        request = self._request("GET", "/m2m_tokens", params=params)
        return ApiCall("list", request, _parse_list)


def _positive_number(value: object) -> bool:
    number = finite_number(value)
    return number is not None and number > 0


# --- parsing -----------------------------------------------------------------------------------


def _json_body(response: ApiResponse) -> Any:
    """Decode a JSON body or raise ``MalformedResponseError`` naming what came instead."""
    content_type = response.headers.get("content-type", "")
    if "json" not in content_type.lower():
        raise MalformedResponseError(
            f"Expected a JSON response, got HTTP {response.status_code} with content type "
            f"{content_type or 'none'!r}. Check api_url: is it Clerk's Backend API?",
            status_code=response.status_code,
            code="unexpected_content_type",
        )
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedResponseError(
            f"HTTP {response.status_code} response is not valid JSON ({type(exc).__name__}).",
            status_code=response.status_code,
            code="invalid_json",
        ) from None


def _check_success(response: ApiResponse) -> Any:
    if not 200 <= response.status_code < 300:
        raise error_from_response(response)
    return _json_body(response)


def _parse_token(response: ApiResponse, *, with_secret: bool) -> M2MToken:
    data = _check_success(response)
    token = parse_token_object(data, status_code=response.status_code)
    if with_secret and not token.token:
        raise _malformed(response.status_code, "the create response has no 'token'")
    return token


def _parse_verified(response: ApiResponse, token_format: TokenFormat) -> M2MToken:
    # The verify answer has no token string: the format is that of the token we sent.
    token = dataclasses.replace(_parse_token(response, with_secret=False), format=token_format)
    # Defence in depth: Clerk answers 404 for such tokens, but a 200 that says so is no pass.
    if token.revoked:
        raise InvalidTokenError(f"Token {token.id} is revoked.", reason="revoked")
    if token.expired:
        raise InvalidTokenError(f"Token {token.id} is expired.", reason="expired")
    return token


def _parse_list(response: ApiResponse) -> M2MTokenList:
    data = _check_success(response)
    if not isinstance(data, dict):
        raise _malformed(response.status_code, "the list response is not a JSON object")
    items = data.get("m2m_tokens", data.get("data"))
    total = data.get("total_count", data.get("totalCount"))
    if not isinstance(items, list):
        raise _malformed(response.status_code, "the list response has no 'm2m_tokens' array")
    tokens = tuple(parse_token_object(item, status_code=response.status_code) for item in items)
    if total is None:
        total = len(tokens)
    count = finite_number(total)
    if count is None or count < 0:
        raise _malformed(response.status_code, "'total_count' is not a count")
    return M2MTokenList(tokens=tokens, total_count=int(count))


def _malformed(status_code: int, what: str) -> MalformedResponseError:
    return MalformedResponseError(
        f"Malformed API response: {what}.", status_code=status_code, code="malformed_response"
    )


def parse_token_object(data: Any, *, status_code: int = 200) -> M2MToken:
    """Turn one ``machine_to_machine_token`` JSON object into an :class:`M2MToken`.

    Lenient in what it accepts (missing optional keys, ``null`` lists), strict about what it needs
    (``id``, ``subject``, well-typed values).

    Raises:
        MalformedResponseError: the object lacks a required field or a field has the wrong type.
    """
    if not isinstance(data, dict):
        raise _malformed(status_code, "the token is not a JSON object")

    def text(name: str, *, required: bool = False) -> str | None:
        value = data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value):
            raise _malformed(status_code, f"token field {name!r} is missing or not a string")
        return value

    def flag(name: str) -> bool:
        value = data.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _malformed(status_code, f"token field {name!r} is not a boolean")
        return value

    def timestamp(name: str) -> datetime | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise _malformed(status_code, f"token field {name!r} is not a Unix-ms timestamp")
        try:
            return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise _malformed(status_code, f"token field {name!r} is out of range") from None

    scopes = data.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise _malformed(status_code, "token field 'scopes' is not a list of strings")
    claims = data.get("claims")
    if claims is not None and not isinstance(claims, dict):
        raise _malformed(status_code, "token field 'claims' is not an object")
    secret = text("token")
    return M2MToken(
        id=text("id", required=True) or "",
        subject=text("subject", required=True) or "",
        scopes=tuple(scopes),
        claims=claims,
        token=secret,
        revoked=flag("revoked"),
        revocation_reason=text("revocation_reason"),
        expired=flag("expired"),
        expiration=timestamp("expiration"),
        created_at=timestamp("created_at"),
        updated_at=timestamp("updated_at"),
        last_used_at=timestamp("last_used_at"),
        format="jwt" if secret is not None and _JWT_SHAPE.match(secret) else "opaque",
    )


# --- errors ------------------------------------------------------------------------------------

_ERROR_CLASSES: dict[int, type[ClerkAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: BadRequestError,
    429: RateLimitError,
}

_HINTS: dict[int, str] = {
    401: "Check the machine secret key (ak_...): it may be wrong, revoked or rotated.",
    403: "The key is valid but may not do this.",
    429: "Rate limited by Clerk; wait for Retry-After.",
}


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_from_response(response: ApiResponse) -> ClerkAPIError:
    """Map a non-2xx response to the matching :class:`ClerkAPIError` subclass.

    Reads Clerk's envelope ``{"errors": [{"message", "long_message", "code"}], "clerk_trace_id"}``
    when there is one; a body that is not (a proxy's HTML page) still maps by status.
    """
    status = response.status_code
    cls = _ERROR_CLASSES.get(status) or (ServerError if status >= 500 else ClerkAPIError)
    code = message = long_message = trace_id = None
    try:
        data = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            code = _str_or_none(first.get("code"))
            message = _str_or_none(first.get("message"))
            long_message = _str_or_none(first.get("long_message"))
        trace_id = _str_or_none(data.get("clerk_trace_id"))
    trace_id = trace_id or response.headers.get("cf-ray")
    summary = long_message or message or f"HTTP {status} from the Clerk API"
    hint = _HINTS.get(status)
    text = f"Clerk API error {status}" + (f" ({code})" if code else "") + f": {summary}"
    if hint and hint not in summary:
        text += f" {hint}"
    return cls(
        text,
        status_code=status,
        code=code,
        long_message=long_message,
        trace_id=trace_id,
        retry_after=parse_retry_after(
            response.headers.get("retry-after"), now=response.received_at
        ),
    )


def _str_or_none(value: object) -> str | None:
    return value[:1000] if isinstance(value, str) else None
