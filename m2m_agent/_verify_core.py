"""The sans-IO half of token verification: what a token is, whether it passes, what to remember.

Nothing here sends, sleeps, locks or reads a clock: every function that needs the time takes
``now``. The drivers in :mod:`m2m_agent.verify` only lock, send and call into this module, so
the sync and async verifiers cannot disagree about a verdict.

The steps for a presented token (Clerk's contract, sections 4.2 and 7):

1. :func:`classify`: ``mt_...`` is an opaque M2M token; a three-part base64url JWT whose ``sub``
   starts with ``mch_`` (and whose ``cat`` header, if any, is the M2M category) is an M2M JWT;
   anything else is ``not_m2m_token``. No secret is needed for this.
2. Opaque: ask Clerk (driver), turn the answer into a verdict (:func:`verdict_from_api`) and keep
   it in the :class:`VerdictCache`, never longer than the token lives.
3. JWT: :func:`check_jwt_header` (RS256 only), pick the key (:class:`JwksState` or the PEM), check
   the signature (driver, with PyJWT), then :func:`verified_from_jwt` checks the times.
4. :class:`Requirements`: the verifier's required scopes and allowed subjects.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar, cast

from m2m_agent._token import M2MToken
from m2m_agent.errors import BadRequestError, InvalidTokenError, NotFoundError

__all__ = [
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_JWKS_CACHE_TTL",
    "DEFAULT_JWKS_REFETCH_INTERVAL",
    "DEFAULT_NEGATIVE_CACHE_MAX_ENTRIES",
    "DEFAULT_NEGATIVE_CACHE_TTL",
    "FETCH",
    "M2M_CATEGORY",
    "MAX_TOKEN_LENGTH",
    "RESERVED_CLAIMS",
    "JwksState",
    "JwtToken",
    "OpaqueToken",
    "Reason",
    "Rejection",
    "Requirements",
    "VerdictCache",
    "VerifiedToken",
    "check_jwt_header",
    "classify",
    "verdict_from_api",
    "verified_from_jwt",
    "verified_from_m2m_token",
]

K = TypeVar("K")

DEFAULT_CACHE_TTL = 30.0
"""Seconds a positive opaque verdict is reused: also the bound on how long a revoked token may
still pass. Never longer than the token itself lives."""

DEFAULT_NEGATIVE_CACHE_TTL = 5.0
"""Seconds a rejection from Clerk (unknown, revoked, expired) is reused: long enough to absorb a
retry storm of one bad token, short enough to forget a token that was not yet known."""

DEFAULT_CACHE_MAX_ENTRIES = 10_000
"""Positive verdicts kept at most (least recently used dropped first): about 3 MB."""

DEFAULT_NEGATIVE_CACHE_MAX_ENTRIES = 1_000
"""Rejections kept at most; separate from the positive cache so a flood of bad tokens cannot
push the good ones out."""

DEFAULT_CLOCK_SKEW = 5.0
"""Seconds of leeway on ``exp``, ``nbf`` and ``iat`` (Clerk's SDKs use the same 5 s)."""

DEFAULT_JWKS_CACHE_TTL = 300.0
"""Seconds a fetched JWKS is used before it is fetched again (Clerk's SDKs: 5 minutes)."""

DEFAULT_JWKS_REFETCH_INTERVAL = 30.0
"""A token with an unknown ``kid`` refetches the JWKS at most this often, so forged ``kid``
values cannot make us hammer the JWKS endpoint."""

MAX_TOKEN_LENGTH = 16 * 1024
"""Longer input is refused before it is hashed or parsed. Clerk's tokens are well under 2 KiB."""

M2M_CATEGORY = "cl_B7d4PD333AAA"
"""The ``cat`` header of M2M JWTs (session tokens carry ``cl_B7d4PD111AAA``)."""

RESERVED_CLAIMS = frozenset({"iss", "sub", "exp", "nbf", "iat", "jti"})
"""Payload names Clerk sets itself; everything else in an M2M JWT is a custom claim."""

Reason = Literal[
    "not_m2m_token", "unknown", "revoked", "expired", "bad_signature", "missing_scope", "malformed"
]
"""Why a token was refused: the ``reason`` of :class:`~m2m_agent.errors.InvalidTokenError`."""

_OPAQUE = re.compile(r"mt_[\x21-\x7e]+")
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_OTHER_KINDS = {
    "ak_": "it is an API key or a machine secret key (ak_...)",
    "oat_": "it is an OAuth access token (oat_...)",
    "sk_": "it is an instance secret key (sk_...)",
    "pk_": "it is a publishable key (pk_...)",
    "m2m_": "it is a legacy machine token (m2m_...)",
}


def _reject(reason: Reason, message: str) -> InvalidTokenError:
    return InvalidTokenError(message, reason=reason)


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A remembered refusal: raised afresh (a new exception each time) on every cache hit."""

    reason: Reason
    message: str

    def error(self) -> InvalidTokenError:
        """A new :class:`InvalidTokenError` for this refusal."""
        return InvalidTokenError(self.message, reason=self.reason)


# --- the verified token --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedToken:
    """A presented M2M token that verified: who sent it, to whom it may go, until when.

    It holds no secret (not the token itself), so it is safe to log, cache and pass around.

    Attributes:
        token_type: Always ``"m2m_token"`` (Clerk's name for the type).
        token_id: The token id, ``mt_...`` (the ``jti`` of a JWT).
        machine_id: The machine that minted the token (its ``sub``/``subject``, ``mch_...``).
        scopes: The machine ids (``mch_...``) the token may be presented to. For opaque tokens
            Clerk sets them from the minting machine's scopes; for JWTs they come from the
            payload's ``scopes`` (space-separated) or ``aud``, which the minting machine can
            choose itself through custom claims.
        claims: The custom claims (read-only), or None when there are none.
        expiration: When the token stops working (aware UTC), or None if it never expires.
        format: ``"opaque"`` (verified by Clerk) or ``"jwt"`` (verified locally).
    """

    token_type: Literal["m2m_token"] = "m2m_token"
    token_id: str
    machine_id: str
    scopes: tuple[str, ...] = ()
    claims: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    expiration: datetime | None = None
    format: Literal["opaque", "jwt"] = "opaque"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", tuple(self.scopes))
        if self.claims is not None and not isinstance(self.claims, MappingProxyType):
            object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))

    def __repr__(self) -> str:
        expiration = self.expiration.isoformat() if self.expiration else None
        return (
            f"<VerifiedToken {self.token_id} machine_id={self.machine_id!r} "
            f"format={self.format!r} scopes={self.scopes!r} expiration={expiration}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        claims = None if self.claims is None else dict(self.claims)
        return (
            _rebuild_verified,
            (self.token_id, self.machine_id, self.scopes, claims, self.expiration, self.format),
        )


def _rebuild_verified(
    token_id: str,
    machine_id: str,
    scopes: tuple[str, ...],
    claims: dict[str, Any] | None,
    expiration: datetime | None,
    format: Literal["opaque", "jwt"],
) -> VerifiedToken:
    return VerifiedToken(
        token_id=token_id,
        machine_id=machine_id,
        scopes=scopes,
        claims=claims,
        expiration=expiration,
        format=format,
    )


# --- type detection ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OpaqueToken:
    """A presented ``mt_...`` token, with its cache key (the full SHA-256 of the token)."""

    value: str = dataclasses.field(repr=False)
    digest: bytes = dataclasses.field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The short fingerprint for logs (the same as :func:`m2m_agent._secrets.fingerprint`)."""
        return self.digest.hex()[:12]


@dataclasses.dataclass(frozen=True, slots=True)
class JwtToken:
    """A presented JWT that looks like an M2M token, parsed but not yet verified."""

    value: str = dataclasses.field(repr=False)
    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes = dataclasses.field(repr=False)
    signature: bytes = dataclasses.field(repr=False)

    @property
    def kid(self) -> str | None:
        """The ``kid`` header, when it is a string."""
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def fingerprint(self) -> str:
        """The short fingerprint for logs."""
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]


def _b64decode(segment: str) -> bytes:
    """Strict base64url: only the canonical encoding of its bytes (no malleable twin strings)."""
    decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != segment.encode("ascii"):
        raise binascii.Error("non-canonical base64url")
    return decoded


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(segment))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _reject("malformed", f"The JWT {what} is not base64url-encoded JSON.") from None
    if not isinstance(value, dict):
        raise _reject("malformed", f"The JWT {what} is not a JSON object.")
    return value


