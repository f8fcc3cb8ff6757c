"""The request handler: routing, authentication, faults, rate limiting and counting.

:meth:`Handler.handle` is a pure decision: it reads an :class:`httpx.Request` and returns an
:class:`Outcome` (response, delay, drop) without sleeping or doing I/O, under the state lock.
The endpoints themselves live in :mod:`._endpoints`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from ._endpoints import Endpoints
from ._faults import fault_response
from ._params import ApiError
from ._records import Outcome
from ._wire import error_response, json_response

if TYPE_CHECKING:
    from ._faults import FaultBook
    from ._jwt import Signer
    from ._ratelimit import RateLimit
    from ._records import Machine
    from ._state import State

__all__ = ["Handler"]

_PREFIXES = ("/v1/m2m_tokens", "/m2m_tokens")
_JWKS_PATHS = ("/v1/jwks", "/jwks", "/.well-known/jwks.json")
_PUBLIC_JWKS_PATH = "/.well-known/jwks.json"
_COUNTERS = {"verify": "verifications", "revoke": "revocations", "list": "lists", "jwks": "jwks"}
_MACHINE_KEY_MESSAGE = (
    "The provided Machine Secret Key is invalid. Make sure that your Machine Secret Key is correct."
)
_CLERK_KEY_MESSAGE = (
    "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct."
)
_MACHINE_KEY_INVALID = (
    401,
    "machine_secret_key_invalid",
    _MACHINE_KEY_MESSAGE,
    _MACHINE_KEY_MESSAGE,
)
_CLERK_KEY_INVALID = (401, "clerk_key_invalid", _CLERK_KEY_MESSAGE, _CLERK_KEY_MESSAGE)


def _route(method: str, path: str) -> tuple[str, str | None]:
    """``(endpoint, token id)`` of a request; 404 for an unknown path, 405 for a wrong method."""
    if path != "/" and path.endswith("/"):
        path = path[:-1]
    methods: dict[str, str] = {}
    token_id = None
    if path in _JWKS_PATHS:
        methods = {"GET": "jwks"}
    elif path in _PREFIXES:
        methods = {"GET": "list", "POST": "create"}
    else:
        for prefix in _PREFIXES:
            if path.startswith(prefix + "/"):
                rest = path[len(prefix) + 1 :]
                if rest == "verify":
                    methods = {"POST": "verify"}
                elif rest.endswith("/revoke") and rest.count("/") == 1:
                    methods, token_id = {"POST": "revoke"}, rest.removesuffix("/revoke")
                break
    if not methods:
        raise ApiError(
            404, "resource_not_found", "Resource not found", "The requested resource was not found."
        )
    endpoint = methods.get(method)
    if endpoint is None:
        allow = ", ".join(methods)
        raise ApiError(
            405,
            "method_not_allowed",
            "Method not allowed",
            f"{method} is not allowed here; use {allow}.",
            headers={"allow": allow},
        )
    return endpoint, token_id


class Handler:
    """Answers requests for one emulated instance.

    Args:
        state: Machines, tokens and counters (its lock guards everything here).
        signer: Signs and checks JWT-format tokens.
        faults: The injected faults.
        rate_limit: The instance rate limit, if any (JWKS is never limited).
    """

    def __init__(
        self, state: State, signer: Signer, faults: FaultBook, rate_limit: RateLimit | None
    ) -> None:
        self._state = state
        self._signer = signer
        self._endpoints = Endpoints(state, signer)
        self._faults = faults
        self._rate_limit = rate_limit

    def handle(self, request: httpx.Request) -> Outcome:
        """Decide the answer to ``request``; see :meth:`Emulator.handle`."""
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = request.read()
        state = self._state
        with state.lock:
            now = state.clock()
            try:
                endpoint, token_id = _route(request.method, request.url.path)
            except ApiError as error:
                state.count_request("unknown")
                return Outcome(self._error(error))
            state.count_request(endpoint)
            fired = self._faults.fire(endpoint, now)
            if fired:
                state.count("faults")
            delay = sum(fault.latency for fault in fired)
            effect = next((fault for fault in fired if fault.changes_answer), None)
            if effect is not None and effect.drop:
                return Outcome(None, delay, drop=True)

            def real() -> httpx.Response:
                return self._serve(endpoint, token_id, request, body, now)

            response = real() if effect is None else fault_response(effect, real)
            if response.status_code >= 400:
                state.count("errors")
            return Outcome(response, delay)

    def _error(self, error: ApiError) -> httpx.Response:
        self._state.count("errors")
        return self._envelope(error)

    @staticmethod
    def _envelope(error: ApiError) -> httpx.Response:
        return error_response(
            error.status,
            error.code,
            error.message,
            error.long_message,
            meta=error.meta,
            headers=error.headers,
        )

    def _serve(
        self, endpoint: str, token_id: str | None, request: httpx.Request, body: bytes, now: float
    ) -> httpx.Response:
        if self._rate_limit is not None and endpoint != "jwks":
            retry_after = self._rate_limit.admit(now)
            if retry_after is not None:
                return error_response(429, headers={"retry-after": str(retry_after)})
        if endpoint in _COUNTERS:
            self._state.count(_COUNTERS[endpoint])
        endpoints = self._endpoints
        try:
            if endpoint == "jwks":
                if request.url.path.rstrip("/") != _PUBLIC_JWKS_PATH:
                    self._authenticate(request, endpoint)
                return json_response(200, self._signer.jwks())
            caller = self._authenticate(request, endpoint)
            if endpoint == "create":
                assert caller is not None
                return endpoints.create_token(caller, body, now)
            if endpoint == "verify":
                return endpoints.verify_token(caller, body, now)
            if endpoint == "revoke":
                assert token_id is not None
                return endpoints.revoke_token(caller, token_id, body, now)
            return endpoints.list_tokens(caller, request, now)
        except ApiError as error:
            return self._envelope(error)

    def _authenticate(self, request: httpx.Request, endpoint: str) -> Machine | None:
        """The calling machine, or ``None`` for the instance key; raise 401 otherwise."""
        header = request.headers.get("authorization")
        if header is None:
            raise ApiError(
                401,
                "authentication_invalid",
                "Unauthenticated",
                "The Authorization header is missing. Send 'Authorization: Bearer <secret key>'.",
            )
        scheme, _, key = header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or " " in key:
            raise ApiError(
                401,
                "authorization_header_format_invalid",
                "Invalid Authorization header format",
                "The Authorization header must be 'Bearer <secret key>'.",
            )
        machine = self._state.machine_by_key(key)
        is_instance = key == self._state.instance_key
        if endpoint == "create":
            if machine is None:
                raise ApiError(*_MACHINE_KEY_INVALID)
            return machine
        if endpoint == "jwks":
            if not is_instance:
                raise ApiError(*_CLERK_KEY_INVALID)
            return None
        if machine is not None:
            return machine
        if is_instance:
            return None
        raise ApiError(*(_CLERK_KEY_INVALID if key.startswith("sk_") else _MACHINE_KEY_INVALID))
