"""Sending one API call over httpx, sync or async: the only I/O of the Backend API client.

The body is read through :class:`~m2m_agent._api.BodyReader` (capped), transport failures become
:class:`~m2m_agent.errors.TransportError`, and the answer goes to the call's sans-IO parser.
Used by the clients and the verifiers alike.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import httpx
import structlog

from m2m_agent._api import ApiCall, ApiResponse, BodyReader
from m2m_agent.errors import TransportError

__all__ = ["asend", "send"]

T = TypeVar("T")

_log = structlog.get_logger("m2m_agent")


def _transport_error(call: ApiCall[Any], exc: httpx.TransportError) -> TransportError:
    url = call.request.url
    _log.debug("m2m_agent.api.transport_error", operation=call.operation, error=type(exc).__name__)
    return TransportError(
        f"Could not reach the Clerk API at {url.scheme}://{url.netloc.decode()} "
        f"({call.operation}): {type(exc).__name__}: {exc}"
    )


def _received(call: ApiCall[T], response: httpx.Response, body: bytes, started: float) -> T:
    _log.debug(
        "m2m_agent.api.response",
        operation=call.operation,
        status_code=response.status_code,
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return call.parse(ApiResponse(response.status_code, response.headers, body, time.time()))


def send(http: httpx.Client, call: ApiCall[T]) -> T:
    """Send ``call`` and parse the (size-capped) answer.

    Raises:
        TransportError: the API could not be reached.
        ClerkAPIError: the answer was an error or malformed.
    """
    started = time.monotonic()
    reader = BodyReader()
    try:
        response = http.send(call.request, stream=True)
        try:
            for chunk in response.iter_bytes():
                reader.feed(chunk, status_code=response.status_code)
        finally:
            response.close()
    except httpx.TransportError as exc:
        raise _transport_error(call, exc) from exc
    return _received(call, response, reader.content, started)


async def asend(http: httpx.AsyncClient, call: ApiCall[T]) -> T:
    """Send ``call`` and parse the answer; see :func:`send`."""
    started = time.monotonic()
    reader = BodyReader()
    try:
        response = await http.send(call.request, stream=True)
        try:
            async for chunk in response.aiter_bytes():
                reader.feed(chunk, status_code=response.status_code)
        finally:
            await response.aclose()
    except httpx.TransportError as exc:
        raise _transport_error(call, exc) from exc
    return _received(call, response, reader.content, started)
