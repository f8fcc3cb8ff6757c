"""The Celery app ``tests/test_celery.py`` runs in a real worker: ``celery -A tests.celery_app``.

Everything comes from the environment the test sets (never imported by the test process itself):

- ``M2M_TEST_BROKER``: the Redis URL used as broker and result backend (database 15).
- ``M2M_TEST_PREFIX``: a prefix unique to the test run, for every Redis key (broker, results,
  token store), so that runs never see each other's keys.
- ``M2M_TEST_STORE``: ``redis`` (one token for the whole worker) or ``memory`` (one per process).
- ``M2M_TEST_SERVICE_URL``: the protected service the tasks call.
- ``M2M_TEST_PARENT_WARMUP``: ``1`` makes the worker's main process take a token and call the
  service before the pool forks, so children are born from a process with a live manager, a
  refresher thread and open connections (none of which they may use).
- ``CLERK_API_URL``, ``CLERK_MACHINE_SECRET_KEY``: the emulator and the machine's key.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery, signals

import m2m_agent.celery as m2m
from m2m_agent import RefreshPolicy
from m2m_agent.stores import RedisStore

BROKER = os.environ.get("M2M_TEST_BROKER", "redis://127.0.0.1:6379/15")
PREFIX = os.environ.get("M2M_TEST_PREFIX", "m2m-agent-test:")
SERVICE_URL = os.environ.get("M2M_TEST_SERVICE_URL", "http://127.0.0.1:9")

app = Celery("m2m_celery_test", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    result_expires=600,
)

if os.environ.get("M2M_TEST_STORE", "redis") == "redis":
    m2m.configure(
        store=RedisStore(BROKER, prefix=PREFIX + "store:"),
        lifetime=600,
        refresh=RefreshPolicy(wait_timeout=20.0),
    )
else:
    m2m.configure(lifetime=600, refresh=RefreshPolicy(wait_timeout=20.0))


@signals.worker_init.connect
def _warm_up_parent(**_: Any) -> None:
    """Runs in the worker's main process, before the pool starts."""
    if os.environ.get("M2M_TEST_PARENT_WARMUP") == "1":
        reply = m2m.get_client(base_url=SERVICE_URL, timeout=10).get("/protected")
        reply.raise_for_status()


@app.task
def call_service(i: int) -> dict[str, Any]:
    """Call the protected service with this process's client; report what served the call."""
    manager = m2m.get_manager()
    reply = m2m.get_client(base_url=SERVICE_URL, timeout=10).get("/protected", params={"i": i})
    time.sleep(0.01)  # spread the tasks over the pool's processes
    stats = manager.statistics()
    return {
        "status": reply.status_code,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "manager": f"{os.getpid()}:{id(manager)}",
        "forks": stats.forks,
        "mints": stats.mints,
        "adoptions": stats.adoptions,
    }
