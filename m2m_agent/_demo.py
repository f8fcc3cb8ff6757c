"""``m2m-agent demo``: the main job, live, on the embedded emulator (or on Clerk with ``--real``).

Workers send requests through :class:`M2MAuth` to a protected service that verifies every token
with Clerk (the emulator). Tokens are short-lived, so they are refreshed and rotated several
times; halfway through, the token endpoint goes down for a while and the workers ride it out on
the still-valid token. The run ends with a summary, and exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats_module
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import httpx

from m2m_agent._async_manager import AsyncTokenManager
from m2m_agent._auth import M2MAuth
from m2m_agent._client import AsyncClerkM2MClient
from m2m_agent._config import ENV_MACHINE_SECRET_KEY
from m2m_agent._policy import RefreshPolicy
from m2m_agent._refresh import Statistics
from m2m_agent.errors import ClerkAPIError, ConfigurationError, InvalidTokenError, M2MAgentError
from m2m_agent.verify import AsyncTokenVerifier

__all__ = ["run_demo"]

EMULATED_API_URL = "https://api.clerk.emulator"
SERVICE_URL = "https://service.demo"


def demo_policy(lifetime: float) -> RefreshPolicy:
    """Refresh at half-life with snappy retries, so the show has rotations and a recovery."""
    return RefreshPolicy(
        refresh_at=0.5,
        jitter=0.02,
        wait_timeout=max(1.0, min(30.0, lifetime)),
        initial_backoff=0.1,
        max_backoff=0.5,
        rotation_grace=min(30.0, lifetime / 4),
    )


@dataclass
class Tally:
    """What the workers saw."""

    requests: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)

    def record(self, started: float, outcome: str | None) -> None:
        self.requests += 1
        self.latencies.append(time.monotonic() - started)
        if outcome is not None:
            self.failures += 1
            self.failure_reasons[outcome] = self.failure_reasons.get(outcome, 0) + 1


def protected_service(verify: Callable[[str], Any]) -> httpx.MockTransport:
    """A service that answers only requests whose bearer token Clerk verifies."""

    async def handle(request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return httpx.Response(401, headers={"WWW-Authenticate": "Bearer"})
        try:
            verified = await verify(token)
        except (ClerkAPIError, InvalidTokenError):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json={"hello": verified.machine_id})

    return httpx.MockTransport(handle)


class Display:
    """One live status line on a terminal; a plain line per second otherwise."""

    def __init__(self, out: TextIO, *, live: bool, quiet: bool) -> None:
        self.out = out
        self.live = live
        self.quiet = quiet
        self._last_plain = 0.0

    def event(self, text: str) -> None:
        if self.quiet:
            return
        prefix = "\r\x1b[2K" if self.live else ""
        self.out.write(f"{prefix}{text}\n")
        self.out.flush()

    def status(self, elapsed: float, tally: Tally, s: Statistics, api: str) -> None:
        if self.quiet:
            return
        expiry = f"{s.seconds_to_expiry:4.1f}s" if s.seconds_to_expiry is not None else "  -  "
        token = (s.token_id or "-")[:14]
        line = (
            f"{elapsed:5.1f}s  requests {tally.requests:5d}  failed {tally.failures:3d}  "
            f"token {token}… expires in {expiry}  mints {s.mints:2d}  "
            f"stale-served {s.served_stale:4d}  refresh failures {s.refresh_failures:2d}  API {api}"
        )
        if self.live:
            self.out.write(f"\r\x1b[2K{line}")
            self.out.flush()
        elif elapsed - self._last_plain >= 1.0:
            self._last_plain = elapsed
            self.out.write(line + "\n")
            self.out.flush()


async def _run(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    lifetime = float(args.lifetime)
    duration = float(args.duration)
    policy = demo_policy(lifetime)
    outage = 0.0 if args.real or args.no_outage else round(lifetime * 0.25, 2)
    display = Display(out, live=out.isatty() and not args.json, quiet=args.json)
    async with AsyncExitStack() as stack:
        emulator = None
        if args.real:
            if not os.environ.get(ENV_MACHINE_SECRET_KEY):
                raise ConfigurationError(
                    f"--real needs {ENV_MACHINE_SECRET_KEY} set to a machine secret key (ak_...)."
                )
            worker = AsyncClerkM2MClient()
            service = worker  # verifies its own tokens: the machine must be in its own scopes
            backend = f"Clerk at {worker.api_url}"
        else:
            from m2m_agent.emulator import Emulator, Fault

            emulator = Emulator()
            service_machine = emulator.create_machine("service")
            worker_machine = emulator.create_machine("worker", scoped_machines=[service_machine.id])
            transport = emulator.async_transport()

            def client(key: str) -> AsyncClerkM2MClient:
                http = httpx.AsyncClient(transport=transport)
                return AsyncClerkM2MClient(key, api_url=EMULATED_API_URL, http_client=http)

            worker, service = client(worker_machine.secret_key), client(service_machine.secret_key)
            backend = "embedded emulator"
        stack.push_async_callback(worker.aclose)
        if service is not worker:
            stack.push_async_callback(service.aclose)

        # The service side: verifies each token with Clerk, reusing a verdict for up to 2 s
        # (a revoked token stops working within that), so most requests cost no verify call.
        verifier = AsyncTokenVerifier(client=service, cache_ttl=2.0)
        manager = AsyncTokenManager(client=worker, lifetime=lifetime, refresh=policy)
        await stack.enter_async_context(manager)
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=protected_service(verifier.verify),
                base_url=SERVICE_URL,
                auth=M2MAuth(manager),
            )
        )
        display.event(
            f"m2m-agent demo on the {backend}: {args.workers} workers, {lifetime:g}s tokens, "
            f"{duration:g}s" + (f", a {outage:g}s token-endpoint outage halfway" if outage else "")
        )
        tally = Tally()
        started = time.monotonic()
        deadline = started + duration
        api_state = ["up"]

        async def work() -> None:
            while time.monotonic() < deadline:
                begun = time.monotonic()
                try:
                    response = await http.get("/hello")
                    outcome = (
                        None if response.status_code == 200 else f"HTTP {response.status_code}"
                    )
                except M2MAgentError as exc:
                    outcome = type(exc).__name__
                tally.record(begun, outcome)
                await anyio.sleep(0.05)

        async def outage_window() -> None:
            if not outage or emulator is None:
                return
            await anyio.sleep(duration / 2)
            # Go down just before the next refresh is due, so the refresh meets the outage.
            until_refresh = manager.statistics().seconds_to_refresh or 0.0
            await anyio.sleep(
                max(0.0, min(until_refresh - 0.1, deadline - time.monotonic() - outage))
            )
            emulator.inject(Fault(status=503, duration=outage, endpoints=frozenset({"create"})))
            api_state[0] = "DOWN"
            display.event(f"  ! token endpoint down for {outage:g}s (HTTP 503)")
            await anyio.sleep(outage)
            api_state[0] = "up"
            display.event("  ✓ token endpoint back")

        async def show() -> None:
            last_token = None
            while time.monotonic() < deadline:
                s = manager.statistics()
                if s.token_id and s.token_id != last_token:
                    if last_token is not None:
                        display.event(f"  ↻ rotated to {s.token_id} (mint #{s.mints})")
                    last_token = s.token_id
                display.status(time.monotonic() - started, tally, s, api_state[0])
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as tg:
            for _ in range(args.workers):
                tg.start_soon(work)
            tg.start_soon(outage_window)
            tg.start_soon(show)
        final = manager.statistics()
    closed = manager.statistics()
    latencies = sorted(tally.latencies) or [0.0]
    summary: dict[str, Any] = {
        "ok": tally.failures == 0 and tally.requests > 0,
        "backend": backend,
        "duration_seconds": duration,
        "lifetime_seconds": lifetime,
        "workers": args.workers,
        "requests": tally.requests,
        "failures": tally.failures,
        "failure_reasons": tally.failure_reasons,
        "mints": final.mints,
        "refreshes": final.refreshes,
        "refresh_failures": final.refresh_failures,
        "served_stale": final.served_stale,
        "waits": final.waits,
        "revocations": closed.revocations,
        "outage_seconds": outage,
        "latency_ms": {
            "p50": round(stats_module.median(latencies) * 1000, 2),
            "p99": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 2),
            "max": round(latencies[-1] * 1000, 2),
        },
    }
    if emulator is not None:
        summary["api_calls"] = dict(emulator.counters.requests)
    return summary


def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the demo; print live status (or one JSON summary); 0 when no request failed."""
    if args.duration <= 0 or args.lifetime <= 0 or args.workers < 1:
        raise ConfigurationError("--duration and --lifetime must be positive, --workers >= 1.")
    if args.lifetime < 2:
        raise ConfigurationError("--lifetime must be at least 2 seconds.")
    summary = anyio.run(_run, args, out)
    if args.json:
        out.write(json.dumps(summary) + "\n")
        return 0 if summary["ok"] else 1
    live = out.isatty()
    prefix = "\r\x1b[2K" if live else ""
    lat = summary["latency_ms"]
    out.write(
        f"{prefix}\n{'PASS' if summary['ok'] else 'FAIL'}: {summary['requests']} requests, "
        f"{summary['failures']} failed; {summary['mints']} mints ({summary['refreshes']} "
        f"refreshes), {summary['refresh_failures']} failed refresh attempts ridden out, "
        f"{summary['served_stale']} requests served a still-valid token during refresh, "
        f"{summary['revocations']} tokens revoked.\n"
        f"request latency p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms\n"
    )
    calls = summary.get("api_calls")
    if calls:
        out.write(
            f"Clerk API calls: {calls['create']} create calls ({summary['mints']} tokens minted "
            "and billed, the rest refused during the outage), "
            f"{calls['verify']} verifications for {summary['requests']} requests (cached by the "
            f"service), {calls['revoke']} revocations.\n"
        )
    if summary["failure_reasons"]:
        out.write(f"failures: {summary['failure_reasons']}\n")
    out.flush()
    return 0 if summary["ok"] else 1
