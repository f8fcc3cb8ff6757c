"""What every token store is: a keyed slot for one token, plus a lease around the mint."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import anyio.to_thread

from m2m_agent._config import finite_number
from m2m_agent._token import TokenFormat
from m2m_agent.errors import StoreError

__all__ = ["StoredToken", "TokenStore", "store_key"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredToken:
    """A token as a store keeps it: the secret, and its life on the wall clock.

    Wall-clock times are only used to move a token between processes; each process converts
    them to its own monotonic clock when it adopts the token.
    """

    id: str
    subject: str
    secret: str = dataclasses.field(repr=False)
    format: TokenFormat
    obtained_at: float
    """Wall-clock seconds just before the mint request was sent."""
    lifetime: float
    """Seconds of life Clerk granted, counted from ``obtained_at``."""

    @property
    def expires_at(self) -> float:
        """Wall-clock seconds when the token expires."""
        return self.obtained_at + self.lifetime

    def to_json(self) -> str:
        """Serialise (includes the secret: stores must protect what they hold)."""
        return json.dumps(
            {
                "v": 1,
                "id": self.id,
                "subject": self.subject,
                "token": self.secret,
                "format": self.format,
                "obtained_at": self.obtained_at,
                "lifetime": self.lifetime,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredToken:
        """Parse what :meth:`to_json` wrote.

        Raises:
            StoreError: the data is not a stored token (corrupted, another version).
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("v") != 1:
                raise ValueError("not a v1 stored token")
            stored = cls(
                id=_text(data, "id"),
                subject=_text(data, "subject"),
                secret=_text(data, "token"),
                format="jwt" if data.get("format") == "jwt" else "opaque",
                obtained_at=_number(data, "obtained_at"),
                lifetime=_number(data, "lifetime"),
            )
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"Stored token is unreadable ({type(exc).__name__}).") from None
        return stored


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(name)
    return value


def _number(data: Mapping[str, Any], name: str) -> float:
    value = finite_number(data.get(name))
    if value is None:
        raise ValueError(name)
    return value


def store_key(
    *,
    api_url: str,
    key_fingerprint: str,
    token_format: str,
    lifetime: float,
    claims: Mapping[str, Any] | None,
) -> str:
    """The slot name for one kind of token: everything that makes tokens differ, hashed.

    Never contains the key itself, only its fingerprint.
    """
    material = json.dumps(
        [api_url, key_fingerprint, token_format, lifetime, claims], sort_keys=True, default=str
    )
    return "m2m-agent:v1:" + hashlib.sha256(material.encode()).hexdigest()[:32]


class TokenStore(abc.ABC):
    """A place to keep one token per key, and a lease so that one process mints at a time.

    Subclasses implement the four sync methods; the async ones run them in a worker thread, so
    every store serves asyncio, trio and threads alike. All methods raise :class:`StoreError`
    on failure, never hang past their own timeout, and never log the token.
    """

    shared: bool = True
    """Whether other processes can see what is saved here (tokens in a shared store are never
    revoked by one process: another may still be using them)."""

    @abc.abstractmethod
    def load(self, key: str) -> StoredToken | None:
        """The token saved under ``key``, or None."""

    @abc.abstractmethod
    def save(self, key: str, token: StoredToken) -> None:
        """Save ``token`` under ``key``, replacing what was there."""

    @abc.abstractmethod
    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Try to take the mint lease for ``key`` for ``ttl`` seconds, without waiting.

        A lease whose holder died must become free within ``ttl``.
        """

    @abc.abstractmethod
    def release(self, key: str, owner: str) -> None:
        """Give the lease back (only if ``owner`` still holds it)."""

    async def aload(self, key: str) -> StoredToken | None:
        """:meth:`load`, from async code."""
        return await anyio.to_thread.run_sync(self.load, key)

    async def asave(self, key: str, token: StoredToken) -> None:
        """:meth:`save`, from async code."""
        await anyio.to_thread.run_sync(self.save, key, token)

    async def aacquire(self, key: str, owner: str, ttl: float) -> bool:
        """:meth:`acquire`, from async code."""
        return await anyio.to_thread.run_sync(self.acquire, key, owner, ttl)

    async def arelease(self, key: str, owner: str) -> None:
        """:meth:`release`, from async code."""
        await anyio.to_thread.run_sync(self.release, key, owner)