def classify(token: object) -> OpaqueToken | JwtToken:
    """Tell what a presented bearer token is, without any key or network.

    Raises:
        InvalidTokenError: ``not_m2m_token`` for session tokens, API keys, OAuth tokens and
            anything else that is not an M2M token; ``malformed`` for input that claims to be
            one but cannot be read.
    """
    if not isinstance(token, str):
        raise _reject("malformed", f"A token is a str, not {type(token).__name__}.")
    if not token:
        raise _reject("malformed", "The token is empty.")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _reject("malformed", f"The token is longer than {MAX_TOKEN_LENGTH} characters.")
    if token.startswith("mt_"):
        if not _OPAQUE.fullmatch(token):
            raise _reject(
                "malformed", "An opaque M2M token is 'mt_' and printable ASCII, with no spaces."
            )
        return OpaqueToken(token, hashlib.sha256(token.encode()).digest())
    if not _JWT.fullmatch(token):
        kind = next(
            (text for prefix, text in _OTHER_KINDS.items() if token.startswith(prefix)),
            "neither an opaque token (mt_...) nor a JWT",
        )
        raise _reject("not_m2m_token", f"Not an M2M token: {kind}.")
    head, body, signature = token.split(".")
    header = _b64json(head, "header")
    payload = _b64json(body, "payload")
    subject = payload.get("sub")
    if not (isinstance(subject, str) and subject.startswith("mch_")):
        raise _reject(
            "not_m2m_token",
            "The JWT's subject is not a machine (mch_...): a session token or another kind "
            "of JWT, not an M2M token.",
        )
    category = header.get("cat")
    if category is not None and category != M2M_CATEGORY:
        raise _reject(
            "not_m2m_token",
            f"The JWT's category (cat) is {_short(category)}, not the M2M category "
            f"{M2M_CATEGORY!r}.",
        )
    try:
        signature_bytes = _b64decode(signature)
    except (binascii.Error, ValueError):
        raise _reject("malformed", "The JWT signature is not base64url.") from None
    return JwtToken(token, header, payload, f"{head}.{body}".encode("ascii"), signature_bytes)


