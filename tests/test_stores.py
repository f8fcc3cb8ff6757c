"""Token stores: the contract of each store, and fleets of real processes sharing one token
through a FileStore or the real Redis on 127.0.0.1:6379 (one mint per rotation)."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from m2m_agent import ConfigurationError, M2MAuth, StoreError, TokenManager
from m2m_agent.emulator import Emulator, EmulatorServer, Machine
from m2m_agent.stores import FileStore, MemoryStore, RedisStore, StoredToken, TokenStore
from m2m_agent.stores._base import store_key

from .conftest import FAST, sync_client

REDIS_URL = "redis://127.0.0.1:6379/15"


def redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
    except Exception:
        return False
    return True


needs_redis = pytest.mark.skipif(not redis_available(), reason="Redis not on 127.0.0.1:6379")


def sample(**overrides: Any) -> StoredToken:
    fields: dict[str, Any] = {
        "id": "mt_" + "a" * 32,
        "subject": "mch_" + "b" * 27,
        "secret": "mt_secretsecretsecret",
        "format": "opaque",
        "obtained_at": time.time(),
        "lifetime": 60.0,
    }
    fields.update(overrides)
    return StoredToken(**fields)


@pytest.fixture
def redis_store() -> Iterator[RedisStore]:
    if not redis_available():
        pytest.skip("Redis not on 127.0.0.1:6379")
    store = RedisStore(REDIS_URL, prefix=f"test-{secrets.token_hex(4)}:")
    yield store
    store.close()


@pytest.fixture(params=["memory", "file", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> TokenStore:
    if request.param == "memory":
        return MemoryStore()
    if request.param == "file":
        return FileStore(tmp_path / "tokens.json")
    return request.getfixturevalue("redis_store")  # type: ignore[no-any-return]


class TestStoreContract:
    def test_save_load_round_trip(self, any_store):
        assert any_store.load("k") is None
        token = sample()
        any_store.save("k", token)
        assert any_store.load("k") == token
        assert any_store.load("other") is None
        newer = sample(id="mt_" + "c" * 32)
        any_store.save("k", newer)
        assert any_store.load("k") == newer

    def test_lease_is_exclusive_and_released_by_its_owner(self, any_store):
        assert any_store.acquire("k", "me", 5)
        assert not any_store.acquire("k", "you", 5)
        any_store.release("k", "you")  # not the holder: no effect
        assert not any_store.acquire("k", "you", 5)
        any_store.release("k", "me")
        assert any_store.acquire("k", "you", 5)

    @pytest.mark.anyio
    async def test_async_access(self, any_store):
        token = sample()
        await any_store.asave("k", token)
        assert await any_store.aload("k") == token
        assert await any_store.aacquire("k2", "me", 5)
        await any_store.arelease("k2", "me")

    def test_stored_token_hides_its_secret(self):
        assert "secretsecret" not in repr(sample())

    def test_corrupted_json_is_a_store_error(self):
        for text in ("{", "[]", '{"v": 2}', '{"v": 1, "id": 3}'):
            with pytest.raises(StoreError):
                StoredToken.from_json(text)

    def test_store_key_separates_what_differs_and_hides_the_key(self):
        base = {
            "api_url": "https://api.clerk.com",
            "key_fingerprint": "abc123",
            "token_format": "opaque",
            "lifetime": 3600.0,
            "claims": {"a": 1},
        }
        key = store_key(**base)
        assert key.startswith("m2m-agent:v1:")
        for name, other in [
            ("api_url", "https://api.clerk.com/v1"),
            ("key_fingerprint", "def456"),
            ("token_format", "jwt"),
            ("lifetime", 60.0),
            ("claims", {"a": 2}),
        ]:
            assert store_key(**{**base, name: other}) != key, name
        assert store_key(**{**base, "claims": {"a": 1}}) == key


class TestFileStore:
    def test_file_is_private(self, tmp_path):
        store = FileStore(tmp_path / "sub" / "tokens.json")
        store.save("k", sample())
        mode = stat.S_IMODE(os.stat(tmp_path / "sub" / "tokens.json").st_mode)
        assert mode == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) & 0o077 == 0

    def test_refuses_a_file_others_can_read(self, tmp_path):
        path = tmp_path / "tokens.json"
        FileStore(path).save("k", sample())
        path.chmod(0o644)
        with pytest.raises(ConfigurationError, match="chmod 600"):
            FileStore(path).load("k")

    def test_refuses_a_folder_others_can_write(self, tmp_path):
        folder = tmp_path / "open"
        folder.mkdir()
        folder.chmod(0o777)
        with pytest.raises(ConfigurationError, match="chmod 700"):
            FileStore(folder / "tokens.json")

    def test_corrupted_file_reads_as_empty_and_is_repaired(self, tmp_path):
        path = tmp_path / "tokens.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"{not json")
        os.close(fd)
        store = FileStore(path)
        with structlog.testing.capture_logs() as logs:
            assert store.load("k") is None
        assert any(e["event"] == "m2m_agent.store.corrupted" for e in logs)
        store.save("k", sample())
        assert store.load("k") == sample(obtained_at=store.load("k").obtained_at)  # type: ignore[union-attr]

    def test_lease_held_by_another_process_and_freed_when_it_is_killed(self, tmp_path):
        path = tmp_path / "tokens.json"
        FileStore(path)  # create the folder
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_FILE_LEASE, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            store = FileStore(path)
            assert not store.acquire("k", "me", 5)
            holder.send_signal(signal.SIGKILL)
            holder.wait(5)
            assert store.acquire("k", "me", 5)
            store.release("k", "me")
        finally:
            holder.kill()
            holder.wait(5)
            if holder.stdout:
                holder.stdout.close()


HOLD_FILE_LEASE = textwrap.dedent(
    """
    import sys, time
    from m2m_agent.stores import FileStore
    store = FileStore(sys.argv[1])
    assert store.acquire("k", "holder", 5)
    print("held", flush=True)
    time.sleep(60)
    """
)


@needs_redis
class TestRedisStore:
    def test_token_expires_with_its_ttl(self, redis_store):
        redis_store.save("k", sample(obtained_at=time.time() - 59.5, lifetime=60))
        assert redis_store.load("k") is not None
        time.sleep(0.7)
        assert redis_store.load("k") is None

    def test_an_expired_token_is_not_saved(self, redis_store):
        redis_store.save("k", sample(obtained_at=time.time() - 120, lifetime=60))
        assert redis_store.load("k") is None

    def test_lease_expires_when_its_holder_dies(self, redis_store):
        assert redis_store.acquire("k", "dead", 0.3)
        assert not redis_store.acquire("k", "me", 5)
        time.sleep(0.4)
        assert redis_store.acquire("k", "me", 5)

    def test_unreachable_redis_is_a_quick_store_error(self):
        store = RedisStore("redis://127.0.0.1:1/0", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreError, match="GET failed") as info:
            store.load("k")
        assert time.monotonic() - started < 3
        assert "127.0.0.1:1" not in str(info.value) or "redis" in str(info.value)

    def test_bad_url(self):
        with pytest.raises(ConfigurationError, match="url"):
            RedisStore("nonsense://x")


# --- managers over shared stores ---------------------------------------------------------------


@pytest.fixture
def served(emulator: Emulator) -> Iterator[EmulatorServer]:
    with emulator.serve() as server:
        yield server


class TestManagerWithSharedStore:
    def test_second_manager_adopts_instead_of_minting(self, emulator, worker, tmp_path):
        store = FileStore(tmp_path / "tokens.json")
        first = TokenManager(client=sync_client(emulator, worker), store=store, refresh=FAST)
        second = TokenManager(client=sync_client(emulator, worker), store=store, refresh=FAST)
        token = first.get_token()
        assert second.get_token() == token
        assert emulator.counters.mints == 1
        assert second.statistics().adoptions == 1
        first.close()
        second.close()
        assert emulator.counters.revocations == 0, "shared tokens are never revoked"

    def test_unreachable_redis_falls_back_to_minting(self, emulator, worker):
        store = RedisStore("redis://127.0.0.1:1/0", timeout=0.3)
        manager = TokenManager(client=sync_client(emulator, worker), store=store, refresh=FAST)
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            assert manager.get_token()
        assert time.monotonic() - started < 3
        assert any(e["event"] == "m2m_agent.store.unavailable" for e in logs)
        assert emulator.counters.mints == 1
        manager.close()

    @needs_redis
    def test_redis_data_loss_mints_then_shares_again(self, emulator, worker, redis_store):
        """A Redis restart (data gone): the next manager mints, and shares that token."""
        a = TokenManager(client=sync_client(emulator, worker), store=redis_store, refresh=FAST)
        a.get_token()
        redis_store._redis.delete(*redis_store._redis.keys(redis_store._prefix + "*"))
        b = TokenManager(client=sync_client(emulator, worker), store=redis_store, refresh=FAST)
        c = TokenManager(client=sync_client(emulator, worker), store=redis_store, refresh=FAST)
        assert b.get_token() == c.get_token()
        assert emulator.counters.mints == 2
        for m in (a, b, c):
            m.close()

    @needs_redis
    def test_lease_of_a_dead_minter_does_not_block_past_its_ttl(
        self, emulator, worker, redis_store
    ):
        manager = TokenManager(
            client=sync_client(emulator, worker), store=redis_store, refresh=FAST
        )
        key = manager._store_key
        assert redis_store.acquire(key, "dead-minter", 0.5)
        started = time.monotonic()
        assert manager.get_token()
        waited = time.monotonic() - started
        assert 0.4 <= waited < 5.0, "freed by the 0.5 s lease, far below LEASE_TTL (15 s)"
        assert emulator.counters.mints == 1
        manager.close()

    def test_token_revoked_behind_the_stores_back_recovers(self, emulator, worker, tmp_path):
        """Every process holds a token revoked at Clerk: each 401 drops it, one process mints,
        the other adopts the new one instead of the rejected one."""
        store = FileStore(tmp_path / "tokens.json")
        policy = FAST
        a = TokenManager(client=sync_client(emulator, worker), store=store, refresh=policy)
        b = TokenManager(client=sync_client(emulator, worker), store=store, refresh=policy)
        old = a.get_token()
        assert b.get_token() == old
        emulator.revoke(next(t.id for t in emulator.tokens if t.token == old))

        def target(request: httpx.Request) -> httpx.Response:
            token = request.headers["authorization"].removeprefix("Bearer ")
            live = any(t.token == token and not t.revoked for t in emulator.tokens)
            return httpx.Response(200 if live else 401)

        for manager in (a, b):
            with httpx.Client(transport=httpx.MockTransport(target), auth=M2MAuth(manager)) as http:
                assert http.post("https://svc.test/", json={}).status_code == 200
        assert a.get_token() == b.get_token() != old
        assert emulator.counters.mints == 2
        a.close()
        b.close()


FLEET_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from m2m_agent import RefreshPolicy, TokenManager
    from m2m_agent.stores import FileStore, RedisStore

    kind, where = os.environ["STORE"].split("=", 1)
    store = FileStore(where) if kind == "file" else RedisStore(
        os.environ["REDIS_URL"], prefix=where
    )
    policy = RefreshPolicy(refresh_at=0.5, jitter=0.0, margin=0.1, wait_timeout=10)
    manager = TokenManager(
        machine_secret_key=os.environ["KEY"], api_url=os.environ["URL"],
        lifetime=float(os.environ["LIFETIME"]), refresh=policy, store=store,
    )
    start_at = float(os.environ["START_AT"])
    time.sleep(max(0.0, start_at - time.time()))
    seen, calls = [], 0
    while time.time() < start_at + float(os.environ["DURATION"]):
        token = manager.get_token()
        if not seen or seen[-1] != token:
            seen.append(token)
        calls += 1
        time.sleep(0.005)
    manager.close()
    print(json.dumps({"seen": seen, "calls": calls, "mints": manager.statistics().mints}))
    """
)


