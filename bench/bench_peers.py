"""m2m-agent next to httpx-auth and authlib, measured in one run, with the same harness for all.

Run by hand (the peers are dev-only dependencies)::

    pip install httpx-auth authlib matplotlib
    python bench/bench_peers.py [--quick] [--json] [--chart PATH] [--no-chart]

The contenders:

- ``m2m-agent``: ``M2MAuth`` over a ``TokenManager`` / ``AsyncTokenManager`` (entered, so its
  background refresher runs), minting from the in-process Clerk emulator;
- ``httpx-auth``: ``OAuth2ClientCredentials`` (an ``httpx.Auth``), whose token requests go
  through the ``client=`` it accepts;
- ``authlib``: ``authlib.integrations.httpx_client.OAuth2Client`` / ``AsyncOAuth2Client`` with
  ``grant_type="client_credentials"`` (the client *is* the HTTP client: it is built on httpx2
  when httpx2 is installed, else on httpx);
- ``const``: a fixed ``Authorization`` header (the cheapest possible bearer auth, the baseline);
- ``none``: no auth.

The harness serves, in-process through ``MockTransport`` handlers that route by path, an OAuth2
client-credentials token endpoint (``POST /oauth/token`` answering ``access_token``,
``token_type`` and ``expires_in``) and a protected resource. Every peer could be pointed at it
(httpx-auth through ``client=``, authlib through ``transport=``), so no loopback server is
needed. m2m-agent mints from the Clerk emulator (its token endpoint is Clerk's M2M create),
wrapped so each minted token is booked the same way. The resource accepts any non-empty bearer
unless the harness booked it and its lifetime is over (then 401). Faults are the same on both
token endpoints: latency, an outage answering 503 (``Fault(status=503, duration=...)`` on the
emulator), and a count of calls.

The scenarios:

1. overhead: µs per request through a warm auth, sync and async, on httpx and on httpx2 (the
   client authlib uses), variants interleaved over rounds, medians, ratio to ``const`` on the
   same client;
2. herd: token-endpoint calls for N concurrent requests (threads, or asyncio tasks) on an empty
   token (authlib cannot start empty: an expired one), the token endpoint answering in 50 ms;
3. refresh under load: workers send paced requests while the token nears expiry and the token
   endpoint takes ``--refresh-latency`` seconds: the slowest request, token-endpoint calls;
4. outage: the token endpoint answers 503 for a window shorter than the token's remaining life,
   starting before anyone's refresh point: failed requests, the slowest request, calls.

Scenarios 3 and 4 use short tokens (``--lifetime``, 4 s) with each library's safety window
scaled to it: the defaults (httpx-auth ``early_expiry=30``, authlib ``leeway=60``) are meant for
hour-long tokens and would refetch on every request; both are set to 10% of the lifetime, the
safety margin m2m-agent's default ``RefreshPolicy`` keeps, so all three stop using a token at
the same point and differ only in when and how they fetch the next one. m2m-agent runs with its
defaults. Scenario 1 uses hour-long tokens and everyone's defaults.

Prints a table per scenario with notes, writes a chart (``--chart``, default
``docs/img/benchmarks.png``), or one JSON document with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import os
import platform
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import structlog

import m2m_agent
from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    ClerkM2MClient,
    M2MAuth,
    RefreshPolicy,
    TokenManager,
)
from m2m_agent.emulator import Emulator, Fault

try:
    import authlib
    import httpx_auth
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuth2Client
    from httpx_auth import OAuth2, OAuth2ClientCredentials
except ImportError as exc:  # pragma: no cover - a dev-only dependency is missing
    sys.exit(f"bench_peers.py needs the peers: pip install httpx-auth authlib matplotlib ({exc})")

API_URL = "https://api.clerk.test"
TOKEN_URL = "https://idp.test/oauth/token"
RESOURCE = "https://service.test/resource"
PUBLIC = "https://service.test/public"
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"  # made up: the in-process harness accepts any
CREATE = frozenset({"create"})
LIBRARIES = ("m2m-agent", "httpx-auth", "authlib")
MODES = ("sync", "async")
STALL = 0.1
"""A request slower than this (seconds) counts as stalled."""
LEEWAY_FRACTION = RefreshPolicy().margin
"""The peers' safety window in scenarios 3 and 4, as a fraction of the lifetime."""


def _authlib_http() -> ModuleType:
    """The httpx flavour authlib's clients are built on (httpx2 when installed, else httpx)."""
    for base in OAuth2Client.__mro__:
        root = base.__module__.split(".")[0]
        if base.__name__ == "Client" and root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    return httpx


AUTHLIB_HTTP = _authlib_http()
if AUTHLIB_HTTP is not httpx:
    from m2m_agent.httpx2 import M2MAuth as M2MAuth2
else:  # pragma: no cover - authlib falls back to httpx when httpx2 is absent
    M2MAuth2 = M2MAuth


def constant_bearer(http: ModuleType, token: str) -> Any:
    """The baseline: an ``Auth`` of ``http`` setting a fixed bearer header in ``auth_flow``."""

    class ConstantBearer(http.Auth):  # type: ignore[name-defined,misc]
        def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    return ConstantBearer()


# -- the harness -------------------------------------------------------------------------------


