"""Run the Celery example end to end: ``python examples/celery_worker/run_demo.py``.

It needs a Redis, as the broker, the result backend and the shared token store:
``M2M_DEMO_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``). Every key it makes is under a
prefix unique to the run, and deleted at the end. Nothing else is needed:

- Clerk is the embedded emulator, served on loopback.
- The "reports" service is a small HTTP server in this process that verifies each caller's
  token with Clerk, using its own machine secret key.
- The worker is a real ``celery -A tasks worker --pool prefork --concurrency 2`` subprocess.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
import structlog

from m2m_agent import ClerkAPIError, ClerkM2MClient
from m2m_agent.emulator import Emulator

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("M2M_DEMO_REDIS_URL", "redis://127.0.0.1:6379/15")
RUN = uuid.uuid4().hex[:8]
PREFIX = f"m2m-agent-demo:{RUN}:"
QUEUE = f"m2m-agent-demo-{RUN}"
TASKS = 20

# The library never configures logging; an application may. Show info events, not debug.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

emu = Emulator()
reports_machine = emu.create_machine("reports")
worker_machine = emu.create_machine("worker", scoped_machines=[reports_machine.id])


def reports_service(api_url: str) -> ThreadingHTTPServer:
    """The receiving side: 200 with the report for a caller whose token Clerk verifies."""
    verifier = ClerkM2MClient(reports_machine.secret_key, api_url=api_url)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            try:
                caller = verifier.verify_token(token).subject
                status, body = 200, {"path": self.path, "caller": caller}
            except ClerkAPIError:
                status, body = 401, {"error": "invalid token"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_worker(log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "--pool", "prefork", "--concurrency", "2", "--loglevel", "warning",
        "--queues", QUEUE, "--hostname", f"{QUEUE}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=HERE, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, as a process manager would; kill the process group if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)


with emu.serve() as api, tempfile.TemporaryDirectory() as tmp:
    service = reports_service(api.url)
    # The worker (a subprocess) and this process read the same settings from the environment.
    os.environ.update(
        CLERK_API_URL=api.url,
        CLERK_MACHINE_SECRET_KEY=worker_machine.secret_key,
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_KEY_PREFIX=PREFIX,
        REPORTS_API_URL=f"http://127.0.0.1:{service.server_address[1]}",
    )
    sys.path.insert(0, str(HERE))
    from tasks import app, fetch_report  # reads the settings just set

    log = Path(tmp) / "worker.log"
    worker = start_worker(log)
    try:
        deadline = time.monotonic() + 40
        first = fetch_report.apply_async((0,), queue=QUEUE)
        while not first.ready():  # the worker is up once it answers a first task
            if worker.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the worker did not answer:\n{log.read_text()}")
            time.sleep(0.1)
        print(f"worker up; first reply: {first.get(timeout=5)['report']}")

        results = [fetch_report.apply_async((i,), queue=QUEUE) for i in range(1, TASKS + 1)]
        replies = [r.get(timeout=max(1.0, deadline - time.monotonic())) for r in results]
        ok = sum(1 for r in replies if r["status"] == 200)
        pids = {r["pid"] for r in replies}
        print(f"{TASKS} tasks: {ok} x 200, run by {len(pids)} pool process(es)")
        print(f"Clerk minted {emu.counters.mints} token(s) for them all, shared through Redis")
    finally:
        stop_worker(worker)
        app.close()
        service.shutdown()
        store = redis.Redis.from_url(REDIS_URL)
        for key in store.scan_iter(match=f"{PREFIX}*"):
            store.delete(key)
        store.close()
    revoked = any(t.revoked for t in emu.tokens)
    print(f"worker stopped; shared token revoked: {revoked} (other workers may still use it)")
    assert emu.counters.mints == 1
    assert ok == TASKS
