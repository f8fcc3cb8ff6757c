"""Where token managers keep their token, and how processes share it.

- :class:`MemoryStore` (the default): in this process only.
- :class:`FileStore`: one private file per host; cron jobs and the CLI reuse a token across
  runs, and processes on the host mint once per rotation.
- :class:`RedisStore`: a fleet shares one token through Redis; one mint per rotation.

With a shared store, one process takes a lease and mints while the others wait for its result
and adopt it. Tokens in a shared store are never revoked by one process (another may still be
using them); they simply expire.
"""

from __future__ import annotations

from m2m_agent.stores._base import StoredToken as StoredToken
from m2m_agent.stores._base import TokenStore as TokenStore
from m2m_agent.stores._file import FileStore as FileStore
from m2m_agent.stores._memory import MemoryStore as MemoryStore
from m2m_agent.stores._redis import RedisStore as RedisStore

__all__ = ["FileStore", "MemoryStore", "RedisStore", "StoredToken", "TokenStore"]
