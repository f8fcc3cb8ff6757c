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
from m2m_agent.errors import MalformedResponseError, TransportError

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


def _undecodable(call: ApiCall[Any], status_code: int) -> MalformedResponseError:
    return MalformedResponseError(
        f"The {call.operation} response body does not decode under its Content-Encoding.",
        status_code=status_code,
        code="undecodable_body",
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
    status_code = 0
    try:
        response = http.send(call.request, stream=True)
        status_code = response.status_code
        try:
            chunks = response.iter_bytes()
            try:
                for chunk in chunks:
                    reader.feed(chunk, status_code=response.status_code)
            finally:
                getattr(chunks, "close", lambda: None)()  # a generator left mid-body
        finally:
            response.close()
    except httpx.TransportError as exc:
        raise _transport_error(call, exc) from exc
    except httpx.DecodingError:
        raise _undecodable(call, status_code) from None
    return _received(call, response, reader.content, started)


async def asend(http: httpx.AsyncClient, call: ApiCall[T]) -> T:
    """Send ``call`` and parse the answer; see :func:`send`."""
    started = time.monotonic()
    reader = BodyReader()
    status_code = 0
    try:
        response = await http.send(call.request, stream=True)
        status_code = response.status_code
        try:
            achunks = response.aiter_bytes()
            try:
                async for chunk in achunks:
                    reader.feed(chunk, status_code=response.status_code)
            finally:
                aclose = getattr(achunks, "aclose", None)  # an async generator left mid-body
                if aclose is not None:
                    await aclose()
        finally:
            await response.aclose()
    except httpx.TransportError as exc:
        raise _transport_error(call, exc) from exc
    except httpx.DecodingError:
        raise _undecodable(call, status_code) from None
    return _received(call, response, reader.content, started)
