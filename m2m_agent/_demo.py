"""``m2m-agent demo``: the main job end to end, on the embedded emulator or on Clerk itself.

A worker's ``TokenManager`` mints a token, ``M2MAuth`` calls a protected service with it, the
service verifies it with its own machine key, later calls reuse the cached token, closing the
manager revokes it, and a call with the revoked token is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TextIO

import httpx

from m2m_agent._auth import M2MAuth
from m2m_agent._client import ClerkM2MClient
from m2m_agent._config import ENV_MACHINE_SECRET_KEY
from m2m_agent._refresh import Statistics
from m2m_agent._sync_manager import TokenManager
from m2m_agent.errors import ClerkAPIError, ConfigurationError, InvalidTokenError

__all__ = ["run_demo"]

EMULATED_API_URL = "https://api.clerk.emulator"
SERVICE_URL = "https://service.demo"


def protected_service(verifier: ClerkM2MClient) -> httpx.MockTransport:
    """A tiny service that answers only requests bearing a token Clerk verifies."""

    def handle(request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return httpx.Response(401, headers={"WWW-Authenticate": "Bearer"})
        try:
            verified = verifier.verify_token(token)
        except (ClerkAPIError, InvalidTokenError):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json={"hello": verified.subject, "token_id": verified.id})

    return httpx.MockTransport(handle)


@contextmanager
def _emulated(stack: ExitStack) -> Iterator[tuple[ClerkM2MClient, ClerkM2MClient, str]]:
    from m2m_agent.emulator import Emulator

    emulator = Emulator()
    service = emulator.create_machine("service")
    worker = emulator.create_machine("worker", scoped_machines=[service.id])
    transport = emulator.transport()

    def client(key: str) -> ClerkM2MClient:
        http = stack.enter_context(httpx.Client(transport=transport))
        return stack.enter_context(ClerkM2MClient(key, api_url=EMULATED_API_URL, http_client=http))

    yield client(worker.secret_key), client(service.secret_key), "embedded emulator"


def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the round trip; print each step (or one JSON summary); 0 when all went as expected."""
    steps: list[dict[str, Any]] = []
    started = time.monotonic()

    def step(name: str, ok: bool, **fields: Any) -> None:
        steps.append({"step": name, "ok": ok, **fields})
        if not args.json:
            mark = "ok " if ok else "FAIL"
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            out.write(f"  [{mark}] {name:<10} {details}\n")
            out.flush()

    with ExitStack() as stack:
        if args.real:
            if not os.environ.get(ENV_MACHINE_SECRET_KEY):
                raise ConfigurationError(f"--real needs {ENV_MACHINE_SECRET_KEY} set.")
            worker = stack.enter_context(ClerkM2MClient())
            service, where = worker, f"Clerk at {worker.api_url}"
        else:
            worker, service, where = stack.enter_context(_emulated(stack))
        if not args.json:
            out.write(f"m2m-agent demo on the {where}\n")
        manager = TokenManager(client=worker, lifetime=args.lifetime)
        stack.callback(manager.close)
        http = stack.enter_context(
            httpx.Client(
                transport=protected_service(service), base_url=SERVICE_URL, auth=M2MAuth(manager)
            )
        )

        token = manager.get_token()
        first = manager.statistics()
        step("mint", first.mints == 1, token=first.token_id, expires_in=_secs(first))

        response = http.get("/hello")
        step("call", response.status_code == 200, status=response.status_code, via="M2MAuth")

        verified = service.verify_token(token)
        step("verify", verified.id == first.token_id, token=verified.id, subject=verified.subject)

        for _ in range(20):
            http.get("/hello")
        cached = manager.statistics()
        step("reuse", cached.mints == 1, requests=21, mints=cached.mints)

        manager.close()
        closed = manager.statistics()
        step("revoke", closed.revocations == 1, token=first.token_id, on="close()")

        response = http.get("/hello", auth=_StaticBearer(token))
        step("refused", response.status_code == 401, status=response.status_code)

    ok = all(s["ok"] for s in steps)
    summary = {
        "ok": ok,
        "backend": where,
        "steps": steps,
        "elapsed_seconds": round(time.monotonic() - started, 3),
    }
    if args.json:
        out.write(json.dumps(summary) + "\n")
    else:
        verdict = "all steps passed" if ok else "some steps FAILED"
        out.write(f"{verdict} in {summary['elapsed_seconds']}s\n")
    return 0 if ok else 1


def _secs(stats: Statistics) -> str:
    left = stats.seconds_to_expiry
    return f"{left:.0f}s" if left is not None else "never"


class _StaticBearer(httpx.Auth):
    """Sends one fixed token: to show that the revoked token no longer opens the door."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request
