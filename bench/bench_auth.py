"""Per-request overhead of ``M2MAuth``, and the herd figures, measured in-process.

Run by hand::

    python bench/bench_auth.py [--requests N] [--rounds R] [--json]

Three variants are sent through ``httpx.MockTransport`` (a handler answering 200), with
``httpx.Client`` and with ``httpx.AsyncClient`` on asyncio:

- ``none``: no auth at all;
- ``const``: an ``httpx.Auth`` subclass setting a fixed ``Authorization`` header in
  ``auth_flow`` (the cheapest possible bearer auth, the baseline);
- ``m2m``: ``M2MAuth`` over a warmed, entered ``TokenManager`` / ``AsyncTokenManager`` on the
  in-process emulator.

The variants are interleaved in several rounds (the order rotates each round) and the median
per variant is reported, to keep drift and noise out of the ratios. The goal is ``m2m`` within
1.10x of ``const``.

The herd figures: 10,000 concurrent ``await manager.get_token()`` on an empty
``AsyncTokenManager``, and 64 threads calling ``get_token()`` on an empty ``TokenManager``; the
emulator counts the mints (the contract says exactly one).
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
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import httpx
import structlog

import m2m_agent
from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    ClerkM2MClient,
    M2MAuth,
    TokenManager,
)
from m2m_agent.emulator import Emulator

API_URL = "https://api.clerk.test"
TARGET = "https://service.test/resource"
VARIANTS = ("none", "const", "m2m")
GOAL = 1.10


class ConstantBearer(httpx.Auth):
    """The baseline: a fixed bearer header, set in ``auth_flow``."""

    def __init__(self, token: str) -> None:
        self.header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header
        yield request


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def emulated(emulator: Emulator) -> tuple[ClerkM2MClient, AsyncClerkM2MClient]:
    key = emulator.create_machine("bench").secret_key
    sync_client = ClerkM2MClient(
        key, api_url=API_URL, http_client=httpx.Client(transport=emulator.transport())
    )
    async_client = AsyncClerkM2MClient(
        key, api_url=API_URL, http_client=httpx.AsyncClient(transport=emulator.async_transport())
    )
    return sync_client, async_client


# -- per-request overhead ----------------------------------------------------------------------


def rounds_of(
    timers: dict[str, Callable[[int], float]], *, requests: int, rounds: int
) -> dict[str, list[float]]:
    """Run each timer ``rounds`` times, rotating the order; µs per request for each run."""
    results: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            results[name].append(timers[name](requests) / requests * 1e6)
    return results


def bench_sync(*, requests: int, rounds: int) -> dict[str, list[float]]:
    emulator = Emulator()
    api_client, _ = emulated(emulator)
    with TokenManager(client=api_client, lifetime=3600) as manager:
        token = manager.get_token()  # warm
        clients = {
            "none": httpx.Client(transport=httpx.MockTransport(ok)),
            "const": httpx.Client(transport=httpx.MockTransport(ok), auth=ConstantBearer(token)),
            "m2m": httpx.Client(transport=httpx.MockTransport(ok), auth=M2MAuth(manager)),
        }

        def timer(client: httpx.Client) -> Callable[[int], float]:
            def run(n: int) -> float:
                get = client.get
                start = time.perf_counter()
                for _ in range(n):
                    get(TARGET)
                return time.perf_counter() - start

            return run

        timers = {name: timer(client) for name, client in clients.items()}
        for run in timers.values():
            run(max(200, requests // 10))  # warm up
        results = rounds_of(timers, requests=requests, rounds=rounds)
        for client in clients.values():
            client.close()
        assert emulator.counters.mints == 1, emulator.counters
    api_client.close()
    return results


def bench_async(*, requests: int, rounds: int) -> dict[str, list[float]]:
    async def main() -> dict[str, list[float]]:
        emulator = Emulator()
        _, api_client = emulated(emulator)
        async with AsyncTokenManager(client=api_client, lifetime=3600) as manager:
            token = await manager.get_token()  # warm
            clients = {
                "none": httpx.AsyncClient(transport=httpx.MockTransport(ok)),
                "const": httpx.AsyncClient(
                    transport=httpx.MockTransport(ok), auth=ConstantBearer(token)
                ),
                "m2m": httpx.AsyncClient(transport=httpx.MockTransport(ok), auth=M2MAuth(manager)),
            }

            def timer(client: httpx.AsyncClient) -> Callable[[int], Awaitable[float]]:
                async def run(n: int) -> float:
                    get = client.get
                    start = time.perf_counter()
                    for _ in range(n):
                        await get(TARGET)
                    return time.perf_counter() - start

                return run

            timers = {name: timer(client) for name, client in clients.items()}
            for run in timers.values():
                await run(max(200, requests // 10))
            results: dict[str, list[float]] = {name: [] for name in timers}
            names = list(timers)
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    gc.collect()
                    results[name].append(await timers[name](requests) / requests * 1e6)
            for client in clients.values():
                await client.aclose()
            assert emulator.counters.mints == 1, emulator.counters
        await api_client.aclose()
        return results

    return asyncio.run(main())


def summarise(runs: dict[str, list[float]]) -> dict[str, Any]:
    medians = {name: statistics.median(values) for name, values in runs.items()}
    base = medians["const"]
    return {
        name: {
            "us_per_request": round(medians[name], 2),
            "min": round(min(runs[name]), 2),
            "max": round(max(runs[name]), 2),
            "ratio_to_const": round(medians[name] / base, 3),
        }
        for name in VARIANTS
    }


# -- herd ----------------------------------------------------------------------------------------


def herd_async(callers: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        emulator = Emulator()
        _, api_client = emulated(emulator)
        manager = AsyncTokenManager(client=api_client, lifetime=3600)
        start = time.perf_counter()
        tokens = await asyncio.gather(*(manager.get_token() for _ in range(callers)))
        elapsed = time.perf_counter() - start
        stats = manager.statistics()
        await manager.aclose()
        await api_client.aclose()
        return {
            "callers": callers,
            "mints": emulator.counters.mints,
            "distinct_tokens": len(set(tokens)),
            "waits": stats.waits,
            "seconds": round(elapsed, 3),
        }

    return asyncio.run(main())


def herd_threads(callers: int) -> dict[str, Any]:
    emulator = Emulator()
    api_client, _ = emulated(emulator)
    manager = TokenManager(client=api_client, lifetime=3600)
    barrier = threading.Barrier(callers)
    tokens: list[str] = []

    def call() -> None:
        barrier.wait()
        tokens.append(manager.get_token())

    threads = [threading.Thread(target=call) for _ in range(callers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    stats = manager.statistics()
    manager.close()
    api_client.close()
    return {
        "callers": callers,
        "mints": emulator.counters.mints,
        "distinct_tokens": len(set(tokens)),
        "waits": stats.waits,
        "seconds": round(elapsed, 3),
    }


# -- main --------------------------------------------------------------------------------------


def print_table(title: str, summary: dict[str, Any]) -> None:
    print(title)
    print(f"  {'variant':<8} {'µs/request':>11} {'min':>8} {'max':>8} {'vs const':>9}")
    for name, row in summary.items():
        print(
            f"  {name:<8} {row['us_per_request']:>11.2f} {row['min']:>8.2f} {row['max']:>8.2f}"
            f" {row['ratio_to_const']:>8.3f}x"
        )
    m2m = summary["m2m"]
    overhead = m2m["us_per_request"] - summary["const"]["us_per_request"]
    verdict = "OK" if m2m["ratio_to_const"] <= GOAL else "OVER GOAL"
    print(
        f"  M2MAuth vs constant header: {m2m['ratio_to_const']:.3f}x "
        f"({overhead:+.2f} µs/request), goal <= {GOAL:.2f}x: {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median taken)")
    parser.add_argument("--herd", type=int, default=10_000, help="concurrent async callers")
    parser.add_argument("--threads", type=int, default=64, help="threads for the sync herd")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args(argv)

    # A script may configure logging: keep the managers' info events out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    sync = summarise(bench_sync(requests=args.requests, rounds=args.rounds))
    async_ = summarise(bench_async(requests=args.requests, rounds=args.rounds))
    herd = {"async": herd_async(args.herd), "threads": herd_threads(args.threads)}
    report = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "httpx": httpx.__version__,
        "m2m_agent": m2m_agent.__version__,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "goal_ratio": GOAL,
        "sync": sync,
        "async": async_,
        "herd": herd,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(
            f"Python {report['python']} ({report['implementation']}), httpx {report['httpx']}, "
            f"{args.requests} requests x {args.rounds} rounds per variant, medians"
        )
        print_table("sync (httpx.Client, MockTransport)", sync)
        print_table("async (httpx.AsyncClient on asyncio, MockTransport)", async_)
        a, t = herd["async"], herd["threads"]
        print("herd")
        print(
            f"  {a['callers']} concurrent await get_token() on an empty AsyncTokenManager: "
            f"{a['mints']} mint(s), {a['distinct_tokens']} distinct token(s), {a['seconds']} s"
        )
        print(
            f"  {t['callers']} threads get_token() on an empty TokenManager: "
            f"{t['mints']} mint(s), {t['distinct_tokens']} distinct token(s), {t['seconds']} s"
        )
    ok_ratio = sync["m2m"]["ratio_to_const"] <= GOAL and async_["m2m"]["ratio_to_const"] <= GOAL
    ok_herd = herd["async"]["mints"] == 1 and herd["threads"]["mints"] == 1
    return 0 if ok_ratio and ok_herd else 1


if __name__ == "__main__":
    sys.exit(main())
