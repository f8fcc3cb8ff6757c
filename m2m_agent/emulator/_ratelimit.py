"""A sliding-window rate limit on the emulator's clock, like Clerk's per-instance limit."""

from __future__ import annotations

import collections
import math

__all__ = ["RateLimit"]


class RateLimit:
    """At most ``limit`` accepted requests in any ``per`` seconds.

    Args:
        limit: Requests allowed per window.
        per: The window, in seconds.

    Raises:
        ValueError: ``limit`` < 1 or ``per`` <= 0.
    """

    def __init__(self, limit: int, per: float) -> None:
        if limit < 1 or not per > 0:
            raise ValueError("rate_limit must be (requests >= 1, per_seconds > 0)")
        self.limit = limit
        self.per = per
        self._accepted: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> int | None:
        """Accept one request at ``now`` if the window has room.

        Args:
            now: Seconds on the emulator's clock.

        Returns:
            ``None`` when accepted; otherwise the ``Retry-After`` in whole seconds (at least 1).
        """
        while self._accepted and self._accepted[0] <= now - self.per:
            self._accepted.popleft()
        if len(self._accepted) < self.limit:
            self._accepted.append(now)
            return None
        return max(1, math.ceil(self._accepted[0] + self.per - now))
