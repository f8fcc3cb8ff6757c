"""The receiving side: verify the M2M tokens that callers present to your service.

:class:`TokenVerifier` (threads) and :class:`AsyncTokenVerifier` (asyncio and trio) take a
presented bearer token and return a :class:`VerifiedToken`, or raise
:class:`~m2m_agent.errors.InvalidTokenError` whose ``reason`` says why::

    from m2m_agent.verify import AsyncTokenVerifier

    verifier = AsyncTokenVerifier(required_scopes=["mch_this_service..."])
    verified = await verifier.verify(token)   # VerifiedToken(machine_id="mch_...", ...)

- **Opaque tokens** (``mt_...``) are verified by Clerk (``POST /m2m_tokens/verify``, billed per
  call) with the machine secret key, falling back to the instance secret key. Verdicts are cached:
  a good token for at most ``cache_ttl`` (30 s) and never past its expiry, a refused one for
  ``negative_cache_ttl`` (5 s). So a revoked token stops verifying within ``cache_ttl``.
  Concurrent verifications of one uncached token make one call.
- **JWT-format tokens** are verified locally: RS256 only, against the PEM ``jwt_key`` (no
  network at all) or the instance's JWKS (fetched with the instance secret key, cached for 5
  minutes, refetched for an unknown ``kid`` at most every 30 s).
- **Anything else** (session tokens, API keys, OAuth tokens, garbage) is ``not_m2m_token``.

Errors that say nothing about the token (Clerk unreachable, 5xx, 429, our key refused) are
never cached and propagate as :class:`~m2m_agent.errors.TransportError` or
:class:`~m2m_agent.errors.ClerkAPIError`: answer those with 503, not 401.

Reasons: ``not_m2m_token``, ``malformed``, ``unknown`` (Clerk does not accept the token: unknown,
revoked, expired or not scoped to your machine; Clerk does not say which), ``revoked``,
``expired`` (also: a JWT not valid yet), ``bad_signature`` (also: a JWT algorithm other than
RS256, an unknown ``kid``), ``missing_scope`` (also: a subject not in ``allowed_subjects``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import httpx
import structlog

from m2m_agent import _clock
from m2m_agent._api import ApiCall, Endpoints
from m2m_agent._client import DEFAULT_TIMEOUT, AsyncClerkM2MClient, ClerkM2MClient
from m2m_agent._config import ENV_MACHINE_SECRET_KEY, resolve_api_url
from m2m_agent._secrets import Secret
from m2m_agent._send import asend, send
from m2m_agent._token import M2MToken
from m2m_agent._verify_core import (
    DEFAULT_CACHE_MAX_ENTRIES,
    DEFAULT_CACHE_TTL,
    DEFAULT_CLOCK_SKEW,
    DEFAULT_JWKS_CACHE_TTL,
    DEFAULT_JWKS_REFETCH_INTERVAL,
    DEFAULT_NEGATIVE_CACHE_MAX_ENTRIES,
    DEFAULT_NEGATIVE_CACHE_TTL,
    FETCH,
    JwksState,
    JwtToken,
    OpaqueToken,
    Rejection,
    Requirements,
    VerdictCache,
    VerifiedToken,
    check_jwt_header,
    classify,
    verdict_from_api,
    verified_from_jwt,
    verified_from_m2m_token,
)
from m2m_agent._verify_io import AsyncSingleFlight, SyncSingleFlight
from m2m_agent._verify_keys import (
    ENV_JWT_KEY,
    ENV_SECRET_KEY,
    JwtCrypto,
    jwks_call,
    jwks_url_for,
    load_crypto,
    optional_machine_secret_key,
    resolve_jwks_url,
    resolve_jwt_key,
    resolve_secret_key,
)
from m2m_agent.errors import ClerkAPIError, ConfigurationError, InvalidTokenError, TransportError

__all__ = [
    "AsyncTokenVerifier",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_NEGATIVE_CACHE_TTL",
    "TokenVerifier",
    "VerifiedToken",
    "VerifierStatistics",
]

VerifiedToken.__module__ = __name__

_log = structlog.get_logger("m2m_agent")

_DONE: Any = object()
"""What the JWKS flight shares: "the key set was fetched", not any one key."""

_live: weakref.WeakSet[_VerifierBase] = weakref.WeakSet()
"""Every verifier, so a forked child can reset them (no inherited held lock or dead flight)."""


def _reset_after_fork() -> None:
    for verifier in list(_live):
        verifier._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_reset_after_fork)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VerifierStatistics:
    """A snapshot of what a verifier did since it was made; every field is a count.

    Attributes:
        cache_hits: Opaque verifications answered by a cached good verdict.
        negative_cache_hits: Opaque verifications answered by a cached refusal.
        api_calls: Calls to Clerk's verify endpoint (what Clerk bills).
        jwks_fetches: JWKS fetches attempted.
        cached: Good verdicts held now (expired ones included until touched).
        negative_cached: Refusals held now.
    """

    cache_hits: int = 0
    negative_cache_hits: int = 0
    api_calls: int = 0
    jwks_fetches: int = 0
    cached: int = 0
    negative_cached: int = 0


class _Counters:
    __slots__ = ("api_calls", "cache_hits", "jwks_fetches", "negative_cache_hits")

    def __init__(self) -> None:
        self.cache_hits = self.negative_cache_hits = self.api_calls = self.jwks_fetches = 0


class _VerifierBase:
    """Settings and state shared by both faces; every decision is in ``_verify_core``."""

    def __init__(
        self,
        *,
        machine_secret_key: str | None,
        secret_key: str | None,
        jwt_key: str | bytes | None,
        api_url: str | httpx.URL | None,
        jwks_url: str | httpx.URL | None,
        required_scopes: Iterable[str] | str,
        allowed_subjects: Iterable[str] | str | None,
        cache_ttl: float,
        negative_cache_ttl: float,
        cache_max_entries: int,
        negative_cache_max_entries: int,
        clock_skew: float,
        jwks_cache_ttl: float,
        jwks_refetch_interval: float,
        timeout: float | httpx.Timeout | None,
        allow_insecure_http: bool,
        client: ClerkM2MClient | AsyncClerkM2MClient | None,
        clock: Callable[[], float],
    ) -> None:
        for name, value in (
            ("cache_ttl", cache_ttl),
            ("negative_cache_ttl", negative_cache_ttl),
            ("clock_skew", clock_skew),
            ("jwks_cache_ttl", jwks_cache_ttl),
            ("jwks_refetch_interval", jwks_refetch_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}.")
        for name, count in (
            ("cache_max_entries", cache_max_entries),
            ("negative_cache_max_entries", negative_cache_max_entries),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigurationError(f"{name} must be an int >= 0, got {count!r}.")
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if client is not None:
            if machine_secret_key is not None:
                raise ConfigurationError(
                    "Give either client= (which carries its key) or machine_secret_key=, not both."
                )
            if not callable(getattr(client, "verify_token", None)):
                raise ConfigurationError("client must have a verify_token(token) method.")
            machine_key = None
            if api_url is None and isinstance(client, (ClerkM2MClient, AsyncClerkM2MClient)):
                api_url = client.api_url
        else:
            machine_key = optional_machine_secret_key(machine_secret_key)
        self._client = client
        instance_key = resolve_secret_key(secret_key)
        self._api_url = resolve_api_url(api_url, allow_insecure_http=allow_insecure_http)
        opaque_key = machine_key or instance_key
        self._opaque_key = opaque_key
        self._opaque_endpoints = (
            Endpoints(self._api_url, opaque_key, timeout=self._timeout)
            if client is None and opaque_key is not None
            else None
        )
        # JWT keys: the PEM (no network) wins; else a public JWKS URL; else the API's JWKS.
        pem = resolve_jwt_key(jwt_key)
        self._jwt_source = "pem" if pem else ("jwks" if jwks_url or instance_key else None)
        self._pem_key: Any = load_crypto().load_pem(pem) if pem else None
        if jwks_url is not None:
            self._jwks_url: httpx.URL | None = resolve_jwks_url(
                jwks_url, allow_insecure_http=allow_insecure_http
            )
            self._jwks_key: Secret | None = None  # never send the instance key elsewhere
        else:
            self._jwks_url = jwks_url_for(self._api_url) if instance_key else None
            self._jwks_key = instance_key
        if client is None and opaque_key is None and self._jwt_source is None:
            raise ConfigurationError(
                "Nothing to verify tokens with. For opaque tokens (mt_...) pass "
                f"machine_secret_key='ak_...' or set {ENV_MACHINE_SECRET_KEY} (this service's "
                f"machine); for JWT-format tokens pass jwt_key (PEM) or set {ENV_JWT_KEY}, or "
                f"pass secret_key='sk_...' or set {ENV_SECRET_KEY} (JWKS). The instance secret "
                "key covers both."
            )
        if isinstance(required_scopes, str):
            required_scopes = [required_scopes]
        if isinstance(allowed_subjects, str):
            allowed_subjects = [allowed_subjects]
        self._requirements = Requirements(
            frozenset(required_scopes),
            None if allowed_subjects is None else frozenset(allowed_subjects),
        )
        self._skew = float(clock_skew)
        self._wall = clock
        self._lock = threading.Lock()
        self._cache = VerdictCache(
            ttl=float(cache_ttl),
            negative_ttl=float(negative_cache_ttl),
            max_entries=cache_max_entries,
            negative_max_entries=negative_cache_max_entries,
        )
        self._jwks = JwksState(ttl=float(jwks_cache_ttl), refetch_interval=jwks_refetch_interval)
        self._counters = _Counters()
        _live.add(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock and flight tables (the parent's threads are gone)."""
        self._lock = threading.Lock()
        self._jwks.failed()  # a fetch in flight in the parent will never finish here
        self._new_flights()

    def _new_flights(self) -> None:
        raise NotImplementedError

    # -- shared steps (pure or under the lock; no I/O) ------------------------------------------

    @property
    def api_url(self) -> httpx.URL:
        """The Backend API URL used for opaque verification and the JWKS."""
        return self._api_url

    def statistics(self) -> VerifierStatistics:
        """A snapshot of the cache and call counters."""
        with self._lock:
            cached, negative = self._cache.sizes
            c = self._counters
            return VerifierStatistics(
                cache_hits=c.cache_hits,
                negative_cache_hits=c.negative_cache_hits,
                api_calls=c.api_calls,
                jwks_fetches=c.jwks_fetches,
                cached=cached,
                negative_cached=negative,
            )

    def clear_cache(self) -> None:
        """Forget every cached opaque verdict (the JWKS is kept)."""
        with self._lock:
            self._cache.clear()

    def _cached(self, token: OpaqueToken) -> VerifiedToken | None:
        """Under the lock: the cached verdict, raised if it is a refusal."""
        verdict = self._cache.get(token.digest, _clock.now())
        if verdict is None:
            return None
        if isinstance(verdict, Rejection):
            self._counters.negative_cache_hits += 1
            raise verdict.error()
        self._counters.cache_hits += 1
        return verdict

    def _check_opaque_configured(self) -> None:
        if self._client is None and self._opaque_endpoints is None:
            raise ConfigurationError(
                "This verifier cannot verify opaque M2M tokens (mt_...): pass "
                f"machine_secret_key='ak_...' or set {ENV_MACHINE_SECRET_KEY} (the key of the "
                f"machine this service runs as), or the instance secret_key / {ENV_SECRET_KEY}."
            )

    def _verify_call(self, token: OpaqueToken) -> ApiCall[M2MToken]:
        assert self._opaque_endpoints is not None
        with self._lock:
            self._counters.api_calls += 1
        return self._opaque_endpoints.verify(token.value)

    def _accepted(self, token: OpaqueToken, m2m_token: M2MToken) -> VerifiedToken:
        verified = verified_from_m2m_token(m2m_token)
        with self._lock:
            self._cache.put_verified(token.digest, verified, now=_clock.now(), wall=self._wall())
        _log.debug(
            "m2m_agent.verify.opaque_verified",
            token_id=verified.token_id,
            machine_id=verified.machine_id,
        )
        return verified

    def _refused(self, token: OpaqueToken, error: Exception) -> None:
        """Cache a refusal and raise it; return (so the caller re-raises) if it is no verdict."""
        rejection = verdict_from_api(error)
        if rejection is None:
            return
        with self._lock:
            rejection = self._cache.explain(
                token.digest, rejection, wall=self._wall(), skew=self._skew
            )
            self._cache.put_rejection(token.digest, rejection, now=_clock.now())
        raise rejection.error() from error

    def _jwt_prepare(self, token: JwtToken) -> JwtCrypto:
        if self._jwt_source is None:
            raise ConfigurationError(
                "This verifier cannot verify JWT-format M2M tokens: pass jwt_key (the PEM public "
                f"key) or set {ENV_JWT_KEY}, or pass secret_key='sk_...' or set {ENV_SECRET_KEY} "
                "to fetch the JWKS, or jwks_url."
            )
        crypto = load_crypto()
        check_jwt_header(token, needs_kid=self._pem_key is None)
        return crypto

    def _jwks_decide(self, kid: str | None) -> Any:
        with self._lock:
            return self._jwks.decide(kid, _clock.now())

    def _jwks_lookup(self, kid: str | None) -> Any:
        """Under the lock (flight lookup): done unless a fetch is still needed for ``kid``."""
        return None if self._jwks.decide(kid, _clock.now()) is FETCH else _DONE

    def _jwks_begin(self) -> ApiCall[dict[str, Any]]:
        assert self._jwks_url is not None
        call = jwks_call(
            self._jwks_url, self._jwks_key, timeout=self._timeout, crypto=load_crypto()
        )
        with self._lock:
            self._jwks.begin(_clock.now())
            self._counters.jwks_fetches += 1
        return call

    def _jwks_end(self, keys: dict[str, Any] | None, error: BaseException | None = None) -> Any:
        with self._lock:
            if keys is None:
                self._jwks.failed()
            else:
                self._jwks.store(keys, _clock.now())
        if keys is not None:
            _log.debug("m2m_agent.verify.jwks_fetched", kids=sorted(keys))
        elif isinstance(error, Exception):
            _log.warning("m2m_agent.verify.jwks_fetch_failed", error=type(error).__name__)
        return _DONE

    def _stale_key(self, kid: str | None, error: Exception) -> Any:
        """After a failed JWKS fetch: the previous key for ``kid``, or the failure raised."""
        decision = self._jwks_decide(kid)
        if decision is None or decision is FETCH:
            raise error
        _log.info("m2m_agent.verify.jwks_stale_key_used", kid=kid)
        return decision

    @staticmethod
    def _unknown_kid(kid: str | None) -> InvalidTokenError:
        shown = kid if kid is not None and len(kid) <= 64 else "(none)"
        return InvalidTokenError(
            f"No signing key {shown!r} in the instance's JWKS: not signed by this Clerk instance.",
            reason="bad_signature",
        )

    def _jwt_finish(self, token: JwtToken, crypto: JwtCrypto, key: Any) -> VerifiedToken:
        if not crypto.verify(token, key):
            raise InvalidTokenError(
                "The JWT signature does not verify: forged, altered, or signed by another key.",
                reason="bad_signature",
            )
        return verified_from_jwt(token, now=self._wall(), skew=self._skew)

    def _rejected(self, token: OpaqueToken | JwtToken, error: InvalidTokenError) -> None:
        _log.debug(
            "m2m_agent.verify.rejected",
            reason=error.reason,
            token_fingerprint=token.fingerprint,
        )

    def __repr__(self) -> str:
        opaque = repr(self._opaque_key) if self._client is None else "client"
        return (
            f"<{type(self).__name__} api_url={str(self._api_url)!r} opaque={opaque} "
            f"jwt={self._jwt_source!r} required_scopes={sorted(self._requirements.scopes)!r}>"
        )


