"""Cancellation and shutdown: callers and the refresher cancelled at random points, interrupts
in sync callers, SIGTERM to a process holding an entered manager, close() during a mint.

After each: no lock left held (the next ``get_token`` answers at once), no task or thread left
behind, and revocation on close still attempted within its timeout (the emulator counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    RefreshPolicy,
    TokenManager,
    TokenUnavailableError,
)
from m2m_agent.emulator import Emulator, Fault

from .conftest import FAST, async_client, sync_client

CREATE = frozenset({"create"})
REVOKE = frozenset({"revoke"})


def m2m_tasks() -> list[Any]:
    """Pending asyncio tasks running m2m_agent code (the flight and refresher tasks)."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "m2m_agent" in task.get_coro().cr_code.co_filename
    ]


def living_tasks() -> int:
    """Tasks alive on the current event loop (trio counts its system tasks too)."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_statistics().tasks_living
    return len([t for t in asyncio.all_tasks() if not t.done()])


def live_ids(emulator: Emulator, subject: str | None = None) -> set[str]:
    now = time.time()
    return {
        t.id
        for t in emulator.tokens
        if not t.revoked
        and (t.expires_at is None or t.expires_at > now)
        and (subject is None or t.subject == subject)
    }


async def settled(manager: Any) -> None:
    """Wait until no mint is in flight (a mint started before close ends on its own)."""
    with anyio.fail_after(2.0):
        while manager.statistics().refresh_in_flight:  # noqa: ASYNC110 - polling a snapshot
            await anyio.sleep(0.01)


def lock_is_free(manager: Any) -> bool:
    if manager._lock.acquire(blocking=False):
        manager._lock.release()
        return True
    return False


@pytest.mark.anyio
class TestAsyncCancellation:
    async def test_callers_cancelled_at_random_points(self, anyio_backend):
        """200 rounds: a few callers in a cancel scope that fires at a random moment, while
        mints (slow, sometimes failing) and invalidations happen. The manager stays usable."""
        rng = random.Random(1234)
        emulator = Emulator(seed=1234)
        machine = emulator.create_machine()
        emulator.inject(Fault(latency=0.03, probability=0.7, endpoints=CREATE))
        emulator.inject(Fault(status=503, probability=0.2, endpoints=CREATE))
        manager = AsyncTokenManager(client=async_client(emulator, machine), refresh=FAST)
        baseline = living_tasks()
        cancelled = 0
        for round_ in range(200):
            with anyio.move_on_after(rng.uniform(0, 0.04)) as scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(rng.randint(1, 4)):
                        tg.start_soon(manager.get_token)
            cancelled += scope.cancelled_caught
            assert lock_is_free(manager), f"lock held after round {round_}"
            if rng.random() < 0.3:
                manager.invalidate(await manager.get_token())
            if round_ % 20 == 19:
                with anyio.fail_after(0.03 + 1.0):  # one slow mint, a retry or two
                    assert await manager.get_token()
        assert cancelled >= 40, "the cancel scopes rarely fired: the test proves little"
        # The shared mint was never cancelled with its callers: the API saw no abandoned flights.
        stats = manager.statistics()
        assert stats.mints == emulator.counters.mints
        await settled(manager)
        await manager.aclose()
        assert living_tasks() <= baseline
        if anyio_backend == "asyncio":
            assert m2m_tasks() == []
        assert live_ids(emulator) == set(), "close revokes the current and rotated tokens"

    async def test_refresher_stopped_at_random_points(self, anyio_backend):
        """20 entered managers, each left (``async with`` exits, aclose cancels the refresher)
        at a random moment: during the first mint, a refresh, a revocation, or idle. (Leaving
        it by cancellation: test_cancelled_owner_still_revokes_within_the_timeout.)"""
        rng = random.Random(99)
        emulator = Emulator(seed=99)
        emulator.inject(Fault(latency=0.05, probability=0.5, endpoints=CREATE))
        emulator.inject(Fault(latency=0.05, probability=0.5, endpoints=REVOKE))
        policy = RefreshPolicy(
            refresh_at=0.3,
            jitter=0.0,
            wait_timeout=1.0,
            initial_backoff=0.02,
            max_backoff=0.1,
            rotation_grace=0.05,
        )
        baseline = living_tasks()
        late = 0
        for round_ in range(20):
            machine = emulator.create_machine(f"worker-{round_}")
            manager = AsyncTokenManager(
                client=async_client(emulator, machine), lifetime=0.6, refresh=policy
            )
            async with manager:
                await anyio.sleep(rng.uniform(0, 0.25))
            assert lock_is_free(manager)
            # Nothing may still run after close (see TestCloseDuringAMint).
            await settled(manager)
            if manager.statistics().token_id is not None:
                late += 1  # a token installed into a closed manager (was a bug)
                continue
            with anyio.fail_after(0.1), pytest.raises(TokenUnavailableError):
                await manager.get_token()  # closed: fails at once, never waits
            assert live_ids(emulator, machine.id) == set(), f"round {round_}: not revoked"
        await anyio.sleep(0.1)
        assert living_tasks() <= baseline, "a refresher or flight task outlived its manager"
        if anyio_backend == "asyncio":
            assert m2m_tasks() == []
        assert late == 0, f"{late} of 20 closes let a mint install a token afterwards"

    @pytest.mark.parametrize("revoke_latency", [0.2, 3.0])
    async def test_cancelled_owner_still_revokes_within_the_timeout(
        self, anyio_backend, revoke_latency, monkeypatch
    ):
        """The scope around ``async with manager`` is cancelled: aclose still sends the
        revocation (shielded), and gives up after REVOKE_TIMEOUT if the API is slow."""
        import m2m_agent._async_manager as driver

        monkeypatch.setattr(driver, "REVOKE_TIMEOUT", 1.0)
        emulator = Emulator(seed=5)
        machine = emulator.create_machine()
        manager = AsyncTokenManager(client=async_client(emulator, machine), refresh=FAST)
        emulator.inject(Fault(latency=revoke_latency, endpoints=REVOKE))
        with anyio.move_on_after(0.3) as scope:
            async with manager:
                token_id = (await manager.get_token(), manager.statistics().token_id)[1]
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        elapsed = anyio.current_time() - scope.deadline
        assert emulator.counters.requests["revoke"] == 1, "revocation attempted"
        if revoke_latency < 1.0:
            assert token_id not in live_ids(emulator)
            assert manager.statistics().revocations == 1
        assert elapsed < 1.0 + 0.5, f"aclose took {elapsed:.2f}s past the cancellation"


class TestCloseDuringAMint:
    @pytest.mark.parametrize("face", ["sync", "async"])
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    @pytest.mark.anyio
    async def test_close_while_minting(self, anyio_backend, face):
        emulator = Emulator(seed=2)
        machine = emulator.create_machine()
        emulator.inject(Fault(latency=0.5, times=1, endpoints=CREATE))
        if face == "sync":
            manager: Any = TokenManager(client=sync_client(emulator, machine), refresh=FAST)

            def caller() -> None:
                with contextlib.suppress(TokenUnavailableError):  # closed under it: fine
                    manager.get_token()

            threading.Thread(target=caller, daemon=True).start()
            await anyio.sleep(0.1)
            assert manager.statistics().refresh_in_flight
            await anyio.to_thread.run_sync(manager.close)
            leftovers: list[Any] = []
        else:
            manager = AsyncTokenManager(client=async_client(emulator, machine), refresh=FAST)
            with anyio.move_on_after(0.1):
                await manager.get_token()
            assert manager.statistics().refresh_in_flight
            await manager.aclose()
            leftovers = m2m_tasks()
        await anyio.sleep(0.8)  # the mint's answer arrives after close
        assert leftovers == [], "a task of the manager outlived aclose()"
        assert live_ids(emulator) == set(), "a token minted by a closed manager is still live"


class SlowRevokes(httpx.AsyncBaseTransport):
    """Revocations take 0.3 s on the wire before the API sees them."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/revoke"):
            await anyio.sleep(0.3)
        return await self._inner.handle_async_request(request)


