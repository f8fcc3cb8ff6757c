"""Managers across processes, event loops and clocks: fork, successive asyncio.run(), threads
with their own loops, trio, wall-clock jumps; and no secret anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import structlog
import time_machine
import trio

from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    M2MAuth,
    TokenManager,
    TokenState,
    TokenUnavailableError,
)
from m2m_agent.emulator import Emulator, EmulatorServer, Fault, Machine

from .conftest import FAST, async_client, in_child, sync_client

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def server(emulator: Emulator) -> Iterator[EmulatorServer]:
    with emulator.serve() as server:
        yield server


@fork_only
@pytest.mark.integration
class TestFork:
    def test_child_reuses_the_parents_token_and_never_revokes_it(self, emulator, worker, server):
        manager = TokenManager(
            machine_secret_key=worker.secret_key, api_url=server.url, refresh=FAST
        )
        token = manager.get_token()
        token_id = manager.statistics().token_id

        def child() -> dict[str, Any]:
            started = time.monotonic()
            got = manager.get_token()
            elapsed = time.monotonic() - started
            forks = manager.statistics().forks
            manager.close()  # revoke_on_close, but the token is shared with the parent
            return {"same": got == token, "elapsed": elapsed, "forks": forks}

        result = in_child(child)
        assert result["same"]
        assert result["elapsed"] < 1.0
        assert result["forks"] == 1
        assert token_id in {t.id for t in emulator.tokens if not t.revoked}
        assert manager.get_token() == token
        manager.close()
        # The parent forked after minting, so the token is shared now: not revoked either.
        assert token_id in {t.id for t in emulator.tokens if not t.revoked}

    def test_fork_during_a_mint_does_not_deadlock_the_child(self, emulator, worker, server):
        """A mint in flight in the parent (its thread does not survive the fork): the child
        starts its own and gets a token within a second or two."""
        emulator.inject(Fault(latency=0.6, times=1, endpoints=frozenset({"create"})))
        manager = TokenManager(
            machine_secret_key=worker.secret_key, api_url=server.url, refresh=FAST
        )
        parent = threading.Thread(target=manager.get_token)
        parent.start()
        time.sleep(0.2)
        assert manager.statistics().refresh_in_flight

        def child() -> dict[str, Any]:
            started = time.monotonic()
            manager.get_token()
            return {"elapsed": time.monotonic() - started}

        result = in_child(child)
        assert result["elapsed"] < 2.0
        parent.join(5)
        assert manager.get_token()
        manager.close()

    def test_entered_manager_restarts_its_refresher_in_the_child(self, emulator, worker, server):
        manager = TokenManager(
            machine_secret_key=worker.secret_key,
            api_url=server.url,
            lifetime=1.0,
            refresh=FAST,
        )
        with manager:
            manager.get_token()

            def child() -> dict[str, Any]:
                manager.get_token()
                time.sleep(1.5)  # the refresher must keep the token fresh without callers
                stats = manager.statistics()
                return {"mints": stats.mints, "state": stats.token_state.value}

            result = in_child(child)
        assert result["mints"] >= 2
        assert result["state"] != TokenState.UNUSABLE.value


@pytest.mark.integration
class TestManyLoops:
    def test_successive_asyncio_runs_and_trio(self, emulator, worker, server):
        """A module-level AsyncTokenManager keeps working across asyncio.run() calls and trio."""
        manager = AsyncTokenManager(
            machine_secret_key=worker.secret_key, api_url=server.url, refresh=FAST
        )
        first = asyncio.run(manager.get_token())
        assert asyncio.run(manager.get_token()) == first
        manager.invalidate(first)
        second = asyncio.run(manager.get_token())
        assert second != first
        assert trio.run(manager.get_token) == second
        manager.invalidate(second)
        third = trio.run(manager.get_token)
        assert third not in (first, second)
        assert asyncio.run(manager.get_token()) == third
        assert emulator.counters.mints == 3
        asyncio.run(manager.aclose())

    def test_threads_with_their_own_loops_share_one_mint(self, emulator, worker):
        emulator.inject(Fault(latency=0.3, times=1, endpoints=frozenset({"create"})))
        manager = AsyncTokenManager(client=async_client(emulator, worker), refresh=FAST)
        results: list[str] = []
        barrier = threading.Barrier(6)

        def run(backend: str) -> None:
            barrier.wait()
            results.append(anyio.run(manager.get_token, backend=backend))

        threads = [
            threading.Thread(target=run, args=("trio" if i % 2 else "asyncio",)) for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 6
        assert len(set(results)) == 1
        assert emulator.counters.mints == 1

    def test_flight_abandoned_by_a_finished_loop_is_restarted(self, emulator, worker):
        """asyncio.run() returns while a mint is in flight: the next loop starts a new one."""
        emulator.inject(Fault(latency=0.5, times=1, endpoints=frozenset({"create"})))
        manager = AsyncTokenManager(client=async_client(emulator, worker), refresh=FAST)

        async def give_up_early() -> None:
            with anyio.move_on_after(0.05):
                await manager.get_token()

        asyncio.run(give_up_early())
        assert not manager.statistics().refresh_in_flight
        assert asyncio.run(manager.get_token())


class TestClock:
    @pytest.mark.parametrize("jump", [86400, -86400])
    def test_wall_clock_jump_changes_nothing(self, worker, jump):
        """Expiry runs on the monotonic clock: jumping the wall clock a day either way neither
        expires the token early nor keeps it late."""
        start = time.time()
        base = time.monotonic()
        emulator = Emulator(clock=lambda: start + time.monotonic() - base)
        machine = emulator.create_machine("worker")
        manager = TokenManager(client=sync_client(emulator, machine), lifetime=60, refresh=FAST)
        token = manager.get_token()
        with time_machine.travel(time.time() + jump, tick=True):
            assert manager.get_token() == token
            stats = manager.statistics()
            assert stats.token_state is TokenState.FRESH
            assert 55 < (stats.seconds_to_expiry or 0) <= 60
        assert emulator.counters.mints == 1


class TestSecrets:
    @pytest.mark.anyio
    async def test_no_secret_in_logs_reprs_or_errors(self, emulator, worker):
        """Across mint, failure, rotation, invalidation, 401 replay and close, neither the
        machine key nor any token string appears in a log event, repr or error."""
        manager = AsyncTokenManager(
            client=async_client(emulator, worker), lifetime=60, refresh=FAST
        )
        texts: list[str] = [repr(manager)]

        def service(request: httpx.Request) -> httpx.Response:
            return httpx.Response(401 if len(texts) < 3 else 200)

        with structlog.testing.capture_logs() as logs:
            async with httpx.AsyncClient(
                transport=httpx.MockTransport(service), auth=M2MAuth(manager)
            ) as http:
                texts.append(repr(await http.get("https://service.test/")))
                texts.append(repr(await http.get("https://service.test/")))
            emulator.inject(Fault(status=503, endpoints=frozenset({"create"})))
            manager.invalidate(await manager.get_token())
            with pytest.raises(TokenUnavailableError) as info:
                await manager.get_token()
            texts += [str(info.value), repr(info.value), repr(info.value.__cause__)]
            texts.append(repr(manager.statistics()))
            emulator.clear_faults()
            await manager.aclose()
        texts += [json.dumps(event, default=repr) for event in logs]
        secrets = [worker.secret_key] + [t.token for t in emulator.tokens]
        assert len(secrets) >= 3
        for text in texts:
            for secret in secrets:
                assert secret not in text
        events = {e["event"] for e in logs}
        assert {"m2m_agent.token.minted", "m2m_agent.token.refresh_failed"} <= events
        assert "m2m_agent.token.invalidated" in events


def test_sync_client_in_async_manager_is_refused(emulator: Emulator, worker: Machine) -> None:
    from m2m_agent import ConfigurationError

    with pytest.raises(ConfigurationError):
        TokenManager(client=AsyncClerkM2MClient(worker.secret_key))  # type: ignore[arg-type]


@fork_only
class TestForkRegressions:
    def test_store_locks_held_by_a_parent_thread_do_not_hang_the_child(self, tmp_path):
        from m2m_agent.stores import FileStore, MemoryStore

        from .test_stores import sample

        for store in (FileStore(tmp_path / "tokens.json"), MemoryStore()):
            lock = store._mutex if isinstance(store, FileStore) else store._lock
            held, release = threading.Event(), threading.Event()

            def hold(lock: Any, held: threading.Event, release: threading.Event) -> None:
                with lock:
                    held.set()
                    release.wait(5)

            holder = threading.Thread(target=hold, args=(lock, held, release))
            holder.start()
            held.wait(5)
            try:

                def child(store: Any = store) -> dict[str, Any]:
                    store.save("k", sample())
                    return {"ok": store.load("k") is not None}

                assert in_child(child, timeout=5)["ok"]
            finally:
                release.set()
                holder.join(5)

    def test_managers_created_during_a_fork_leave_no_lock_held(self):
        key = "ak_test_" + "0" * 32
        keep = [
            TokenManager(machine_secret_key=key, api_url="http://127.0.0.1:9") for _ in range(5)
        ]
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                keep.append(TokenManager(machine_secret_key=key, api_url="http://127.0.0.1:9"))
                del keep[20:]

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            for _ in range(40):
                pid = os.fork()
                if pid == 0:  # pragma: no cover - child
                    os._exit(0)
                os.waitpid(pid, 0)
        finally:
            stop.set()
            thread.join(5)
        assert not [m for m in keep if m._lock.locked()]

    def test_a_forked_child_never_uses_the_parents_connections(self, emulator, worker, server):
        from m2m_agent import ClerkM2MClient

        client = ClerkM2MClient(worker.secret_key, api_url=server.url)
        client.create_token()
        parent_http = id(client._http_client())

        def child() -> dict[str, Any]:
            client.create_token()
            return {"same": id(client._http_client()) == parent_http}

        assert in_child(child)["same"] is False
        assert id(client._http_client()) == parent_http
        client.close()
