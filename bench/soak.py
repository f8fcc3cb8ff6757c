"""Soak: a long stream of requests across many token rotations; resources must stay flat.

Run by hand (the test suite runs a short version, ``tests/test_soak.py``)::

    python bench/soak.py [--seconds 600] [--lifetime 2] [--workers 2] [--tracemalloc]
                         [--backend asyncio|trio] [--keep-on-close] [--json]

An ``AsyncTokenManager`` and a ``TokenManager`` (each its own machine, each entered, each with
the default in-memory store and its own HTTP client) mint from the emulator, run as
``m2m-agent emulator`` in a child process and reached over loopback TCP (so this process holds
only the client side: real sockets, pooled connections and per-flight clients show in the fd
count, and the emulator's own memory, which keeps every token it minted, is not counted). Their
``--workers`` async tasks plus as many threads send requests through ``M2MAuth`` to a protected
resource, an ``httpx.MockTransport`` that accepts a bearer only if Clerk's verify endpoint
(asked once per token, by a third machine) says it is live, and only until its expiration.
Tokens live ``--lifetime`` seconds, so they rotate every ~0.7 of that.

Every ``--sample`` seconds (after a full garbage collection) the script records: RSS, traced
memory (``--tracemalloc``, one frame: slower but exact), open file descriptors, threads (anyio's
idle worker pool aside), the library's own threads, and tasks alive on the event loop. The
report compares the last sample with the first one after the warm-up, fits a slope (per minute)
to each series, and, after close, checks each manager's ``statistics()`` against the tokens the
emulator lists for its machine (minted, revoked, live).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import sniffio
import structlog

from m2m_agent import (
    AsyncTokenManager,
    ClerkM2MClient,
    M2MAgentError,
    M2MAuth,
    RefreshPolicy,
    TokenManager,
)

TARGET = "https://resource.test/data"


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    seconds: float = 10.0
    warmup_seconds: float = 2.0
    lifetime: float = 1.0
    workers: int = 2
    think_seconds: float = 0.001
    """Each worker's pause between requests (a saturated GIL would starve the API server)."""
    sample_seconds: float = 1.0
    trace_memory: bool = True
    revoke_on_close: bool = True
    policy: RefreshPolicy = RefreshPolicy(  # noqa: RUF009 - frozen, shared safely
        jitter=0.05, wait_timeout=5.0, initial_backoff=0.05, max_backoff=1.0, rotation_grace=0.3
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_count() -> int:
    """Threads, not counting anyio's and trio's idle worker pools (they outlive their calls)."""
    pools = ("AnyIO worker thread", "Trio thread")
    return sum(not t.name.startswith(pools) for t in threading.enumerate())


def m2m_threads() -> int:
    """The library's own threads (refresher, mint flights)."""
    return sum(t.name.startswith("m2m-agent") for t in threading.enumerate())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def living_tasks() -> int:
    if sniffio.current_async_library() == "trio":
        import trio

        return int(trio.lowlevel.current_statistics().tasks_living)
    return len([t for t in asyncio.all_tasks() if not t.done()])


def traced_bytes() -> int:
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


@contextlib.contextmanager
def emulator_process() -> Iterator[dict[str, Any]]:
    """``m2m-agent emulator`` in a child process: its URL and machines (async, sync, service)."""
    command = [sys.executable, "-m", "m2m_agent", "emulator", "--port", "0", "--json"]
    for name in ("async", "sync", "service"):
        command += ["--machine", name]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        try:
            assert process.stdout is not None
            settings = json.loads(process.stdout.readline())
            settings["machines"] = {m["name"]: m for m in settings["machines"]}
            yield settings
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(10)


@dataclasses.dataclass
class Sample:
    at: float
    requests: int
    rss: int
    traced: int
    fds: int
    threads: int
    m2m_threads: int
    tasks: int


class Resource:
    """Accepts a bearer Clerk verifies (once per token), until its expiration."""

    def __init__(self, verifier: ClerkM2MClient) -> None:
        self._verifier = verifier
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()
        self.rejected = 0
        self.verified = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        secret = request.headers.get("authorization", "").removeprefix("Bearer ")
        with self._lock:
            expiry = self._expiry.get(secret)
            if expiry is None:
                try:
                    token = self._verifier.verify_token(secret)
                except M2MAgentError:
                    expiry = 0.0
                else:
                    self.verified += 1
                    expiry = token.expiration.timestamp() if token.expiration else 0.0
                now = time.time()
                self._expiry = {k: v for k, v in self._expiry.items() if v > now}
                self._expiry[secret] = expiry
            if expiry <= time.time():
                self.rejected += 1
                return httpx.Response(401)
        return httpx.Response(200)


def machine_tokens(machine: dict[str, str], api_url: str) -> list[Any]:
    """Every token the emulator holds for ``machine`` (revoked and expired too)."""
    tokens: list[Any] = []
    with ClerkM2MClient(machine["secret_key"], api_url=api_url) as client:  # its own key only
        while True:
            page = client.list_tokens(
                subject=machine["id"], revoked=True, expired=True, limit=100, offset=len(tokens)
            )
            tokens += page.tokens
            if not page.tokens or len(tokens) >= page.total_count:
                return tokens


def floor(samples: list[Sample], field: str) -> int:
    return min(int(getattr(s, field)) for s in samples)


def slope_per_minute(samples: list[Sample], field: str) -> float:
    """Least-squares slope of ``field`` over time, per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s.at for s in samples]
    ys = [getattr(s, field) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return (
        0.0
        if var == 0
        else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 60
    )


async def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Run on the current event loop; returns the report (see the module doc)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    counts = {"async": 0, "sync": 0}
    failures: list[str] = []
    stop = threading.Event()
    samples: list[Sample] = []
    started_tracing = False
    with emulator_process() as emulator:
        machines = emulator["machines"]
        verifier = ClerkM2MClient(machines["service"]["secret_key"], api_url=emulator["url"])
        resource = Resource(verifier)
        transport = httpx.MockTransport(resource.handle)
        if config.trace_memory and not tracemalloc.is_tracing():
            tracemalloc.start(1)
            started_tracing = True
        common = {
            "api_url": emulator["url"],
            "lifetime": config.lifetime,
            "refresh": config.policy,
            "revoke_on_close": config.revoke_on_close,
        }
        amanager = AsyncTokenManager(machine_secret_key=machines["async"]["secret_key"], **common)
        smanager = TokenManager(machine_secret_key=machines["sync"]["secret_key"], **common)

        async def async_worker() -> None:
            async with httpx.AsyncClient(auth=M2MAuth(amanager), transport=transport) as http:
                while not stop.is_set():
                    response = await http.get(TARGET)
                    counts["async"] += 1
                    if response.status_code != 200:
                        failures.append(f"async {response.status_code}")
                    await anyio.sleep(config.think_seconds)

        def sync_worker() -> None:
            with httpx.Client(auth=M2MAuth(smanager), transport=transport) as http:
                while not stop.is_set():
                    response = http.get(TARGET)
                    counts["sync"] += 1
                    if response.status_code != 200:
                        failures.append(f"sync {response.status_code}")
                    stop.wait(config.think_seconds)

        async def quiet(*managers: Any) -> None:
            """Wait for a moment between rotations: no mint in flight, the old token's
            revocation done, the next refresh not imminent. Closing during a mint or while the
            refresher revokes loses a revocation (known bugs, tests/test_shutdown.py:
            TestCloseDuringAMint, TestCloseDuringARevocation): the counts checked here would
            show those, not what this soak is after."""
            grace = config.policy.rotation_grace
            for _ in range(400):
                stats = [m.statistics() for m in managers]
                if all(
                    not s.refresh_in_flight
                    and (s.seconds_to_refresh or 0) > 0.1
                    and config.lifetime - (s.seconds_to_expiry or 0) > grace + 0.1
                    for s in stats
                ):
                    return
                await anyio.sleep(0.005)

        async def sample(t0: float) -> Sample:
            # No mint in flight: its thread, task and socket come and go, they are no leak.
            for _ in range(100):
                if not any(m.statistics().refresh_in_flight for m in (amanager, smanager)):
                    break
                await anyio.sleep(0.005)
            gc.collect()
            return Sample(
                at=time.monotonic() - t0,
                requests=sum(counts.values()),
                rss=rss_bytes(),
                traced=traced_bytes(),
                fds=open_fds(),
                threads=thread_count(),
                m2m_threads=m2m_threads(),
                tasks=living_tasks(),
            )

        # The baseline, once the event loop's own machinery is up (a worker thread, a socket).
        with contextlib.suppress(M2MAgentError):
            await anyio.to_thread.run_sync(verifier.verify_token, "mt_" + "0" * 48)
        t0 = time.monotonic()
        before = await sample(t0)
        threads = [
            threading.Thread(target=sync_worker, daemon=True, name=f"soak-{i}")
            for i in range(config.workers)
        ]
        smanager.__enter__()
        await amanager.__aenter__()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(config.workers):
                    tg.start_soon(async_worker)
                for thread in threads:
                    thread.start()
                await anyio.sleep(config.warmup_seconds)
                while time.monotonic() - t0 < config.warmup_seconds + config.seconds:
                    samples.append(await sample(t0))
                    await anyio.sleep(config.sample_seconds)
                samples.append(await sample(t0))
                stop.set()
            await anyio.to_thread.run_sync(lambda: [t.join(10) for t in threads])
        finally:
            stop.set()
            await quiet(amanager)  # close between rotations (see quiet)
            await amanager.__aexit__(None, None, None)
            await quiet(smanager)
            await anyio.to_thread.run_sync(smanager.close)
        await anyio.sleep(0.2)
        verifier.close()
        await anyio.sleep(0.2)
        after = await sample(t0)
        if started_tracing:
            tracemalloc.stop()
        listed = {
            face: await anyio.to_thread.run_sync(machine_tokens, machines[face], emulator["url"])
            for face in ("async", "sync")
        }

    first, last = samples[0], samples[-1]
    report: dict[str, Any] = {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "policy"},
        "requests": dict(counts),
        "requests_per_second": round(
            (last.requests - first.requests) / max(last.at - first.at, 1e-9)
        ),
        "failures": len(failures),
        "resource_rejections": resource.rejected,
        "resource_verifications": resource.verified,
        "samples": len(samples),
        # The lowest of the last three samples against the lowest of the first three: a leak
        # raises the floor, a request or revocation caught mid-way is only a spike.
        "growth": {
            key: (floor(samples[-3:], name) - floor(samples[:3], name)) // scale
            for key, name, scale in (
                ("rss_kib", "rss", 1024),
                ("traced_kib", "traced", 1024),
                ("fds", "fds", 1),
                ("threads", "threads", 1),
                ("tasks", "tasks", 1),
            )
        },
        "slope_per_minute": {
            "rss_kib": round(slope_per_minute(samples, "rss") / 1024, 1),
            "traced_kib": round(slope_per_minute(samples, "traced") / 1024, 1),
            "fds": round(slope_per_minute(samples, "fds"), 2),
            "threads": round(slope_per_minute(samples, "threads"), 2),
        },
        "bytes_per_request_traced": round(
            (last.traced - first.traced) / max(last.requests - first.requests, 1), 3
        ),
        "peak": {
            "fds": max(s.fds for s in samples),
            "threads": max(s.threads for s in samples),
            "m2m_threads": max(s.m2m_threads for s in samples),
            "tasks": max(s.tasks for s in samples),
        },
        "before": dataclasses.asdict(before),
        "after_close": dataclasses.asdict(after),
        "faces": {},
    }
    for face, manager in (("async", amanager), ("sync", smanager)):
        stats = manager.statistics()
        tokens = listed[face]
        report["faces"][face] = {
            "statistics": {
                k: getattr(v, "value", v)
                for k, v in dataclasses.asdict(stats).items()
                if k != "last_error"
            },
            "emulator_tokens": len(tokens),
            "emulator_revoked_tokens": sum(t.revoked for t in tokens),
            "emulator_unrevoked_tokens": sum(not t.revoked for t in tokens),
        }
    return report


def check(report: dict[str, Any], config: SoakConfig) -> list[str]:
    """What must hold; an empty list when it all does."""
    problems = []
    if report["failures"] or report["resource_rejections"]:
        problems.append(f"{report['failures']} failed requests")
    growth = report["growth"]
    if growth["fds"] > 0 or growth["threads"] > 0 or growth["tasks"] > 0:
        problems.append(f"fds/threads/tasks grew: {growth}")
    before, after = report["before"], report["after_close"]
    if (
        after["threads"] > before["threads"]
        or after["fds"] > before["fds"]
        or after["m2m_threads"]
        or after["tasks"] > before["tasks"]
    ):
        problems.append(f"not back to baseline after close: {before} -> {after}")
    for face, f in report["faces"].items():
        s = f["statistics"]
        expected_revocations = s["mints"] if config.revoke_on_close else s["mints"] - 1
        wrong = {
            "mints == refreshes + 1": s["mints"] == s["refreshes"] + 1,
            "revocations after close": s["revocations"] == expected_revocations,
            "no failures": s["refresh_failures"] == s["revocation_failures"] == 0,
            "no waits timed out": s["wait_timeouts"] == 0,
            "no invalidations": s["invalidations"] == 0,
            "emulator tokens == mints": f["emulator_tokens"] == s["mints"],
            "emulator revoked == revocations": f["emulator_revoked_tokens"] == s["revocations"],
            "unrevoked tokens after close": f["emulator_unrevoked_tokens"]
            == (0 if config.revoke_on_close else 1),
        }
        problems += [f"{face}: {name}: {s}" for name, ok in wrong.items() if not ok]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="the size knob")
    parser.add_argument("--lifetime", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--tracemalloc", action="store_true", help="trace memory (slower)")
    parser.add_argument("--keep-on-close", action="store_true", help="revoke_on_close=False")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        warmup_seconds=min(10.0, max(2.0, args.seconds / 10)),
        lifetime=args.lifetime,
        workers=args.workers,
        sample_seconds=args.sample,
        trace_memory=args.tracemalloc,
        revoke_on_close=not args.keep_on_close,
    )
    started = time.monotonic()
    report = anyio.run(run_soak, config, backend=args.backend)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["backend"] = args.backend
    problems = check(report, config)
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rotations = {f: v["statistics"]["mints"] for f, v in report["faces"].items()}
        print(
            f"{sum(report['requests'].values())} requests ({report['requests_per_second']}/s), "
            f"mints {rotations}, failures {report['failures']}"
        )
        print(f"growth first->last sample: {report['growth']}")
        print(f"slope per minute: {report['slope_per_minute']}")
        print(f"traced bytes per request: {report['bytes_per_request_traced']}")
        print(f"before: {report['before']}\nafter close: {report['after_close']}")
        print("problems:", problems or "none")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