def _short(value: object) -> str:
    """A bounded ``repr`` of attacker-supplied data, for messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- JWT checks ----------------------------------------------------------------------------------


def check_jwt_header(token: JwtToken, *, needs_kid: bool) -> None:
    """Refuse any algorithm but RS256 (``none``, HS256, ...) and headers we do not understand.

    Raises:
        InvalidTokenError: ``bad_signature`` for another algorithm; ``malformed`` for a ``crit``
            header or (with ``needs_kid``, i.e. JWKS) a missing ``kid``.
    """
    alg = token.header.get("alg")
    if alg != "RS256":
        raise _reject(
            "bad_signature",
            f"The JWT algorithm {_short(alg)} is not accepted: M2M JWTs are signed RS256.",
        )
    if "crit" in token.header:
        raise _reject("malformed", "The JWT has a 'crit' header, which M2M JWTs never carry.")
    if needs_kid and token.kid is None:
        raise _reject("malformed", "The JWT has no 'kid' header naming its signing key.")


def _number(payload: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _reject("malformed", f"The JWT claim {name!r} is missing or not a number.")
    return float(value)


def _scopes(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """``scopes`` (space-separated, or a list), else ``aud``, else nothing (contract §4.2)."""
    for name in ("scopes", "aud"):
        value = payload.get(name)
        if isinstance(value, str):
            return tuple(part for part in value.split(" ") if part)
        if isinstance(value, list) and all(isinstance(part, str) for part in value):
            return tuple(value)
    return ()


def verified_from_jwt(token: JwtToken, *, now: float, skew: float) -> VerifiedToken:
    """Check a signature-verified JWT's times and map it the way Clerk's SDK does (§4.2).

    Args:
        token: The token, whose signature was already checked.
        now: Wall-clock seconds (Unix time).
        skew: Seconds of leeway on ``exp``, ``nbf`` and ``iat``.

    Raises:
        InvalidTokenError: ``expired`` past ``exp`` (or before ``nbf``/``iat``), ``malformed``
            without ``jti`` or ``exp``.
    """
    payload = token.payload
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti:
        raise _reject("malformed", "The JWT has no token id (jti).")
    exp = _number(payload, "exp", required=True)
    assert exp is not None
    if exp <= now - skew:
        raise _reject("expired", f"Token {_short(jti)} expired at {_iso(exp)}.")
    for name in ("nbf", "iat"):
        when = _number(payload, name, required=False)
        if when is not None and when > now + skew:
            raise _reject(
                "expired", f"Token {_short(jti)} is not valid yet ({name} is {_iso(when)})."
            )
    try:
        expiration = datetime.fromtimestamp(exp, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise _reject("malformed", "The JWT claim 'exp' is out of range.") from None
    claims = {name: value for name, value in payload.items() if name not in RESERVED_CLAIMS}
    return VerifiedToken(
        token_id=jti,
        machine_id=str(payload["sub"]),
        scopes=_scopes(payload),
        claims=claims or None,
        expiration=expiration,
        format="jwt",
    )


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"


# --- opaque verdicts -----------------------------------------------------------------------------


def verified_from_m2m_token(token: M2MToken) -> VerifiedToken:
    """Map Clerk's verify answer onto a :class:`VerifiedToken`."""
    return VerifiedToken(
        token_id=token.id,
        machine_id=token.subject,
        scopes=token.scopes,
        claims=token.claims,
        expiration=token.expiration,
        format="opaque",
    )