class Book:
    """Which tokens were issued and when each expires (monotonic), shared with the resource."""

    def __init__(self) -> None:
        self._expires: dict[str, float] = {}
        self._lock = threading.Lock()
        self.expired_uses = 0

    def issued(self, token: str, expires_at: float) -> None:
        with self._lock:
            self._expires[token] = expires_at

    def status(self, authorization: str | None) -> int:
        """200 for any non-empty bearer unless it is booked and past its lifetime; else 401."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401
        expires_at = self._expires.get(token.strip())
        if expires_at is not None and time.monotonic() >= expires_at:
            with self._lock:
                self.expired_uses += 1
            return 401
        return 200


class TokenEndpoint:
    """An OAuth2 client-credentials token endpoint with fault knobs and a call counter.

    The token is issued when the answer leaves (after the latency), so a client that starts its
    expiry clock on receipt is exactly right; an outage is decided when the request arrives.
    """

    def __init__(self, book: Book, lifetime: int) -> None:
        self.book = book
        self.lifetime = lifetime
        self.latency = 0.0
        self.outage: tuple[float, float] | None = None
        self.calls = 0
        self._lock = threading.Lock()

    def arrive(self, body: bytes, authorization: str | None) -> tuple[float, int]:
        """Count a call: (seconds to wait, status to answer)."""
        with self._lock:
            self.calls += 1
            now = time.monotonic()
        if self.outage is not None and self.outage[0] <= now < self.outage[1]:
            return self.latency, 503
        if b"grant_type=client_credentials" not in body or not authorization:
            return 0.0, 400
        return self.latency, 200

    def answer(self, status: int) -> tuple[int, dict[str, Any]]:
        if status == 503:
            return 503, {"error": "temporarily_unavailable", "error_description": "outage"}
        if status != 200:
            return status, {"error": "invalid_request"}
        token = secrets.token_urlsafe(24)
        self.book.issued(token, time.monotonic() + self.lifetime)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}


class Router:
    """``MockTransport`` handlers for one httpx flavour: the token endpoint and the resource."""

    def __init__(self, http: ModuleType, book: Book, endpoint: TokenEndpoint | None) -> None:
        self.http = http
        self.book = book
        self.endpoint = endpoint

    def _arrive(self, request: Any) -> tuple[float, int] | None:
        if self.endpoint is None or request.url.path != "/oauth/token":
            return None
        return self.endpoint.arrive(request.content, request.headers.get("authorization"))

    def _token(self, status: int) -> Any:
        assert self.endpoint is not None
        status, body = self.endpoint.answer(status)
        return self.http.Response(status, json=body)

    def _resource(self, request: Any) -> Any:
        if request.url.path == "/public":
            return self.http.Response(200)
        return self.http.Response(self.book.status(request.headers.get("authorization")))

    def sync(self, request: Any) -> Any:
        arrival = self._arrive(request)
        if arrival is None:
            return self._resource(request)
        delay, status = arrival
        if delay:
            time.sleep(delay)
        return self._token(status)

    async def async_(self, request: Any) -> Any:
        arrival = self._arrive(request)
        if arrival is None:
            return self._resource(request)
        delay, status = arrival
        if delay:
            await asyncio.sleep(delay)
        return self._token(status)


class OAuthSide:
    """The peers' world: the OAuth2 token endpoint and the resource."""

    def __init__(self, lifetime: int) -> None:
        self.book = Book()
        self.endpoint = TokenEndpoint(self.book, lifetime)

    def router(self, http: ModuleType) -> Router:
        return Router(http, self.book, self.endpoint)

    def calls(self) -> int:
        return self.endpoint.calls

    def set_latency(self, seconds: float) -> None:
        self.endpoint.latency = seconds

    def schedule_outage(self, start: float, duration: float) -> None:
        self.endpoint.outage = (start, start + duration)

    def close(self) -> None:
        pass


def _book_mint(book: Book, request: httpx.Request, response: httpx.Response) -> None:
    minted = request.url.path.rstrip("/").endswith("m2m_tokens")
    if minted and request.method == "POST" and response.status_code == 200:
        body = json.loads(response.content)
        left = body["expiration"] / 1000 - time.time()
        book.issued(body["token"], time.monotonic() + left)


class Recording(httpx.BaseTransport):
    """The emulator's transport, booking each minted token's expiry for the resource."""

    def __init__(self, inner: httpx.BaseTransport, book: Book) -> None:
        self._inner = inner
        self._book = book

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        _book_mint(self._book, request, response)
        return response


class AsyncRecording(httpx.AsyncBaseTransport):
    """The emulator's async transport, booking each minted token's expiry for the resource."""

    def __init__(self, inner: httpx.AsyncBaseTransport, book: Book) -> None:
        self._inner = inner
        self._book = book

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        _book_mint(self._book, request, response)
        return response


