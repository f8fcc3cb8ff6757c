"""Chaos: a sustained mix of API faults while sync and async workers call a protected service.

Run by hand (the test suite runs a short version, ``tests/test_chaos.py``)::

    python bench/chaos.py [--chaos-seconds 60] [--outage-seconds 10] [--lifetime 3]
                          [--workers 4] [--probability 0.5] [--backend asyncio|trio]
                          [--seed 1] [--json]

What happens, on the in-process emulator (no network):

1. Two managers, one ``AsyncTokenManager`` and one ``TokenManager`` (each its own machine, so
   their tokens can be told apart), are entered; ``--workers`` async tasks and as many threads
   send requests through ``M2MAuth`` to a protected resource, an ``httpx.MockTransport``
   handler that accepts a bearer only if the emulator holds it as unrevoked and unexpired *by
   the emulator's own clock*.
2. Chaos, ``--chaos-seconds``: every ``create`` call meets, with probability ``--probability``
   overall, one of 500, 503, 429 with ``Retry-After: 1``, a dropped connection, a malformed body
   (not JSON, wrong shape, truncated, HTML, huge), or a latency longer than the client's read
   timeout; a fifth of calls also get a latency spike. Tokens live ``--lifetime`` seconds, so
   refreshes keep happening inside the faults.
3. Outage, ``--outage-seconds``: every ``create`` answers 503.
4. Recovery: faults are cleared; the time until each manager holds a FRESH token with no
   failure outstanding is measured.

Every API call is recorded by a probe transport between the client and the emulator (start,
end, outcome, ``Retry-After``, how many calls were in flight per key, and each token that was
actually delivered: a truncated or dropped answer mints a token nobody received). The report
says, per face: requests and caller-visible failures, failures while a delivered token was
still valid, requests that reached the resource with an expired, revoked, unknown or
under-margin token, API attempts per minute during the chaos and the outage, the most attempts
in flight at once, violations of ``Retry-After``, the recovery time, and the manager's own
statistics.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import anyio
import anyio.to_thread
import httpx
import structlog

from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    ClerkM2MClient,
    M2MAgentError,
    M2MAuth,
    RefreshPolicy,
    TokenManager,
    TokenState,
)
from m2m_agent.emulator import Emulator, Fault

API_URL = "https://api.clerk.test"
TARGET = "https://resource.test/data"
FACES = ("async", "sync")


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
    """The scenario's knobs; the defaults are the short version the test suite runs."""

    seed: int = 1
    lifetime: float = 3.0
    warmup_seconds: float = 0.5
    chaos_seconds: float = 5.0
    outage_seconds: float = 2.5
    cooldown_seconds: float = 0.5
    workers: int = 4
    """Async tasks, and as many threads."""
    probability: float = 0.5
    """The chance that a ``create`` call fails during the chaos."""
    think_seconds: float = 0.005
    """Each worker's pause between requests."""
    request_timeout: float = 1.0
    """The API client's timeout: the 1.5 s latency fault becomes a ReadTimeout."""
    retry_after: float = 1.0
    policy: RefreshPolicy = RefreshPolicy(  # noqa: RUF009 - frozen, shared safely
        refresh_at=0.5,
        wait_timeout=5.0,
        initial_backoff=0.05,
        max_backoff=1.0,
        rotation_grace=0.5,
        min_invalidate_age=1.0,
    )
    token_format: str = "opaque"
    faces: tuple[str, ...] = FACES


# --- the probe between the API client and the emulator ------------------------------------------


@dataclasses.dataclass
class Attempt:
    face: str
    endpoint: str
    started: float
    ended: float = math.nan
    outcome: str = ""
    retry_after: float | None = None


@dataclasses.dataclass(frozen=True)
class Delivered:
    face: str
    token_id: str
    secret: str
    delivered_at: float
    expires_at: float