def verdict_from_api(error: Exception) -> Rejection | None:
    """What an error from the verify endpoint says about the token, or None if nothing.

    A 404 means Clerk does not accept the token (unknown, revoked, expired or not scoped to the
    verifying machine: Clerk does not say which); a 400 that it is malformed; a 200 marked
    revoked or expired carries its own reason. Anything else (401 for our key, 429, 5xx,
    transport) says nothing about the token: it is not cached and propagates.
    """
    if isinstance(error, InvalidTokenError):
        reason = cast("Reason", error.reason if error.reason in _REASONS else "unknown")
        return Rejection(reason, error.message)
    if isinstance(error, NotFoundError):
        return Rejection(
            "unknown",
            "Clerk does not accept this token: it is unknown, revoked, expired, or not scoped "
            "to the verifying machine.",
        )
    if isinstance(error, BadRequestError):
        return Rejection("malformed", "Clerk refused the token as malformed.")
    return None


_REASONS = frozenset(
    {
        "not_m2m_token",
        "unknown",
        "revoked",
        "expired",
        "bad_signature",
        "missing_scope",
        "malformed",
    }
)


# --- requirements --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Requirements:
    """What a verified token must also satisfy: scopes it must carry, subjects it may have."""

    scopes: frozenset[str] = frozenset()
    subjects: frozenset[str] | None = None

    def check(self, token: VerifiedToken, extra_scopes: Iterable[str] = ()) -> None:
        """Raise ``missing_scope`` unless the token satisfies these requirements.

        Args:
            token: The verified token.
            extra_scopes: Scopes required on top of :attr:`scopes` (a route's own).
        """
        if self.subjects is not None and token.machine_id not in self.subjects:
            raise _reject(
                "missing_scope",
                f"Machine {token.machine_id} is not one of the subjects this verifier accepts.",
            )
        required = self.scopes.union(extra_scopes) if extra_scopes else self.scopes
        if required:
            missing = required.difference(token.scopes)
            if missing:
                raise _reject(
                    "missing_scope",
                    f"Token {token.token_id} is not scoped to {', '.join(sorted(missing))}.",
                )


# --- the verdict cache ---------------------------------------------------------------------------