class ClerkSide:
    """m2m-agent's world: the Clerk emulator (token endpoint) and the same resource."""

    def __init__(self) -> None:
        self.book = Book()
        self.emulator = Emulator()
        self.key = self.emulator.create_machine("bench").secret_key
        self._timers: list[threading.Timer] = []

    def router(self, http: ModuleType) -> Router:
        return Router(http, self.book, None)

    def calls(self) -> int:
        return self.emulator.counters.requests.get("create", 0)

    def set_latency(self, seconds: float) -> None:
        self.emulator.clear_faults()
        if seconds > 0:
            self.emulator.inject(Fault(latency=seconds, endpoints=CREATE))

    def schedule_outage(self, start: float, duration: float) -> None:
        fault = Fault(status=503, duration=duration, endpoints=CREATE)
        timer = threading.Timer(max(0.0, start - time.monotonic()), self.emulator.inject, (fault,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()


Side = OAuthSide | ClerkSide


def side_for(library: str, lifetime: int) -> Side:
    return ClerkSide() if library == "m2m-agent" else OAuthSide(lifetime)


# -- the contenders ----------------------------------------------------------------------------


@dataclasses.dataclass
class SyncRig:
    send: Callable[[], int]
    close: Callable[[], None]


@dataclasses.dataclass
class AsyncRig:
    send: Callable[[], Awaitable[int]]
    close: Callable[[], Awaitable[None]]


def expired_token() -> dict[str, Any]:
    """authlib needs a token to start from (``MissingTokenError`` otherwise): an expired one."""
    return {"access_token": "expired", "token_type": "Bearer", "expires_at": int(time.time()) - 60}


def sync_rig(
    library: str,
    side: Side,
    *,
    lifetime: int,
    leeway: float | None,
    http: ModuleType = httpx,
    entered: bool = True,
) -> SyncRig:
    """A sync client for ``library`` against ``side``; ``leeway=None`` keeps the defaults.

    ``entered``: m2m-agent's manager runs its background refresher (which mints at once);
    otherwise it mints on demand, at the first request.
    """
    if library == "m2m-agent":
        assert isinstance(side, ClerkSide)
        api = ClerkM2MClient(
            side.key,
            api_url=API_URL,
            http_client=httpx.Client(transport=Recording(side.emulator.transport(), side.book)),
        )
        manager = TokenManager(client=api, lifetime=lifetime)
        if entered:
            manager.__enter__()
        auth = M2MAuth(manager) if http is httpx else M2MAuth2(manager)
        client = http.Client(transport=http.MockTransport(side.router(http).sync), auth=auth)

        def close_m2m() -> None:
            client.close()
            manager.close()
            api.close()

        return SyncRig(lambda: client.get(RESOURCE).status_code, close_m2m)
    if library == "httpx-auth":
        assert isinstance(side, OAuthSide)
        OAuth2.token_cache.clear()  # a process-wide cache: start every run empty
        token_client = httpx.Client(transport=httpx.MockTransport(side.router(httpx).sync))
        extra = {} if leeway is None else {"early_expiry": leeway}
        peer = OAuth2ClientCredentials(
            TOKEN_URL, CLIENT_ID, CLIENT_SECRET, client=token_client, **extra
        )
        client = httpx.Client(transport=httpx.MockTransport(side.router(httpx).sync), auth=peer)

        def close_httpx_auth() -> None:
            client.close()
            token_client.close()

        return SyncRig(lambda: client.get(RESOURCE).status_code, close_httpx_auth)
    if library == "authlib":
        assert isinstance(side, OAuthSide)
        ah = AUTHLIB_HTTP
        session = OAuth2Client(
            CLIENT_ID,
            CLIENT_SECRET,
            token_endpoint=TOKEN_URL,
            grant_type="client_credentials",
            token=expired_token(),
            transport=ah.MockTransport(side.router(ah).sync),
            **({} if leeway is None else {"leeway": leeway}),
        )
        return SyncRig(lambda: session.get(RESOURCE).status_code, session.close)
    if library in ("const", "none"):
        auth = constant_bearer(http, "constant") if library == "const" else None
        url = RESOURCE if library == "const" else PUBLIC
        client = http.Client(transport=http.MockTransport(side.router(http).sync), auth=auth)
        return SyncRig(lambda: client.get(url).status_code, client.close)
    raise ValueError(library)


async def async_rig(
    library: str,
    side: Side,
    *,
    lifetime: int,
    leeway: float | None,
    http: ModuleType = httpx,
    entered: bool = True,
) -> AsyncRig:
    """An async client for ``library`` against ``side``; see :func:`sync_rig`."""
    if library == "m2m-agent":
        assert isinstance(side, ClerkSide)
        transport = AsyncRecording(side.emulator.async_transport(), side.book)
        api = AsyncClerkM2MClient(
            side.key, api_url=API_URL, http_client=httpx.AsyncClient(transport=transport)
        )
        manager = AsyncTokenManager(client=api, lifetime=lifetime)
        if entered:
            await manager.__aenter__()
        auth = M2MAuth(manager) if http is httpx else M2MAuth2(manager)
        client = http.AsyncClient(transport=http.MockTransport(side.router(http).async_), auth=auth)

        async def send_m2m() -> int:
            return (await client.get(RESOURCE)).status_code

        async def close_m2m() -> None:
            await client.aclose()
            await manager.aclose()
            await api.aclose()

        return AsyncRig(send_m2m, close_m2m)
    if library == "httpx-auth":
        assert isinstance(side, OAuthSide)
        OAuth2.token_cache.clear()
        # httpx-auth has no async token request: it fetches with a sync httpx.Client, on the loop.
        token_client = httpx.Client(transport=httpx.MockTransport(side.router(httpx).sync))
        extra = {} if leeway is None else {"early_expiry": leeway}
        peer = OAuth2ClientCredentials(
            TOKEN_URL, CLIENT_ID, CLIENT_SECRET, client=token_client, **extra
        )
        client = httpx.AsyncClient(
            transport=httpx.MockTransport(side.router(httpx).async_), auth=peer
        )

        async def send_peer() -> int:
            return (await client.get(RESOURCE)).status_code

        async def close_peer() -> None:
            await client.aclose()
            token_client.close()  # noqa: ASYNC212 - nothing in flight: closing is instant

        return AsyncRig(send_peer, close_peer)
    if library == "authlib":
        assert isinstance(side, OAuthSide)
        ah = AUTHLIB_HTTP
        session = AsyncOAuth2Client(
            CLIENT_ID,
            CLIENT_SECRET,
            token_endpoint=TOKEN_URL,
            grant_type="client_credentials",
            token=expired_token(),
            transport=ah.MockTransport(side.router(ah).async_),
            **({} if leeway is None else {"leeway": leeway}),
        )

        async def send_authlib() -> int:
            return (await session.get(RESOURCE)).status_code

        return AsyncRig(send_authlib, session.aclose)
    if library in ("const", "none"):
        auth = constant_bearer(http, "constant") if library == "const" else None
        url = RESOURCE if library == "const" else PUBLIC
        client = http.AsyncClient(transport=http.MockTransport(side.router(http).async_), auth=auth)

        async def send_plain() -> int:
            return (await client.get(url)).status_code

        return AsyncRig(send_plain, client.aclose)
    raise ValueError(library)


# -- settings ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    requests: int
    rounds: int
    herd: int
    herd_latency: float
    herd_cap: float
    lifetime: int
    refresh_latency: float
    outage_start: float
    outage_length: float
    workers: int
    pace: float
    reference: bool
    """Also run ``const`` in scenarios 3 and 4 (the latency noise floor)."""
    long_lifetime: int = 3600

    @property
    def leeway(self) -> float:
        return LEEWAY_FRACTION * self.lifetime

    @property
    def refresh_window(self) -> float:
        """Past the peers' refresh point (90% of the lifetime) and their slow fetch."""
        return self.lifetime + self.refresh_latency

    @property
    def outage_window(self) -> float:
        """Past the outage's end by a quarter of the lifetime (m2m-agent's backoff)."""
        return self.lifetime * (self.outage_start + self.outage_length + 0.25)

    @property
    def drain_cap(self) -> float:
        """Seconds after a window's end before injected latency is lifted (bounds the run).

        Long enough for every worker to wait out one slow fetch each, one after the other.
        """
        return self.workers * self.refresh_latency + 1.0


FULL = Settings(
    requests=2000,
    rounds=11,
    herd=1000,
    herd_latency=0.05,
    herd_cap=5.0,
    lifetime=4,
    refresh_latency=1.0,
    outage_start=0.65,
    outage_length=0.30,
    workers=8,
    pace=0.01,
    reference=True,
)
QUICK = dataclasses.replace(
    FULL,
    requests=500,
    rounds=3,
    herd=300,
    herd_cap=1.0,
    lifetime=2,
    refresh_latency=0.5,
    reference=False,
)


# -- 1. per-request overhead -------------------------------------------------------------------


def overhead_variants() -> list[tuple[str, str]]:
    """(client flavour, contender) pairs, each compared with ``const`` on its own flavour."""
    variants = [("httpx", name) for name in ("none", "const", "m2m-agent", "httpx-auth")]
    flavour = AUTHLIB_HTTP.__name__
    if AUTHLIB_HTTP is not httpx:
        variants += [(flavour, name) for name in ("none", "const", "m2m-agent")]
    return [*variants, (flavour, "authlib")]


def _rotations(names: list[Any], rounds: int) -> Generator[list[Any], None, None]:
    for r in range(rounds):
        yield names[r % len(names) :] + names[: r % len(names)]


def overhead_sync(s: Settings) -> dict[tuple[str, str], list[float]]:
    clerk, oauth = ClerkSide(), OAuthSide(s.long_lifetime)
    rigs: dict[tuple[str, str], SyncRig] = {}
    for flavour, library in overhead_variants():
        side = clerk if library == "m2m-agent" else oauth
        http = importlib.import_module(flavour)
        rigs[flavour, library] = sync_rig(
            library, side, lifetime=s.long_lifetime, leeway=None, http=http
        )
    for rig in rigs.values():  # warm: every token is fetched here, and the code paths are hot
        for _ in range(max(200, s.requests // 10)):
            assert rig.send() == 200
    runs: dict[tuple[str, str], list[float]] = {key: [] for key in rigs}
    for order in _rotations(list(rigs), s.rounds):
        for key in order:
            send = rigs[key].send
            gc.collect()
            start = time.perf_counter()
            for _ in range(s.requests):
                send()
            runs[key].append((time.perf_counter() - start) / s.requests * 1e6)
    for rig in rigs.values():
        rig.close()
    ours = sum(1 for _, library in rigs if library == "m2m-agent")
    assert clerk.emulator.counters.mints == ours, clerk.emulator.counters  # one per manager
    return runs


def overhead_async(s: Settings) -> dict[tuple[str, str], list[float]]:
    async def main() -> dict[tuple[str, str], list[float]]:
        clerk, oauth = ClerkSide(), OAuthSide(s.long_lifetime)
        rigs: dict[tuple[str, str], AsyncRig] = {}
        for flavour, library in overhead_variants():
            side = clerk if library == "m2m-agent" else oauth
            http = importlib.import_module(flavour)
            rigs[flavour, library] = await async_rig(
                library, side, lifetime=s.long_lifetime, leeway=None, http=http
            )
        for rig in rigs.values():
            for _ in range(max(200, s.requests // 10)):
                assert await rig.send() == 200
        runs: dict[tuple[str, str], list[float]] = {key: [] for key in rigs}
        for order in _rotations(list(rigs), s.rounds):
            for key in order:
                send = rigs[key].send
                gc.collect()
                start = time.perf_counter()
                for _ in range(s.requests):
                    await send()
                runs[key].append((time.perf_counter() - start) / s.requests * 1e6)
        for rig in reversed(rigs.values()):  # async context managers unwind last in, first out
            await rig.close()
        return runs

    return asyncio.run(main())


def summarise_overhead(runs: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
    medians = {key: statistics.median(values) for key, values in runs.items()}
    rows = []
    for (flavour, library), median in medians.items():
        base = medians[flavour, "const"]
        rows.append(
            {
                "client": flavour,
                "library": library,
                "us_per_request": round(median, 2),
                "min": round(min(runs[flavour, library]), 2),
                "max": round(max(runs[flavour, library]), 2),
                "ratio_to_const": round(median / base, 3),
                "us_over_const": round(median - base, 2),
            }
        )
    return rows


# -- 2. herd -----------------------------------------------------------------------------------


def _lift_latency_later(side: Side, delay: float) -> threading.Timer:
    """Bound a run: after ``delay`` seconds the token endpoint stops being slow."""
    timer = threading.Timer(delay, side.set_latency, (0.0,))
    timer.daemon = True
    timer.start()
    return timer


def herd_sync(library: str, s: Settings) -> dict[str, Any]:
    side = side_for(library, s.long_lifetime)
    rig = sync_rig(library, side, lifetime=s.long_lifetime, leeway=None, entered=False)
    side.set_latency(s.herd_latency)
    barrier = threading.Barrier(s.herd)
    outcomes: list[str] = []

    def one() -> None:
        barrier.wait()
        try:
            outcomes.append(str(rig.send()))
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(s.herd)]
    lift = _lift_latency_later(side, s.herd_cap)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    capped = not lift.is_alive() and elapsed > s.herd_cap
    lift.cancel()
    result = _herd_result(library, "sync", side, outcomes, elapsed, capped, None)
    rig.close()
    side.close()
    return result


def herd_async(library: str, s: Settings) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        side = side_for(library, s.long_lifetime)
        rig = await async_rig(library, side, lifetime=s.long_lifetime, leeway=None, entered=False)
        side.set_latency(s.herd_latency)

        async def one() -> str:
            try:
                return str(await rig.send())
            except Exception as exc:
                return type(exc).__name__

        lift = _lift_latency_later(side, s.herd_cap)
        async with LoopWatch() as watch:
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(one() for _ in range(s.herd)))
            elapsed = time.perf_counter() - start
        capped = not lift.is_alive() and elapsed > s.herd_cap
        lift.cancel()
        result = _herd_result(library, "async", side, outcomes, elapsed, capped, watch.max_stall)
        await rig.close()
        side.close()
        return result

    return asyncio.run(main())


def _herd_result(
    library: str,
    mode: str,
    side: Side,
    outcomes: list[str],
    elapsed: float,
    capped: bool,
    loop_stall: float | None,
) -> dict[str, Any]:
    kinds = Counter(outcomes)
    return {
        "library": library,
        "mode": mode,
        "requests": len(outcomes),
        "token_calls": side.calls(),
        "failed": sum(n for kind, n in kinds.items() if kind != "200"),
        "outcomes": dict(kinds),
        "seconds": round(elapsed, 3),
        "capped": capped,
        "loop_stall_s": None if loop_stall is None else round(loop_stall, 3),
    }


# -- 3 and 4. timelines under load -------------------------------------------------------------


class LoopWatch:
    """Measures the longest time the event loop could not run a 5 ms ticker (a blocked loop)."""

    TICK = 0.005

    def __init__(self) -> None:
        self.max_stall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.TICK)
            self.max_stall = max(self.max_stall, time.perf_counter() - before - self.TICK)

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        await asyncio.sleep(2 * self.TICK)  # let the ticker see a stall that just ended
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    window: Callable[[Settings], float]
    fault: Callable[[Side, float, Settings], None]
    """Called once the first token is cached, with the monotonic time it was obtained."""


def _slow_refresh(side: Side, t0: float, s: Settings) -> None:
    side.set_latency(s.refresh_latency)


def _outage(side: Side, t0: float, s: Settings) -> None:
    side.schedule_outage(t0 + s.outage_start * s.lifetime, s.outage_length * s.lifetime)


REFRESH = Scenario("refresh", lambda s: s.refresh_window, _slow_refresh)
OUTAGE = Scenario("outage", lambda s: s.outage_window, _outage)


@dataclasses.dataclass
class Sample:
    at: float
    seconds: float
    outcome: str


def _to_next_second(library: str) -> float:
    """Seconds to wait so that authlib takes its first token just after a whole second.

    authlib keeps ``expires_at`` in whole seconds, rounded down: a token fetched at x.9 s would
    be refreshed 0.9 s early, at random. The others keep exact times and need no wait.
    """
    return 1.001 - time.time() % 1.0 if library == "authlib" else 0.0


def timeline_sync(library: str, scenario: Scenario, s: Settings) -> dict[str, Any]:
    side = side_for(library, s.lifetime)
    time.sleep(_to_next_second(library))
    # Built now: an entered TokenManager starts minting at once.
    rig = sync_rig(library, side, lifetime=s.lifetime, leeway=s.leeway)
    assert rig.send() == 200  # the first token
    t0 = time.monotonic()
    calls_before = side.calls()
    scenario.fault(side, t0, s)
    until = t0 + scenario.window(s)
    samples: list[Sample] = []

    def worker() -> None:
        while (now := time.monotonic()) < until:
            start = time.perf_counter()
            try:
                outcome = str(rig.send())
            except Exception as exc:
                outcome = type(exc).__name__
            samples.append(Sample(now - t0, time.perf_counter() - start, outcome))
            time.sleep(s.pace)

    threads = [threading.Thread(target=worker) for _ in range(s.workers)]
    for thread in threads:
        thread.start()
    lift = _lift_latency_later(side, until - time.monotonic() + s.drain_cap)
    for thread in threads:
        thread.join()
    capped = not lift.is_alive() and time.monotonic() > until + s.drain_cap
    lift.cancel()
    result = _timeline_result(library, "sync", side, calls_before, samples, capped, None)
    result["expired_uses"] = side.book.expired_uses
    rig.close()
    side.close()
    return result


def timeline_async(library: str, scenario: Scenario, s: Settings) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        side = side_for(library, s.lifetime)
        await asyncio.sleep(_to_next_second(library))
        rig = await async_rig(library, side, lifetime=s.lifetime, leeway=s.leeway)
        assert await rig.send() == 200
        t0 = time.monotonic()
        calls_before = side.calls()
        scenario.fault(side, t0, s)
        until = t0 + scenario.window(s)
        samples: list[Sample] = []

        async def worker() -> None:
            while (now := time.monotonic()) < until:
                start = time.perf_counter()
                try:
                    outcome = str(await rig.send())
                except Exception as exc:
                    outcome = type(exc).__name__
                samples.append(Sample(now - t0, time.perf_counter() - start, outcome))
                await asyncio.sleep(s.pace)

        lift = _lift_latency_later(side, until - time.monotonic() + s.drain_cap)
        async with LoopWatch() as watch:
            await asyncio.gather(*(worker() for _ in range(s.workers)))
        capped = not lift.is_alive() and time.monotonic() > until + s.drain_cap
        lift.cancel()
        result = _timeline_result(
            library, "async", side, calls_before, samples, capped, watch.max_stall
        )
        result["expired_uses"] = side.book.expired_uses
        await rig.close()
        side.close()
        return result

    return asyncio.run(main())


def _timeline_result(
    library: str,
    mode: str,
    side: Side,
    calls_before: int,
    samples: list[Sample],
    capped: bool,
    loop_stall: float | None,
) -> dict[str, Any]:
    latencies = sorted(sample.seconds for sample in samples)
    failed = [sample for sample in samples if sample.outcome != "200"]
    slowest = max(samples, key=lambda sample: sample.seconds)
    bad = [sample for sample in samples if sample.outcome != "200" or sample.seconds > STALL]
    return {
        "library": library,
        "mode": mode,
        "requests": len(samples),
        "failed": len(failed),
        "outcomes": dict(Counter(sample.outcome for sample in samples)),
        "first_failure_s": round(min(f.at for f in failed), 3) if failed else None,
        "last_failure_s": round(max(f.at for f in failed), 3) if failed else None,
        "max_latency_s": round(slowest.seconds, 3),
        "slowest_sent_at_s": round(slowest.at, 3),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 2),
        "stalled": sum(1 for latency in latencies if latency > STALL),
        "normal_again_s": round(max(b.at + b.seconds for b in bad), 3) if bad else None,
        "token_calls": side.calls() - calls_before,
        "loop_stall_s": None if loop_stall is None else round(loop_stall, 3),
        "capped": capped,
    }


def run_timelines(scenario: Scenario, s: Settings) -> list[dict[str, Any]]:
    contenders = [*LIBRARIES, "const"] if s.reference else list(LIBRARIES)
    rows = []
    for library in contenders:
        rows.append(timeline_sync(library, scenario, s))
        rows.append(timeline_async(library, scenario, s))
    return rows


# -- output ------------------------------------------------------------------------------------


def _x(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_overhead(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(
        f"  {'client':<7} {'contender':<11} {'µs/request':>11} {'min':>8} {'max':>8}"
        f" {'vs const':>9} {'µs over const':>14}"
    )
    for row in rows:
        print(
            f"  {row['client']:<7} {row['library']:<11} {row['us_per_request']:>11.2f}"
            f" {row['min']:>8.2f} {row['max']:>8.2f} {row['ratio_to_const']:>8.3f}x"
            f" {row['us_over_const']:>+14.2f}"
        )


def print_herd(rows: list[dict[str, Any]], s: Settings) -> None:
    print(
        f"2. herd: {s.herd} concurrent requests on an empty token (authlib: expired), token "
        f"endpoint answering in {s.herd_latency * 1e3:.0f} ms"
    )
    print(
        f"  {'contender':<11} {'mode':<6} {'token calls':>12} {'failed':>7} {'seconds':>9}"
        f" {'loop stall s':>13}"
    )
    for row in rows:
        seconds = f"{'>=' if row['capped'] else ''}{row['seconds']:.3f}"
        print(
            f"  {row['library']:<11} {row['mode']:<6} {row['token_calls']:>12} {row['failed']:>7}"
            f" {seconds:>9} {_x(row['loop_stall_s']):>13}"
        )


def print_timeline(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(
        f"  {'contender':<11} {'mode':<6} {'requests':>8} {'failed':>7} {'max latency s':>14}"
        f" {'p99 ms':>7} {'>100ms':>7} {'normal at s':>12} {'token calls':>12}"
        f" {'loop stall s':>13}"
    )
    for row in rows:
        worst = f"{'>=' if row['capped'] else ''}{row['max_latency_s']:.3f}"
        print(
            f"  {row['library']:<11} {row['mode']:<6} {row['requests']:>8} {row['failed']:>7}"
            f" {worst:>14} {row['p99_ms']:>7.2f} {row['stalled']:>7}"
            f" {_x(row['normal_again_s'], 2):>12} {row['token_calls']:>12}"
            f" {_x(row['loop_stall_s']):>13}"
        )
        failures = {k: v for k, v in row["outcomes"].items() if k != "200"}
        if failures:
            what = ", ".join(f"{n} x {kind}" for kind, n in failures.items())
            print(
                f"  {'':<11} {'':<6} failures: {what}, sent between "
                f"{row['first_failure_s']:.2f} s and {row['last_failure_s']:.2f} s"
            )


NOTES = """notes
  - httpx-auth has no async code path: in an httpx.AsyncClient its synchronous auth flow runs on
    the event loop and fetches the token with a blocking httpx.Client, so the whole loop stops for
    the token request ("loop stall").
  - httpx-auth serialises token fetches behind a lock but does not look at the cache again once
    it holds it: N requests that found no valid token make N fetches, one after the other.
  - authlib's sync OAuth2Client has no lock: every thread that sees the token expired fetches
    (in parallel). Its AsyncOAuth2Client takes one asyncio lock around every request's expiry
    check and holds it during a fetch: one fetch, and every request waits for it.
  - authlib cannot start without a token (MissingTokenError), so its herd starts from an expired
    one; it stores expires_at as whole seconds, rounded down (up to 1 s earlier refresh).
  - Neither peer refreshes ahead of expiry or retries: a failed token request fails the request,
    and the next request tries the token endpoint again. m2m-agent refreshes from 70-75% of the
    lifetime in the background, serves the current token meanwhile, retries with full-jitter
    backoff, and makes callers wait (up to RefreshPolicy.wait_timeout, 30 s) rather than fail
    once the token is inside its safety margin.
  - "loop stall": the longest the event loop could not run a 5 ms ticker. In the herd it also
    counts the CPU time of requests resuming together: m2m-agent wakes every waiter at once when
    the token arrives, authlib hands its lock to one waiter at a time; only httpx-auth's stall
    includes a network wait. "normal at": when the last failed or slower-than-100 ms request
    ended, in seconds from the first token."""


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sync": "#4C72B0", "async": "#DD8452"}
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 9))
    width = 0.38

    def bars(
        ax: Any,
        labels: list[str],
        values: dict[str, list[float]],
        notes: dict[str, list[str]],
    ) -> None:
        xs = range(len(labels))
        for i, mode in enumerate(MODES):
            offsets = [x + (i - 0.5) * width for x in xs]
            drawn = ax.bar(offsets, values[mode], width, label=mode, color=colours[mode])
            ax.bar_label(drawn, labels=notes[mode], fontsize=7.5, padding=2)
        ax.set_xticks(list(xs), labels)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="upper left")

    def rows(scenario: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["library"], r["mode"]): r for r in report[scenario]}

    def per_mode(
        table: dict[Any, Any], fn: Callable[[dict[str, Any]], Any]
    ) -> dict[str, list[Any]]:
        return {mode: [fn(table[lib, mode]) for lib in LIBRARIES] for mode in MODES}

    settings = report["settings"]
    overhead = {
        mode: {(r["client"], r["library"]): r for r in report["overhead"][mode]} for mode in MODES
    }
    keys = [key for key in overhead["sync"] if key[1] not in ("none", "const")]
    ratios = {mode: [overhead[mode][key]["ratio_to_const"] for key in keys] for mode in MODES}
    ax = axes[0][0]
    bars(
        ax,
        [f"{lib}\n({client})" for client, lib in keys],
        ratios,
        {mode: [f"{v:.2f}x" for v in ratios[mode]] for mode in MODES},
    )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_title("1. per-request overhead, warm token")
    ax.set_ylabel("time per request / constant header (lower is better)")

    herd = rows("herd")
    ax = axes[0][1]
    bars(
        ax,
        list(LIBRARIES),
        per_mode(herd, lambda r: r["token_calls"]),
        per_mode(herd, lambda r: str(r["token_calls"])),
    )
    ax.set_yscale("log")
    ax.set_title(f"2. herd: {settings['herd']} concurrent requests on an empty token")
    ax.set_ylabel("token-endpoint calls, log scale (lower is better)")

    def secs(value: float) -> str:
        return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"

    def blocked(r: dict[str, Any]) -> str:
        stall = r["loop_stall_s"]
        return "\nloop blocked" if stall is not None and stall > STALL else ""

    refresh = rows("refresh")
    ax = axes[1][0]
    bars(
        ax,
        list(LIBRARIES),
        per_mode(refresh, lambda r: r["max_latency_s"]),
        per_mode(refresh, lambda r: f"{secs(r['max_latency_s'])}{blocked(r)}"),
    )
    ax.set_title(
        f"3. refresh under load: {settings['lifetime']} s tokens, "
        f"{settings['refresh_latency']:g} s token endpoint"
    )
    ax.set_ylabel("slowest request, s (lower is better)")

    outage = rows("outage")
    ax = axes[1][1]
    bars(
        ax,
        list(LIBRARIES),
        per_mode(outage, lambda r: r["failed"]),
        per_mode(
            outage,
            lambda r: (
                f"{r['failed']}\n{r['token_calls']} calls\nslowest\n{secs(r['max_latency_s'])}"
            ),
        ),
    )
    start = settings["outage_start"] * settings["lifetime"]
    length = settings["outage_length"] * settings["lifetime"]
    ax.set_title(
        f"4. outage: 503 for {length:g} s from {start:g} s of a {settings['lifetime']} s token"
    )
    ax.margins(y=0.4)  # room for the three-line labels
    ax.set_ylabel("failed requests (lower is better)")

    versions = report["versions"]
    fig.suptitle(
        f"m2m-agent {versions['m2m_agent']}, httpx-auth {versions['httpx_auth']}, authlib "
        f"{versions['authlib']} on {versions['authlib_http']}, httpx {versions['httpx']}, "
        f"Python {versions['python']}: bench/bench_peers.py",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCENARIOS = ("overhead", "herd", "refresh", "outage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, shorter run (~40 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.add_argument(
        "--chart",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "img" / "benchmarks.png",
        help="where to write the chart (PNG, matplotlib; default docs/img/benchmarks.png)",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not write the chart")
    parser.add_argument(
        "--only",
        choices=SCENARIOS,
        action="append",
        help="run only this scenario (repeatable); the chart needs all four",
    )
    for name, kind, what in (
        ("requests", int, "overhead: requests per variant per round"),
        ("rounds", int, "overhead: interleaved rounds (median taken)"),
        ("herd", int, "herd: concurrent requests"),
        ("herd-latency", float, "herd: token endpoint latency, seconds"),
        ("lifetime", int, "refresh/outage: token lifetime, whole seconds"),
        ("refresh-latency", float, "refresh: token endpoint latency, seconds"),
        ("outage-start", float, "outage: start, as a fraction of the lifetime"),
        ("outage-length", float, "outage: length, as a fraction of the lifetime"),
        ("workers", int, "refresh/outage: concurrent workers (threads or tasks)"),
        ("pace", float, "refresh/outage: pause between a worker's requests, seconds"),
    ):
        parser.add_argument(f"--{name}", type=kind, default=None, help=what)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Settings)
        if getattr(args, field.name, None) is not None
    }
    s = dataclasses.replace(s, **overrides)
    if s.lifetime < 2:
        parser.error(
            "--lifetime must be at least 2 whole seconds (the peers read expires_in as int)"
        )
    if not 0 < s.outage_start < s.outage_start + s.outage_length < 1:
        parser.error("the outage must start and end within the token's life")
    chosen = set(args.only or SCENARIOS)
    draw = not args.no_chart and chosen == set(SCENARIOS)

    # Keep log events (m2m-agent's refresh failures, the peers' debug) out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.disable(logging.CRITICAL)

    started = time.perf_counter()
    load_before = _load()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    report: dict[str, Any] = {
        "versions": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "m2m_agent": m2m_agent.__version__,
            "httpx": httpx.__version__,
            "authlib_http": f"{AUTHLIB_HTTP.__name__} {AUTHLIB_HTTP.__version__}",
            "httpx_auth": httpx_auth.__version__,
            "authlib": authlib.__version__,
        },
        "settings": {
            **dataclasses.asdict(s),
            "leeway_s": s.leeway,
            "refresh_window_s": s.refresh_window,
            "outage_window_s": s.outage_window,
        },
    }
    if "overhead" in chosen:
        say("overhead ...")
        report["overhead"] = {
            "sync": summarise_overhead(overhead_sync(s)),
            "async": summarise_overhead(overhead_async(s)),
        }
    if "herd" in chosen:
        say("herd ...")
        report["herd"] = [
            run(library, s) for library in LIBRARIES for run in (herd_sync, herd_async)
        ]
    if "refresh" in chosen:
        say("refresh under load ...")
        report["refresh"] = run_timelines(REFRESH, s)
    if "outage" in chosen:
        say("outage ...")
        report["outage"] = run_timelines(OUTAGE, s)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average"] = {"before": load_before, "after": _load()}
    if draw:
        chart(report, args.chart)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report, s, chart_path=args.chart if draw else None)
    herd_ok = all(r["token_calls"] == 1 for r in report.get("herd", []) if _ours(r))
    timelines = report.get("refresh", []) + report.get("outage", [])
    no_failures = all(r["failed"] == 0 for r in timelines if _ours(r))
    return 0 if herd_ok and no_failures else 1


