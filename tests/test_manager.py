"""Token managers against the emulator: herd, serve-stale, outage, rotation, cancellation.

Every behavioural test runs on both faces (``TokenManager`` through a worker thread,
``AsyncTokenManager`` directly) and on both anyio backends (asyncio, trio): one test, not copies.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
import structlog

from m2m_agent import (
    AsyncTokenManager,
    AuthenticationError,
    ConfigurationError,
    RefreshPolicy,
    Statistics,
    TokenManager,
    TokenState,
    TokenUnavailableError,
)
from m2m_agent.emulator import Emulator, Fault, Machine

from .conftest import FAST, async_client, sync_client

pytestmark = pytest.mark.anyio


class Face:
    """One manager behind an async interface, so a test runs unchanged on both faces."""

    def __init__(self, manager: TokenManager | AsyncTokenManager) -> None:
        self.manager = manager

    async def get_token(self) -> str:
        if isinstance(self.manager, AsyncTokenManager):
            return await self.manager.get_token()
        return await anyio.to_thread.run_sync(self.manager.get_token)

    def invalidate(self, token: str) -> bool:
        return self.manager.invalidate(token)

    def statistics(self) -> Statistics:
        return self.manager.statistics()

    async def close(self) -> None:
        if isinstance(self.manager, AsyncTokenManager):
            await self.manager.aclose()
        else:
            await anyio.to_thread.run_sync(self.manager.close)

    @asynccontextmanager
    async def entered(self) -> AsyncIterator[Face]:
        if isinstance(self.manager, AsyncTokenManager):
            async with self.manager:
                yield self
        else:
            with self.manager:
                yield self


@pytest.fixture(params=["sync", "async"])
def face_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(face_kind: str, emulator: Emulator, worker: Machine):
    """Build a manager of the face under test over the in-process emulator."""
    made: list[Face] = []

    def factory(**kwargs: Any) -> Face:
        kwargs.setdefault("refresh", FAST)
        kwargs.setdefault("lifetime", 60)
        machine = kwargs.pop("machine", worker)
        if face_kind == "sync":
            manager: Any = TokenManager(client=sync_client(emulator, machine), **kwargs)
        else:
            manager = AsyncTokenManager(client=async_client(emulator, machine), **kwargs)
        face = Face(manager)
        made.append(face)
        return face

    return factory


def live_token_ids(emulator: Emulator) -> set[str]:
    return {t.id for t in emulator.tokens if not t.revoked}


class TestGetToken:
    async def test_mints_once_and_caches(self, make, emulator):
        """The first call mints; later calls reuse the cached token without any API call."""
        face = make()
        first = await face.get_token()
        for _ in range(50):
            assert await face.get_token() == first
        assert emulator.counters.mints == 1
        stats = face.statistics()
        assert stats.mints == 1
        assert stats.token_state is TokenState.FRESH
        assert stats.token_id in live_token_ids(emulator)
        assert 55 < (stats.seconds_to_expiry or 0) <= 60

    async def test_concurrent_callers_on_empty_cache_cause_one_mint(self, make, emulator):
        """64 concurrent callers on an empty cache share one mint (threads for the sync face)."""
        emulator.inject(Fault(latency=0.2, endpoints=frozenset({"create"})))
        face = make()
        tokens: list[str] = []

        async def call() -> None:
            tokens.append(await face.get_token())

        limiter = anyio.CapacityLimiter(64)

        async def call_limited() -> None:
            if isinstance(face.manager, TokenManager):
                tokens.append(
                    await anyio.to_thread.run_sync(face.manager.get_token, limiter=limiter)
                )
            else:
                await call()

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(call_limited)
        assert len(set(tokens)) == 1
        assert len(tokens) == 64
        assert emulator.counters.mints == 1
        assert face.statistics().waits >= 1

    async def test_claims_and_format_reach_clerk(self, make, emulator):
        face = make(claims={"role": "billing"}, lifetime=120)
        await face.get_token()
        (record,) = emulator.tokens
        assert record.claims == {"role": "billing"}
        assert record.expires_at is not None
        assert record.expires_at - record.created_at == pytest.approx(120)

    async def test_jwt_format(self, make, emulator):
        face = make(token_format="jwt")
        token = await face.get_token()
        assert token.count(".") == 2
        await face.close()
        assert emulator.counters.revocations == 0, "JWTs are never sent to revoke"


class TestHerd:
    async def test_ten_thousand_async_callers_one_mint(self, emulator, worker):
        """10,000 concurrent awaits on an empty cache cause exactly one mint."""
        emulator.inject(Fault(latency=0.1, endpoints=frozenset({"create"})))
        # Scheduling 10,000 tasks takes a while on a loaded machine: the wait bound is not
        # what this test is about.
        policy = dataclasses.replace(FAST, wait_timeout=30.0)
        manager = AsyncTokenManager(client=async_client(emulator, worker), refresh=policy)
        results: list[str] = []

        async def call() -> None:
            results.append(await manager.get_token())

        async with anyio.create_task_group() as tg:
            for _ in range(10_000):
                tg.start_soon(call)
        assert len(results) == 10_000
        assert len(set(results)) == 1
        assert emulator.counters.mints == 1
        assert emulator.counters.requests["create"] == 1

    def test_sixty_four_threads_one_mint(self, emulator, worker):
        """64 threads released together on the sync manager cause exactly one mint."""
        emulator.inject(Fault(latency=0.1, endpoints=frozenset({"create"})))
        policy = dataclasses.replace(FAST, wait_timeout=30.0)
        manager = TokenManager(client=sync_client(emulator, worker), refresh=policy)
        barrier = threading.Barrier(64)
        results: list[str] = []

        def call() -> None:
            barrier.wait()
            results.append(manager.get_token())

        threads = [threading.Thread(target=call) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 64
        assert len(set(results)) == 1
        assert emulator.counters.mints == 1


class TestRefreshAhead:
    async def test_steady_stream_never_uses_a_token_under_the_margin(self, make, emulator):
        """With 1.5 s tokens and a steady stream for 4 s, every token handed out has more
        than the safety margin left by the server's own clock, and mints follow the policy."""
        policy = dataclasses.replace(FAST, refresh_at=0.6, margin=0.2)
        face = make(lifetime=1.5, refresh=policy)
        margin = 0.2 * 1.5
        seen: set[str] = set()
        worst = float("inf")
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            token = await face.get_token()
            record = next(t for t in emulator.tokens if t.token == token)
            assert record.expires_at is not None
            remaining = record.expires_at - time.time()
            worst = min(worst, remaining)
            seen.add(record.id)
            await anyio.sleep(0.01)
        assert worst > margin * 0.9, f"a token with {worst:.3f}s left was handed out"
        # Refresh at 60% of 1.5 s = every 0.9 s: about 4.4 mints in 4 s; allow slack for load.
        assert 4 <= emulator.counters.mints <= 7
        assert len(seen) == emulator.counters.mints

    async def test_slow_refresh_does_not_slow_callers(self, make, emulator):
        """While a proactive refresh takes 1.5 s, callers get the stale token at once."""
        policy = dataclasses.replace(FAST, refresh_at=0.3, margin=0.1)
        face = make(lifetime=4.0, refresh=policy)
        first = await face.get_token()
        emulator.inject(Fault(latency=1.5, endpoints=frozenset({"create"}), times=1))
        await anyio.sleep(1.3)  # past the refresh point (1.2 s), well above the margin
        slowest = 0.0
        tokens = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            tokens.add(await face.get_token())
            slowest = max(slowest, time.monotonic() - started)
            await anyio.sleep(0.01)
        assert first in tokens
        assert slowest < 0.25, f"a caller waited {slowest:.3f}s during the refresh"
        assert face.statistics().served_stale > 0
        await anyio.sleep(1.0)
        assert await face.get_token() != first
        # The new token's life counts from before its slow request: it may be stale on arrival.
        assert 2 <= emulator.counters.mints <= 3

    async def test_background_refresher_mints_ahead(self, make, emulator):
        """Entered, the manager mints on its own, before anyone asks and ahead of expiry."""
        face = make(lifetime=1.0, refresh=dataclasses.replace(FAST, refresh_at=0.5))
        async with face.entered():
            await anyio.sleep(0.3)
            assert emulator.counters.mints == 1, "minted on entry, before any get_token"
            await anyio.sleep(1.5)
            assert emulator.counters.mints >= 3
            assert face.statistics().token_state is TokenState.FRESH