class TokenVerifier(_VerifierBase):
    """Verifies presented M2M tokens (thread-safe; share one per process).

    ``verify(token)`` returns a :class:`VerifiedToken` or raises
    :class:`~m2m_agent.errors.InvalidTokenError`. See the module documentation for the rules.

    Args:
        machine_secret_key: This service's machine secret key (``ak_...``) for opaque tokens;
            default ``CLERK_MACHINE_SECRET_KEY``. Clerk then accepts only tokens scoped to
            this machine.
        secret_key: The instance secret key (``sk_...``); default ``CLERK_SECRET_KEY``. Fetches
            the JWKS, and verifies opaque tokens when there is no machine key (then Clerk does
            not check scopes: set ``required_scopes``).
        jwt_key: The instance's JWT public key (PEM); default ``CLERK_JWT_KEY``. JWTs are then
            verified with no network at all.
        api_url: The Backend API URL; default ``CLERK_API_URL``, then ``https://api.clerk.com``.
        jwks_url: A public JWKS URL (``https://<frontend-api>/.well-known/jwks.json``) to use
            instead of the API's ``/v1/jwks``; fetched without any key.
        required_scopes: Machine ids (``mch_...``) that must all be in the token's scopes
            (typically this service's own id). A JWT's scopes are whatever its minting machine
            put in its claims: to restrict who may call, prefer ``allowed_subjects``.
        allowed_subjects: If given, only tokens minted by these machines pass.
        cache_ttl: Seconds a good opaque verdict is reused (never past the token's expiry);
            the bound on how long a revoked token may still pass. 0 disables.
        negative_cache_ttl: Seconds a refusal from Clerk is reused. 0 disables.
        cache_max_entries: Good verdicts kept at most (least recently used dropped first).
        negative_cache_max_entries: Refusals kept at most.
        clock_skew: Seconds of leeway on a JWT's ``exp``, ``nbf`` and ``iat``.
        jwks_cache_ttl: Seconds a fetched JWKS is used before it is fetched again.
        jwks_refetch_interval: An unknown ``kid`` refetches the JWKS at most this often.
        timeout: Per-request timeout in seconds (or an ``httpx.Timeout``).
        allow_insecure_http: Permit plain ``http://`` to a non-loopback host.
        client: Your own :class:`~m2m_agent.ClerkM2MClient` for opaque verification (instead of
            ``machine_secret_key``); not closed by the verifier.
        http_client: Your own ``httpx.Client`` (its transport, proxies); not closed.
        clock: Wall-clock seconds, for JWT times and token expiry (tests may move it).

    Raises:
        ConfigurationError: a key or setting is wrong, or there is nothing to verify with.
    """

    def __init__(
        self,
        *,
        machine_secret_key: str | None = None,
        secret_key: str | None = None,
        jwt_key: str | bytes | None = None,
        api_url: str | httpx.URL | None = None,
        jwks_url: str | httpx.URL | None = None,
        required_scopes: Iterable[str] | str = (),
        allowed_subjects: Iterable[str] | str | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        negative_cache_ttl: float = DEFAULT_NEGATIVE_CACHE_TTL,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        negative_cache_max_entries: int = DEFAULT_NEGATIVE_CACHE_MAX_ENTRIES,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        jwks_cache_ttl: float = DEFAULT_JWKS_CACHE_TTL,
        jwks_refetch_interval: float = DEFAULT_JWKS_REFETCH_INTERVAL,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        allow_insecure_http: bool = False,
        client: ClerkM2MClient | None = None,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            machine_secret_key=machine_secret_key,
            secret_key=secret_key,
            jwt_key=jwt_key,
            api_url=api_url,
            jwks_url=jwks_url,
            required_scopes=required_scopes,
            allowed_subjects=allowed_subjects,
            cache_ttl=cache_ttl,
            negative_cache_ttl=negative_cache_ttl,
            cache_max_entries=cache_max_entries,
            negative_cache_max_entries=negative_cache_max_entries,
            clock_skew=clock_skew,
            jwks_cache_ttl=jwks_cache_ttl,
            jwks_refetch_interval=jwks_refetch_interval,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            client=client,
            clock=clock,
        )
        self._verify_client = client
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self._timeout)
        self._new_flights()

    def _new_flights(self) -> None:
        self._opaque_flights: SyncSingleFlight[VerifiedToken] = SyncSingleFlight(self._lock)
        self._jwks_flights: SyncSingleFlight[Any] = SyncSingleFlight(self._lock)

    def _after_fork(self) -> None:
        super()._after_fork()
        if self._owns_http:  # the parent's pooled connections are not ours to use (or close)
            self._http = httpx.Client(timeout=self._timeout)

    def verify(self, token: str) -> VerifiedToken:
        """Verify a presented bearer token (without the ``Bearer`` prefix).

        Returns:
            Who sent it and what it allows.

        Raises:
            InvalidTokenError: the token does not verify; ``reason`` says why.
            TransportError: Clerk (or the JWKS) could not be reached: answer 503, not 401.
            ClerkAPIError: Clerk failed or refused our key: answer 503, not 401.
            ConfigurationError: this verifier has no key for this kind of token.
        """
        parsed = classify(token)
        try:
            if isinstance(parsed, OpaqueToken):
                verified = self._verify_opaque(parsed)
            else:
                verified = self._verify_jwt(parsed)
            self._requirements.check(verified)
        except InvalidTokenError as error:
            self._rejected(parsed, error)
            raise
        return verified

    def _verify_opaque(self, token: OpaqueToken) -> VerifiedToken:
        self._check_opaque_configured()
        return self._opaque_flights.run(
            token.digest, lambda: self._cached(token), lambda: self._ask_clerk(token)
        )

    def _ask_clerk(self, token: OpaqueToken) -> VerifiedToken:
        try:
            if self._verify_client is not None:
                with self._lock:
                    self._counters.api_calls += 1
                answer = self._verify_client.verify_token(token.value)
            else:
                answer = send(self._http, self._verify_call(token))
        except Exception as error:
            self._refused(token, error)
            raise
        return self._accepted(token, answer)

    def _verify_jwt(self, token: JwtToken) -> VerifiedToken:
        crypto = self._jwt_prepare(token)
        key = self._pem_key if self._pem_key is not None else self._jwks_signing_key(token.kid)
        return self._jwt_finish(token, crypto, key)

    def _jwks_signing_key(self, kid: str | None) -> Any:
        for _ in range(3):
            decision = self._jwks_decide(kid)
            if decision is None:
                break
            if decision is not FETCH:
                return decision
            try:
                self._jwks_flights.run("jwks", lambda: self._jwks_lookup(kid), self._fetch_jwks)
            except (TransportError, ClerkAPIError) as error:
                return self._stale_key(kid, error)
        raise self._unknown_kid(kid)

    def _fetch_jwks(self) -> Any:
        call = self._jwks_begin()
        try:
            keys = send(self._http, call)
        except BaseException as error:
            self._jwks_end(None, error)
            raise
        return self._jwks_end(keys)

    def close(self) -> None:
        """Close the HTTP client if this verifier made it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TokenVerifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncTokenVerifier(_VerifierBase):
    """Verifies presented M2M tokens on asyncio or trio; one instance serves every task.

    ``await verifier.verify(token)`` returns a :class:`VerifiedToken` or raises
    :class:`~m2m_agent.errors.InvalidTokenError`. Same arguments as :class:`TokenVerifier`,
    with an :class:`~m2m_agent.AsyncClerkM2MClient` for ``client`` and an
    ``httpx.AsyncClient`` for ``http_client``.

    Raises:
        ConfigurationError: a key or setting is wrong, or there is nothing to verify with.
    """

    def __init__(
        self,
        *,
        machine_secret_key: str | None = None,
        secret_key: str | None = None,
        jwt_key: str | bytes | None = None,
        api_url: str | httpx.URL | None = None,
        jwks_url: str | httpx.URL | None = None,
        required_scopes: Iterable[str] | str = (),
        allowed_subjects: Iterable[str] | str | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        negative_cache_ttl: float = DEFAULT_NEGATIVE_CACHE_TTL,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        negative_cache_max_entries: int = DEFAULT_NEGATIVE_CACHE_MAX_ENTRIES,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        jwks_cache_ttl: float = DEFAULT_JWKS_CACHE_TTL,
        jwks_refetch_interval: float = DEFAULT_JWKS_REFETCH_INTERVAL,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        allow_insecure_http: bool = False,
        client: AsyncClerkM2MClient | None = None,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            machine_secret_key=machine_secret_key,
            secret_key=secret_key,
            jwt_key=jwt_key,
            api_url=api_url,
            jwks_url=jwks_url,
            required_scopes=required_scopes,
            allowed_subjects=allowed_subjects,
            cache_ttl=cache_ttl,
            negative_cache_ttl=negative_cache_ttl,
            cache_max_entries=cache_max_entries,
            negative_cache_max_entries=negative_cache_max_entries,
            clock_skew=clock_skew,
            jwks_cache_ttl=jwks_cache_ttl,
            jwks_refetch_interval=jwks_refetch_interval,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            client=client,
            clock=clock,
        )
        self._verify_client = client
        self._owns_http = http_client is None
        self._http = (
            http_client if http_client is not None else httpx.AsyncClient(timeout=self._timeout)
        )
        self._new_flights()

    def _new_flights(self) -> None:
        self._opaque_flights: AsyncSingleFlight[VerifiedToken] = AsyncSingleFlight(self._lock)
        self._jwks_flights: AsyncSingleFlight[Any] = AsyncSingleFlight(self._lock)

    def _after_fork(self) -> None:
        super()._after_fork()
        if self._owns_http:
            self._http = httpx.AsyncClient(timeout=self._timeout)

    async def verify(self, token: str) -> VerifiedToken:
        """Verify a presented bearer token; see :meth:`TokenVerifier.verify`.

        JWTs and cached opaque verdicts are answered without awaiting anything that blocks.
        """
        parsed = classify(token)
        try:
            if isinstance(parsed, OpaqueToken):
                verified = await self._verify_opaque(parsed)
            else:
                verified = await self._verify_jwt(parsed)
            self._requirements.check(verified)
        except InvalidTokenError as error:
            self._rejected(parsed, error)
            raise
        return verified

    async def _verify_opaque(self, token: OpaqueToken) -> VerifiedToken:
        self._check_opaque_configured()
        return await self._opaque_flights.run(
            token.digest, lambda: self._cached(token), lambda: self._ask_clerk(token)
        )

    async def _ask_clerk(self, token: OpaqueToken) -> VerifiedToken:
        try:
            if self._verify_client is not None:
                with self._lock:
                    self._counters.api_calls += 1
                answer = await self._verify_client.verify_token(token.value)
            else:
                answer = await asend(self._http, self._verify_call(token))
        except Exception as error:
            self._refused(token, error)
            raise
        return self._accepted(token, answer)

    async def _verify_jwt(self, token: JwtToken) -> VerifiedToken:
        crypto = self._jwt_prepare(token)
        if self._pem_key is not None:
            key = self._pem_key
        else:
            key = await self._jwks_signing_key(token.kid)
        return self._jwt_finish(token, crypto, key)

    async def _jwks_signing_key(self, kid: str | None) -> Any:
        for _ in range(3):
            decision = self._jwks_decide(kid)
            if decision is None:
                break
            if decision is not FETCH:
                return decision
            try:
                await self._jwks_flights.run(
                    "jwks", lambda: self._jwks_lookup(kid), self._fetch_jwks
                )
            except (TransportError, ClerkAPIError) as error:
                return self._stale_key(kid, error)
        raise self._unknown_kid(kid)

    async def _fetch_jwks(self) -> Any:
        call = self._jwks_begin()
        try:
            keys = await asend(self._http, call)
        except BaseException as error:
            self._jwks_end(None, error)
            raise
        return self._jwks_end(keys)

    async def aclose(self) -> None:
        """Close the HTTP client if this verifier made it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTokenVerifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