def _ours(row: dict[str, Any]) -> bool:
    return bool(row["library"] == "m2m-agent")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        return None


def print_report(report: dict[str, Any], s: Settings, *, chart_path: Path | None) -> None:
    v = report["versions"]
    print(
        f"Python {v['python']} ({v['implementation']}); m2m-agent {v['m2m_agent']},"
        f" httpx-auth {v['httpx_auth']}, authlib {v['authlib']} (on {v['authlib_http']}),"
        f" httpx {v['httpx']}; {report['seconds']} s, load average"
        f" {report['load_average']['before']} -> {report['load_average']['after']}"
        f" on {os.cpu_count()} CPUs"
    )
    if "overhead" in report:
        print_overhead(
            f"1a. overhead, sync: µs per request through a warm auth, median of {s.rounds} rounds"
            f" x {s.requests} requests",
            report["overhead"]["sync"],
        )
        print_overhead("1b. overhead, async (asyncio)", report["overhead"]["async"])
    if "herd" in report:
        print_herd(report["herd"], s)
    if "refresh" in report:
        print_timeline(
            f"3. refresh under load: {s.workers} workers, a request each every {s.pace * 1e3:g}"
            f" ms, {s.lifetime} s tokens, token endpoint answering in {s.refresh_latency:g} s,"
            f" {s.refresh_window:g} s from the first token",
            report["refresh"],
        )
    if "outage" in report:
        start, length = s.outage_start * s.lifetime, s.outage_length * s.lifetime
        print_timeline(
            f"4. outage: token endpoint answers 503 from {start:g} s to {start + length:g} s of a"
            f" {s.lifetime} s token's life ({length:g} s, shorter than the"
            f" {s.lifetime - start:g} s it has left), {s.outage_window:g} s from the first token",
            report["outage"],
        )
    if "refresh" in report or "outage" in report:
        print(
            f"  leeways in 3 and 4: httpx-auth early_expiry={s.leeway:g} s, authlib"
            f" leeway={s.leeway:g} s ({LEEWAY_FRACTION:.0%} of the lifetime, m2m-agent's margin)"
        )
    print(NOTES)
    if chart_path is not None:
        print(f"chart: {chart_path}")


if __name__ == "__main__":
    sys.exit(main())