class TestOutage:
    async def test_outage_shorter_than_remaining_life_is_invisible(self, make, emulator):
        """The API answers 503 for 1.5 s during the stale window: no caller sees a failure,
        and attempts are spaced by backoff (one in flight, not one per caller)."""
        policy = dataclasses.replace(FAST, refresh_at=0.2, margin=0.05, max_backoff=0.3)
        face = make(lifetime=4.0, refresh=policy)
        await face.get_token()
        await anyio.sleep(0.85)
        emulator.reset_counters()
        emulator.inject(Fault(status=503, duration=1.5, endpoints=frozenset({"create"})))
        failures = 0
        calls = 0
        deadline = time.monotonic() + 1.4

        async def caller() -> None:
            nonlocal failures, calls
            while time.monotonic() < deadline:
                try:
                    await face.get_token()
                except Exception:
                    failures += 1
                calls += 1
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(caller)
        assert failures == 0
        attempts = emulator.counters.requests["create"]
        assert 1 <= attempts <= 1.4 / 0.02, attempts  # bounded by backoff
        assert attempts < calls / 10, "attempts must not scale with callers"
        assert face.statistics().refresh_failures == attempts
        await anyio.sleep(0.6)  # the API is back: the next attempt within one backoff step
        await face.get_token()
        await anyio.sleep(0.4)
        assert face.statistics().consecutive_failures == 0
        assert emulator.counters.mints == 1

    async def test_no_token_and_api_down_fails_after_the_bounded_wait(self, make, emulator):
        """With nothing cached and the API down, the caller gets TokenUnavailableError after
        about wait_timeout, caused by the last failure; the manager recovers afterwards."""
        emulator.inject(Fault(status=503, endpoints=frozenset({"create"})))
        face = make()
        started = time.monotonic()
        with pytest.raises(TokenUnavailableError) as info:
            await face.get_token()
        waited = time.monotonic() - started
        assert 0.9 <= waited < 2.0
        assert info.value.__cause__ is not None
        assert "503" in str(info.value.__cause__)
        assert face.statistics().wait_timeouts == 1
        emulator.clear_faults()
        assert await face.get_token()

    async def test_retry_after_is_honoured(self, make, emulator):
        """A 429 with Retry-After: 1 keeps the next attempt at least ~1 s away."""
        policy = dataclasses.replace(FAST, wait_timeout=3.0, max_backoff=2.0)
        emulator.inject(Fault(status=429, retry_after=1, times=1, endpoints=frozenset({"create"})))
        face = make(refresh=policy)
        started = time.monotonic()
        await face.get_token()
        assert time.monotonic() - started >= 0.95
        assert emulator.counters.requests["create"] == 2

    async def test_fatal_error_fails_fast_without_hammering(self, emulator, make):
        """A wrong key (401) is not retried: callers fail at once, and during the backoff
        window no further request reaches the API."""
        bad = Machine(id="mch_" + "x" * 27, name="ghost", secret_key="ak_test_" + "0" * 32)
        face = make(machine=bad)
        started = time.monotonic()
        with pytest.raises(TokenUnavailableError) as info:
            await face.get_token()
        assert time.monotonic() - started < 0.5
        assert isinstance(info.value.__cause__, AuthenticationError)
        for _ in range(20):
            with pytest.raises(TokenUnavailableError):
                await face.get_token()
        assert emulator.counters.requests["create"] <= 2


