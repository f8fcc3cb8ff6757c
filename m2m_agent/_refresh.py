"""The sans-IO heart of the token managers: token state, single flight, backoff, rotation.

:class:`Coordinator` holds every decision and takes ``now`` (monotonic seconds) as an argument;
it never sends, sleeps, locks or reads a clock. The sync and async managers hold a lock around
each call, run the mint it asks for, and report back. Rules it keeps:

1. A token is handed out only above its safety margin; FRESH is served as is, STALE is served
   while one refresh runs (serve stale while revalidating), UNUSABLE makes the caller wait.
2. At most one flight (a sequence of mint attempts) at a time; callers never start a second.
3. After a failure, no attempt before ``next_attempt_at`` (full-jitter backoff, Retry-After),
   whoever asks. A fatal failure (a 4xx other than 408/429) with no usable token fails callers
   at once until then, instead of making each of them wait.
4. A replaced or invalidated opaque token this process alone minted is revoked after a grace
   period; a token shared with forked children is never revoked; JWTs are never revoked.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import random

from m2m_agent._policy import RefreshPolicy, is_retryable
from m2m_agent._token import M2MToken
from m2m_agent.errors import MalformedResponseError
from m2m_agent.stores._base import StoredToken

__all__ = ["LEASE_POLL", "CachedToken", "Coordinator", "Plan", "Statistics", "TokenState", "admit"]

LEASE_POLL = 0.1
"""Seconds between looks at a shared store while another process holds the mint lease."""


class TokenState(enum.Enum):
    """Where a cached token stands on its timeline (see :class:`RefreshPolicy`)."""

    FRESH = "fresh"
    """Before the refresh point: served as is."""
    STALE = "stale"
    """Past the refresh point, above the safety margin: served while a refresh runs."""
    UNUSABLE = "unusable"
    """Within the safety margin of expiry, or past it, or no token at all: never served."""


@dataclasses.dataclass(frozen=True, slots=True)
class CachedToken:
    """A minted token placed on the monotonic clock."""

    record: M2MToken
    secret: str = dataclasses.field(repr=False)
    obtained_at: float
    refresh_after: float
    usable_until: float
    expires_at: float
    owned: bool
    """Minted by this process and shared with nobody: ours to revoke."""

    def state(self, now: float) -> TokenState:
        """The token's state at ``now``."""
        if now < self.refresh_after:
            return TokenState.FRESH
        if now < self.usable_until:
            return TokenState.STALE
        return TokenState.UNUSABLE