class Probe:
    """Records every API call and every token actually delivered to a client."""

    def __init__(self, faces_by_key: dict[str, str]) -> None:
        self._faces = faces_by_key
        self._lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.delivered: list[Delivered] = []
        self._in_flight: dict[tuple[str, str], int] = defaultdict(int)
        self.max_in_flight: dict[tuple[str, str], int] = defaultdict(int)

    def begin(self, request: httpx.Request) -> Attempt:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        path = request.url.path
        if path.endswith("/revoke"):
            endpoint = "revoke"
        elif path.endswith("/verify"):
            endpoint = "verify"
        else:
            endpoint = "create" if request.method == "POST" else "list"
        attempt = Attempt(self._faces.get(key, "?"), endpoint, time.time())
        with self._lock:
            slot = (attempt.face, endpoint)
            self._in_flight[slot] += 1
            self.max_in_flight[slot] = max(self.max_in_flight[slot], self._in_flight[slot])
            self.attempts.append(attempt)
        return attempt

    def end(
        self, attempt: Attempt, response: httpx.Response | None, error: Exception | None
    ) -> None:
        attempt.ended = time.time()
        if response is None:
            attempt.outcome = type(error).__name__
        else:
            attempt.outcome = str(response.status_code)
            value = response.headers.get("retry-after")
            attempt.retry_after = float(value) if value else None
            if attempt.endpoint == "create" and response.status_code == 201:
                self._delivered(attempt, response.content)
        with self._lock:
            self._in_flight[(attempt.face, attempt.endpoint)] -= 1

    def _delivered(self, attempt: Attempt, content: bytes) -> None:
        if len(content) > 1024 * 1024:
            return  # the client refuses it
        try:
            body = json.loads(content)
            secret, token_id, expiration = body["token"], body["id"], body["expiration"]
        except (ValueError, KeyError, TypeError):
            return  # a truncated or malformed answer: nobody got this token
        if not (isinstance(secret, str) and isinstance(expiration, (int, float))):
            return
        with self._lock:
            self.delivered.append(
                Delivered(attempt.face, token_id, secret, attempt.ended, expiration / 1000)
            )


class ProbeTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, probe: Probe) -> None:
        self._inner, self._probe = inner, probe

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt = self._probe.begin(request)
        try:
            response = self._inner.handle_request(request)
            response.read()
        except Exception as exc:
            self._probe.end(attempt, None, exc)
            raise
        self._probe.end(attempt, response, None)
        return response


class AsyncProbeTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, probe: Probe) -> None:
        self._inner, self._probe = inner, probe

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = self._probe.begin(request)
        try:
            response = await self._inner.handle_async_request(request)
            await response.aread()
        except Exception as exc:
            self._probe.end(attempt, None, exc)
            raise
        self._probe.end(attempt, response, None)
        return response


# --- the protected resource ----------------------------------------------------------------------