class TestInvalidate:
    async def test_many_reports_of_one_token_cause_one_mint(self, make, emulator):
        face = make()
        token = await face.get_token()
        results = [face.invalidate(token) for _ in range(100)]
        assert results.count(True) == 1
        fresh = await face.get_token()
        assert fresh != token
        assert emulator.counters.mints == 2
        assert face.statistics().invalidations == 1
        assert not face.invalidate("mt_not_the_current_one")

    async def test_invalidated_token_is_revoked_after_the_grace(self, make, emulator):
        face = make()
        token = await face.get_token()
        old_id = face.statistics().token_id
        face.invalidate(token)
        await face.get_token()
        await anyio.sleep(0.2)
        face.invalidate(await face.get_token())
        await face.get_token()  # the flight revokes what is due
        revoked = {t.id for t in emulator.tokens if t.revoked}
        assert old_id in revoked


class TestRotationAndClose:
    async def test_close_revokes_the_current_opaque_token(self, make, emulator):
        face = make()
        await face.get_token()
        token_id = face.statistics().token_id
        await face.close()
        assert token_id not in live_token_ids(emulator)
        assert face.statistics().revocations == 1

    async def test_close_keeps_the_token_when_asked(self, make, emulator):
        face = make(revoke_on_close=False)
        await face.get_token()
        await face.close()
        assert emulator.counters.revocations == 0

    async def test_replaced_token_is_revoked_after_grace(self, make, emulator):
        face = make(lifetime=1.0, refresh=dataclasses.replace(FAST, refresh_at=0.3))
        async with face.entered():
            first_id = (await face.get_token(), face.statistics().token_id)[1]
            await anyio.sleep(0.7)
            assert face.statistics().token_id != first_id
            await anyio.sleep(0.6)
            assert first_id not in live_token_ids(emulator)

    async def test_revoke_failure_is_logged_not_raised(self, make, emulator):
        face = make()
        await face.get_token()
        emulator.inject(Fault(status=500, endpoints=frozenset({"revoke"})))
        with structlog.testing.capture_logs() as logs:
            await face.close()
        assert face.statistics().revocation_failures == 1
        assert any(e["event"] == "m2m_agent.token.revoke_failed" for e in logs)