def admit(
    token: M2MToken,
    *,
    sent_at: float,
    received_at: float,
    requested_lifetime: float,
    policy: RefreshPolicy,
    rng: random.Random,
) -> CachedToken:
    """Place a freshly minted token on the monotonic clock, or refuse it.

    The lifetime is the one Clerk granted (``expiration - created_at``, both server times, so
    local clock skew does not matter), counted from ``sent_at``, the moment before the request
    left: the token can only be younger than we assume, never older.

    Raises:
        MalformedResponseError: the token has no secret, is revoked or expired, or arrived already
            inside its safety margin.
    """
    if not token.token:
        raise MalformedResponseError("The minted token has no secret.", code="refresh_rejected")
    if token.revoked or token.expired:
        raise MalformedResponseError(
            f"Clerk returned token {token.id} already revoked or expired.", code="refresh_rejected"
        )
    lifetime = token.lifetime
    if lifetime is None or not math.isfinite(lifetime):
        # No expiration (a non-expiring token) or no creation time: rotate on our own schedule.
        lifetime = requested_lifetime
    expires_at = sent_at + lifetime
    usable_until = expires_at - policy.margin_seconds(lifetime)
    if lifetime <= 0 or received_at >= usable_until:
        raise MalformedResponseError(
            f"Token {token.id} arrived with less than its safety margin left (lifetime "
            f"{lifetime:.1f}s, round trip {received_at - sent_at:.1f}s); use a longer lifetime.",
            code="refresh_rejected",
        )
    return CachedToken(
        record=token,
        secret=token.token,
        obtained_at=sent_at,
        refresh_after=sent_at + policy.refresh_offset(lifetime, rng),
        usable_until=usable_until,
        expires_at=expires_at,
        owned=True,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a ``get_token`` call should do now."""

    token: str | None
    """The token to hand out, or None when the caller must wait (or fail)."""
    start_flight: bool
    """Start a mint flight (nobody else is running one)."""
    fail: BaseException | None = None
    """Fail at once with this cause: no usable token, and the last failure was fatal."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    """An immutable snapshot of a token manager, for dashboards and tests."""

    mints: int
    """Tokens minted (each one a billed creation)."""
    refreshes: int
    """Mints that replaced a token (proactive refreshes, rotations after invalidation)."""
    refresh_failures: int
    """Failed mint attempts."""
    consecutive_failures: int
    """Failed attempts since the last success."""
    revocations: int
    """Tokens revoked (rotation, invalidation, close)."""
    revocation_failures: int
    """Revocations that failed (logged, never raised)."""
    waits: int
    """``get_token`` calls that had to wait for a mint."""
    wait_timeouts: int
    """``get_token`` calls that gave up with ``TokenUnavailableError``."""
    served_stale: int
    """``get_token`` calls served a still-valid token while a refresh was due."""
    invalidations: int
    """Tokens dropped because a caller saw them rejected."""
    forks: int
    """Times this manager found itself in a forked child and reset."""
    adoptions: int
    """Tokens taken from a shared store, minted by another process."""
    refresh_in_flight: bool
    """Whether a mint is under way."""
    token_id: str | None
    """The current token's id (never the secret)."""
    token_state: TokenState
    """The current token's state."""
    seconds_to_expiry: float | None
    """Seconds until the current token expires."""
    seconds_to_refresh: float | None
    """Seconds until the current token's refresh point (negative: past it)."""
    last_error: str | None
    """The last failure's type and message, if the last attempt failed."""


class Coordinator:
    """Every decision of a token manager, as a plain state machine (not thread-safe)."""

    def __init__(
        self, policy: RefreshPolicy, *, requested_lifetime: float, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self.requested_lifetime = requested_lifetime
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.current: CachedToken | None = None
        self.flight_active = False
        self.closed = False
        self.failures = 0
        self.last_error: BaseException | None = None
        self.last_error_fatal = False
        self.next_attempt_at = -math.inf
        self.last_demand_at = -math.inf
        self.pending_revocations: list[tuple[str, float]] = []
        self.rejected_ids: collections.deque[str] = collections.deque(maxlen=32)
        """Ids of tokens callers saw rejected: never adopted again from a shared store."""
        self._counts = dict.fromkeys(
            (
                "mints",
                "refreshes",
                "refresh_failures",
                "revocations",
                "revocation_failures",
                "waits",
                "wait_timeouts",
                "served_stale",
                "invalidations",
                "forks",
                "adoptions",
            ),
            0,
        )

    # -- callers ---------------------------------------------------------------------------

    def plan(self, now: float) -> Plan:
        """Decide a ``get_token`` call: hand out, hand out and refresh, wait, or fail."""
        entry = self.current
        state = entry.state(now) if entry is not None else TokenState.UNUSABLE
        if entry is not None and state is TokenState.FRESH:
            return Plan(entry.secret, start_flight=False)
        self.last_demand_at = now
        can_start = not self.flight_active and not self.closed
        if entry is not None and state is TokenState.STALE:
            self._counts["served_stale"] += 1
            return Plan(entry.secret, start_flight=can_start and now >= self.next_attempt_at)
        if can_start and self.last_error_fatal and now < self.next_attempt_at:
            return Plan(None, start_flight=False, fail=self.last_error)
        self._counts["waits"] += 1
        return Plan(None, start_flight=can_start)

    def usable_token(self, now: float) -> str | None:
        """The current token if it may be handed out at ``now``."""
        entry = self.current
        if entry is not None and entry.state(now) is not TokenState.UNUSABLE:
            return entry.secret
        return None

    def wait_timed_out(self) -> None:
        """Count a caller that gave up waiting."""
        self._counts["wait_timeouts"] += 1

    def invalidate(self, secret: str, now: float) -> bool:
        """A caller saw ``secret`` rejected: drop it if it is still current (once).

        A token younger than ``min_invalidate_age`` is kept: see :class:`RefreshPolicy`.
        """
        entry = self.current
        if entry is None or entry.secret != secret:
            return False
        if now - entry.obtained_at < self.policy.min_invalidate_age:
            return False
        self.current = None
        self.rejected_ids.append(entry.record.id)
        self._counts["invalidations"] += 1
        self._retire(entry, now)
        return True

    # -- the flight ------------------------------------------------------------------------

    def flight_started(self) -> None:
        """A flight began: no other may start until :meth:`flight_finished`."""
        self.flight_active = True

    def delay_before_attempt(self, now: float) -> float:
        """Seconds the flight must wait before its next attempt (the backoff gate)."""
        return max(0.0, self.next_attempt_at - now)

    def attempt_succeeded(
        self, token: M2MToken, *, sent_at: float, now: float, owned: bool = True
    ) -> CachedToken:
        """Install a minted token; the one it replaces is queued for revocation.

        Raises:
            MalformedResponseError: the token is refused (see :func:`admit`); report it with
                :meth:`attempt_failed`.
        """
        previous = self.current
        if previous is not None and previous.record.id == token.id:
            raise MalformedResponseError(
                f"The refresh returned the current token {token.id} again.",
                code="refresh_rejected",
            )
        entry = admit(
            token,
            sent_at=sent_at,
            received_at=now,
            requested_lifetime=self.requested_lifetime,
            policy=self.policy,
            rng=self.rng,
        )
        if not owned:
            entry = dataclasses.replace(entry, owned=False)
        self._counts["mints"] += 1
        self._install(entry, now)
        return entry

    def _install(self, entry: CachedToken, now: float) -> None:
        previous = self.current
        if previous is not None:
            self._counts["refreshes"] += 1
            self._retire(previous, now)
        self.current = entry
        self.failures = 0
        self.last_error = None
        self.last_error_fatal = False
        self.next_attempt_at = -math.inf

    def adopt(self, stored: StoredToken, *, now: float, wall_now: float) -> CachedToken | None:
        """Take a token another process minted (from a shared store) if it beats ours.

        Its life is moved from the wall clock to our monotonic clock once, here. Adopted
        tokens are never ours to revoke. Returns the installed entry, or None if it was not
        better (the same token, an older one, or one already inside its safety margin).
        """
        current = self.current
        if stored.id in self.rejected_ids or (
            current is not None and current.record.id == stored.id
        ):
            return None
        obtained = now - (wall_now - stored.obtained_at)
        lifetime = stored.lifetime
        expires_at = obtained + lifetime
        entry = CachedToken(
            record=M2MToken(
                id=stored.id, subject=stored.subject, token=stored.secret, format=stored.format
            ),
            secret=stored.secret,
            obtained_at=obtained,
            refresh_after=obtained + self.policy.refresh_offset(lifetime, self.rng),
            usable_until=expires_at - self.policy.margin_seconds(lifetime),
            expires_at=expires_at,
            owned=False,
        )
        if entry.state(now) is TokenState.UNUSABLE:
            return None
        if current is not None and entry.expires_at <= current.expires_at:
            return None
        self._counts["adoptions"] += 1
        self._install(entry, now)
        return entry

    def to_stored(self, entry: CachedToken, *, now: float, wall_now: float) -> StoredToken:
        """The entry as a shared store keeps it (on the wall clock)."""
        return StoredToken(
            id=entry.record.id,
            subject=entry.record.subject,
            secret=entry.secret,
            format=entry.record.format,
            obtained_at=wall_now - (now - entry.obtained_at),
            lifetime=entry.expires_at - entry.obtained_at,
        )

    def current_is_fresh(self, now: float) -> bool:
        """Whether the current token needs no refresh at ``now``."""
        return self.current is not None and self.current.state(now) is TokenState.FRESH

    def lease_busy(self, now: float) -> None:
        """Another process holds the mint lease: look again shortly (not a failure)."""
        self.next_attempt_at = now + self.rng.uniform(0.5, 1.5) * LEASE_POLL

    def attempt_failed(self, error: BaseException, now: float) -> None:
        """Record a failed attempt and set the backoff gate."""
        self.failures += 1
        self._counts["refresh_failures"] += 1
        self.last_error = error
        self.last_error_fatal = not is_retryable(error)
        retry_after = getattr(error, "retry_after", None)
        self.next_attempt_at = now + self.policy.backoff(
            self.failures,
            retry_after=retry_after if isinstance(retry_after, (int, float)) else None,
            rng=self.rng,
        )

    def should_retry(self, now: float) -> bool:
        """Whether the flight should try again after a failure.

        Yes while the failure is transient and someone still needs a token: the cached one is
        still servable (keep refreshing behind it), or a caller asked within ``wait_timeout``.
        """
        if self.closed or self.last_error_fatal:
            return False
        if self.usable_token(now) is not None:
            return True
        return now - self.last_demand_at < self.policy.wait_timeout

    def flight_finished(self) -> None:
        """The flight ended (success, give-up or cancellation)."""
        self.flight_active = False

    # -- revocation, fork, close -----------------------------------------------------------

    def _retire(self, entry: CachedToken, now: float) -> None:
        if entry.owned and entry.record.format == "opaque":
            self.pending_revocations.append((entry.record.id, now + self.policy.rotation_grace))

    def due_revocations(self, now: float, *, everything: bool = False) -> list[str]:
        """Pop the token ids whose grace period is over (all of them with ``everything``)."""
        due = [tid for tid, at in self.pending_revocations if everything or at <= now]
        self.pending_revocations = [
            (tid, at) for tid, at in self.pending_revocations if not (everything or at <= now)
        ]
        return due

    def next_revocation_at(self) -> float | None:
        """When the next queued revocation is due."""
        return min((at for _, at in self.pending_revocations), default=None)

    def revocation_done(self, *, ok: bool) -> None:
        """Count a revocation attempt."""
        self._counts["revocations" if ok else "revocation_failures"] += 1

    def shared(self) -> None:
        """The process is about to fork: the current token is no longer ours alone."""
        if self.current is not None and self.current.owned:
            self.current = dataclasses.replace(self.current, owned=False)

    def forked_child(self) -> None:
        """We are the child of a fork: no flight survives, the parent's revocations are its own."""
        self.shared()
        self.flight_active = False
        self.pending_revocations = []
        self._counts["forks"] += 1

    def begin_close(self) -> None:
        """Closing: no new flight, no further retry; a mint under way may still land."""
        self.closed = True

    def close(self, *, revoke_current: bool) -> list[str]:
        """Stop; return the ids to revoke now (queued ones, and the current if asked and ours)."""
        self.closed = True
        ids = self.due_revocations(0.0, everything=True)
        entry = self.current
        if revoke_current and entry is not None and entry.owned:
            if entry.record.format == "opaque":
                ids.append(entry.record.id)
            self.current = None
        return ids

    def refresh_due(self, now: float) -> bool:
        """Whether a background refresher should start a flight now."""
        entry = self.current
        fresh = entry is not None and entry.state(now) is TokenState.FRESH
        if fresh or self.flight_active or self.closed or self.last_error_fatal:
            # After a fatal error (a wrong key), only a caller asking again re-probes.
            return False
        return now >= self.next_attempt_at

    def next_wakeup(self, now: float) -> float:
        """When a background refresher should next look (monotonic seconds)."""
        entry = self.current
        if entry is not None and entry.state(now) is TokenState.FRESH:
            wake = entry.refresh_after
        elif self.last_error_fatal:
            wake = max(self.next_attempt_at, now + self.policy.max_backoff)  # look, don't probe
        else:
            wake = self.next_attempt_at
        revocation = self.next_revocation_at()
        if revocation is not None:
            wake = min(wake, revocation)
        return max(now, wake)

    def statistics(self, now: float) -> Statistics:
        """An immutable snapshot."""
        entry = self.current
        error = self.last_error
        return Statistics(
            **self._counts,
            consecutive_failures=self.failures,
            refresh_in_flight=self.flight_active,
            token_id=entry.record.id if entry else None,
            token_state=entry.state(now) if entry else TokenState.UNUSABLE,
            seconds_to_expiry=entry.expires_at - now if entry else None,
            seconds_to_refresh=entry.refresh_after - now if entry else None,
            last_error=f"{type(error).__name__}: {error}" if error is not None else None,
        )
