"""A TokenManager and M2MAuth on an httpx.Client calling a protected service.

Run it: ``python examples/sync_httpx.py``. It uses the embedded Clerk emulator (no account, no
network): a "worker" machine calls a "service" machine's API, and the service verifies every
bearer token with Clerk using its own machine secret key.

Against real Clerk: set CLERK_MACHINE_SECRET_KEY to the worker machine's key, build the manager
as ``TokenManager(lifetime=60)`` (no ``client=``: it reads the key from the environment), and
point the httpx.Client at your real service instead of the mock transport.
"""

import logging

import httpx
import structlog

from m2m_agent import ClerkAPIError, ClerkM2MClient, M2MAuth, TokenManager
from m2m_agent.emulator import Emulator

# The library never configures logging; an application may. Show info events, not debug.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

emu = Emulator()
service = emu.create_machine("service")
worker = emu.create_machine("worker", scoped_machines=[service.id])


def clerk_client(secret_key: str) -> ClerkM2MClient:  # requests go to the emulator in-process
    http = httpx.Client(transport=emu.transport())
    return ClerkM2MClient(secret_key, api_url="https://api.clerk.test", http_client=http)


verifier = clerk_client(service.secret_key)


def protected_service(request: httpx.Request) -> httpx.Response:  # the receiving side
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        verified = verifier.verify_token(token)
    except ClerkAPIError:
        return httpx.Response(401)
    return httpx.Response(200, json={"caller": verified.subject})


# --8<-- [start:usage]
manager = TokenManager(client=clerk_client(worker.secret_key), lifetime=60)
http = httpx.Client(
    auth=M2MAuth(manager),
    base_url="https://service.example",
    transport=httpx.MockTransport(protected_service),  # calling your real service: drop this
)
with manager, http:  # entering the manager starts its background refresher
    for _ in range(3):
        reply = http.get("/reports")
        print(f"GET /reports -> {reply.status_code} {reply.json()}")
    stats = manager.statistics()
    print(f"3 calls, {stats.mints} mint: token {stats.token_id} is cached and reused")
    print(f"it is {stats.token_state.value}; refresh starts in {stats.seconds_to_refresh:.0f}s")
# --8<-- [end:usage]
assert stats.mints == 1
assert all(token.revoked for token in emu.tokens)  # revoke_on_close=True by default
print("manager closed: its token is revoked")