def run_fleet(
    server: EmulatorServer, machine: Machine, store: str, *, processes: int = 8
) -> list[dict[str, Any]]:
    lifetime, duration = 2.0, 2.6  # rotations at about 1.0 s and 2.0 s: two rotations
    env = {
        **os.environ,
        "URL": server.url,
        "KEY": machine.secret_key,
        "STORE": store,
        "REDIS_URL": REDIS_URL,
        "LIFETIME": str(lifetime),
        "DURATION": str(duration),
        "START_AT": str(time.time() + 2.5),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FLEET_WORKER], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.integration
class TestFleet:
    def check(self, emulator: Emulator, results: list[dict[str, Any]]) -> None:
        minted = sorted(emulator.tokens, key=lambda t: t.created_at)
        assert len(minted) == emulator.counters.mints
        assert emulator.counters.mints == 3, "one initial mint and one per rotation"
        gaps = [b.created_at - a.created_at for a, b in itertools.pairwise(minted)]
        assert all(gap > 0.8 for gap in gaps), gaps
        assert sum(r["mints"] for r in results) == 3
        for result in results:
            assert result["calls"] > 50
            assert len(result["seen"]) >= 2

    def test_eight_processes_share_a_file_store(self, emulator, worker, served, tmp_path):
        results = run_fleet(served, worker, f"file={tmp_path / 'tokens.json'}")
        self.check(emulator, results)

    @needs_redis
    def test_eight_processes_share_redis(self, emulator, worker, served):
        results = run_fleet(served, worker, f"redis=fleet-{secrets.token_hex(4)}:")
        self.check(emulator, results)


@pytest.mark.integration
def test_sixty_cron_runs_mint_once(emulator, worker, served, tmp_path):
    """``m2m-agent token`` run 60 times within one lifetime: one mint, a 0600 cache file."""
    cache = tmp_path / "cache" / "tokens.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLERK_")},
        "CLERK_API_URL": served.url,
        "CLERK_MACHINE_SECRET_KEY": worker.secret_key,
    }
    tokens = set()
    for _ in range(60):
        result = subprocess.run(
            [sys.executable, "-m", "m2m_agent", "token", "--cache", str(cache)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        tokens.add(result.stdout.strip())
    assert len(tokens) == 1
    assert emulator.counters.mints == 1
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert emulator.counters.revocations == 0
