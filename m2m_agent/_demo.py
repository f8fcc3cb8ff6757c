"""``m2m-agent demo``: the main job end to end, on the embedded emulator or on Clerk itself.

A worker machine mints a token, calls a protected service with it, the service verifies it with
its own machine key, the worker revokes it, and a second call with the revoked token is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TextIO

import httpx

from m2m_agent._client import ClerkM2MClient
from m2m_agent._config import ENV_MACHINE_SECRET_KEY
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
        http = stack.enter_context(
            httpx.Client(transport=protected_service(service), base_url=SERVICE_URL)
        )

        minted = worker.create_token(seconds_until_expiration=args.lifetime)
        step("mint", True, token=minted.id, format=minted.format, lifetime=minted.lifetime)
        secret = minted.token or ""

        response = http.get("/hello", headers={"Authorization": f"Bearer {secret}"})
        step("call", response.status_code == 200, status=response.status_code)

        verified = service.verify_token(secret)
        step("verify", verified.id == minted.id, token=verified.id, subject=verified.subject)

        revoked = worker.revoke_token(minted.id, reason="demo finished")
        step("revoke", revoked.revoked, token=revoked.id)

        response = http.get("/hello", headers={"Authorization": f"Bearer {secret}"})
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
        out.write(
            f"{'all steps passed' if ok else 'some steps FAILED'} in "
            f"{summary['elapsed_seconds']}s\n"
        )
    return 0 if ok else 1
