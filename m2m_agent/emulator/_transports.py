"""In-process httpx transports that route requests to the emulator, sync and async.

They honour the outcome's delay (``time.sleep`` or ``anyio.sleep``, so asyncio and trio both
work), turn a dropped connection into :class:`httpx.RemoteProtocolError`, and raise
:class:`httpx.ReadTimeout` when the delay exceeds the request's read timeout, as a real
connection would.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
import httpx

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._records import Outcome

__all__ = ["AsyncEmulatorTransport", "EmulatorTransport"]

_DROPPED = "Server disconnected without sending a response."


def _read_timeout(request: httpx.Request) -> float | None:
    timeout = request.extensions.get("timeout") or {}
    value = timeout.get("read")
    return value if isinstance(value, (int, float)) else None


def _wait(request: httpx.Request, delay: float) -> tuple[float, bool]:
    """How long to wait and whether the wait ends in a read timeout."""
    limit = _read_timeout(request)
    if limit is not None and delay > limit:
        return limit, True
    return delay, False


def _finish(request: httpx.Request, outcome: Outcome, timed_out: bool) -> httpx.Response:
    if timed_out:
        raise httpx.ReadTimeout(
            "The emulator's injected latency exceeded the read timeout.", request=request
        )
    if outcome.drop or outcome.response is None:
        raise httpx.RemoteProtocolError(_DROPPED, request=request)
    return outcome.response


class EmulatorTransport(httpx.BaseTransport):
    """A sync transport answering from the emulator in the calling thread.

    Args:
        handle: The emulator's decision function, :meth:`Emulator.handle`.
    """

    def __init__(self, handle: Callable[[httpx.Request], Outcome]) -> None:
        self._handle = handle

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request``, sleeping through injected latency.

        Raises:
            httpx.RemoteProtocolError: An injected dropped connection.
            httpx.ReadTimeout: Injected latency longer than the read timeout.
        """
        request.read()
        outcome = self._handle(request)
        delay, timed_out = _wait(request, outcome.delay)
        if delay > 0:
            time.sleep(delay)
        return _finish(request, outcome, timed_out)


class AsyncEmulatorTransport(httpx.AsyncBaseTransport):
    """An async transport answering from the emulator; waits with ``anyio.sleep``.

    Args:
        handle: The emulator's decision function, :meth:`Emulator.handle`.
    """

    def __init__(self, handle: Callable[[httpx.Request], Outcome]) -> None:
        self._handle = handle

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request``, sleeping through injected latency without blocking the loop.

        Raises:
            httpx.RemoteProtocolError: An injected dropped connection.
            httpx.ReadTimeout: Injected latency longer than the read timeout.
        """
        await request.aread()
        outcome = self._handle(request)
        delay, timed_out = _wait(request, outcome.delay)
        if delay > 0:
            await anyio.sleep(delay)
        return _finish(request, outcome, timed_out)
