"""M2MAuth for httpx and httpx2 clients, sync and async.

Every behaviour runs against both libraries (``m2m_agent.M2MAuth`` on httpx,
``m2m_agent.httpx2.M2MAuth`` on httpx2) and, for async, on asyncio and trio. Tokens come from a
manager over the in-process emulator; the target service is a ``MockTransport`` handler of the
library under test. The last tests drive the flow generators by hand, with no client at all
(httpx's own ``tests/test_auth.py`` style).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

import m2m_agent
from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    ClerkM2MClient,
    ConfigurationError,
    M2MAuth,
    TokenManager,
)
from m2m_agent.emulator import Emulator, Fault, Machine

API_URL = "https://api.clerk.test"
SERVICE = "https://service.test"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


# -- the library under test ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lib:
    """httpx or httpx2, with its M2MAuth class."""

    name: str
    mod: ModuleType
    auth: type[Any]

    def client(self, handler: Callable[..., Any], auth: Any) -> Any:
        return self.mod.Client(transport=self.mod.MockTransport(handler), auth=auth)

    def async_client(self, handler: Callable[..., Any], auth: Any) -> Any:
        return self.mod.AsyncClient(transport=self.mod.MockTransport(handler), auth=auth)


@pytest.fixture(params=["httpx", "httpx2"])
def lib(request: pytest.FixtureRequest) -> Lib:
    if request.param == "httpx":
        return Lib("httpx", httpx, m2m_agent.M2MAuth)
    mod = pytest.importorskip("httpx2")
    from m2m_agent.httpx2 import M2MAuth

    return Lib("httpx2", mod, M2MAuth)


class Target:
    """The service being called: records each request's token and body, rejects some tokens."""

    def __init__(self, lib: Lib, *, reject: Callable[[str], bool] = lambda _: False) -> None:
        self.lib = lib
        self.reject = reject
        self.tokens: list[str] = []
        self.bodies: list[bytes] = []

    def answer(self, request: Any) -> Any:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        assert scheme == "Bearer"
        self.tokens.append(token)
        self.bodies.append(request.content)
        return self.lib.mod.Response(401 if self.reject(token) else 200)

    def __call__(self, request: Any) -> Any:
        return self.answer(request)


# -- managers over the emulator ----------------------------------------------------------------


from .conftest import FAST  # noqa: E402


@pytest.fixture
def emulator() -> Emulator:
    return Emulator()


@pytest.fixture
def worker(emulator: Emulator) -> Machine:
    return emulator.create_machine("worker")


@pytest.fixture
def manager(emulator: Emulator, worker: Machine) -> Iterator[TokenManager]:
    http = httpx.Client(transport=emulator.transport())
    client = ClerkM2MClient(worker.secret_key, api_url=API_URL, http_client=http)
    manager = TokenManager(client=client, lifetime=60, refresh=FAST)
    yield manager
    manager.close()
    http.close()


@pytest.fixture
async def async_manager(emulator: Emulator, worker: Machine) -> AsyncIterator[AsyncTokenManager]:
    http = httpx.AsyncClient(transport=emulator.async_transport())
    client = AsyncClerkM2MClient(worker.secret_key, api_url=API_URL, http_client=http)
    manager = AsyncTokenManager(client=client, lifetime=60, refresh=FAST)
    yield manager
    await manager.aclose()
    await http.aclose()


@pytest.fixture
def idle_async_manager(emulator: Emulator, worker: Machine) -> AsyncTokenManager:
    """An AsyncTokenManager that is never used on a loop (for the wrong-pairing test)."""
    client = AsyncClerkM2MClient(
        worker.secret_key,
        api_url=API_URL,
        http_client=httpx.AsyncClient(transport=emulator.async_transport()),
    )
    return AsyncTokenManager(client=client, lifetime=60)


def api_requests(emulator: Emulator) -> int:
    return sum(emulator.counters.requests.values())


async def body_chunks() -> AsyncIterator[bytes]:
    yield b"streamed "
    yield b"body"


# -- sync clients ------------------------------------------------------------------------------