class TestCancellation:
    async def test_cancelled_waiter_does_not_cancel_the_mint(self, emulator, worker):
        """Cancelling the only waiter leaves the mint running; the next caller gets its token
        at once, and no lock is left held."""
        emulator.inject(Fault(latency=0.5, endpoints=frozenset({"create"}), times=1))
        manager = AsyncTokenManager(client=async_client(emulator, worker), refresh=FAST)
        with anyio.move_on_after(0.1) as scope:
            await manager.get_token()
        assert scope.cancelled_caught
        await anyio.sleep(0.6)
        with anyio.fail_after(0.1):
            assert await manager.get_token()
        assert emulator.counters.mints == 1


class TestConfiguration:
    def test_bad_settings(self, emulator, worker):
        client = sync_client(emulator, worker)
        with pytest.raises(ConfigurationError, match="lifetime"):
            TokenManager(client=client, lifetime=0)
        with pytest.raises(ConfigurationError, match="token_format"):
            TokenManager(client=client, token_format="paseto")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="either"):
            TokenManager(client=client, machine_secret_key=worker.secret_key)
        with pytest.raises(ConfigurationError, match="AsyncClerkM2MClient"):
            AsyncTokenManager(client=client)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="refresh_at"):
            RefreshPolicy(refresh_at=0.95, margin=0.1)
        with pytest.raises(ConfigurationError, match="wait_timeout"):
            RefreshPolicy(wait_timeout=0)

    def test_statistics_are_immutable(self, emulator, worker):
        manager = TokenManager(client=sync_client(emulator, worker), refresh=FAST)
        stats = manager.statistics()
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.mints = 5  # type: ignore[misc]


class TestReviewRegressions:
    async def test_an_unsafe_store_fails_fast_with_its_cause(self, make, tmp_path):
        """A token file others can read is a configuration error: callers learn it at once,
        nothing spins."""
        import os

        from m2m_agent.stores import FileStore

        path = tmp_path / "tokens.json"
        store = FileStore(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        os.chmod(path, 0o644)
        face = make(store=store)
        started = time.monotonic()
        with pytest.raises(TokenUnavailableError) as info:
            await face.get_token()
        assert time.monotonic() - started < 0.5
        assert isinstance(info.value.__cause__, ConfigurationError)
        assert "chmod 600" in str(info.value)
        assert face.statistics().refresh_failures == 1

    async def test_the_refresher_stops_probing_after_a_fatal_error(self, emulator, make):
        bad = Machine(id="mch_" + "y" * 27, name="ghost", secret_key="ak_test_" + "1" * 32)
        face = make(machine=bad)
        async with face.entered():
            await anyio.sleep(1.5)
        assert emulator.counters.requests["create"] == 1, "a wrong key is not retried"


def test_a_rejected_mint_is_not_retried():
    from m2m_agent._policy import is_retryable
    from m2m_agent.errors import MalformedResponseError

    assert not is_retryable(MalformedResponseError("short", code="refresh_rejected"))
    assert is_retryable(MalformedResponseError("garbled", code="invalid_json"))
