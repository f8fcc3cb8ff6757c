"""An AsyncTokenManager and M2MAuth on an httpx.AsyncClient, on asyncio or trio.

Run it: ``python examples/async_httpx.py`` (asyncio) or ``python examples/async_httpx.py trio``.
It uses the embedded Clerk emulator (no account, no network): a "worker" machine calls a
"service" machine's API concurrently, and the service verifies every bearer token with Clerk.

Against real Clerk: set CLERK_MACHINE_SECRET_KEY to the worker machine's key, build the manager
as ``AsyncTokenManager(lifetime=60)`` (no ``client=``: it reads the key from the environment),
and point the httpx.AsyncClient at your real service instead of the mock transport.
"""

import logging
import sys

import anyio
import httpx
import structlog

from m2m_agent import AsyncClerkM2MClient, AsyncTokenManager, ClerkAPIError, M2MAuth
from m2m_agent.emulator import Emulator

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


async def main() -> None:
    emu = Emulator()
    service = emu.create_machine("service")
    worker = emu.create_machine("worker", scoped_machines=[service.id])

    def clerk_client(secret_key: str) -> AsyncClerkM2MClient:
        http = httpx.AsyncClient(transport=emu.async_transport())
        return AsyncClerkM2MClient(secret_key, api_url="https://api.clerk.test", http_client=http)

    verifier = clerk_client(service.secret_key)

    async def protected_service(request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        try:
            verified = await verifier.verify_token(token)
        except ClerkAPIError:
            return httpx.Response(401)
        return httpx.Response(200, json={"caller": verified.subject})

    # --8<-- [start:usage]
    manager = AsyncTokenManager(client=clerk_client(worker.secret_key), lifetime=60)
    http = httpx.AsyncClient(
        auth=M2MAuth(manager),
        base_url="https://service.example",
        transport=httpx.MockTransport(protected_service),  # calling your real service: drop this
    )
    async with manager, http:  # entering the manager starts its background refresher

        async def call(n: int) -> None:
            reply = await http.get(f"/jobs/{n}")
            print(f"GET /jobs/{n} -> {reply.status_code} {reply.json()}")

        async with anyio.create_task_group() as tasks:
            for n in range(5):
                tasks.start_soon(call, n)
        print(f"5 concurrent calls, {manager.statistics().mints} mint")
    # --8<-- [end:usage]
    assert manager.statistics().mints == 1


backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
anyio.run(main, backend=backend)
print(f"done on {backend}")
