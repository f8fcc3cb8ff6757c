"""``RedisStore``: one token shared by a fleet, one mint per rotation across hosts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from m2m_agent._config import is_loopback_host
from m2m_agent.errors import ConfigurationError, StoreError
from m2m_agent.stores._base import StoredToken, TokenStore

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStore"]

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class RedisStore(TokenStore):
    """Tokens in Redis, shared by every process and host that uses the same Redis.

    - The token is stored with a TTL matching its expiry, so Redis drops it when it dies.
    - The mint lease is ``SET <key>:lease <owner> NX PX <ttl>``: one process mints while the
      others wait for its result; a holder that dies loses the lease when the TTL runs out.
    - Every call has a short socket timeout: an unreachable Redis is a :class:`StoreError`
      within seconds, and managers then mint on their own until Redis is back.
    - Tokens are bearer secrets: protect the Redis (AUTH, TLS ``rediss://``, a private network).

    Args:
        url: A Redis URL (``redis://``, ``rediss://``, ``unix://``); default
            ``redis://127.0.0.1:6379/0``.
        client: Your own ``redis.Redis`` (sync) client instead of a URL.
        prefix: Prepended to every key.
        timeout: Socket connect and read timeout, in seconds.

    Raises:
        ConfigurationError: the ``redis`` package is missing (``pip install
            'm2m-agent[redis]'``), or the URL is malformed.
    """

    shared = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        prefix: str = "",
        timeout: float = 2.0,
    ) -> None:
        try:
            import redis as redis_module
        except ImportError:
            raise ConfigurationError(
                "RedisStore needs the redis package: pip install 'm2m-agent[redis]'."
            ) from None
        self._errors: tuple[type[BaseException], ...] = (redis_module.RedisError, OSError)
        if client is None:
            url = url or "redis://127.0.0.1:6379/0"
            try:
                client = redis_module.Redis.from_url(
                    url, socket_timeout=timeout, socket_connect_timeout=timeout
                )
            except ValueError as exc:
                raise ConfigurationError(f"RedisStore url is invalid: {exc}") from None
            host = client.connection_pool.connection_kwargs.get("host", "")
            self._where = f"redis at {host}" if is_loopback_host(str(host)) else "redis"
        else:
            self._where = "redis"
        self._redis = client
        self._prefix = prefix
        self._release = client.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"<RedisStore {self._where} prefix={self._prefix!r}>"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StoreError(f"{self._where}: {what} failed ({type(exc).__name__}).") from None

    def load(self, key: str) -> StoredToken | None:
        """The token under ``key``, or None (absent, expired, or unreadable)."""
        raw = self._call("GET", self._redis.get, self._prefix + key)
        if raw is None:
            return None
        try:
            return StoredToken.from_json(raw)
        except StoreError:
            return None

    def save(self, key: str, token: StoredToken) -> None:
        """Store ``token`` with a TTL that ends when it expires."""
        ttl_ms = int((token.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        self._call("SET", self._redis.set, self._prefix + key, token.to_json(), px=ttl_ms)

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """``SET NX PX``: take the lease for ``ttl`` seconds if nobody holds it."""
        lease = f"{self._prefix}{key}:lease"
        taken = self._call("SET", self._redis.set, lease, owner, nx=True, px=int(ttl * 1000))
        return bool(taken)

    def release(self, key: str, owner: str) -> None:
        """Delete the lease only if ``owner`` still holds it (compare-and-delete)."""
        self._call("EVAL", self._release, keys=[f"{self._prefix}{key}:lease"], args=[owner])

    def close(self) -> None:
        """Close the connection pool."""
        self._redis.close()