class TestSyncClient:
    def test_sets_bearer_header(self, lib: Lib, manager: TokenManager, emulator: Emulator) -> None:
        """Each request carries ``Authorization: Bearer <the manager's token>``."""
        target = Target(lib)
        with lib.client(target, lib.auth(manager)) as http:
            assert http.get(f"{SERVICE}/a").status_code == 200
            assert http.get(f"{SERVICE}/b").status_code == 200
        token = manager.get_token()
        assert target.tokens == [token, token]
        assert emulator.counters.mints == 1

    def test_401_invalidates_and_replays_once(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """A 401 drops the token and replays the request, body included, with a fresh one."""
        first = manager.get_token()
        target = Target(lib, reject=lambda token: token == first)
        with lib.client(target, lib.auth(manager)) as http:
            response = http.post(f"{SERVICE}/jobs", json={"job": 1})
        assert response.status_code == 200
        assert len(target.tokens) == 2
        assert target.tokens[0] == first
        assert target.tokens[1] != first
        assert target.tokens[1] == manager.get_token()
        assert target.bodies[0] == target.bodies[1] == b'{"job":1}'
        assert emulator.counters.mints == 2
        assert manager.statistics().invalidations == 1

    def test_second_401_is_returned(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """A 401 on the replay goes back to the caller: one retry, no loop."""
        target = Target(lib, reject=lambda _: True)
        with lib.client(target, lib.auth(manager)) as http:
            response = http.get(f"{SERVICE}/a")
        assert response.status_code == 401
        assert len(target.tokens) == 2
        assert target.tokens[0] != target.tokens[1]
        assert len(response.history) == 1
        assert emulator.counters.mints == 2

    def test_streaming_body_is_not_replayed(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """A generator body cannot be sent twice: the 401 is returned as is."""

        def chunks() -> Iterator[bytes]:
            yield b"streamed "
            yield b"body"

        target = Target(lib, reject=lambda _: True)
        with lib.client(target, lib.auth(manager)) as http:
            response = http.post(f"{SERVICE}/upload", content=chunks())
        assert response.status_code == 401
        assert target.bodies == [b"streamed body"]
        assert emulator.counters.mints == 1

    def test_retry_on_401_off(self, lib: Lib, manager: TokenManager, emulator: Emulator) -> None:
        """With ``retry_on_401=False`` a 401 is returned without a replay or a new mint."""
        target = Target(lib, reject=lambda _: True)
        with lib.client(target, lib.auth(manager, retry_on_401=False)) as http:
            assert http.get(f"{SERVICE}/a").status_code == 401
        assert len(target.tokens) == 1
        assert emulator.counters.mints == 1

    def test_concurrent_401s_cause_one_mint(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """N threads all rejected with the same token cause exactly one extra mint."""
        n = 16
        first = manager.get_token()
        all_rejected = threading.Barrier(n, timeout=10)

        def answer(request: Any) -> Any:
            response = target.answer(request)
            if response.status_code == 401:
                all_rejected.wait()  # every request holds its 401 until all have the old token
            return response

        target = Target(lib, reject=lambda token: token == first)
        with lib.client(answer, lib.auth(manager)) as http, ThreadPoolExecutor(n) as pool:
            statuses = list(pool.map(lambda i: http.get(f"{SERVICE}/{i}").status_code, range(n)))
        assert statuses == [200] * n
        assert target.tokens.count(first) == n
        assert len(set(target.tokens)) == 2
        assert emulator.counters.mints == 2
        assert manager.statistics().invalidations == 1

    def test_async_manager_in_sync_client(
        self, lib: Lib, idle_async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """An AsyncTokenManager cannot serve a sync Client: a clear RuntimeError, nothing sent."""
        target = Target(lib)
        with (
            lib.client(target, lib.auth(idle_async_manager)) as http,
            pytest.raises(RuntimeError, match=r"AsyncTokenManager.*AsyncClient"),
        ):
            http.get(f"{SERVICE}/a")
        assert target.tokens == []
        assert api_requests(emulator) == 0

    @pytest.mark.parametrize(
        "url", ["http://service.example/a", "http://10.0.0.7:8080/a", "ws://service.example/"]
    )
    def test_refuses_plain_http(
        self, lib: Lib, manager: TokenManager, emulator: Emulator, url: str
    ) -> None:
        """No token goes over plain http to a non-loopback host; none is even minted."""
        target = Target(lib)
        with (
            lib.client(target, lib.auth(manager)) as http,
            pytest.raises(ConfigurationError, match="allow_insecure_http"),
        ):
            http.get(url)
        assert target.tokens == []
        assert emulator.counters.mints == 0

    def test_plain_http_opt_in(self, lib: Lib, manager: TokenManager) -> None:
        """``allow_insecure_http=True`` lets the token go over plain http."""
        target = Target(lib)
        with lib.client(target, lib.auth(manager, allow_insecure_http=True)) as http:
            assert http.get("http://service.example/a").status_code == 200
        assert target.tokens == [manager.get_token()]

    @pytest.mark.parametrize(
        "url", ["http://127.0.0.1:8000/a", "http://localhost/a", "http://[::1]:9000/a"]
    )
    def test_plain_http_to_loopback_is_allowed(
        self, lib: Lib, manager: TokenManager, url: str
    ) -> None:
        """Plain http to this machine (a sidecar, a local service) needs no opt-in."""
        target = Target(lib)
        with lib.client(target, lib.auth(manager)) as http:
            assert http.get(url).status_code == 200
        assert target.tokens == [manager.get_token()]


# -- async clients -----------------------------------------------------------------------------


@pytest.mark.anyio
class TestAsyncClient:
    async def test_sets_bearer_header(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """Each request carries ``Authorization: Bearer <the manager's token>``."""
        target = Target(lib)
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            assert (await http.get(f"{SERVICE}/a")).status_code == 200
            assert (await http.get(f"{SERVICE}/b")).status_code == 200
        token = await async_manager.get_token()
        assert target.tokens == [token, token]
        assert emulator.counters.mints == 1

    async def test_401_invalidates_and_replays_once(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """A 401 drops the token and replays the request, body included, with a fresh one."""
        first = await async_manager.get_token()
        target = Target(lib, reject=lambda token: token == first)
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            response = await http.post(f"{SERVICE}/jobs", json={"job": 1})
        assert response.status_code == 200
        assert len(target.tokens) == 2
        assert target.tokens[0] == first
        assert target.tokens[1] != first
        assert target.tokens[1] == await async_manager.get_token()
        assert target.bodies[0] == target.bodies[1] == b'{"job":1}'
        assert emulator.counters.mints == 2
        assert async_manager.statistics().invalidations == 1

    async def test_second_401_is_returned(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """A 401 on the replay goes back to the caller: one retry, no loop."""
        target = Target(lib, reject=lambda _: True)
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            response = await http.get(f"{SERVICE}/a")
        assert response.status_code == 401
        assert len(target.tokens) == 2
        assert target.tokens[0] != target.tokens[1]
        assert len(response.history) == 1
        assert emulator.counters.mints == 2

    async def test_streaming_body_is_not_replayed(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """An async generator body cannot be sent twice: the 401 is returned as is."""
        target = Target(lib, reject=lambda _: True)
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            response = await http.post(f"{SERVICE}/upload", content=body_chunks())
        assert response.status_code == 401
        assert target.bodies == [b"streamed body"]
        assert emulator.counters.mints == 1

    async def test_concurrent_401s_cause_one_mint(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """N tasks all rejected with the same token cause exactly one extra mint."""
        n = 50
        first = await async_manager.get_token()
        target = Target(lib, reject=lambda token: token == first)
        all_rejected = anyio.Event()
        statuses: list[int] = []

        async def answer(request: Any) -> Any:
            response = target.answer(request)
            if response.status_code == 401:
                if target.tokens.count(first) == n:
                    all_rejected.set()
                await all_rejected.wait()  # every request holds its 401 until all have the old one
            return response

        async with lib.async_client(answer, lib.auth(async_manager)) as http:

            async def call(i: int) -> None:
                statuses.append((await http.get(f"{SERVICE}/{i}")).status_code)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(call, i)
        assert statuses == [200] * n
        assert target.tokens.count(first) == n
        assert len(set(target.tokens)) == 2
        assert emulator.counters.mints == 2
        assert async_manager.statistics().invalidations == 1

    async def test_sync_manager_in_async_client(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """A TokenManager cannot serve an AsyncClient (it would block the loop): RuntimeError."""
        target = Target(lib)
        async with lib.async_client(target, lib.auth(manager)) as http:
            with pytest.raises(RuntimeError, match=r"TokenManager.*httpx\.Client"):
                await http.get(f"{SERVICE}/a")
        assert target.tokens == []
        assert api_requests(emulator) == 0

    async def test_refuses_plain_http(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """No token goes over plain http to a non-loopback host unless the user opts in."""
        target = Target(lib)
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            with pytest.raises(ConfigurationError, match="allow_insecure_http"):
                await http.get("http://service.example/a")
        assert emulator.counters.mints == 0
        async with lib.async_client(target, lib.auth(async_manager)) as http:
            assert (await http.get("http://127.0.0.1:8000/a")).status_code == 200
        auth = lib.auth(async_manager, allow_insecure_http=True)
        async with lib.async_client(target, auth) as http:
            assert (await http.get("http://service.example/a")).status_code == 200
        assert len(target.tokens) == 2


# -- the auth object itself --------------------------------------------------------------------


class TestAuthObject:
    def test_repr_hides_the_token(self, lib: Lib, manager: TokenManager, worker: Machine) -> None:
        """Neither the token nor the machine secret key shows in ``repr(auth)``."""
        auth = lib.auth(manager)
        target = Target(lib)
        with lib.client(target, auth) as http:
            http.get(f"{SERVICE}/a")
        token = manager.get_token()
        assert token not in repr(auth)
        assert worker.secret_key not in repr(auth)
        assert "M2MAuth" in repr(auth)

    def test_is_the_library_auth_class(self, lib: Lib, manager: TokenManager) -> None:
        """Each M2MAuth subclasses its own library's ``Auth`` (httpx2 accepts no other)."""
        auth = lib.auth(manager)
        assert isinstance(auth, lib.mod.Auth)
        assert lib.auth.__doc__
        assert lib.auth.__module__ == ("m2m_agent" if lib.name == "httpx" else "m2m_agent.httpx2")

    def test_refuses_a_non_manager(self, lib: Lib) -> None:
        """Only a TokenManager or an AsyncTokenManager will do."""
        with pytest.raises(ConfigurationError, match="TokenManager"):
            lib.auth("mt_not_a_manager")

    def test_auth_flow_is_not_used(self, lib: Lib, manager: TokenManager) -> None:
        """The generic ``auth_flow`` refuses: only the sync and async flows may wait for a mint."""
        flow = lib.auth(manager).auth_flow(lib.mod.Request("GET", f"{SERVICE}/a"))
        with pytest.raises(RuntimeError, match="sync_auth_flow"):
            next(flow)

    def test_httpx2_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without httpx2, importing ``m2m_agent.httpx2`` says which extra to install."""
        monkeypatch.setitem(sys.modules, "httpx2", None)  # makes ``import httpx2`` fail
        monkeypatch.delitem(sys.modules, "m2m_agent.httpx2", raising=False)
        with pytest.raises(ImportError, match=r"pip install 'm2m-agent\[httpx2\]'"):
            importlib.import_module("m2m_agent.httpx2")


# -- the flows driven by hand: no client, no network -------------------------------------------


class TestFlowByHand:
    def test_sync_flow_does_no_io_with_a_cached_token(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """With a token cached, the flow only sets a header: the Backend API sees nothing."""
        token = manager.get_token()
        emulator.inject(Fault(drop=True))  # any call to the API would now fail
        before = api_requests(emulator)
        auth = lib.auth(manager)
        request = lib.mod.Request("GET", f"{SERVICE}/a")
        flow = auth.sync_auth_flow(request)
        sent = next(flow)
        assert sent is request
        assert sent.headers["Authorization"] == f"Bearer {token}"
        with pytest.raises(StopIteration):
            flow.send(lib.mod.Response(200, request=request))
        assert api_requests(emulator) == before

    def test_sync_flow_replays_on_401(
        self, lib: Lib, manager: TokenManager, emulator: Emulator
    ) -> None:
        """A 401 sent into the flow yields the same request with a new token, then stops."""
        first = manager.get_token()
        auth = lib.auth(manager)
        request = lib.mod.Request("POST", f"{SERVICE}/a", content=b"payload")
        flow = auth.sync_auth_flow(request)
        next(flow)
        replay = flow.send(lib.mod.Response(401, request=request))
        assert replay is request
        assert replay.headers["Authorization"] != f"Bearer {first}"
        assert replay.headers["Authorization"] == f"Bearer {manager.get_token()}"
        with pytest.raises(StopIteration):
            flow.send(lib.mod.Response(401, request=request))
        assert emulator.counters.mints == 2

    def test_sync_flow_streaming_body_read_by_transport(
        self, lib: Lib, manager: TokenManager
    ) -> None:
        """A streamed body stays non-replayable even if the transport read it into memory."""
        manager.get_token()
        request = lib.mod.Request("POST", f"{SERVICE}/a", content=iter([b"a", b"b"]))
        flow = lib.auth(manager).sync_auth_flow(request)
        next(flow)
        request.read()  # what MockTransport (not a network transport) does while sending
        with pytest.raises(StopIteration):
            flow.send(lib.mod.Response(401, request=request))

    @pytest.mark.anyio
    async def test_async_flow_does_no_io_with_a_cached_token(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """With a token cached, the async flow only sets a header: the API sees nothing."""
        token = await async_manager.get_token()
        emulator.inject(Fault(drop=True))
        before = api_requests(emulator)
        auth = lib.auth(async_manager)
        request = lib.mod.Request("GET", f"{SERVICE}/a")
        flow = auth.async_auth_flow(request)
        sent = await flow.__anext__()
        assert sent is request
        assert sent.headers["Authorization"] == f"Bearer {token}"
        with pytest.raises(StopAsyncIteration):
            await flow.asend(lib.mod.Response(200, request=request))
        assert api_requests(emulator) == before

    @pytest.mark.anyio
    async def test_async_flow_replays_on_401(
        self, lib: Lib, async_manager: AsyncTokenManager, emulator: Emulator
    ) -> None:
        """A 401 sent into the async flow yields the request with a new token, then stops."""
        first = await async_manager.get_token()
        request = lib.mod.Request("GET", f"{SERVICE}/a")
        flow = lib.auth(async_manager).async_auth_flow(request)
        await flow.__anext__()
        replay = await flow.asend(lib.mod.Response(401, request=request))
        assert replay.headers["Authorization"] == f"Bearer {await async_manager.get_token()}"
        assert replay.headers["Authorization"] != f"Bearer {first}"
        with pytest.raises(StopAsyncIteration):
            await flow.asend(lib.mod.Response(401, request=request))
        assert emulator.counters.mints == 2


class TestRejectedNewToken:
    def test_a_fresh_token_rejected_by_the_target_is_not_re_minted(self, emulator, worker):
        """With the default policy a token younger than min_invalidate_age survives a 401: a
        target that rejects every token costs no mint per request."""
        http = httpx.Client(transport=emulator.transport())
        client = ClerkM2MClient(worker.secret_key, api_url=API_URL, http_client=http)
        manager = TokenManager(client=client, lifetime=60)
        target = httpx.MockTransport(lambda request: httpx.Response(401))
        with httpx.Client(transport=target, auth=M2MAuth(manager)) as service:
            for _ in range(10):
                assert service.post("https://svc.test/x", json={}).status_code == 401
        assert emulator.counters.mints == 1
        manager.close()

    def test_a_non_replayable_401_still_drops_the_token(self, manager, emulator):
        """A streaming upload is not replayed, but the rejected token is not used again."""
        seen: list[str] = []

        def target(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["authorization"])
            return httpx.Response(401 if len(seen) == 1 else 200)

        with httpx.Client(transport=httpx.MockTransport(target), auth=M2MAuth(manager)) as c:
            assert c.post("https://svc.test/x", content=iter([b"a"])).status_code == 401
            assert c.get("https://svc.test/y").status_code == 200
        assert seen[0] != seen[1]
        assert emulator.counters.mints == 2
