"""``m2m_agent.celery``: one manager per worker process, in-process checks and real workers.

The integration tests start a real ``celery worker`` subprocess (prefork, solo and threads pools)
with Redis (database 15, keys under a prefix unique to the run) as broker and result backend. Its
tasks call a protected service: an ASGI app served by uvicorn in a thread of this process, which
accepts a bearer token only if the emulator holds it live, unexpired and unrevoked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from m2m_agent import ConfigurationError, M2MAuth, TokenManager
from m2m_agent.emulator import Emulator, Machine

from .conftest import FAST, in_child, sync_client

celery = pytest.importorskip("celery")
m2m = importlib.import_module("m2m_agent.celery")

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/15"
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


# -- in-process: the accessors, the fork reset, the signals -------------------------------------


@pytest.fixture
def configured(emulator: Emulator, worker: Machine) -> Iterator[Callable[[], TokenManager]]:
    """m2m_agent.celery set to build managers on the in-process emulator; closed afterwards."""

    def factory() -> TokenManager:
        return TokenManager(client=sync_client(emulator, worker), refresh=FAST, lifetime=600)

    m2m.configure(factory=factory)
    yield factory
    m2m.close()
    m2m.configure()


class TestAccessors:
    def test_import_without_celery_says_what_to_install(self, monkeypatch):
        """Without celery, importing the module raises ImportError naming the extra."""
        monkeypatch.setitem(sys.modules, "celery", None)
        monkeypatch.delitem(sys.modules, "m2m_agent.celery")
        with pytest.raises(ImportError, match=r"pip install 'm2m-agent\[celery\]'"):
            importlib.import_module("m2m_agent.celery")

    def test_one_manager_auth_and_client_per_process(self, configured):
        """Every thread of a process gets the same manager, auth and client."""
        seen: list[tuple[int, int, int]] = []

        def grab() -> None:
            seen.append((id(m2m.get_manager()), id(m2m.get_auth()), id(m2m.get_client(timeout=5))))

        threads = [threading.Thread(target=grab) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        assert len(seen) == 16
        assert len(set(seen)) == 1
        auth = m2m.get_auth()
        assert isinstance(auth, M2MAuth)
        assert auth.manager is m2m.get_manager()
        assert m2m.get_client(timeout=5).auth is auth

    def test_one_client_per_set_of_arguments(self, configured):
        a = m2m.get_client(base_url="http://127.0.0.1:1")
        assert m2m.get_client(base_url="http://127.0.0.1:1") is a
        b = m2m.get_client(base_url="http://127.0.0.1:2")
        assert b is not a
        with pytest.raises(TypeError, match="auth"):
            m2m.get_client(auth=None)

    def test_close_revokes_the_process_token_and_starts_afresh(self, configured, emulator):
        """close() closes the clients and the manager (which revokes its own token); the next
        get_manager() makes a new manager."""
        manager = m2m.get_manager()
        client = m2m.get_client()
        manager.get_token()
        token_id = manager.statistics().token_id
        m2m.close()
        assert client.is_closed
        assert {t.id: t.revoked for t in emulator.tokens}[token_id]
        assert m2m.get_manager() is not manager
        m2m.close()  # idempotent

    def test_worker_signals_keep_same_process_state_and_close_it_at_shutdown(self, configured):
        """worker_process_init in the same process (the solo pool) keeps the manager;
        worker_shutdown and worker_process_shutdown close it."""
        manager = m2m.get_manager()
        celery.signals.worker_process_init.send(sender=None)
        assert m2m.get_manager() is manager
        celery.signals.worker_shutdown.send(sender=None)
        assert m2m.get_manager() is not manager
        second = m2m.get_manager()
        celery.signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        assert m2m.get_manager() is not second

    def test_background_refresh_enters_the_manager(self, configured, emulator):
        """By default the manager is entered: its refresher mints with no caller asking."""
        m2m.get_manager()
        deadline = time.monotonic() + 5
        while emulator.counters.mints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emulator.counters.mints == 1

    def test_configure_rejects_what_cannot_work(self, emulator, worker):
        with pytest.raises(ConfigurationError, match="factory="):
            m2m.configure(client=sync_client(emulator, worker))
        with pytest.raises(ConfigurationError, match="not both"):
            m2m.configure(factory=TokenManager, lifetime=60)
        with pytest.raises(TypeError, match="lifetme"):
            m2m.configure(lifetme=60)
        m2m.configure(factory=lambda: "not a manager")  # type: ignore[arg-type,return-value]
        try:
            with pytest.raises(ConfigurationError, match="returned str"):
                m2m.get_manager()
        finally:
            m2m.configure()

    @fork_only
    def test_forked_child_makes_its_own_manager_and_client(self, configured):
        """A child never uses what its parent made (manager, auth, client): it makes its own,
        and the parent keeps its own."""
        parent_manager = m2m.get_manager()
        parent_client = m2m.get_client()
        parent_token = parent_manager.get_token()

        def child() -> dict[str, Any]:
            manager = m2m.get_manager()
            token = manager.get_token()
            return {
                "new_manager": manager is not parent_manager,
                "new_client": m2m.get_client() is not parent_client,
                "client_auth_is_new": m2m.get_client().auth.manager is manager,
                "forks": manager.statistics().forks,
                "new_token": token != parent_token,
            }

        assert in_child(child) == {
            "new_manager": True,
            "new_client": True,
            "client_auth_is_new": True,
            "forks": 0,
            "new_token": True,
        }
        assert m2m.get_manager() is parent_manager
        assert m2m.get_client() is parent_client
        assert parent_manager.get_token() == parent_token


# -- real workers -------------------------------------------------------------------------------


class ProtectedService:
    """An ASGI app: 200 for a live emulator token in ``Authorization: Bearer``, else 401."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.accepted = 0
        self.rejected = 0

    def live(self, token: str) -> bool:
        now = time.time()
        return any(
            record.token == token
            and not record.revoked
            and (record.expires_at is None or record.expires_at > now)
            for record in self.emulator.tokens
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode()
        ok = header.startswith("Bearer ") and self.live(header.removeprefix("Bearer "))
        if ok:
            self.accepted += 1
        else:
            self.rejected += 1
        body = b'{"ok":true}' if ok else b'{"ok":false}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        status = 200 if ok else 401
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app on loopback with uvicorn in a daemon thread; yield its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn died"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture
def redis_client() -> Iterator[Any]:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield client
    client.close()


@pytest.fixture
def run_id(redis_client: Any) -> Iterator[str]:
    """A unique id for this run; every Redis key it makes is deleted afterwards."""
    run = uuid.uuid4().hex[:12]
    yield run
    for key in redis_client.scan_iter(match=f"m2m-agent-test:{run}:*", count=1000):
        redis_client.delete(key)


@dataclasses.dataclass
class Stack:
    """The emulator and the protected service, both served on loopback TCP."""

    api_url: str
    service_url: str
    service: ProtectedService


@pytest.fixture
def stack(emulator: Emulator) -> Iterator[Stack]:
    service = ProtectedService(emulator)
    with emulator.serve() as api, serve(service) as service_url:
        yield Stack(api.url, service_url, service)


class Worker:
    """A ``celery worker`` subprocess in its own session, always stopped (then killed)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM, as a process manager would); SIGKILL the group on timeout."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # pool children left behind, if any
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)
            return None
        return proc.returncode


@contextlib.contextmanager
def celery_worker(
    *, app: str, pool: str, concurrency: int, queue: str, env: dict[str, str], cwd: Path, log: Path
) -> Iterator[Worker]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "warning",
        "--queues",
        queue,
        "--hostname",
        f"{queue}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    process = Worker(proc, log)
    try:
        yield process
    finally:
        process.stop()


def worker_env(run: str, emulator_url: str, machine: Machine, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "M2M_TEST_"))}
    env.update(
        CLERK_API_URL=emulator_url,
        CLERK_MACHINE_SECRET_KEY=machine.secret_key,
        M2M_TEST_BROKER=REDIS_URL,
        M2M_TEST_PREFIX=f"m2m-agent-test:{run}:",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


@contextlib.contextmanager
def producer(run: str) -> Iterator[Any]:
    """A Celery app in this process that sends to the worker's queue and reads its results."""
    prefix = f"m2m-agent-test:{run}:"
    app = celery.Celery(f"m2m-producer-{run}", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
    )
    try:
        yield app
    finally:
        app.close()


def run_tasks(
    app: Any, worker: Worker, *, name: str, queue: str, count: int, budget: float
) -> list[Any]:
    """Send ``count`` tasks at once (they queue until the worker is up); return their results.

    All at once, so that the pool's processes start together and race for the first token.
    Fails, with the worker's log, if the worker dies or the tasks do not all finish within
    ``budget`` seconds (startup included): a deadlocked pool process shows up here.
    """
    deadline = time.monotonic() + budget
    results = [app.send_task(name, args=[i], queue=queue) for i in range(count)]
    values = []
    for result in results:
        while True:
            assert worker.proc.poll() is None, f"the worker died:\n{worker.log()}"
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"tasks unfinished after {budget}s (deadlock?):\n{worker.log()}"
            try:
                values.append(result.get(timeout=min(1.0, remaining)))
                break
            except celery.exceptions.TimeoutError:
                continue
        result.forget()
    return values


def run_on_worker(
    tmp_path: Path,
    run: str,
    stack: Stack,
    machine: Machine,
    *,
    pool: str,
    concurrency: int,
    count: int,
    **extra: str,
) -> tuple[list[dict[str, Any]], int, int | None]:
    """Run ``count`` tasks of ``tests.celery_app`` on a fresh worker; stop it.

    Returns:
        The task results, the worker's pid and its exit code.
    """
    queue = f"m2m-agent-test-{run}"
    env = worker_env(run, stack.api_url, machine, M2M_TEST_SERVICE_URL=stack.service_url, **extra)
    with (
        producer(run) as app,
        celery_worker(
            app="tests.celery_app",
            pool=pool,
            concurrency=concurrency,
            queue=queue,
            env=env,
            cwd=ROOT,
            log=tmp_path / "worker.log",
        ) as worker,
    ):
        results = run_tasks(
            app, worker, name="tests.celery_app.call_service", queue=queue, count=count, budget=40
        )
        exit_code = worker.stop()
    log = worker.log()
    assert "Traceback" not in log, log
    return results, worker.proc.pid, exit_code


@pytest.mark.integration
@pytest.mark.timeout(60)
class TestRealWorker:
    @pytest.mark.parametrize("warm_parent", [False, True], ids=["cold", "warm-parent"])
    def test_prefork_200_tasks_one_mint_with_redis_store(
        self, tmp_path, run_id, stack, emulator, worker, warm_parent
    ):
        """200 tasks over 4 prefork children sharing a RedisStore: all succeed, one mint.

        Cold: the children start together and race for the first token; one mints, the others
        adopt it. Warm parent: the main process takes a token and calls the service before
        forking (a live manager, refresher thread and keep-alive connection at fork time); every
        child still makes its own manager (none inherited: ``forks == 0``) and adopts the token.
        """
        results, worker_pid, exit_code = run_on_worker(
            tmp_path,
            run_id,
            stack,
            worker,
            pool="prefork",
            concurrency=4,
            count=200,
            M2M_TEST_STORE="redis",
            M2M_TEST_PARENT_WARMUP="1" if warm_parent else "0",
        )
        service = stack.service
        assert [r["status"] for r in results] == [200] * 200
        assert service.accepted == 200 + warm_parent  # and the parent's warm-up call
        assert service.rejected == 0
        assert emulator.counters.mints == 1
        pids = {r["pid"] for r in results}
        assert worker_pid not in pids
        assert len(pids) >= 2, pids
        assert {r["forks"] for r in results} == {0}
        managers: dict[str, tuple[int, int]] = {}
        for r in results:  # each child's manager: (mints, adoptions), latest snapshot
            managers[r["manager"]] = max(
                managers.get(r["manager"], (0, 0)), (r["mints"], r["adoptions"])
            )
        assert len(managers) == len(pids)  # one manager per child
        assert sum(m for m, _ in managers.values()) == (0 if warm_parent else 1)
        assert all(m + a >= 1 for m, a in managers.values())  # the others adopted it
        assert exit_code == 0
        # A token in a shared store is never revoked at shutdown: others may still use it.
        assert [t.revoked for t in emulator.tokens] == [False]

    def test_prefork_memory_store_one_token_per_child_revoked_at_shutdown(
        self, tmp_path, run_id, stack, emulator, worker
    ):
        """Without a shared store each child mints its own token, and revokes it when the
        worker stops (worker_process_shutdown)."""
        results, worker_pid, exit_code = run_on_worker(
            tmp_path,
            run_id,
            stack,
            worker,
            pool="prefork",
            concurrency=3,
            count=30,
            M2M_TEST_STORE="memory",
        )
        assert [r["status"] for r in results] == [200] * 30
        pids = {r["pid"] for r in results}
        assert worker_pid not in pids
        tokens = emulator.tokens
        assert emulator.counters.mints == len(tokens) == len(pids)
        assert exit_code == 0
        assert all(t.revoked for t in tokens), [(t.id, t.revoked) for t in tokens]

    def test_solo_pool(self, tmp_path, run_id, stack, emulator, worker):
        """The solo pool runs tasks in the main process: one manager, one mint."""
        results, worker_pid, exit_code = run_on_worker(
            tmp_path,
            run_id,
            stack,
            worker,
            pool="solo",
            concurrency=1,
            count=20,
            M2M_TEST_STORE="redis",
        )
        assert [r["status"] for r in results] == [200] * 20
        assert {r["pid"] for r in results} == {worker_pid}
        assert len({r["manager"] for r in results}) == 1
        assert emulator.counters.mints == 1
        assert exit_code == 0

    def test_threads_pool_memory_store_revoked_at_worker_shutdown(
        self, tmp_path, run_id, stack, emulator, worker
    ):
        """4 threads share the main process's one manager (one mint); worker_shutdown closes
        it, which revokes the token it alone owned."""
        results, worker_pid, exit_code = run_on_worker(
            tmp_path,
            run_id,
            stack,
            worker,
            pool="threads",
            concurrency=4,
            count=20,
            M2M_TEST_STORE="memory",
        )
        assert [r["status"] for r in results] == [200] * 20
        assert {r["pid"] for r in results} == {worker_pid}
        assert len({r["manager"] for r in results}) == 1
        assert len({r["thread"] for r in results}) >= 2
        assert emulator.counters.mints == 1
        assert exit_code == 0
        assert [t.revoked for t in emulator.tokens] == [True]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_worked_example_runs(tmp_path, redis_client):
    """``examples/celery_worker/run_demo.py`` runs end to end on the emulator and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    env["M2M_DEMO_REDIS_URL"] = REDIS_URL
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "celery_worker" / "run_demo.py")],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "20 tasks: 20 x 200" in result.stdout, output
    assert "Clerk minted 1 token(s)" in result.stdout, output
    assert "ak_" not in output
