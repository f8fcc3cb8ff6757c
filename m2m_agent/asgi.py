"""Protect an ASGI service (Starlette, FastAPI, or any ASGI 3 app) with M2M token verification.

Two ways, which combine:

- :class:`M2MAuthMiddleware`: plain ASGI (no Starlette needed). Every request outside
  ``exclude_paths`` must carry ``Authorization: Bearer <M2M token>``; the
  :class:`~m2m_agent.verify.VerifiedToken` lands in ``scope["state"]["m2m"]``, which Starlette and
  FastAPI show as ``request.state.m2m``::

      app = Starlette(routes=...)
      app.add_middleware(
          M2MAuthMiddleware, verifier=AsyncTokenVerifier(), exclude_paths=["/health"]
      )

- :func:`require_m2m`: a FastAPI dependency that verifies (or reuses what the middleware
  verified) and checks a route's own scopes::

      @app.get("/reports")
      async def reports(caller: VerifiedToken = Depends(require_m2m(verifier))) -> ...:

Answers follow RFC 6750: 401 with ``WWW-Authenticate: Bearer error="invalid_token"`` for a bad
token (plain ``Bearer`` when there was none), 403 with ``error="insufficient_scope"`` for a good
token without a required scope, and 503 (with ``Retry-After`` when Clerk gave one) when the token
could not be checked because Clerk or the JWKS was unreachable: the caller should retry, not
throw its token away.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio.to_thread

from m2m_agent.errors import ClerkAPIError, ConfigurationError, InvalidTokenError, TransportError
from m2m_agent.verify import AsyncTokenVerifier, TokenVerifier, VerifiedToken

__all__ = ["M2MAuthMiddleware", "STATE_KEY", "bearer_token", "require_m2m"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY = "m2m"
"""The key of the verified token in ``scope["state"]`` (``request.state.m2m``)."""

_DESCRIPTIONS = {
    "not_m2m_token": "The bearer token is not an M2M token.",
    "malformed": "The bearer token is malformed.",
    "unknown": "The M2M token is not valid (unknown, revoked or expired).",
    "revoked": "The M2M token has been revoked.",
    "expired": "The M2M token has expired or is not valid yet.",
    "bad_signature": "The M2M token's signature does not verify.",
    "missing_scope": "The M2M token is not allowed to call this service.",
}
"""Fixed texts for callers: never the exception's message, never anything from the token."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None.

    The scheme is case-insensitive; anything but exactly one non-empty token after it is None.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


@dataclasses.dataclass(frozen=True)
class _Denial:
    """A refusal, rendered identically by the middleware and the dependency."""

    status: int
    error: str
    description: str
    headers: dict[str, str]


def _challenge(realm: str | None, error: str | None = None, description: str | None = None) -> str:
    params = []
    if realm:
        params.append(f'realm="{realm}"')
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append(f'error_description="{description}"')
    return "Bearer" + (" " + ", ".join(params) if params else "")


def _deny(error: BaseException | None, realm: str | None) -> _Denial:
    """How to answer a request whose token is missing (``None``), refused, or uncheckable."""
    if error is None:
        description = "An M2M bearer token is required."
        return _Denial(401, "invalid_request", description, {"WWW-Authenticate": _challenge(realm)})
    if isinstance(error, InvalidTokenError):
        description = _DESCRIPTIONS.get(error.reason, "The M2M token is not valid.")
        if error.reason == "missing_scope":
            challenge = _challenge(realm, "insufficient_scope", description)
            return _Denial(403, "insufficient_scope", description, {"WWW-Authenticate": challenge})
        challenge = _challenge(realm, "invalid_token", description)
        return _Denial(401, "invalid_token", description, {"WWW-Authenticate": challenge})
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, (int, float)) and retry_after > 0:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return _Denial(
        503,
        "temporarily_unavailable",
        "The M2M token could not be checked right now; retry shortly.",
        headers,
    )


_UNAVAILABLE = (TransportError, ClerkAPIError)
"""Errors that say nothing about the token: the verifier could not reach Clerk or the JWKS."""