class Resource:
    """Accepts a bearer only if the emulator holds it, unrevoked and unexpired by its own clock."""

    def __init__(self, emulator: Emulator, clock: Any, margin: float) -> None:
        self._emulator = emulator
        self._clock = clock
        self._margin = margin
        self._lock = threading.Lock()
        self.verdicts: dict[str, int] = defaultdict(int)
        self.min_remaining = math.inf
        self.under_margin = 0
        self.tokens_seen: set[str] = set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        now = self._clock()
        record = next((t for t in self._emulator.tokens if t.token == secret), None)
        if scheme != "Bearer" or record is None:
            verdict = "unknown"
        elif record.revoked:
            verdict = "revoked"
        elif record.expires_at is not None and now >= record.expires_at:
            verdict = "expired"
        else:
            verdict = "ok"
        with self._lock:
            self.verdicts[verdict] += 1
            if record is not None:
                self.tokens_seen.add(record.id)
            if record is not None and record.expires_at is not None:
                remaining = record.expires_at - now
                self.min_remaining = min(self.min_remaining, remaining)
                # 0.1 s of slack: the time between get_token() and this handler on a busy box.
                if remaining < self._margin - 0.1:
                    self.under_margin += 1
        if verdict != "ok":
            return httpx.Response(401, headers={"www-authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json={"ok": True})


# --- workers -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Failure:
    face: str
    started: float
    ended: float
    kind: str
    error: BaseException | None = None


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = defaultdict(int)
        self.failures: list[Failure] = []
        self.errors: list[BaseException] = []
        self.slowest: dict[str, float] = defaultdict(float)

    def record(
        self, face: str, started: float, status: int | None, error: BaseException | None
    ) -> None:
        ended = time.time()
        with self._lock:
            self.requests[face] += 1
            self.slowest[face] = max(self.slowest[face], ended - started)
            if error is not None:
                self.errors.append(error)
                self.failures.append(Failure(face, started, ended, type(error).__name__, error))
            elif status != 200:
                self.failures.append(Failure(face, started, ended, f"HTTP {status}"))


@dataclasses.dataclass
class Phases:
    chaos: tuple[float, float] = (math.nan, math.nan)
    outage: tuple[float, float] = (math.nan, math.nan)


def inject_chaos(emulator: Emulator, config: ChaosConfig) -> None:
    """The mix: seven answer-changing faults sharing ``probability``, plus latency spikes."""
    create = frozenset({"create"})
    kinds: list[dict[str, Any]] = [
        {"status": 500},
        {"status": 503},
        {"status": 429, "retry_after": config.retry_after},
        {"drop": True},
        {"malformed": "not_json"},
        {"malformed": "truncated"},
        {"malformed": "html"},
        {"malformed": "wrong_shape"},
        {"malformed": "huge"},
        {"latency": config.request_timeout * 1.5},  # a ReadTimeout
    ]
    # Faults are drawn in order: each applies with p, so that 1 - (1 - p)**n = probability.
    each = 1 - (1 - config.probability) ** (1 / len(kinds))
    for kind in kinds:
        emulator.inject(Fault(endpoints=create, probability=each, **kind))
    emulator.inject(Fault(latency=0.3, probability=0.2, endpoints=create))


async def run_scenario(config: ChaosConfig, emulator: Emulator | None = None) -> dict[str, Any]:
    """Run the scenario on the current event loop; returns the report (see the module doc).

    The report's ``caller_errors`` holds the exceptions workers saw (not JSON: drop it to print).
    """
    clock = time.time
    emulator = emulator or Emulator(seed=config.seed, clock=clock)
    machines = {face: emulator.create_machine(f"{face}-worker") for face in config.faces}
    probe = Probe({m.secret_key: face for face, m in machines.items()})
    policy = config.policy
    margin = policy.margin_seconds(config.lifetime)
    resource = Resource(emulator, clock, margin)
    tally = Tally()
    managers: dict[str, Any] = {}
    common = {"lifetime": config.lifetime, "refresh": policy, "token_format": config.token_format}
    if "async" in config.faces:
        http = httpx.AsyncClient(transport=AsyncProbeTransport(emulator.async_transport(), probe))
        client: Any = AsyncClerkM2MClient(
            machines["async"].secret_key,
            api_url=API_URL,
            http_client=http,
            timeout=config.request_timeout,
        )
        managers["async"] = AsyncTokenManager(client=client, **common)
    if "sync" in config.faces:
        http_sync = httpx.Client(transport=ProbeTransport(emulator.transport(), probe))
        client = ClerkM2MClient(
            machines["sync"].secret_key,
            api_url=API_URL,
            http_client=http_sync,
            timeout=config.request_timeout,
        )
        managers["sync"] = TokenManager(client=client, **common)

    stop = threading.Event()
    resource_transport = httpx.MockTransport(resource.handle)

    async def async_worker() -> None:
        async with httpx.AsyncClient(
            auth=M2MAuth(managers["async"]), transport=resource_transport
        ) as http:
            while not stop.is_set():
                started = time.time()
                try:
                    response = await http.get(TARGET)
                except M2MAgentError as exc:
                    tally.record("async", started, None, exc)
                else:
                    tally.record("async", started, response.status_code, None)
                await anyio.sleep(config.think_seconds)

    def sync_worker() -> None:
        with httpx.Client(auth=M2MAuth(managers["sync"]), transport=resource_transport) as http:
            while not stop.is_set():
                started = time.time()
                try:
                    response = http.get(TARGET)
                except M2MAgentError as exc:
                    tally.record("sync", started, None, exc)
                else:
                    tally.record("sync", started, response.status_code, None)
                stop.wait(config.think_seconds)

    phases = Phases()
    recovery: dict[str, float] = {}
    threads = [
        threading.Thread(target=sync_worker, name=f"chaos-sync-{i}", daemon=True)
        for i in range(config.workers if "sync" in managers else 0)
    ]
    sync_manager = managers.get("sync")
    async_manager = managers.get("async")
    if sync_manager is not None:
        sync_manager.__enter__()
    try:
        if async_manager is not None:
            await async_manager.__aenter__()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(config.workers if async_manager is not None else 0):
                    tg.start_soon(async_worker)
                for thread in threads:
                    thread.start()
                await anyio.sleep(config.warmup_seconds)
                started = clock()
                inject_chaos(emulator, config)
                await anyio.sleep(config.chaos_seconds)
                emulator.clear_faults()
                phases.chaos = (started, clock())
                emulator.inject(Fault(status=503, endpoints=frozenset({"create"})))
                await anyio.sleep(config.outage_seconds)
                emulator.clear_faults()
                cleared = clock()
                phases.outage = (phases.chaos[1], cleared)
                pending = set(managers)
                while pending and clock() - cleared < 10 * policy.max_backoff + 5:
                    for face in sorted(pending):
                        stats = managers[face].statistics()
                        if (
                            stats.consecutive_failures == 0
                            and stats.token_state is TokenState.FRESH
                        ):
                            recovery[face] = clock() - cleared
                            pending.discard(face)
                    await anyio.sleep(0.01)
                await anyio.sleep(config.cooldown_seconds)
                stop.set()
            await anyio.to_thread.run_sync(lambda: [t.join(10) for t in threads])
        finally:
            stop.set()
            if async_manager is not None:
                await async_manager.__aexit__(None, None, None)
    finally:
        if sync_manager is not None:
            await anyio.to_thread.run_sync(sync_manager.close)

    return build_report(
        config, emulator, machines, probe, resource, tally, phases, recovery, managers, margin
    )


def _rate_per_minute(attempts: list[Attempt], window: tuple[float, float]) -> float:
    start, end = window
    count = sum(1 for a in attempts if start <= a.started < end)
    return round(count / max(end - start, 1e-9) * 60, 1)


def build_report(
    config: ChaosConfig,
    emulator: Emulator,
    machines: dict[str, Any],
    probe: Probe,
    resource: Resource,
    tally: Tally,
    phases: Phases,
    recovery: dict[str, float],
    managers: dict[str, Any],
    margin: float,
) -> dict[str, Any]:
    subjects = {m.id for m in machines.values()}
    delivered_ids = {d.token_id for d in probe.delivered}
    live = [
        t.id
        for t in emulator.tokens
        if not t.revoked and (t.expires_at or math.inf) > time.time() and t.subject in subjects
    ]
    report: dict[str, Any] = {
        "caller_errors": list(tally.errors),
        "config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("policy", "faces")
        },
        "policy": dataclasses.asdict(config.policy),
        "resource": {
            "verdicts": dict(resource.verdicts),
            "under_margin": resource.under_margin,
            "min_remaining_s": round(resource.min_remaining, 3),
        },
        "emulator": {
            "mints": emulator.counters.mints,
            "faults_applied": emulator.counters.faults,
            "requests": dict(emulator.counters.requests),
            # Minted, but the answer never arrived (truncated): no client could revoke them.
            "orphans_live_after_close": len([i for i in live if i not in delivered_ids]),
            # Delivered to a manager and still live after close: close() should have revoked.
            "delivered_live_after_close": [i for i in live if i in delivered_ids],
        },
        "faces": {},
    }
    for face in managers:
        creates = [a for a in probe.attempts if a.face == face and a.endpoint == "create"]
        creates.sort(key=lambda a: a.started)
        delivered = sorted(
            (d for d in probe.delivered if d.face == face), key=lambda d: d.delivered_at
        )
        failures = [f for f in tally.failures if f.face == face]

        def valid_token_existed(at: float, delivered: list[Delivered] = delivered) -> bool:
            return any(
                d.delivered_at <= at - 0.05 and d.expires_at - margin - 0.1 > at for d in delivered
            )

        early = []
        for previous, following in itertools.pairwise(creates):
            if previous.outcome == "429" and previous.retry_after is not None:
                wanted = min(previous.retry_after, config.policy.max_backoff)
                if following.started - previous.ended < wanted - 0.01:
                    early.append(round(following.started - previous.ended, 3))
        stats = managers[face].statistics()
        outcomes: dict[str, int] = defaultdict(int)
        for attempt in creates:
            if phases.chaos[0] <= attempt.started < phases.chaos[1]:
                outcomes[attempt.outcome] += 1
        report["faces"][face] = {
            "requests": tally.requests[face],
            "failures": len(failures),
            "failure_kinds": sorted({f.kind for f in failures}),
            "failures_while_valid_token": sum(valid_token_existed(f.ended) for f in failures),
            "failures_by_phase": {
                name: sum(start <= f.ended < end for f in failures)
                for name, (start, end) in (("chaos", phases.chaos), ("outage", phases.outage))
            },
            "failure_wait_s": [
                round(min((f.ended - f.started for f in failures), default=0.0), 3),
                round(max((f.ended - f.started for f in failures), default=0.0), 3),
            ],
            "slowest_request_s": round(tally.slowest[face], 3),
            "create_attempts": len(creates),
            "create_outcomes_during_chaos": dict(outcomes),
            "attempts_per_minute_chaos": _rate_per_minute(creates, phases.chaos),
            "attempts_per_minute_outage": _rate_per_minute(creates, phases.outage),
            "max_creates_in_flight": probe.max_in_flight.get((face, "create"), 0),
            "retry_after_violations": early,
            "tokens_delivered": len(delivered),
            "recovery_s": round(recovery[face], 3) if face in recovery else None,
            "statistics": {
                k: (v.value if isinstance(v, TokenState) else v)
                for k, v in dataclasses.asdict(stats).items()
                if k not in ("last_error",)
            },
        }
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    resource, emulator = report["resource"], report["emulator"]
    lines = [
        (
            f"resource verdicts {resource['verdicts']}, under margin {resource['under_margin']}, "
            f"min remaining {resource['min_remaining_s']}s"
        ),
        (
            f"emulator mints {emulator['mints']}, faults applied {emulator['faults_applied']}, "
            f"delivered tokens live after close {emulator['delivered_live_after_close']}, "
            f"orphans (truncated answers) {emulator['orphans_live_after_close']}"
        ),
    ]
    for face, f in report["faces"].items():
        lines.append(
            f"{face:5s}: {f['requests']} requests, {f['failures']} failures "
            f"({f['failures_while_valid_token']} while a valid token existed, waits "
            f"{f['failure_wait_s']}s), slowest "
            f"{f['slowest_request_s']}s; creates {f['create_attempts']} "
            f"({f['attempts_per_minute_chaos']}/min chaos, {f['attempts_per_minute_outage']}/min "
            f"outage), max in flight {f['max_creates_in_flight']}, Retry-After violations "
            f"{len(f['retry_after_violations'])}, recovery {f['recovery_s']}s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chaos-seconds", type=float, default=60.0)
    parser.add_argument("--outage-seconds", type=float, default=10.0)
    parser.add_argument("--lifetime", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--probability", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only
    )
    config = ChaosConfig(
        seed=args.seed,
        lifetime=args.lifetime,
        chaos_seconds=args.chaos_seconds,
        outage_seconds=args.outage_seconds,
        workers=args.workers,
        probability=args.probability,
    )
    started = time.monotonic()
    report = anyio.run(run_scenario, config, backend=args.backend)
    report.pop("caller_errors")
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["backend"] = args.backend
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for line in summary_lines(report):
            print(line)
    bad = any(
        f["failures_while_valid_token"] or f["max_creates_in_flight"] > 1
        for f in report["faces"].values()
    ) or any(report["resource"]["verdicts"].get(v) for v in ("expired", "revoked", "unknown"))
    bad = bad or bool(report["emulator"]["delivered_live_after_close"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
