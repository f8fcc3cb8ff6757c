"""``M2MToken``: the immutable record of Clerk's ``machine_to_machine_token`` object."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Literal

from m2m_agent._secrets import fingerprint

__all__ = ["M2MToken", "M2MTokenList", "TokenFormat"]

TokenFormat = Literal["opaque", "jwt"]
"""The two token formats Clerk mints: stored, revocable ``opaque`` (``mt_...``) or local ``jwt``."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class M2MToken:
    """One M2M token as Clerk describes it; timestamps are aware UTC datetimes.

    ``token`` (the secret itself) is only present on the create response. ``repr`` and ``str``
    never show it: they show the id and a short fingerprint instead.
    """

    id: str
    """The token id, ``mt_`` followed by 32 hex characters (the JWT ``jti`` for JWTs)."""
    subject: str
    """The machine that minted the token, ``mch_...``."""
    scopes: tuple[str, ...] = ()
    """Machine ids (``mch_...``) this token may be presented to."""
    claims: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False, compare=True)
    """The custom claims given at creation, or None."""
    token: str | None = dataclasses.field(default=None, repr=False)
    """The bearer secret: on create responses only. Never logged or shown."""
    revoked: bool = False
    """Whether the token was revoked (it no longer verifies)."""
    revocation_reason: str | None = None
    """The reason given when it was revoked."""
    expired: bool = False
    """Whether Clerk considers the token expired."""
    expiration: datetime | None = None
    """When the token stops working; None for a token that never expires."""
    created_at: datetime | None = None
    """When it was minted."""
    updated_at: datetime | None = None
    """When Clerk last changed it (minted, verified, revoked)."""
    last_used_at: datetime | None = None
    """When it was last verified (opaque tokens only)."""
    format: TokenFormat = "opaque"
    """``"jwt"`` when ``token`` is a JWT, else ``"opaque"``."""

    @property
    def fingerprint(self) -> str | None:
        """A short fingerprint of the secret, safe for logs; None when the secret is absent."""
        return fingerprint(self.token) if self.token is not None else None

    @property
    def lifetime(self) -> float | None:
        """Seconds between creation and expiration as Clerk granted them, or None if unknown.

        Both ends come from the server's clock, so the figure is free of local clock skew.
        """
        if self.expiration is None or self.created_at is None:
            return None
        return (self.expiration - self.created_at).total_seconds()

    def __repr__(self) -> str:
        secret = f", fingerprint={self.fingerprint!r}" if self.token is not None else ""
        state = " revoked" if self.revoked else (" expired" if self.expired else "")
        return (
            f"<M2MToken {self.id}{state} subject={self.subject!r} format={self.format!r}"
            f" expiration={self.expiration.isoformat() if self.expiration else None}{secret}>"
        )

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, slots=True)
class M2MTokenList:
    """One page of ``list_tokens``: the tokens (newest first) and the total matching count."""

    tokens: tuple[M2MToken, ...]
    total_count: int

    def __iter__(self) -> Iterator[M2MToken]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)