class TestCloseDuringARevocation:
    @pytest.mark.anyio
    async def test_aclose_while_the_refresher_revokes(self, anyio_backend):
        emulator = Emulator(seed=4)
        machine = emulator.create_machine()
        policy = RefreshPolicy(
            refresh_at=0.25,
            jitter=0.0,
            rotation_grace=0.1,
            wait_timeout=1.0,
            initial_backoff=0.02,
            max_backoff=0.1,
        )
        client = AsyncClerkM2MClient(
            machine.secret_key,
            api_url="https://api.clerk.test",
            http_client=httpx.AsyncClient(transport=SlowRevokes(emulator.async_transport())),
        )
        manager = AsyncTokenManager(client=client, lifetime=2.0, refresh=policy)
        async with manager:
            await manager.get_token()
            first = manager.statistics().token_id
            await anyio.sleep(0.75)  # rotated at 0.5 s; the refresher revokes `first` from 0.6 s
            assert manager.statistics().token_id != first
        revoked = {t.id for t in emulator.tokens if t.revoked}
        assert first in revoked, "the rotated-out token was never revoked (it lives on)"


class TestSyncClose:
    def test_entered_manager_leaves_no_thread(self, emulator, worker):
        """Entered, rotating, closed: the refresher and every mint thread are gone after close."""
        baseline = {t.ident for t in threading.enumerate()}
        policy = RefreshPolicy(
            refresh_at=0.3,
            jitter=0.0,
            wait_timeout=1.0,
            rotation_grace=0.05,
            initial_backoff=0.02,
            max_backoff=0.1,
        )
        manager = TokenManager(client=sync_client(emulator, worker), lifetime=0.6, refresh=policy)
        with manager:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                manager.get_token()
                time.sleep(0.01)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            extra = [t for t in threading.enumerate() if t.ident not in baseline]
            if not extra:
                break
            time.sleep(0.01)
        assert extra == []
        stats = manager.statistics()
        assert stats.mints >= 3
        assert stats.revocations == stats.mints
        assert live_ids(emulator) == set()

    def test_close_is_bounded_by_the_revoke_timeout(self, emulator, worker, monkeypatch):
        import m2m_agent._sync_manager as driver

        monkeypatch.setattr(driver, "REVOKE_TIMEOUT", 0.3)
        manager = TokenManager(client=sync_client(emulator, worker), refresh=FAST)
        manager.get_token()
        emulator.inject(Fault(latency=1.2, endpoints=REVOKE))
        started = time.monotonic()
        manager.close()
        assert emulator.counters.requests["revoke"] == 1
        assert time.monotonic() - started < 0.3 + 0.4