class _Lru(Generic[K]):
    """A bounded map with per-entry deadlines; the least recently used entry goes first."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._entries: collections.OrderedDict[bytes, tuple[float, K]] = collections.OrderedDict()
        self._limit = limit

    def get(self, key: bytes, now: float) -> K | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: bytes, value: K, deadline: float) -> None:
        if self._limit <= 0:
            return
        self._entries[key] = (deadline, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class VerdictCache:
    """Opaque verdicts keyed by the token's SHA-256: verified tokens and rejections, bounded.

    A positive entry lives ``min(ttl, time the token has left)``; a rejection lives
    ``negative_ttl``. Keys are full digests, never the token, and never a short fingerprint
    (a 48-bit fingerprint could be brute-forced into a collision with a cached good token).

    Args:
        ttl: Seconds a positive verdict is reused (0 disables).
        negative_ttl: Seconds a rejection is reused (0 disables).
        max_entries: Positive entries kept at most.
        negative_max_entries: Rejections kept at most.
    """

    __slots__ = ("_negative", "_negative_ttl", "_positive", "_seen", "_ttl")

    def __init__(
        self, *, ttl: float, negative_ttl: float, max_entries: int, negative_max_entries: int
    ) -> None:
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._positive: _Lru[VerifiedToken] = _Lru(max_entries if ttl > 0 else 0)
        self._negative: _Lru[Rejection] = _Lru(negative_max_entries if negative_ttl > 0 else 0)
        # Tokens Clerk accepted before (id and expiry), kept past their verdicts: a token
        # accepted once and refused later was revoked or has expired (its scopes cannot change).
        self._seen: _Lru[tuple[str, float | None]] = _Lru(max_entries)

    def get(self, key: bytes, now: float) -> VerifiedToken | Rejection | None:
        """The live verdict for a token digest at monotonic time ``now``, or None."""
        verified = self._positive.get(key, now)
        return verified if verified is not None else self._negative.get(key, now)

    def put_verified(self, key: bytes, token: VerifiedToken, *, now: float, wall: float) -> None:
        """Remember a token Clerk accepted, for at most ``ttl`` and never past its expiration.

        Args:
            key: The token digest.
            token: The verdict.
            now: Monotonic seconds (entry deadlines).
            wall: Wall-clock seconds (to measure what is left until ``expiration``).
        """
        lifetime = self._ttl
        expires = None if token.expiration is None else token.expiration.timestamp()
        if expires is not None:
            lifetime = min(lifetime, expires - wall)
        self._negative.discard(key)
        self._seen.put(key, (token.token_id, expires), math.inf)
        if lifetime > 0:
            self._positive.put(key, token, now + lifetime)

    def explain(self, key: bytes, rejection: Rejection, *, wall: float, skew: float) -> Rejection:
        """Sharpen Clerk's "unknown" (404) for a token Clerk accepted before.

        Such a token has expired (when our clock says it is past, or within ``skew`` of, its
        expiry) or was revoked; anything else stays as it is.
        """
        if rejection.reason != "unknown":
            return rejection
        seen = self._seen.get(key, 0.0)
        if seen is None:
            return rejection
        token_id, expires = seen
        if expires is not None and wall >= expires - skew:
            return Rejection("expired", f"Token {token_id} has expired.")
        return Rejection(
            "revoked", f"Token {token_id} verified before and Clerk now refuses it: revoked."
        )

    def put_rejection(self, key: bytes, rejection: Rejection, *, now: float) -> None:
        """Remember a refusal from Clerk for ``negative_ttl``."""
        self._positive.discard(key)
        self._negative.put(key, rejection, now + self._negative_ttl)

    def clear(self) -> None:
        """Forget every verdict (and which tokens were accepted before)."""
        self._positive.clear()
        self._negative.clear()
        self._seen.clear()

    @property
    def sizes(self) -> tuple[int, int]:
        """``(positive entries, negative entries)``, expired ones included until touched."""
        return len(self._positive), len(self._negative)


# --- JWKS state ----------------------------------------------------------------------------------


class _Fetch:
    def __repr__(self) -> str:
        return "FETCH"


FETCH: Any = _Fetch()
""":meth:`JwksState.decide`'s answer when the key set must be fetched first."""


class JwksState:
    """The fetched signing keys and the policy for fetching them again.

    - A key of a set fetched less than ``ttl`` ago is used as is.
    - A set older than that is fetched again; while a fetch has just been tried (less than
      ``refetch_interval`` ago, e.g. it failed), the old keys are still used.
    - An unknown ``kid`` fetches again, at most once per ``refetch_interval``; after that it is
      refused, so invented ``kid`` values cannot drive traffic to the JWKS endpoint.

    Args:
        ttl: Seconds a fetched set is fresh.
        refetch_interval: Seconds between fetches for unknown ``kid`` values.
    """

    __slots__ = (
        "_attempted_at",
        "_fetched_at",
        "_in_flight",
        "_keys",
        "_refetch_interval",
        "_ttl",
    )

    def __init__(self, *, ttl: float, refetch_interval: float) -> None:
        self._ttl = ttl
        self._refetch_interval = refetch_interval
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._in_flight = False

    def decide(self, kid: str | None, now: float) -> Any:
        """The key for ``kid``, :data:`FETCH` (fetch, or wait for the fetch in flight), or None.

        None means refuse: no such key, and the set was fetched too recently to fetch again.

        Args:
            kid: The token's ``kid`` header.
            now: Monotonic seconds.
        """
        key = self._keys.get(kid) if kid is not None else None
        fresh = self._fetched_at is not None and now - self._fetched_at < self._ttl
        tried = self._attempted_at is not None and now - self._attempted_at < self._refetch_interval
        if key is not None and (fresh or tried or self._in_flight):
            return key
        if self._in_flight or not tried or self._fetched_at is None:
            # Fetch (or wait for the fetch in flight). With no keys at all this is an outage:
            # the driver keeps one fetch in flight at a time and shares its failure.
            return FETCH
        return None

    def begin(self, now: float) -> None:
        """A fetch starts at ``now``."""
        self._attempted_at = now
        self._in_flight = True

    def store(self, keys: Mapping[str, Any], now: float) -> None:
        """The fetch brought these keys at ``now``."""
        self._keys = dict(keys)
        self._fetched_at = now
        self._in_flight = False

    def failed(self) -> None:
        """The fetch failed; the old keys (if any) stay in use until the next attempt."""
        self._in_flight = False

    @property
    def kids(self) -> tuple[str, ...]:
        """The known key ids."""
        return tuple(sorted(self._keys))
