"""The emulator's public records: machines, stored tokens, counters and handler outcomes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

__all__ = ["Counters", "Machine", "Outcome", "TokenRecord"]


@dataclasses.dataclass(frozen=True)
class Machine:
    """A machine registered with the emulator.

    Attributes:
        id: The machine id, ``mch_`` and 27 word characters; the ``subject`` of its tokens.
        name: A human-readable name.
        secret_key: The machine secret key (``ak_...``). Never shown by ``repr``.
        scoped_machines: Ids of the machines this machine's tokens may be presented to; copied
            into a token's ``scopes`` when it is minted.
        default_token_ttl: The lifetime in seconds of a token minted without
            ``seconds_until_expiration``.
    """

    id: str
    name: str
    secret_key: str = dataclasses.field(repr=False)
    scoped_machines: tuple[str, ...] = ()
    default_token_ttl: int = 3600


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """A snapshot of one stored (opaque) token, as the emulator holds it.

    Times are seconds on the emulator's clock; the wire format turns them into Unix milliseconds.

    Attributes:
        id: The token id, ``mt_`` and 32 hex digits.
        subject: The id of the machine that minted it.
        token: The opaque token string. Never shown by ``repr``.
        claims: The custom claims given at creation, or ``None``.
        scopes: The machine ids this token may be presented to.
        created_at: When it was minted.
        expires_at: When it expires, or ``None`` for never.
        revoked: Whether it was revoked.
        revocation_reason: The reason given at revocation, if any.
        last_used_at: When it was last verified, or ``None``.
        updated_at: When it last changed (minted, verified or revoked).
    """

    id: str
    subject: str
    token: str = dataclasses.field(repr=False)
    claims: Any
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked: bool = False
    revocation_reason: str | None = None
    last_used_at: float | None = None
    updated_at: float = 0.0

    def is_expired(self, now: float) -> bool:
        """Whether the token has expired at time ``now``.

        Args:
            now: Seconds on the emulator's clock.

        Returns:
            ``True`` once ``now`` has reached the expiry.
        """
        return self.expires_at is not None and now >= self.expires_at

    def remaining(self, now: float) -> float:
        """Seconds of life left at ``now`` (infinite when it never expires, negative once expired).

        Args:
            now: Seconds on the emulator's clock.

        Returns:
            The remaining lifetime in seconds.
        """
        return float("inf") if self.expires_at is None else self.expires_at - now


@dataclasses.dataclass(frozen=True)
class Counters:
    """A snapshot of what the emulator has served since creation or the last reset.

    Attributes:
        requests: Attempts per endpoint (``create``, ``verify``, ``revoke``, ``list``, ``jwks``,
            and ``unknown`` for unrouted paths), counting faulted and rate-limited ones.
        mints: New tokens created (what Clerk bills), opaque and JWT.
        reused: Create calls answered with an existing token through ``min_remaining_ttl_seconds``.
        verifications: Verify calls that reached the handler (past faults and rate limiting),
            whatever their answer.
        revocations: Revoke calls that reached the handler, whatever their answer.
        lists: List calls that reached the handler.
        jwks: JWKS calls that reached the handler.
        faults: Requests to which at least one injected fault applied (latency included).
        errors: Responses answered with a 4xx or 5xx status, injected or not.
    """

    requests: Mapping[str, int]
    mints: int = 0
    reused: int = 0
    verifications: int = 0
    revocations: int = 0
    lists: int = 0
    jwks: int = 0
    faults: int = 0
    errors: int = 0


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The emulator's decision for one request, before any waiting.

    Attributes:
        response: The response to send, or ``None`` when the connection is dropped.
        delay: Seconds to wait before answering (or dropping).
        drop: Whether to close the connection without a complete response.
    """

    response: httpx.Response | None
    delay: float = 0.0
    drop: bool = False