# --- other processes -----------------------------------------------------------------------------

INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import json, random, signal, sys, threading, time, _thread
    import httpx
    from m2m_agent import ClerkM2MClient, RefreshPolicy, TokenManager
    from m2m_agent.emulator import Emulator, Fault

    seed, duration = int(sys.argv[1]), float(sys.argv[2])
    rng = random.Random(seed)
    emulator = Emulator(seed=seed)
    machine = emulator.create_machine()
    emulator.inject(Fault(latency=0.01, probability=0.5, endpoints=frozenset({"create"})))
    emulator.inject(Fault(status=503, probability=0.2, endpoints=frozenset({"create"})))
    policy = RefreshPolicy(wait_timeout=2.0, initial_backoff=0.005, max_backoff=0.02,
                           rotation_grace=0.01, jitter=0.0, min_invalidate_age=0.0)
    baseline = threading.active_count()
    http = httpx.Client(transport=emulator.transport())
    client = ClerkM2MClient(machine.secret_key, api_url="https://api.clerk.test", http_client=http)
    manager = TokenManager(client=client, lifetime=60, refresh=policy)

    # Ctrl-C, simulated: interrupt_main() makes SIGINT's handler run in the main thread at its
    # next bytecode. The handler raises KeyboardInterrupt only while the main thread is inside
    # the library calls below (armed), once per arming, so the loop itself always survives.
    armed = [False]
    def on_sigint(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_sigint)
    stop = threading.Event()
    def interrupter():
        while not stop.is_set():
            time.sleep(rng.uniform(0, 0.004))
            _thread.interrupt_main()
    helper = threading.Thread(target=interrupter, daemon=True)
    helper.start()
    interrupts = completed = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        try:
            armed[0] = True
            token = manager.get_token()
            manager.invalidate(token)   # the next call mints again: interrupts hit mint starts
            armed[0] = False
            completed += 1
        except KeyboardInterrupt:
            interrupts += 1
    armed[0] = False
    stop.set()
    helper.join()
    time.sleep(0.05)

    lock_free = manager._lock.acquire(timeout=1.0)
    if lock_free:
        manager._lock.release()
    settle = time.monotonic() + 2.5
    while manager.statistics().refresh_in_flight and time.monotonic() < settle:
        time.sleep(0.01)
    stuck_flight = manager.statistics().refresh_in_flight
    started = time.monotonic()
    try:
        manager.get_token()
        ok = True
    except Exception as exc:
        ok = repr(exc)
    get_token_s = time.monotonic() - started
    manager.close()
    settle = time.monotonic() + 2.0
    while threading.active_count() > baseline and time.monotonic() < settle:
        time.sleep(0.01)
    now = time.time()
    live = [t.id for t in emulator.tokens if not t.revoked and t.expires_at > now]
    print(json.dumps({
        "interrupts": interrupts, "completed": completed, "lock_free": lock_free,
        "stuck_flight": stuck_flight, "get_token_ok": ok, "get_token_s": get_token_s,
        "threads_before": baseline, "threads_after": threading.active_count(),
        "mints": manager.statistics().mints, "live_tokens": len(live),
    }))
    """
)


def run_script(script: str, *args: str, timeout: float = 30) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.integration
class TestInterrupts:
    def test_ctrl_c_at_random_points_in_a_sync_caller(self):
        """~200 simulated Ctrl-C's land at random points of get_token/invalidate in the main
        thread (mints started and restarted all the time): afterwards the lock is free, no
        flight is stuck, get_token answers at once, close() leaves no thread and no token."""
        report = run_script(INTERRUPT_SCRIPT, "7", "2.0")
        assert report["interrupts"] >= 100, report
        assert report["completed"] >= 50, report
        assert report["lock_free"], report
        assert not report["stuck_flight"], report
        assert report["get_token_ok"] is True, report
        assert report["get_token_s"] < 1.0, report
        assert report["threads_after"] == report["threads_before"], report
        assert report["live_tokens"] == 0, report


SIGTERM_SYNC = textwrap.dedent(
    """
    import signal, sys, threading, time
    from m2m_agent import RefreshPolicy, TokenManager

    def on_sigterm(signum, frame):
        raise SystemExit(143)  # unwinds the with-block: close() revokes
    signal.signal(signal.SIGTERM, on_sigterm)
    baseline = threading.active_count()
    policy = RefreshPolicy(refresh_at=0.5, jitter=0.0, rotation_grace=0.1, wait_timeout=2.0)
    try:
        with TokenManager(machine_secret_key=sys.argv[1], api_url=sys.argv[2], lifetime=2.0,
                          refresh=policy) as manager:
            manager.get_token()
            print("READY", flush=True)
            while True:
                manager.get_token()
                time.sleep(0.005)
    finally:
        time.sleep(0.05)
        print("THREADS", baseline, threading.active_count(), flush=True)
    """
)

SIGTERM_ASYNC = textwrap.dedent(
    """
    import signal, sys, threading
    import anyio
    from m2m_agent import AsyncTokenManager, RefreshPolicy

    async def main():
        policy = RefreshPolicy(refresh_at=0.5, jitter=0.0, rotation_grace=0.1, wait_timeout=2.0)
        manager = AsyncTokenManager(machine_secret_key=sys.argv[1], api_url=sys.argv[2],
                                    lifetime=2.0, refresh=policy)
        async with manager:
            async with anyio.create_task_group() as tg:
                async def on_sigterm():
                    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                        async for _ in signals:
                            tg.cancel_scope.cancel()
                tg.start_soon(on_sigterm)
                await manager.get_token()
                print("READY", flush=True)
                while True:
                    await manager.get_token()
                    await anyio.sleep(0.005)
        print("CLOSED", flush=True)

    anyio.run(main, backend=sys.argv[3])
    """
)


@pytest.mark.integration
class TestSigterm:
    @pytest.mark.parametrize(
        ("script", "backend", "code"),
        [(SIGTERM_SYNC, "-", 143), (SIGTERM_ASYNC, "asyncio", 0), (SIGTERM_ASYNC, "trio", 0)],
        ids=["sync", "asyncio", "trio"],
    )
    @pytest.mark.parametrize("revoke_latency", [0.0, 0.3])
    def test_sigterm_revokes_on_the_way_out(self, script, backend, code, revoke_latency):
        """SIGTERM at a random moment of a process with an entered manager (rotating every
        second; revocation answered at once or slowly): it exits promptly, and its current
        token is revoked (the emulator saw it)."""
        emulator = Emulator(seed=3)
        machine = emulator.create_machine()
        if revoke_latency:
            emulator.inject(Fault(latency=revoke_latency, endpoints=REVOKE))
        rng = random.Random(hash((backend, revoke_latency)) & 0xFFFF)
        with (
            emulator.serve() as server,
            subprocess.Popen(
                [sys.executable, "-c", script, machine.secret_key, server.url, backend],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ) as process,
        ):
            assert process.stdout is not None
            for _ in range(1000):  # structlog's default logger prints to stdout too
                if process.stdout.readline().strip() == "READY":
                    break
            time.sleep(rng.uniform(0.1, 0.8))
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            out, err = process.communicate(timeout=10)
            elapsed = time.monotonic() - sent
        assert process.returncode == code, err[-2000:]
        assert elapsed < 5.0 + 1.0, f"exit took {elapsed:.2f}s"
        assert emulator.counters.requests["revoke"] >= 1
        assert live_ids(emulator) == set(), "the current token outlived the process"
        if script is SIGTERM_SYNC:
            threads = out.split("THREADS")[-1].split()
            assert threads[0] == threads[1], f"threads before/after close: {threads}"
        else:
            assert "CLOSED" in out
