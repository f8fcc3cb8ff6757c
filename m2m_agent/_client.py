"""``ClerkM2MClient`` and ``AsyncClerkM2MClient``: the Backend API's M2M endpoints, both faces.

Both faces build their calls with :class:`m2m_agent._api.Endpoints` and read the answers with its
parsers; the only code here is sending. Method names and arguments are identical on both faces
(a test asserts it), so they cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from m2m_agent._api import ApiCall, Endpoints
from m2m_agent._config import check_timeout, resolve_api_url, resolve_machine_secret_key
from m2m_agent._send import asend, send
from m2m_agent._token import M2MToken, M2MTokenList, TokenFormat

__all__ = ["DEFAULT_TIMEOUT", "AsyncClerkM2MClient", "ClerkM2MClient"]

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
"""Per-request timeout: a mint that takes longer than this is better retried than waited for."""


class _ClientBase:
    """Configuration shared by both faces: the checked key, URL and call builders."""

    def __init__(
        self,
        machine_secret_key: str | None = None,
        *,
        api_url: str | httpx.URL | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        allow_insecure_http: bool = False,
    ) -> None:
        self._key = resolve_machine_secret_key(machine_secret_key)
        check_timeout(timeout)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._endpoints = Endpoints(
            resolve_api_url(api_url, allow_insecure_http=allow_insecure_http),
            self._key,
            timeout=self._timeout,
        )

    @property
    def api_url(self) -> httpx.URL:
        """The Backend API URL in use (paths such as ``/m2m_tokens`` are appended to it)."""
        return self._endpoints.api_url

    @property
    def key_fingerprint(self) -> str:
        """A short fingerprint of the machine secret key, safe to log."""
        return self._key.fingerprint

    def __repr__(self) -> str:
        return f"<{type(self).__name__} api_url={str(self.api_url)!r} key={self._key!r}>"


class ClerkM2MClient(_ClientBase):
    """The synchronous M2M client: create, revoke, verify and list tokens.

    Args:
        machine_secret_key: The machine's secret key (``ak_...``); defaults to
            ``CLERK_MACHINE_SECRET_KEY``.
        api_url: The Backend API URL; defaults to ``CLERK_API_URL``, then
            ``https://api.clerk.com``. Give ``https://api.clerk.com/v1`` for the versioned paths.
        timeout: Per-request timeout in seconds (or an ``httpx.Timeout``).
        http_client: Your own ``httpx.Client`` (its transport, proxies, limits); not closed by us.
        allow_insecure_http: Permit plain ``http://`` to a non-loopback host.

    Raises:
        ConfigurationError: the key or the URL is missing or wrong.
    """

    def __init__(
        self,
        machine_secret_key: str | None = None,
        *,
        api_url: str | httpx.URL | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        http_client: httpx.Client | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        super().__init__(
            machine_secret_key,
            api_url=api_url,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self._timeout)
        self._pid = os.getpid()

    def _http_client(self) -> httpx.Client:
        if self._owns_http and self._pid != os.getpid():
            # A forked child: the pool's connections are the parent's sockets, never share
            # them. (A client you passed in is yours to handle.)
            self._http, self._pid = httpx.Client(timeout=self._timeout), os.getpid()
        return self._http

    def _call(self, call: ApiCall[T]) -> T:
        return send(self._http_client(), call)

    def create_token(
        self,
        *,
        seconds_until_expiration: float | None = 3600,
        claims: Mapping[str, Any] | None = None,
        token_format: TokenFormat = "opaque",
        min_remaining_ttl_seconds: int | None = None,
    ) -> M2MToken:
        """Mint a token (``POST /m2m_tokens``); the result carries the secret in ``token``.

        Args:
            seconds_until_expiration: Lifetime in seconds; None for the machine's default TTL.
            claims: Custom claims (JSON values) to embed.
            token_format: ``"opaque"`` (revocable, verified by Clerk) or ``"jwt"``.
            min_remaining_ttl_seconds: Opaque only: let Clerk return an existing token of this
                machine with the same claims if it has at least this many seconds left.

        Raises:
            ClerkAPIError: Clerk refused (a subclass per status).
            TransportError: Clerk could not be reached.
        """
        return self._call(
            self._endpoints.create(
                seconds_until_expiration=seconds_until_expiration,
                claims=claims,
                token_format=token_format,
                min_remaining_ttl_seconds=min_remaining_ttl_seconds,
            )
        )

    def revoke_token(self, token_id: str, *, reason: str | None = None) -> M2MToken:
        """Revoke an opaque token by id (``mt_...``); returns it with ``revoked=True``.

        Raises:
            NotFoundError: no such token, or not one this machine minted (or a JWT's id).
        """
        return self._call(self._endpoints.revoke(token_id, reason=reason))

    def verify_token(self, token: str) -> M2MToken:
        """Ask Clerk whether a presented token is valid for this machine.

        Raises:
            NotFoundError: unknown, revoked, expired, or not scoped to this machine.
            InvalidTokenError: Clerk said 200 but the token is marked revoked or expired.
        """
        return self._call(self._endpoints.verify(token))

    def list_tokens(
        self,
        *,
        subject: str,
        revoked: bool = False,
        expired: bool = False,
        limit: int = 10,
        offset: int = 0,
    ) -> M2MTokenList:
        """List a machine's stored (opaque) tokens, newest first.

        Args:
            subject: The machine id (``mch_...``); a machine key may only list its own.
            revoked: Include revoked tokens.
            expired: Include expired tokens.
            limit: Page size, 1 to 100.
            offset: Tokens to skip.
        """
        return self._call(
            self._endpoints.list(
                subject=subject, revoked=revoked, expired=expired, limit=limit, offset=offset
            )
        )

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ClerkM2MClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClerkM2MClient(_ClientBase):
    """The asynchronous M2M client (asyncio or trio, through httpx and anyio).

    Takes the same arguments as :class:`ClerkM2MClient`, with an ``httpx.AsyncClient`` for
    ``http_client``; every method is awaited.
    """

    def __init__(
        self,
        machine_secret_key: str | None = None,
        *,
        api_url: str | httpx.URL | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        super().__init__(
            machine_secret_key,
            api_url=api_url,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
        )
        self._owns_http = http_client is None
        self._http = (
            http_client if http_client is not None else httpx.AsyncClient(timeout=self._timeout)
        )
        self._pid = os.getpid()

    def _http_client(self) -> httpx.AsyncClient:
        if self._owns_http and self._pid != os.getpid():
            self._http, self._pid = httpx.AsyncClient(timeout=self._timeout), os.getpid()
        return self._http

    async def _call(self, call: ApiCall[T]) -> T:
        return await asend(self._http_client(), call)

    async def create_token(
        self,
        *,
        seconds_until_expiration: float | None = 3600,
        claims: Mapping[str, Any] | None = None,
        token_format: TokenFormat = "opaque",
        min_remaining_ttl_seconds: int | None = None,
    ) -> M2MToken:
        """Mint a token; see :meth:`ClerkM2MClient.create_token`."""
        return await self._call(
            self._endpoints.create(
                seconds_until_expiration=seconds_until_expiration,
                claims=claims,
                token_format=token_format,
                min_remaining_ttl_seconds=min_remaining_ttl_seconds,
            )
        )

    async def revoke_token(self, token_id: str, *, reason: str | None = None) -> M2MToken:
        """Revoke an opaque token by id; see :meth:`ClerkM2MClient.revoke_token`."""
        return await self._call(self._endpoints.revoke(token_id, reason=reason))

    async def verify_token(self, token: str) -> M2MToken:
        """Verify a presented token; see :meth:`ClerkM2MClient.verify_token`."""
        return await self._call(self._endpoints.verify(token))

    async def list_tokens(
        self,
        *,
        subject: str,
        revoked: bool = False,
        expired: bool = False,
        limit: int = 10,
        offset: int = 0,
    ) -> M2MTokenList:
        """List a machine's stored tokens; see :meth:`ClerkM2MClient.list_tokens`."""
        return await self._call(
            self._endpoints.list(
                subject=subject, revoked=revoked, expired=expired, limit=limit, offset=offset
            )
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClerkM2MClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
