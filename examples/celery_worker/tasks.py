"""A Celery app whose tasks call a protected service with Clerk M2M tokens.

Two files:

- ``tasks.py`` (this one): the Celery app, m2m-agent's setup and a task. This is what you write.
- ``run_demo.py``: runs it all on this machine, with a real prefork worker, the embedded Clerk
  emulator and a small "reports" service that verifies every caller's token:
  ``python examples/celery_worker/run_demo.py`` (needs a Redis; see its docstring).

Against real Clerk, from this folder::

    export CLERK_MACHINE_SECRET_KEY=ak_...          # the worker machine's secret key
    export REPORTS_API_URL=https://reports.internal  # the service the tasks call
    celery -A tasks worker --pool prefork --concurrency 8

Every pool process gets its own TokenManager after the fork, and all of them share one token
through Redis, so the whole worker (and every other worker on the same Redis) mints once per
rotation instead of once per process.

Settings, from the environment:

- ``CELERY_BROKER_URL`` (default ``redis://localhost:6379/0``) and ``CELERY_RESULT_BACKEND``
  (default: the broker).
- ``M2M_REDIS_URL``: where the fleet shares its token (default: the broker's Redis).
- ``CELERY_KEY_PREFIX``: a prefix for every Redis key, when several apps share one Redis.
- ``REPORTS_API_URL``: the protected service.
"""

import os
from typing import Any

import httpx
from celery import Celery

import m2m_agent.celery as m2m
from m2m_agent import TokenUnavailableError
from m2m_agent.stores import RedisStore

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL)
TOKEN_REDIS_URL = os.environ.get("M2M_REDIS_URL", BROKER_URL)
KEY_PREFIX = os.environ.get("CELERY_KEY_PREFIX", "")
REPORTS_API_URL = os.environ.get("REPORTS_API_URL", "https://reports.internal")

# --8<-- [start:setup]
app = Celery("tasks", broker=BROKER_URL, backend=RESULT_BACKEND)
if KEY_PREFIX:
    app.conf.broker_transport_options = {"global_keyprefix": KEY_PREFIX}
    app.conf.result_backend_transport_options = {"global_keyprefix": KEY_PREFIX}

# Once, at import: nothing is minted here. Each worker process builds its own TokenManager
# on first use, and closes it when it stops. The key comes from CLERK_MACHINE_SECRET_KEY.
m2m.configure(store=RedisStore(TOKEN_REDIS_URL, prefix=KEY_PREFIX), lifetime=3600)
# --8<-- [end:setup]


# --8<-- [start:task]
@app.task(
    autoretry_for=(httpx.TransportError, TokenUnavailableError),
    retry_backoff=True,
    max_retries=5,
)
def fetch_report(report_id: int) -> dict[str, Any]:
    # One client per process, reused by every task; it carries the process's token.
    http = m2m.get_client(base_url=REPORTS_API_URL, timeout=10)
    reply = http.get(f"/reports/{report_id}")
    reply.raise_for_status()
    return {"status": reply.status_code, "report": reply.json(), "pid": os.getpid()}


# --8<-- [end:task]
