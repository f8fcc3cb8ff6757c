"""``RefreshPolicy``: when to refresh, what never to hand out, how to retry. Pure; no I/O.

The timeline of one token of lifetime ``L`` (granted by Clerk, measured on the monotonic clock from
just before the mint request was sent)::

    0 ───────────── FRESH ─────────────┬──────── STALE ────────┬── UNUSABLE ──┐
                                     refresh point          usable until    expiry
                              (75% of L, minus 0-5% jitter)   (L - margin)      (L)

- FRESH: hand out the cached token, nothing else.
- STALE: hand out the cached token *and* make sure one refresh is in flight (serve stale while
  revalidating). Failures here are logged and retried with backoff; callers never see them.
- UNUSABLE: within the safety margin of expiry (or past it). Never handed out: callers wait for
  the in-flight mint, up to ``wait_timeout``.
"""

from __future__ import annotations

import dataclasses
import random

from m2m_agent._config import finite_number
from m2m_agent.errors import (
    ClerkAPIError,
    M2MAgentError,
    MalformedResponseError,
    RateLimitError,
    ServerError,
    TransportError,
)

__all__ = ["RefreshPolicy", "is_retryable"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RefreshPolicy:
    """When tokens are refreshed, the margin under which they are never used, and retries.

    The defaults, and why:

    - ``refresh_at=0.75``: start refreshing after 75% of the lifetime. A one-hour token is
      refreshed with 15 minutes left, enough to ride out a long Clerk outage on the old token.
    - ``jitter=0.05``: each token's refresh point is moved earlier by a random 0 to 5% of the
      lifetime (up to 3 minutes for one hour), so a fleet started together does not refresh in
      lockstep.
    - ``margin=0.10``, ``max_margin=60``: a token with less than 10% of its lifetime, or 60 s,
      left (whichever is smaller) is never handed out: a request made with it could arrive
      after it expired.
    - ``wait_timeout=30``: a caller that has no usable token waits at most 30 s for a mint before
      :class:`~m2m_agent.TokenUnavailableError`.
    - ``initial_backoff=0.5``, ``max_backoff=30``: retries wait a random time between 0 and
      ``min(max_backoff, initial_backoff * 2**n)`` ("full jitter"), at least ``Retry-After`` when
      Clerk sends one, and never more than ``max_backoff``. Only one attempt is ever in flight.
      For very short tokens (seconds), lower both so retries fit in the refresh window.
    - ``rotation_grace=30``: a replaced opaque token is revoked 30 s after its successor arrived,
      so requests already sent with it can finish.
    - ``min_invalidate_age=5``: a token younger than 5 s is not dropped when a target rejects
      it. A brand-new token that is refused points at the target (scopes, configuration), not
      at the token, and dropping it would mint (a billed creation) on every request.

    Raises:
        ConfigurationError: a value is out of range.
    """

    refresh_at: float = 0.75
    jitter: float = 0.05
    margin: float = 0.10
    max_margin: float = 60.0
    wait_timeout: float = 30.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    rotation_grace: float = 30.0
    min_invalidate_age: float = 5.0

    def __post_init__(self) -> None:
        from m2m_agent.errors import ConfigurationError

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigurationError(f"RefreshPolicy: {what}.")

        for name in (f.name for f in dataclasses.fields(self)):
            value = finite_number(getattr(self, name))
            check(value is not None and value >= 0, f"{name} must be a finite number >= 0")
        check(0 < self.refresh_at < 1, "refresh_at must be a fraction of the lifetime in (0, 1)")
        check(self.jitter < self.refresh_at, "jitter must be smaller than refresh_at")
        check(self.margin < 1, "margin must be a fraction of the lifetime below 1")
        check(
            self.refresh_at < 1 - self.margin,
            "refresh_at must come before the safety margin (refresh_at < 1 - margin)",
        )
        check(self.wait_timeout > 0, "wait_timeout must be positive")
        check(self.max_backoff >= self.initial_backoff, "max_backoff must be >= initial_backoff")

    def margin_seconds(self, lifetime: float) -> float:
        """The safety margin, in seconds, for a token of ``lifetime`` seconds."""
        return min(self.margin * lifetime, self.max_margin)

    def refresh_offset(self, lifetime: float, rng: random.Random) -> float:
        """Seconds after issue at which proactive refresh starts (jittered earlier)."""
        point = lifetime * (self.refresh_at - rng.uniform(0, self.jitter))
        # A short lifetime with a capped margin: never schedule the refresh past the margin.
        return min(point, lifetime - self.margin_seconds(lifetime))

    def backoff(self, failures: int, *, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before the next attempt after ``failures`` consecutive failures."""
        # The exponent is capped: 2**1024 overflows a float, and 2**60 is past any ceiling.
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** min(60, max(0, failures - 1)))
        delay = rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)


def is_retryable(error: BaseException) -> bool:
    """Whether a failed mint is worth another attempt.

    Transport failures, 408, 429, 5xx and malformed responses are (a proxy hiccup, an overloaded
    Clerk). Every other 4xx is not: a wrong key or a bad request will not fix itself.
    """
    if isinstance(error, MalformedResponseError) and error.code == "refresh_rejected":
        return False  # a mint that succeeded but is unusable: another one costs, and won't help
    if isinstance(error, (TransportError, RateLimitError, ServerError, MalformedResponseError)):
        return True
    if isinstance(error, ClerkAPIError):
        return error.status_code == 408
    return not isinstance(error, M2MAgentError) and isinstance(error, OSError)
