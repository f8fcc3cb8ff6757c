"""Verifications per second on the receiving side, against a plain ``jwt.decode`` baseline.

Run by hand::

    python bench/bench_verify.py [--count N] [--rounds R] [--herd N] [--json]

Variants, all on one JWT-format and one opaque token minted by the in-process emulator:

- ``jwt.decode``: PyJWT's ``jwt.decode(token, public_key, algorithms=["RS256"])`` of the JWT,
  the key already loaded (the baseline: the least a correct RS256 check costs in PyJWT);
- ``jwt-pem``: ``TokenVerifier(jwt_key=PEM).verify(jwt)`` (type detection, RS256 only, time
  checks, mapping to ``VerifiedToken``);
- ``jwt-jwks``: the same with keys from the (cached) JWKS;
- ``jwt-pem-async``: ``await AsyncTokenVerifier(jwt_key=PEM).verify(jwt)`` on asyncio;
- ``opaque-cached`` / ``opaque-cached-async``: an opaque token already verified once, so every
  call is a cache hit (what a busy service sees between two calls to Clerk).

Variants are interleaved over several rounds (the order rotates) and the median per variant is
reported, with its ratio to ``jwt.decode`` (higher is faster). The herd figures: N concurrent
``await verify()`` of one uncached opaque token on asyncio, and 64 threads on the sync verifier,
with 50 ms of API latency; the emulator counts the verify calls (the contract says one).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import platform
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
import structlog
from cryptography.hazmat.primitives import serialization

import m2m_agent
from m2m_agent import ClerkM2MClient
from m2m_agent.emulator import Emulator, Fault
from m2m_agent.verify import AsyncTokenVerifier, TokenVerifier

API_URL = "https://api.clerk.test"
BASELINE = "jwt.decode"


class Setup:
    """An emulated instance, one opaque and one JWT token, and warmed verifiers."""

    def __init__(self) -> None:
        self.emu = Emulator()
        service = self.emu.create_machine("service")
        worker = self.emu.create_machine("worker", scoped_machines=[service.id])
        minter = ClerkM2MClient(
            worker.secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=self.emu.transport()),
        )
        self.opaque = minter.create_token(seconds_until_expiration=3600).token or ""
        self.jwt = (
            minter.create_token(
                seconds_until_expiration=3600, token_format="jwt", claims={"role": "bench"}
            ).token
            or ""
        )
        self.pem = self.emu.public_key_pem()
        self.public_key = serialization.load_pem_public_key(self.pem.encode())
        self.service_key = service.secret_key
        self.sync = TokenVerifier(
            machine_secret_key=service.secret_key,
            jwt_key=self.pem,
            api_url=API_URL,
            http_client=httpx.Client(transport=self.emu.transport()),
        )
        self.jwks = TokenVerifier(
            secret_key=self.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=self.emu.transport()),
        )
        self.sync.verify(self.opaque)
        self.jwks.verify(self.jwt)

    def async_verifier(self) -> AsyncTokenVerifier:
        return AsyncTokenVerifier(
            machine_secret_key=self.service_key,
            jwt_key=self.pem,
            api_url=API_URL,
            http_client=httpx.AsyncClient(transport=self.emu.async_transport()),
        )


def sync_timer(fn: Callable[[], Any]) -> Callable[[int], float]:
    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - start

    return run


def async_timer(fn: Callable[[], Awaitable[Any]]) -> Callable[[int], float]:
    def run(n: int) -> float:
        async def loop() -> float:
            start = time.perf_counter()
            for _ in range(n):
                await fn()
            return time.perf_counter() - start

        return asyncio.run(loop())

    return run


def bench(*, count: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    setup = Setup()
    verifier = setup.async_verifier()
    asyncio.run(verifier.verify(setup.opaque))  # warm the async cache
    token, key = setup.jwt, setup.public_key

    def baseline() -> Any:
        return jwt.decode(token, key, algorithms=["RS256"])  # type: ignore[arg-type]

    timers: dict[str, Callable[[int], float]] = {
        BASELINE: sync_timer(baseline),
        "jwt-pem": sync_timer(lambda: setup.sync.verify(token)),
        "jwt-jwks": sync_timer(lambda: setup.jwks.verify(token)),
        "jwt-pem-async": async_timer(lambda: verifier.verify(token)),
        "opaque-cached": sync_timer(lambda: setup.sync.verify(setup.opaque)),
        "opaque-cached-async": async_timer(lambda: verifier.verify(setup.opaque)),
    }
    # Same answers before timing anything: the baseline and the verifier agree on the token.
    decoded = baseline()
    assert setup.sync.verify(token).token_id == decoded["jti"]
    for run in timers.values():
        run(max(100, count // 10))  # warm up
    results: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            results[name].append(count / timers[name](count))
    calls = {
        "verify_calls": setup.emu.counters.verifications,
        "jwks_fetches": setup.emu.counters.jwks,
    }
    return results, calls


def summarise(runs: dict[str, list[float]]) -> dict[str, Any]:
    medians = {name: statistics.median(values) for name, values in runs.items()}
    base = medians[BASELINE]
    return {
        name: {
            "per_second": round(medians[name]),
            "us_per_call": round(1e6 / medians[name], 2),
            "min_per_second": round(min(runs[name])),
            "max_per_second": round(max(runs[name])),
            "ratio_to_jwt_decode": round(medians[name] / base, 3),
        }
        for name in runs
    }


def herd_async(callers: int) -> dict[str, Any]:
    setup = Setup()
    verifier = setup.async_verifier()  # a new verifier: the opaque token is not cached in it
    setup.emu.reset_counters()
    setup.emu.inject(Fault(latency=0.05, endpoints=frozenset({"verify"})))
    token = setup.opaque

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(verifier.verify(token) for _ in range(callers)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    return {
        "callers": callers,
        "verify_calls": setup.emu.counters.requests.get("verify", 0),
        "seconds": round(elapsed, 3),
    }


def herd_threads(callers: int) -> dict[str, Any]:
    setup = Setup()
    setup.emu.reset_counters()
    setup.emu.inject(Fault(latency=0.05, endpoints=frozenset({"verify"})))
    verifier = TokenVerifier(
        machine_secret_key=setup.service_key,
        api_url=API_URL,
        http_client=httpx.Client(transport=setup.emu.transport()),
    )
    barrier = threading.Barrier(callers)

    def call() -> None:
        barrier.wait()
        verifier.verify(setup.opaque)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "callers": callers,
        "verify_calls": setup.emu.counters.requests.get("verify", 0),
        "seconds": round(time.perf_counter() - start, 3),
    }


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"  {'variant':<20} {'verif/s':>10} {'µs/call':>9} {'min/s':>10} {'max/s':>10} {'ratio':>8}"
    )
    for name, row in summary.items():
        print(
            f"  {name:<20} {row['per_second']:>10,} {row['us_per_call']:>9.2f}"
            f" {row['min_per_second']:>10,} {row['max_per_second']:>10,}"
            f" {row['ratio_to_jwt_decode']:>7.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median taken)")
    parser.add_argument("--herd", type=int, default=10_000, help="concurrent async callers")
    parser.add_argument("--threads", type=int, default=64, help="threads for the sync herd")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args(argv)

    # Keep the library's debug events (one per API call) out of the figures and the output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    runs, calls = bench(count=args.count, rounds=args.rounds)
    report = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pyjwt": jwt.__version__,
        "m2m_agent": m2m_agent.__version__,
        "count_per_round": args.count,
        "rounds": args.rounds,
        "variants": summarise(runs),
        "api_calls_during_timing": calls,
        "herd": {"async": herd_async(args.herd), "threads": herd_threads(args.threads)},
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"Python {report['python']} ({report['implementation']}), PyJWT {report['pyjwt']}, "
        f"{args.count} verifications x {args.rounds} rounds per variant, medians; "
        f"ratio = throughput / jwt.decode's"
    )
    print_table(report["variants"])
    print(
        f"  API calls while timing: {calls['verify_calls']} verify (the warm-up), "
        f"{calls['jwks_fetches']} JWKS fetch"
    )
    herd = report["herd"]
    print(
        f"herd: {herd['async']['callers']} concurrent async verifications of one uncached "
        f"opaque token -> {herd['async']['verify_calls']} verify call "
        f"({herd['async']['seconds']} s)"
    )
    print(
        f"herd: {herd['threads']['callers']} threads -> {herd['threads']['verify_calls']} "
        f"verify call ({herd['threads']['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
