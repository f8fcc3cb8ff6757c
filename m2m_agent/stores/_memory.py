"""``MemoryStore``: the default; the token lives in this process only."""

from __future__ import annotations

import threading
import time

from m2m_agent import _forksafe
from m2m_agent.stores._base import StoredToken, TokenStore

__all__ = ["MemoryStore"]


class MemoryStore(TokenStore):
    """Keeps tokens in this process's memory: nothing is shared with other processes.

    This is the default store. A manager with it keeps its token in itself, owns what it mints
    and revokes replaced opaque tokens after the rotation grace. Give each manager its own.
    """

    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, StoredToken] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        _forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        # The parent's lock may have been held by one of its threads: it would stay held here.
        self._lock = threading.Lock()
        self._leases.clear()

    def __repr__(self) -> str:
        return f"<MemoryStore tokens={len(self._tokens)}>"

    def load(self, key: str) -> StoredToken | None:
        """The token saved under ``key``, or None."""
        with self._lock:
            return self._tokens.get(key)

    def save(self, key: str, token: StoredToken) -> None:
        """Save ``token`` under ``key``."""
        with self._lock:
            self._tokens[key] = token

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease if it is free or expired."""
        now = time.monotonic()
        with self._lock:
            holder = self._leases.get(key)
            if holder is not None and holder[0] != owner and holder[1] > now:
                return False
            self._leases[key] = (owner, now + ttl)
            return True

    def release(self, key: str, owner: str) -> None:
        """Free the lease if ``owner`` holds it."""
        with self._lock:
            holder = self._leases.get(key)
            if holder is not None and holder[0] == owner:
                del self._leases[key]
