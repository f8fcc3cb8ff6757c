"""What the sync and async token managers share: settings, the lock, fork handling, logging.

The drivers (``_sync_manager.py``, ``_async_manager.py``) only send, sleep and wait; every
decision is made by :class:`m2m_agent._refresh.Coordinator` under :attr:`_lock`.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from m2m_agent import _clock, _forksafe
from m2m_agent._config import finite_number
from m2m_agent._policy import RefreshPolicy
from m2m_agent._refresh import CachedToken, Coordinator, Statistics
from m2m_agent._secrets import fingerprint
from m2m_agent._token import TokenFormat
from m2m_agent.errors import ClerkAPIError, ConfigurationError, StoreError, TokenUnavailableError
from m2m_agent.stores._base import StoredToken, TokenStore, store_key
from m2m_agent.stores._memory import MemoryStore

__all__ = ["LEASE_TTL", "LeaseBusy", "ManagerBase", "log"]

log = structlog.get_logger("m2m_agent")

_FORMATS = ("opaque", "jwt")
REVOKE_TIMEOUT = 5.0
"""Seconds ``close()`` spends revoking before it gives up (revocation is best effort)."""


class ManagerBase:
    """Settings, state and fork safety common to ``TokenManager`` and ``AsyncTokenManager``."""

    _fast_path_ok = True
    """Whether ``get_token`` may return a FRESH token without taking the lock."""

    def __init__(
        self,
        *,
        lifetime: float,
        claims: Mapping[str, Any] | None,
        token_format: TokenFormat,
        refresh: RefreshPolicy | None,
        revoke_on_close: bool,
        store: TokenStore | None,
    ) -> None:
        if (finite_number(lifetime) or 0) <= 0:
            raise ConfigurationError(
                f"lifetime must be a positive number of seconds, got {lifetime!r}."
            )
        if claims is not None and not isinstance(claims, Mapping):
            raise ConfigurationError(
                f"claims must be a mapping of JSON values, got {type(claims).__name__}."
            )
        if token_format not in _FORMATS:
            raise ConfigurationError(
                f"token_format must be 'opaque' or 'jwt', got {token_format!r}."
            )
        if refresh is not None and not isinstance(refresh, RefreshPolicy):
            raise ConfigurationError("refresh must be a RefreshPolicy.")
        if store is not None and not isinstance(store, TokenStore):
            raise ConfigurationError(
                "store must be a TokenStore (MemoryStore, FileStore, RedisStore)."
            )
        self._store = store if store is not None else MemoryStore()
        self._lifetime = float(lifetime)
        self._claims = dict(claims) if claims is not None else None
        self._token_format: TokenFormat = token_format
        self._policy = refresh or RefreshPolicy()
        self._revoke_on_close = revoke_on_close
        self._core = Coordinator(self._policy, requested_lifetime=self._lifetime)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._owner = _new_owner()
        self._store_key = ""  # set by the driver once it knows its client: _bind_store()
        _forksafe.register(self)

    def _bind_store(self, *, api_url: str, key_fingerprint: str) -> None:
        self._store_key = store_key(
            api_url=api_url,
            key_fingerprint=key_fingerprint,
            token_format=self._token_format,
            lifetime=self._lifetime,
            claims=self._claims,
        )

    @property
    def store(self) -> TokenStore:
        """The token store in use."""
        return self._store

    @property
    def _shared_store(self) -> TokenStore | None:
        """The store to coordinate through, or None for in-process only."""
        return self._store if self._store.shared else None

    def _store_failed(self, error: StoreError) -> None:
        log.warning("m2m_agent.store.unavailable", store=repr(self._store), error=str(error))

    def _adopted(self, stored: StoredToken) -> bool:
        """Adopt ``stored`` if it beats ours; whether we now hold a FRESH token."""
        with self._lock:
            now = _clock.now()
            entry = self._core.adopt(stored, now=now, wall_now=time.time())
            fresh = self._core.current_is_fresh(now)
        if entry is not None:
            log.info("m2m_agent.token.adopted", token_id=entry.record.id, store=repr(self._store))
        return fresh

    def _to_stored(self, entry: CachedToken) -> StoredToken:
        with self._lock:
            return self._core.to_stored(entry, now=_clock.now(), wall_now=time.time())

    def _retry_now(self, error: BaseException) -> bool:
        """Tenacity's retry predicate: never on cancellation, else as the core decides."""
        if not isinstance(error, Exception):
            return False
        with self._lock:
            return self._core.should_retry(_clock.now())

    def _retry_delay(self) -> float:
        with self._lock:
            return self._core.delay_before_attempt(_clock.now())

    def _record_failure(self, error: Exception) -> None:
        """Count, log and back off a failed attempt.

        Every failure (the API, a store misconfiguration, a bug) goes through here: none is
        retried at once or hidden.
        """
        with self._lock:
            now = _clock.now()
            self._core.attempt_failed(error, now)
            retry_in = self._core.delay_before_attempt(now)
            retrying = self._core.should_retry(now)
        self._log_failure(error, retry_in=retry_in if retrying else None)

    def _lease_busy(self) -> LeaseBusy:
        with self._lock:
            self._core.lease_busy(_clock.now())
        return LeaseBusy()

    @staticmethod
    def _check_client(
        client: object, expected: type, *, key: str | None, api_url: str | None, hint: str
    ) -> None:
        """Refuse a client of the wrong face, or a client given along with its settings."""
        if client is None:
            return
        if key is not None or api_url is not None:
            raise ConfigurationError("Give either client= or machine_secret_key/api_url.")
        if not isinstance(client, expected):
            raise ConfigurationError(f"client must be a{hint}.")

    @property
    def policy(self) -> RefreshPolicy:
        """The refresh policy in force."""
        return self._policy

    def statistics(self) -> Statistics:
        """An immutable snapshot: mints, refreshes, failures, waits, the current token's id..."""
        with self._lock:
            return self._core.statistics(_clock.now())

    def invalidate(self, token: str) -> bool:
        """Report that ``token`` was rejected: the next ``get_token`` gets a new one.

        However many callers report the same token, it is dropped (and replaced) once.
        Returns whether this call dropped it. Never blocks, never does I/O.
        """
        with self._lock:
            dropped = self._core.invalidate(token, _clock.now())
        if dropped:
            log.info("m2m_agent.token.invalidated", fingerprint=fingerprint(token))
        return dropped

    def _minted_args(self) -> dict[str, Any]:
        return {
            "seconds_until_expiration": self._lifetime,
            "claims": self._claims,
            "token_format": self._token_format,
        }

    def _unavailable(self, cause: BaseException | None) -> TokenUnavailableError:
        what = f"{type(cause).__name__}: {cause}" if cause is not None else "no mint completed"
        error = TokenUnavailableError(
            f"No usable M2M token within {self._policy.wait_timeout:g}s ({what})."
        )
        error.__cause__ = cause
        log.warning("m2m_agent.token.unavailable", error=type(cause).__name__ if cause else None)
        return error

    def _log_minted(self, entry: CachedToken) -> None:
        record = entry.record
        log.info(
            "m2m_agent.token.minted",
            token_id=record.id,
            fingerprint=record.fingerprint,
            format=record.format,
            lifetime=round(entry.expires_at - entry.obtained_at, 3),
            refresh_in=round(entry.refresh_after - entry.obtained_at, 3),
        )

    def _log_failure(self, error: BaseException, *, retry_in: float | None) -> None:
        log.warning(
            "m2m_agent.token.refresh_failed",
            error=type(error).__name__,
            status_code=error.status_code if isinstance(error, ClerkAPIError) else None,
            message=str(error),
            retry_in=round(retry_in, 3) if retry_in is not None else None,
        )

    def _log_revocation(self, token_id: str, error: BaseException | None) -> None:
        if error is None:
            log.info("m2m_agent.token.revoked", token_id=token_id)
        else:
            log.warning("m2m_agent.token.revoke_failed", token_id=token_id, error=str(error))

    # -- fork ------------------------------------------------------------------------------

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        # Children now hold copies of the current token: it is no longer ours alone to revoke.
        self._core.shared()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._owner = _new_owner()
        self._core.forked_child()
        self._reset_after_fork()
        log.info("m2m_agent.manager.fork_reset", pid=self._pid)

    def _reset_after_fork(self) -> None:
        """Drop whatever the parent's threads or tasks held (overridden by the drivers)."""


class LeaseBusy(Exception):  # noqa: N818 - a signal to retry, not an error
    """Another process holds the shared store's mint lease: look again shortly."""


LEASE_TTL = 15.0
"""Seconds a shared-store mint lease lasts: longer than one mint attempt (10 s timeout)."""


def _new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
