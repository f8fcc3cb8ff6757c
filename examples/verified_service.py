"""The receiving side: a service that only answers callers with a valid Clerk M2M token.

Run it: ``python examples/verified_service.py`` (asyncio) or ``... trio``. Everything runs
in-process on the embedded Clerk emulator (no account, no network): the service is a plain ASGI
app behind ``M2MAuthMiddleware``, reached through ``httpx.ASGITransport``; the caller is an
``AsyncTokenManager`` with ``M2MAuth``, as in a real worker.

With Starlette or FastAPI the middleware is added the usual way, and the caller shows up as
``request.state.m2m``::

    app = Starlette(routes=[...])
    app.add_middleware(M2MAuthMiddleware, verifier=AsyncTokenVerifier(), exclude_paths=["/health"])

    # or per route, in FastAPI:
    @app.get("/reports")
    async def reports(caller: VerifiedToken = Depends(require_m2m(verifier))): ...

Against real Clerk: build ``AsyncTokenVerifier()`` with no arguments on the service (it reads
CLERK_MACHINE_SECRET_KEY, the service machine's key, and CLERK_JWT_KEY or CLERK_SECRET_KEY for
JWT-format tokens) and serve the app with any ASGI server.
"""

import json
import logging
import sys
from typing import Any

import anyio
import httpx
import structlog

from m2m_agent import AsyncClerkM2MClient, AsyncTokenManager, M2MAuth, RefreshPolicy
from m2m_agent.asgi import M2MAuthMiddleware
from m2m_agent.emulator import Emulator, Fault
from m2m_agent.verify import AsyncTokenVerifier

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

API_URL = "https://api.clerk.test"
SERVICE_URL = "http://localhost"  # loopback: M2MAuth sends tokens over plain http only there


async def reports_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The protected app (plain ASGI): it reads who called from the middleware's state."""
    if scope["type"] != "http":
        return
    caller = scope.get("state", {}).get("m2m")
    body = {"path": scope["path"]}
    if caller is not None:
        body.update(caller=caller.machine_id, token=caller.token_id, format=caller.format)
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def main() -> None:
    emu = Emulator()
    service = emu.create_machine("service")
    worker = emu.create_machine("worker", scoped_machines=[service.id])

    # --8<-- [start:service]
    verifier = AsyncTokenVerifier(
        machine_secret_key=service.secret_key,  # opaque tokens: Clerk checks they are ours
        jwt_key=emu.public_key_pem(),  # JWT-format tokens: checked locally, no network
        # Only the worker may call. (required_scopes=[service.id] would also work for opaque
        # tokens, but a JWT carries scopes only if its minter put them in its claims.)
        allowed_subjects=[worker.id],
        cache_ttl=1.0,  # a revoked token stops passing within a second (default 30 s)
        api_url=API_URL,
        http_client=httpx.AsyncClient(transport=emu.async_transport()),  # real Clerk: drop
    )
    app = M2MAuthMiddleware(reports_app, verifier=verifier, exclude_paths=["/health"])
    # --8<-- [end:service]

    def caller(token_format: str) -> AsyncTokenManager:
        http = httpx.AsyncClient(transport=emu.async_transport())
        client = AsyncClerkM2MClient(worker.secret_key, api_url=API_URL, http_client=http)
        # min_invalidate_age: by default a token younger than 5 s is kept when a target refuses
        # it (that points at the target's setup); this demo revokes one after a second.
        refresh = RefreshPolicy(min_invalidate_age=0.5)
        return AsyncTokenManager(
            client=client, lifetime=600, token_format=token_format, refresh=refresh
        )

    to_service = httpx.ASGITransport(app=app)
    anonymous = httpx.AsyncClient(transport=to_service, base_url=SERVICE_URL)
    manager = caller("opaque")
    authed = httpx.AsyncClient(auth=M2MAuth(manager), transport=to_service, base_url=SERVICE_URL)

    async with manager, authed, anonymous, verifier:
        reply = await anonymous.get("/health")
        print(f"GET /health without a token -> {reply.status_code} (excluded path)")
        reply = await anonymous.get("/reports")
        challenge = reply.headers["www-authenticate"]
        print(f"GET /reports without a token -> {reply.status_code} ({challenge})")
        reply = await anonymous.get("/reports", headers={"Authorization": "Bearer not-a-token"})
        print(f"GET /reports with garbage -> {reply.status_code} {reply.json()['error']}")

        replies = []

        async def call(n: int) -> None:
            replies.append(await authed.get(f"/reports/{n}"))

        async with anyio.create_task_group() as tasks:
            for n in range(5):
                tasks.start_soon(call, n)
        assert all(r.status_code == 200 for r in replies)
        print(f"GET /reports/0..4 with M2MAuth -> 200 x5, caller {replies[0].json()['caller']}")
        print(
            f"5 calls, {manager.statistics().mints} mint, "
            f"{emu.counters.verifications} verify call (the rest from the cache)"
        )
        assert manager.statistics().mints == 1
        assert emu.counters.verifications == 1

        # Revoke the worker's token behind its back: the service stops accepting it once the
        # cache entry ends; M2MAuth sees the 401, mints a new token and retries, once.
        first = replies[0].json()["token"]
        emu.revoke(first)
        await anyio.sleep(1.05)
        reply = await authed.get("/reports")
        assert reply.status_code == 200
        assert reply.json()["token"] != first
        print(
            f"after revoking {first[:11]}...: GET /reports -> {reply.status_code} with a new "
            f"token ({manager.statistics().mints} mints)"
        )

        # Clerk's verify endpoint goes down: a cached token still passes; an unchecked one gets
        # 503 (try again later), never 401 (which would make the caller drop a good token).
        emu.inject(Fault(status=503, endpoints=frozenset({"verify"})))
        reply = await authed.get("/reports")
        print(f"verify endpoint down, cached token -> {reply.status_code}")
        verifier.clear_cache()
        reply = await authed.get("/reports")
        print(f"verify endpoint down, uncached token -> {reply.status_code}")
        assert reply.status_code == 503
        emu.clear_faults()

        # JWT-format tokens are verified locally: no verify call at all.
        before = emu.counters.verifications
        jwt_manager = caller("jwt")
        async with (
            jwt_manager,
            httpx.AsyncClient(
                auth=M2MAuth(jwt_manager), transport=to_service, base_url=SERVICE_URL
            ) as jwt_http,
        ):
            reply = await jwt_http.get("/reports")
        assert reply.status_code == 200, reply.text
        print(
            f"JWT caller -> {reply.status_code} format={reply.json()['format']}, "
            f"{emu.counters.verifications - before} verify calls"
        )
        assert emu.counters.verifications == before


backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
anyio.run(main, backend=backend)
print(f"done on {backend}")
