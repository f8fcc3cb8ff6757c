"""``TokenManager``: the thread-based driver, the twin of ``_async_manager.py``.

Mints run in a short-lived daemon thread of their own, never in a caller's thread: callers wait
on a ``threading.Event`` with a deadline, so an interrupted caller never leaves a mint half done
or a lock held. Fork-safe: in a child the lock is new, the parent's threads are forgotten, the
HTTP client is rebuilt, and the inherited token is used but never revoked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import tenacity

from m2m_agent import _clock
from m2m_agent._api import with_timeout
from m2m_agent._client import ClerkM2MClient
from m2m_agent._manager_base import LEASE_TTL, REVOKE_TIMEOUT, LeaseBusy, ManagerBase, log
from m2m_agent._policy import RefreshPolicy
from m2m_agent._refresh import CachedToken
from m2m_agent._token import TokenFormat
from m2m_agent.errors import StoreError
from m2m_agent.stores._base import TokenStore

__all__ = ["TokenManager"]

T = TypeVar("T")


class _Flight:
    """One mint flight, run in its own thread."""

    def __init__(self) -> None:
        self.done = threading.Event()


class TokenManager(ManagerBase):
    """Keeps threaded or plain sync code supplied with a valid M2M token.

    Thread-safe and fork-safe (Celery prefork, gunicorn ``--preload``). ``get_token()`` returns a
    token with comfortably more than the safety margin left. Entering ``with manager`` starts a
    background refresher thread that mints ahead of expiry; without it, refresh happens on demand
    with the same guarantees.

    Args:
        machine_secret_key: The machine secret key (``ak_...``); default
            ``CLERK_MACHINE_SECRET_KEY``.
        api_url: The Backend API URL; default ``CLERK_API_URL``, then Clerk's.
        lifetime: Seconds each minted token lives (default one hour).
        claims: Custom claims for the tokens.
        token_format: ``"opaque"`` (default) or ``"jwt"``.
        refresh: When to refresh and how to retry (:class:`RefreshPolicy`).
        revoke_on_close: Revoke the current opaque token on ``close()``, if this process alone
            minted it (default True).
        store: Where the token is kept: :class:`~m2m_agent.stores.MemoryStore` (default), or a
            shared ``FileStore``/``RedisStore`` so processes mint once per rotation.
        client: Your own :class:`ClerkM2MClient` (then ``machine_secret_key`` and ``api_url``
            must not be given). Not closed by the manager.

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
        client: ClerkM2MClient | None = None,
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
            ClerkM2MClient,
            key=machine_secret_key,
            api_url=api_url,
            hint=" ClerkM2MClient (use AsyncTokenManager for the async one)",
        )
        self._client = client or ClerkM2MClient(machine_secret_key, api_url=api_url)
        self._own_client = client is None
        self._bind_store(
            api_url=str(self._client.api_url), key_fingerprint=self._client.key_fingerprint
        )
        self._flight: _Flight | None = None
        self._stop = threading.Event()
        self._refresher_thread: threading.Thread | None = None
        self._entered = False

    def __repr__(self) -> str:
        return f"<TokenManager {self._client!r} format={self._token_format!r}>"

    # -- callers ---------------------------------------------------------------------------

    def get_token(self) -> str:
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
            self._ensure_refresher()
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
                flight.done.wait(remaining)
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
        """Start a mint flight in its own thread (call with the lock held)."""
        flight = _Flight()
        self._flight = flight
        self._core.flight_started()
        threading.Thread(
            target=self._run_flight, args=(flight,), name="m2m-agent-mint", daemon=True
        ).start()
        return flight

    def _run_flight(self, flight: _Flight) -> None:
        try:
            with self._lock:
                delay = self._core.delay_before_attempt(_clock.now())
            if self._stop.wait(delay) or self._core.closed:
                return
            retrying = tenacity.Retrying(
                sleep=self._sleep,
                retry=tenacity.retry_if_exception(self._retry_now),
                wait=lambda _: self._retry_delay(),
                reraise=True,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        try:
                            self._attempt()
                        except LeaseBusy:
                            raise
                        except Exception as exc:
                            self._record_failure(exc)
                            raise
            except Exception:  # noqa: S110 - recorded and logged above
                pass
            self._revoke_due()
        finally:
            with self._lock:
                self._core.flight_finished()
                if self._flight is flight:
                    self._flight = None
            flight.done.set()

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # close() cuts a backoff short

    def _attempt(self) -> None:
        """One attempt: adopt a shared token, or take the lease and mint (or just mint)."""
        store = self._shared_store
        if store is None:
            self._mint(owned=True)
            return
        key, owner = self._store_key, self._owner
        stored = self._store_call(store.load, key)
        if stored is not None and self._adopted(stored):
            return
        leased = self._store_call(store.acquire, key, owner, LEASE_TTL)
        if leased is False:
            raise self._lease_busy()
        try:
            stored = self._store_call(store.load, key) if leased else None
            if stored is not None and self._adopted(stored):
                return
            entry = self._mint(owned=False)
            self._store_call(store.save, key, self._to_stored(entry))
        finally:
            if leased:
                self._store_call(store.release, key, owner)

    def _store_call(self, fn: Callable[..., T], *args: Any) -> T | None:
        """A store operation; on failure, log it and carry on without the store (None)."""
        try:
            return fn(*args)
        except StoreError as exc:
            self._store_failed(exc)
            return None

    def _mint(self, *, owned: bool) -> CachedToken:
        sent_at = _clock.now()
        token = self._client.create_token(**self._minted_args())
        with self._lock:
            entry = self._core.attempt_succeeded(
                token, sent_at=sent_at, now=_clock.now(), owned=owned
            )
        self._log_minted(entry)
        return entry

    def _revoke_due(self, *, everything: bool = False) -> None:
        with self._lock:
            due = self._core.due_revocations(_clock.now(), everything=everything)
        for token_id in due:
            self._revoke(token_id)

    def _revoke(self, token_id: str, *, timeout: float | None = None) -> None:
        error: Exception | None = None
        try:
            call = self._client._endpoints.revoke(token_id, reason="rotated by m2m-agent")
            self._client._call(call if timeout is None else with_timeout(call, timeout))
        except Exception as exc:  # best effort: logged and counted, never raised
            error = exc
        with self._lock:
            self._core.revocation_done(ok=error is None)
        self._log_revocation(token_id, error)

    # -- background refresher and lifecycle ------------------------------------------------

    def _ensure_refresher(self) -> None:
        """(Re)start the refresher thread when entered (call with the lock held)."""
        self._fast_path_ok = True
        if not self._entered or self._core.closed:
            return
        thread = self._refresher_thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(
                target=self._refresher, name="m2m-agent-refresher", daemon=True
            )
            self._refresher_thread = thread
            thread.start()

    def _refresher(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = _clock.now()
                wake = self._core.next_wakeup(now)
            if self._stop.wait(max(0.0, wake - now)):
                return
            with self._lock:
                now = _clock.now()
                flight = self._start_flight() if self._core.refresh_due(now) else self._flight
                revocation_due = (self._core.next_revocation_at() or float("inf")) <= now
            if flight is not None:
                while not flight.done.wait(0.1):  # wake promptly on close()
                    if self._stop.is_set():
                        return
            elif revocation_due:
                self._revoke_due()

    def __enter__(self) -> TokenManager:
        with self._lock:
            self._entered = True
            self._ensure_refresher()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the refresher and revoke what this process alone owns (best effort, bounded).

        Waits for a mint under way (its token would otherwise outlive the manager), then revokes
        tokens waiting out their rotation grace and, with ``revoke_on_close``, the current
        opaque token: all within ``REVOKE_TIMEOUT`` (5 s). JWT-format tokens cannot be revoked
        and are left to expire.
        """
        deadline = _clock.now() + REVOKE_TIMEOUT
        with self._lock:
            self._core.begin_close()
            flight = self._flight
            thread, self._refresher_thread = self._refresher_thread, None
        self._stop.set()  # cuts backoff sleeps short: the flight ends after its current attempt
        if flight is not None:
            flight.done.wait(max(0.0, deadline - _clock.now()))
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - _clock.now()))
        with self._lock:
            to_revoke = self._core.close(revoke_current=self._revoke_on_close)
        for token_id in to_revoke:
            remaining = deadline - _clock.now()
            if remaining <= 0:
                log.warning("m2m_agent.token.revoke_skipped", token_id=token_id)
                continue
            self._revoke(token_id, timeout=remaining)
        if self._own_client:
            self._client.close()

    def _reset_after_fork(self) -> None:
        # The parent's mint and refresher threads do not exist here (the client rebuilds its own
        # connection pool). A refresher restarts on the next get_token if the manager was entered.
        self._flight = None
        self._refresher_thread = None
        self._stop = threading.Event()
        self._fast_path_ok = False
