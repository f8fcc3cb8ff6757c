"""The :class:`Emulator` facade: one emulated Clerk instance and the ways to reach it."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from ._asgi import AsgiApp
from ._faults import Fault, FaultBook
from ._handler import Handler
from ._jwt import Signer
from ._ratelimit import RateLimit
from ._server import EmulatorServer
from ._state import State, snapshot
from ._transports import AsyncEmulatorTransport, EmulatorTransport

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import httpx

    from ._records import Counters, Machine, Outcome, TokenRecord

__all__ = ["DEFAULT_ISSUER", "Emulator"]

#: The ``iss`` of the emulator's JWT-format tokens unless another is given.
DEFAULT_ISSUER = "https://emulator.m2m-agent.test"


class Emulator:
    """A local, in-memory emulation of Clerk's machine-to-machine (M2M) token API.

    It serves create, verify, revoke and list on both ``/m2m_tokens`` and ``/v1/m2m_tokens``,
    opaque and JWT-format tokens, JWKS (``/v1/jwks``, ``/jwks`` with the instance key, and
    ``/.well-known/jwks.json`` without), Clerk-shaped errors, fault injection and counters.
    Reach it in-process with :meth:`transport` / :meth:`async_transport`, as ASGI with
    :attr:`asgi_app`, or over loopback TCP with :meth:`serve`. It is thread-safe.

    Example:
        ```python
        emu = Emulator()
        machine = emu.create_machine("worker")
        with httpx.Client(transport=emu.transport(), base_url="https://api.clerk.test") as client:
            created = client.post(
                "/m2m_tokens",
                json={"seconds_until_expiration": 60},
                headers={"Authorization": f"Bearer {machine.secret_key}"},
            )
        ```

    Args:
        clock: Wall-clock seconds used for timestamps, expiry, rate limiting and fault
            durations; pass a fake to move time in tests.
        issuer: The ``iss`` of JWT-format tokens.
        rate_limit: ``(requests, per_seconds)``: beyond that, answer 429 with ``Retry-After``
            (JWKS is never limited).
        seed: Seeds the draws of faults with a ``probability`` below 1.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        issuer: str = DEFAULT_ISSUER,
        rate_limit: tuple[int, float] | None = None,
        seed: int | None = None,
    ) -> None:
        self._state = State(clock)
        self._signer = Signer(self._state.instance_id, issuer)
        self._faults = FaultBook(seed)
        limit = None if rate_limit is None else RateLimit(*rate_limit)
        self._handler = Handler(self._state, self._signer, self._faults, limit)

    @property
    def instance_id(self) -> str:
        """The emulated instance's id (``ins_...``), also the ``kid`` of its JWT signing key."""
        return self._state.instance_id

    @property
    def instance_secret_key(self) -> str:
        """The instance secret key (``sk_test_...``): for any token and JWKS."""
        return self._state.instance_key

    def create_machine(
        self,
        name: str = "worker",
        *,
        secret_key: str | None = None,
        scoped_machines: Iterable[str] = (),
        default_token_ttl: int = 3600,
        machine_id: str | None = None,
    ) -> Machine:
        """Register a machine that can mint tokens with its secret key.

        Args:
            name: A human-readable name.
            secret_key: Its ``ak_...`` secret key; by default ``ak_test_`` and 32 random hex digits.
            scoped_machines: Ids of the machines its tokens may be presented to.
            default_token_ttl: The lifetime in seconds of tokens minted without one.
            machine_id: Its id (``mch_`` and 27 word characters); random if not given.

        Returns:
            The machine.

        Raises:
            ValueError: A malformed or duplicate id or key, or a TTL below 1.
        """
        with self._state.lock:
            return self._state.add_machine(
                name,
                secret_key=secret_key,
                scoped_machines=scoped_machines,
                default_token_ttl=default_token_ttl,
                machine_id=machine_id,
            )

    def add_scope(self, machine_id: str, target_machine_id: str) -> Machine:
        """Let tokens that ``machine_id`` mints from now on be presented to ``target_machine_id``.

        Existing tokens keep their scopes, as in Clerk.

        Args:
            machine_id: The minting machine.
            target_machine_id: The machine that will accept its tokens.

        Returns:
            The updated minting machine.

        Raises:
            KeyError: Either machine is unknown.
        """
        with self._state.lock:
            return self._state.add_scope(machine_id, target_machine_id)

    def handle(self, request: httpx.Request) -> Outcome:
        """Decide the answer to one request, without waiting or doing I/O.

        Args:
            request: The request; its body is read if it was not.

        Returns:
            The response with the delay to wait first, or a dropped connection.
        """
        return self._handler.handle(request)

    def transport(self) -> httpx.BaseTransport:
        """An httpx transport serving this emulator in-process, for :class:`httpx.Client`."""
        return EmulatorTransport(self.handle)

    def async_transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport serving this emulator in-process, for :class:`httpx.AsyncClient`.

        It waits with ``anyio.sleep``, so it works on asyncio and trio.
        """
        return AsyncEmulatorTransport(self.handle)

    @functools.cached_property
    def asgi_app(self) -> AsgiApp:
        """An ASGI 3 application serving this emulator (for uvicorn or any ASGI server)."""
        return AsgiApp(self.handle)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> EmulatorServer:
        """Serve over HTTP with uvicorn in a daemon thread; returns once connections are accepted.

        Use the result as a context manager, or call its ``stop()``.

        Args:
            host: A loopback address.
            port: The TCP port; 0 picks a free one.

        Returns:
            The running server; its ``url`` is the base URL.

        Raises:
            ValueError: ``host`` is not a loopback address.
        """
        return EmulatorServer(self.asgi_app, host=host, port=port).start()

    def inject(self, fault: Fault) -> Fault:
        """Start applying a fault to matching requests.

        Args:
            fault: What to break, and when.

        Returns:
            The same fault.
        """
        with self._state.lock:
            self._faults.add(fault, self._state.clock())
        return fault

    def clear_faults(self) -> None:
        """Stop applying every injected fault."""
        with self._state.lock:
            self._faults.clear()

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The faults still in force (not used up, not past their duration)."""
        with self._state.lock:
            return self._faults.active(self._state.clock())

    @property
    def counters(self) -> Counters:
        """A snapshot of the request and token counters."""
        with self._state.lock:
            return self._state.counters()

    def reset_counters(self) -> None:
        """Set every counter back to zero."""
        with self._state.lock:
            self._state.reset_counters()

    @property
    def tokens(self) -> tuple[TokenRecord, ...]:
        """Snapshots of the stored (opaque) tokens, oldest first."""
        with self._state.lock:
            return self._state.tokens()

    def revoke(self, token_id: str, reason: str | None = None) -> TokenRecord:
        """Revoke a stored token behind its holder's back (counts as no request).

        Args:
            token_id: The token id (``mt_...``).
            reason: The revocation reason.

        Returns:
            The revoked token.

        Raises:
            KeyError: No stored token has this id.
        """
        with self._state.lock:
            return snapshot(self._state.revoke(token_id, reason))

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set served at ``/v1/jwks``."""
        with self._state.lock:
            return self._signer.jwks()

    def public_key_pem(self) -> str:
        """The JWT signing key's public half in PEM, like Clerk's ``CLERK_JWT_KEY``."""
        with self._state.lock:
            return self._signer.public_key_pem()

    def __repr__(self) -> str:
        return f"<Emulator {self.instance_id}>"
