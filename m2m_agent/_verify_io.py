"""The verifiers' single flight, for threads and for anyio tasks.

Single flight: the first caller for a key (a token digest, or the JWKS) does the work; callers
that arrive meanwhile wait for it and share its result or its error. A leader that is cancelled
or interrupted shares nothing: one of the waiters takes over. The lookup that decides whether
work is needed at all runs under the same lock as the flight table, so a caller can never slip
between "the result was stored" and "the flight was removed" and start a second call.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

__all__ = ["AsyncSingleFlight", "SyncSingleFlight"]

T = TypeVar("T")

_log = structlog.get_logger("m2m_agent")


def _shared(error: BaseException) -> BaseException:
    """A copy of the leader's error for one waiter, so tracebacks do not pile up on one object."""
    try:
        twin = copy.copy(error)
    except Exception:  # an exception that does not copy is shared as is
        return error
    twin.__cause__ = error.__cause__
    twin.__traceback__ = None
    return twin


class _Outcome(Generic[T]):
    __slots__ = ("error", "has_value", "value")

    def __init__(self) -> None:
        self.has_value = False
        self.value: T | None = None
        self.error: BaseException | None = None

    def result(self) -> T | None:
        """The shared value, the shared error raised, or None: the leader gave up; try again."""
        if self.has_value:
            return self.value
        if self.error is not None:
            raise _shared(self.error)
        return None


class _SyncFlight(_Outcome[T]):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()


class SyncSingleFlight(Generic[T]):
    """Single flight for threads.

    Args:
        lock: The lock that also guards what ``lookup`` reads.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._flights: dict[Hashable, _SyncFlight[T]] = {}

    def run(self, key: Hashable, lookup: Callable[[], T | None], work: Callable[[], T]) -> T:
        """``lookup()``'s answer if it has one, else the (shared) result of ``work()``.

        ``lookup`` runs under the lock and may raise; ``work`` runs outside it and must store
        its result where ``lookup`` finds it before returning.
        """
        while True:
            with self._lock:
                found = lookup()
                if found is not None:
                    return found
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _SyncFlight()
            if leader:
                try:
                    value = work()
                except Exception as exc:
                    flight.error = exc
                    raise
                else:
                    flight.value, flight.has_value = value, True
                    return value
                finally:
                    with self._lock:
                        del self._flights[key]
                    flight.done.set()
            flight.done.wait()
            shared = flight.result()
            if shared is not None:
                return shared


class _AsyncFlight(_Outcome[T]):
    __slots__ = ("done", "local", "loop")

    def __init__(self) -> None:
        super().__init__()
        self.loop = anyio.lowlevel.current_token()
        self.local = anyio.Event()
        self.done = threading.Event()

    def finish(self) -> None:
        self.done.set()
        self.local.set()

    async def wait(self) -> None:
        if anyio.lowlevel.current_token() == self.loop:
            await self.local.wait()
        else:  # another event loop (another thread, a later asyncio.run()): its Event is not ours
            await anyio.to_thread.run_sync(self.done.wait, abandon_on_cancel=True)


class AsyncSingleFlight(Generic[T]):
    """Single flight for tasks on any anyio backend, and across event loops.

    Args:
        lock: The (thread) lock that also guards what ``lookup`` reads; never held across an
            ``await``.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._flights: dict[Hashable, _AsyncFlight[T]] = {}

    async def run(
        self, key: Hashable, lookup: Callable[[], T | None], work: Callable[[], Awaitable[T]]
    ) -> T:
        """``lookup()``'s answer if it has one, else the (shared) result of ``await work()``."""
        while True:
            with self._lock:
                found = lookup()
                if found is not None:
                    return found
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _AsyncFlight()
            if leader:
                try:
                    value = await work()
                except Exception as exc:
                    flight.error = exc
                    raise
                else:
                    flight.value, flight.has_value = value, True
                    return value
                finally:
                    with self._lock:
                        del self._flights[key]
                    flight.finish()
            await flight.wait()
            shared = flight.result()
            if shared is not None:
                return shared
