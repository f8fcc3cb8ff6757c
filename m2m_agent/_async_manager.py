"""``AsyncTokenManager``: the async driver (anyio: asyncio and trio).

Mints run in their own task (a system task of the caller's event loop), never in a caller's: a
cancelled caller never cancels the shared mint, and a mint outlives no loop. Callers on the
mint's loop wait on an ``anyio.Event``; callers on another loop (another thread, a later
``asyncio.run()``) wait on a thread-safe event from a worker thread, so one manager serves them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import sniffio
import tenacity

from m2m_agent import _clock
from m2m_agent._client import AsyncClerkM2MClient
from m2m_agent._manager_base import LEASE_TTL, REVOKE_TIMEOUT, LeaseBusy, ManagerBase, log
from m2m_agent._policy import RefreshPolicy
from m2m_agent._refresh import CachedToken
from m2m_agent._token import TokenFormat
from m2m_agent.errors import StoreError
from m2m_agent.stores._base import TokenStore

__all__ = ["AsyncTokenManager"]

T = TypeVar("T")

_background_tasks: set[asyncio.Task[None]] = set()


def _spawn_system_task(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` in a task of the current loop that belongs to no caller."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn)
        return

    async def run() -> None:
        await fn()

    task = asyncio.get_running_loop().create_task(run())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


class _Flight:
    """One mint flight, awaitable from any event loop."""

    def __init__(self) -> None:
        self.loop = anyio.lowlevel.current_token()
        self.local = anyio.Event()
        self.done = threading.Event()

    def finish(self) -> None:
        self.local.set()
        self.done.set()

    async def wait(self, budget: float) -> None:
        with anyio.move_on_after(budget):
            if anyio.lowlevel.current_token() == self.loop:
                await self.local.wait()
            else:
                await anyio.to_thread.run_sync(self.done.wait, budget, abandon_on_cancel=True)


class AsyncTokenManager(ManagerBase):
    """Keeps an async application supplied with a valid M2M token (asyncio or trio).

    ``await manager.get_token()`` returns a token with comfortably more than the safety margin
    left. Entering ``async with manager`` starts a background refresher that mints ahead of
    expiry; without it, refresh happens on demand with the same guarantees. One manager can
    serve several event loops (successive ``asyncio.run()`` calls, threads with their own loops).

    Args:
        machine_secret_key: The machine secret key (``ak_...``); default
            ``CLERK_MACHINE_SECRET_KEY``.
        api_url: The Backend API URL; default ``CLERK_API_URL``, then Clerk's.
        lifetime: Seconds each minted token lives (default one hour).
        claims: Custom claims for the tokens.
        token_format: ``"opaque"`` (default) or ``"jwt"``.
        refresh: When to refresh and how to retry (:class:`RefreshPolicy`).
        revoke_on_close: Revoke the current opaque token on ``aclose()``, if this process alone
            minted it (default True).
        store: Where the token is kept: :class:`~m2m_agent.stores.MemoryStore` (default), or a
            shared ``FileStore``/``RedisStore`` so processes mint once per rotation.
        client: Your own :class:`AsyncClerkM2MClient` (then ``machine_secret_key`` and
            ``api_url`` must not be given). Not closed by the manager.

    Raises:
        ConfigurationError: a setting is missing or wrong.
    """

    def __init__(
        self,
        *,
        machine_secret_key: str | None = None,
        api_url: str | None = None,
        lifetime: float = 3600.0,
        claims: Mapping[str, Any] | None = None,
        token_format: TokenFormat = "opaque",
        refresh: RefreshPolicy | None = None,
        revoke_on_close: bool = True,
        store: TokenStore | None = None,
        client: AsyncClerkM2MClient | None = None,
    ) -> None:
        super().__init__(
            lifetime=lifetime,
            claims=claims,
            token_format=token_format,
            refresh=refresh,
            revoke_on_close=revoke_on_close,
            store=store,
        )
        self._check_client(
            client,
            AsyncClerkM2MClient,
            key=machine_secret_key,
            api_url=api_url,
            hint="n AsyncClerkM2MClient (use TokenManager for ClerkM2MClient)",
        )
        # Validates the key and URL now; an owned client is made per flight, on its loop.
        self._template = client or AsyncClerkM2MClient(machine_secret_key, api_url=api_url)
        self._own_client = client is None
        self._bind_store(
            api_url=str(self._template.api_url), key_fingerprint=self._template.key_fingerprint
        )
        self._flight: _Flight | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<AsyncTokenManager {self._template!r} format={self._token_format!r}>"

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[AsyncClerkM2MClient]:
        if not self._own_client:
            yield self._template
            return
        # httpx connection pools belong to one event loop: a fresh client per flight (a few
        # per hour) lets the manager outlive loops.
        template = self._template
        async with AsyncClerkM2MClient(
            template._key.reveal(), api_url=template.api_url, allow_insecure_http=True
        ) as client:
            yield client

    # -- callers ---------------------------------------------------------------------------

    async def get_token(self) -> str:
        """A token with comfortably more than the safety margin left.

        Returns at once when one is cached; otherwise waits for the single in-flight mint, at
        most ``refresh.wait_timeout`` seconds.

        Raises:
            TokenUnavailableError: no usable token within the wait budget, or the last mint
                failed for good (a wrong key); ``__cause__`` is the last failure.
        """
        entry = self._core.current  # an immutable snapshot: safe to read without the lock
        if entry is not None and _clock.now() < entry.refresh_after and self._fast_path_ok:
            return entry.secret
        with self._lock:
            plan = self._core.plan(_clock.now())
            flight = self._start_flight() if plan.start_flight else self._flight
        if plan.token is not None:
            return plan.token
        if plan.fail is not None:
            raise self._unavailable(plan.fail)
        deadline = _clock.now() + self._policy.wait_timeout
        while True:
            remaining = deadline - _clock.now()
            if flight is not None and remaining > 0:
                await flight.wait(remaining)
            with self._lock:
                now = _clock.now()
                token = self._core.usable_token(now)
                if token is not None:
                    return token
                if now >= deadline or self._core.last_error_fatal or self._core.closed:
                    self._core.wait_timed_out()
                    cause = self._core.last_error
                    break
                flight = self._flight or self._start_flight()
        raise self._unavailable(cause)

    # -- the flight ------------------------------------------------------------------------

    def _start_flight(self) -> _Flight:
        """Start a mint flight on the current loop (call with the lock held)."""
        flight = _Flight()
        self._flight = flight
        self._core.flight_started()
        _spawn_system_task(lambda: self._run_flight(flight))
        return flight

    async def _run_flight(self, flight: _Flight) -> None:
        try:
            with self._lock:
                delay = self._core.delay_before_attempt(_clock.now())
            await anyio.sleep(delay)
            if self._core.closed:
                return
            async with self._client() as client:
                retrying = tenacity.AsyncRetrying(
                    sleep=anyio.sleep,
                    retry=tenacity.retry_if_exception(self._retry_now),
                    wait=lambda _: self._retry_delay(),
                    reraise=True,
                )
                try:
                    async for attempt in retrying:
                        with attempt:
                            try:
                                await self._attempt(client)
                            except LeaseBusy:
                                raise
                            except Exception as exc:
                                self._record_failure(exc)
                                raise
                except Exception:  # noqa: S110 - recorded and logged above
                    pass
                await self._revoke_due(client)
        finally:
            with self._lock:
                self._core.flight_finished()
                if self._flight is flight:
                    self._flight = None
            flight.finish()

    async def _attempt(self, client: AsyncClerkM2MClient) -> None:
        """One attempt: adopt a shared token, or take the lease and mint (or just mint)."""
        store = self._shared_store
        if store is None:
            await self._mint(client, owned=True)
            return
        key, owner = self._store_key, self._owner
        stored = await self._store_call(store.aload, key)
        if stored is not None and self._adopted(stored):
            return
        leased = await self._store_call(store.aacquire, key, owner, LEASE_TTL)
        if leased is False:
            raise self._lease_busy()
        try:
            stored = await self._store_call(store.aload, key) if leased else None
            if stored is not None and self._adopted(stored):
                return
            entry = await self._mint(client, owned=False)
            await self._store_call(store.asave, key, self._to_stored(entry))
        finally:
            if leased:
                with anyio.CancelScope(shield=True):
                    await self._store_call(store.arelease, key, owner)

    async def _store_call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """A store operation; on failure, log it and carry on without the store (None)."""
        try:
            return await fn(*args)
        except StoreError as exc:
            self._store_failed(exc)
            return None

    async def _mint(self, client: AsyncClerkM2MClient, *, owned: bool) -> CachedToken:
        sent_at = _clock.now()
        token = await client.create_token(**self._minted_args())
        with self._lock:
            entry = self._core.attempt_succeeded(
                token, sent_at=sent_at, now=_clock.now(), owned=owned
            )
        self._log_minted(entry)
        return entry

    async def _revoke_due(self, client: AsyncClerkM2MClient, *, everything: bool = False) -> None:
        with self._lock:
            due = self._core.due_revocations(_clock.now(), everything=everything)
        for token_id in due:
            await self._revoke(client, token_id)

    async def _revoke(self, client: AsyncClerkM2MClient, token_id: str) -> None:
        # Shielded and bounded: once an id has left the queue, cancelling us (aclose stopping
        # the refresher, a cancelled owner) must not drop its revocation half-way.
        error: Exception | None = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(REVOKE_TIMEOUT) as budget:
            try:
                await client.revoke_token(token_id, reason="rotated by m2m-agent")
            except Exception as exc:  # best effort: logged and counted, never raised
                error = exc
        if budget.cancel_called:
            error = TimeoutError(f"no answer within {REVOKE_TIMEOUT:g}s")
        with self._lock:
            self._core.revocation_done(ok=error is None)
        self._log_revocation(token_id, error)

    # -- background refresher and lifecycle ------------------------------------------------

    async def _refresher(self) -> None:
        while True:
            with self._lock:
                now = _clock.now()
                wake = self._core.next_wakeup(now)
            await anyio.sleep(max(0.0, wake - now))
            with self._lock:
                if self._core.closed:
                    return
                now = _clock.now()
                flight = self._start_flight() if self._core.refresh_due(now) else self._flight
                revocation_due = (self._core.next_revocation_at() or float("inf")) <= now
            if flight is not None:
                await flight.wait(self._policy.wait_timeout + self._policy.max_backoff)
            elif revocation_due:
                async with self._client() as client:
                    await self._revoke_due(client)

    async def __aenter__(self) -> AsyncTokenManager:
        if self._task_group is not None:
            raise RuntimeError("This AsyncTokenManager is already entered.")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        task_group.start_soon(self._refresher)
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the refresher and revoke what this process alone owns (best effort, bounded).

        Waits for a mint under way (its token would otherwise outlive the manager), then revokes
        tokens waiting out their rotation grace and, with ``revoke_on_close``, the current
        opaque token: all within ``REVOKE_TIMEOUT`` (5 s), and even when the caller is being
        cancelled. JWT-format tokens cannot be revoked and are left to expire.
        """
        with self._lock:
            self._core.begin_close()
            flight = self._flight
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                # Exited here, not inside the shield below: a task group's scope must be the
                # innermost one when it exits. If we are being cancelled it still waits for the
                # refresher (whose revocations are shielded), then the finally block runs.
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish_close(flight)

    async def _finish_close(self, flight: _Flight | None) -> None:
        to_revoke: list[str] = []
        done: list[str] = []
        with anyio.move_on_after(REVOKE_TIMEOUT):
            if flight is not None:
                await flight.wait(REVOKE_TIMEOUT)
            with self._lock:
                to_revoke = self._core.close(revoke_current=self._revoke_on_close)
            if to_revoke:
                async with self._client() as client:
                    for token_id in to_revoke:
                        await self._revoke(client, token_id)
                        done.append(token_id)
        for token_id in to_revoke[len(done) :]:
            log.warning("m2m_agent.token.revoke_skipped", token_id=token_id)
        if self._own_client:
            await self._template.aclose()

    def _reset_after_fork(self) -> None:
        self._flight = None
        self._task_group = None
        log.debug("m2m_agent.manager.async_fork_reset")