async def _verify(verifier: AsyncTokenVerifier | TokenVerifier, token: str) -> VerifiedToken:
    if isinstance(verifier, AsyncTokenVerifier):
        return await verifier.verify(token)
    return await anyio.to_thread.run_sync(verifier.verify, token)


def _check_realm(realm: str | None) -> None:
    if realm is not None and (
        not isinstance(realm, str) or not realm.isprintable() or '"' in realm or "\\" in realm
    ):
        raise ConfigurationError("realm must be printable text without quotes or backslashes.")


def _check_verifier(verifier: object) -> None:
    if not isinstance(verifier, (AsyncTokenVerifier, TokenVerifier)):
        raise ConfigurationError(
            "verifier must be an AsyncTokenVerifier (or a TokenVerifier), "
            f"not {type(verifier).__name__}."
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            try:
                return bytes(value).decode("latin-1")
            except (TypeError, ValueError):
                return None
    return None


class M2MAuthMiddleware:
    """ASGI middleware: only requests with a valid M2M bearer token reach the app.

    HTTP and WebSocket requests are checked (a WebSocket is closed before it is accepted:
    code 1008, or 1013 when Clerk is unreachable); lifespan events pass through. A
    :class:`~m2m_agent.errors.ConfigurationError` from the verifier (no key for this kind of
    token) is not answered here: it propagates, a server error to fix in the configuration.

    Args:
        app: The ASGI app to protect.
        verifier: The verifier (one per process; an :class:`~m2m_agent.verify.AsyncTokenVerifier`,
            or a :class:`~m2m_agent.verify.TokenVerifier`, which then runs in a worker thread).
        exclude_paths: Paths served without a token: exact (``"/health"``), or a prefix when
            ending in ``*`` (``"/public/*"``).
        realm: The ``realm`` of the ``WWW-Authenticate`` challenge, if any.
        state_key: Where the verified token goes in ``scope["state"]``.

    Raises:
        ConfigurationError: ``verifier`` is not a verifier.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: AsyncTokenVerifier | TokenVerifier,
        exclude_paths: Iterable[str] = (),
        realm: str | None = None,
        state_key: str = STATE_KEY,
    ) -> None:
        _check_verifier(verifier)
        if isinstance(exclude_paths, str):
            exclude_paths = [exclude_paths]
        paths = list(exclude_paths)
        _check_realm(realm)
        self.app = app
        self.verifier = verifier
        self._exact = frozenset(path for path in paths if not path.endswith("*"))
        self._prefixes = tuple(path[:-1] for path in paths if path.endswith("*"))
        self._realm = realm
        self._state_key = state_key

    def _excluded(self, path: str) -> bool:
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request's bearer token, then call the app or answer the refusal."""
        kind = scope.get("type")
        if kind not in ("http", "websocket") or self._excluded(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        failure: BaseException | None = None
        if token is not None:
            try:
                verified = await _verify(self.verifier, token)
            except (InvalidTokenError, *_UNAVAILABLE) as error:
                failure = error
            else:
                state = dict(scope.get("state") or {})
                state[self._state_key] = verified
                await self.app({**scope, "state": state}, receive, send)
                return
        denial = _deny(failure, self._realm)
        if kind == "websocket":
            await self._close_websocket(receive, send, denial)
        else:
            await self._respond(send, denial)

    @staticmethod
    async def _respond(send: Send, denial: _Denial) -> None:
        body = json.dumps({"error": denial.error, "error_description": denial.description})
        payload = body.encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in denial.headers.items()]
        await send({"type": "http.response.start", "status": denial.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _close_websocket(receive: Receive, send: Send, denial: _Denial) -> None:
        message = await receive()
        if message.get("type") != "websocket.connect":
            return
        code = 1013 if denial.status == 503 else 1008
        await send({"type": "websocket.close", "code": code, "reason": denial.description})


def require_m2m(
    verifier: AsyncTokenVerifier | TokenVerifier,
    *,
    scopes: Iterable[str] | str = (),
    realm: str | None = None,
    state_key: str = STATE_KEY,
) -> Callable[..., Any]:
    """A FastAPI dependency that returns the caller's :class:`~m2m_agent.verify.VerifiedToken`.

    Use it as ``Depends(require_m2m(verifier, scopes=[...]))``. Behind
    :class:`M2MAuthMiddleware` it reuses the token the middleware verified (and re-checks the
    verifier's own requirements); alone, it verifies the ``Authorization`` header itself. Either
    way it raises Starlette's ``HTTPException``: 401 (invalid or missing token), 403 (a scope in
    ``scopes`` is missing), 503 (Clerk unreachable).

    Args:
        verifier: The verifier; with a :class:`~m2m_agent.verify.TokenVerifier` the dependency
            is synchronous (FastAPI runs it in its thread pool).
        scopes: Machine ids that must be in the token's scopes for this route, on top of the
            verifier's ``required_scopes``.
        realm: The ``realm`` of the ``WWW-Authenticate`` challenge, if any.
        state_key: Where the middleware put the token (and where this puts it).

    Raises:
        ConfigurationError: Starlette is not installed, or ``verifier`` is not a verifier.
    """
    _check_verifier(verifier)
    _check_realm(realm)
    try:
        # Starlette is optional (no extra pulls it in): without it these are untyped.
        from starlette.exceptions import HTTPException  # type: ignore[import-not-found,unused-ignore]
        from starlette.requests import HTTPConnection  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "require_m2m needs Starlette (FastAPI brings it): pip install fastapi"
        ) from exc
    extra = frozenset([scopes] if isinstance(scopes, str) else scopes)

    def refuse(error: BaseException | None) -> HTTPException:
        denial = _deny(error, realm)
        return HTTPException(denial.status, detail=denial.description, headers=denial.headers)

    def reuse(connection: HTTPConnection) -> VerifiedToken | None:
        verified = getattr(connection.state, state_key, None)
        if not isinstance(verified, VerifiedToken):
            return None
        try:
            verifier._requirements.check(verified, extra)
        except InvalidTokenError as error:
            raise refuse(error) from None
        return verified

    def token_of(connection: HTTPConnection) -> str:
        token = bearer_token(connection.headers.get("authorization"))
        if token is None:
            raise refuse(None)
        return token

    def accept(connection: HTTPConnection, verified: VerifiedToken) -> VerifiedToken:
        try:
            verifier._requirements.check(verified, extra)
        except InvalidTokenError as error:
            raise refuse(error) from None
        setattr(connection.state, state_key, verified)
        return verified

    dependency: Callable[..., Any]
    if isinstance(verifier, AsyncTokenVerifier):
        async_verifier = verifier

        async def require_m2m_token(connection: HTTPConnection) -> VerifiedToken:
            verified = reuse(connection)
            if verified is not None:
                return verified
            try:
                verified = await async_verifier.verify(token_of(connection))
            except (InvalidTokenError, *_UNAVAILABLE) as error:
                raise refuse(error) from None
            return accept(connection, verified)

        dependency = require_m2m_token
    else:
        sync_verifier = verifier

        def require_m2m_token_sync(connection: HTTPConnection) -> VerifiedToken:
            verified = reuse(connection)
            if verified is not None:
                return verified
            try:
                verified = sync_verifier.verify(token_of(connection))
            except (InvalidTokenError, *_UNAVAILABLE) as error:
                raise refuse(error) from None
            return accept(connection, verified)

        dependency = require_m2m_token_sync

    # FastAPI reads the signature to inject the connection; with postponed annotations the
    # lazily imported class is not in this module's globals, so give it the class itself.
    parameter = inspect.Parameter(
        "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
    )
    _set_signature(dependency, inspect.Signature([parameter], return_annotation=VerifiedToken))
    return dependency


def _set_signature(function: Any, signature: inspect.Signature) -> None:
    function.__signature__ = signature
