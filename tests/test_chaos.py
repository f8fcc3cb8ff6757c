"""Chaos: sustained API faults under sync and async load, and a secrets audit of all of it.

The scenario itself lives in ``bench/chaos.py`` (``python bench/chaos.py --chaos-seconds 600``
is the long version, see docs/reliability.md); these tests run it short, on both anyio backends,
and assert on its report.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import structlog

from m2m_agent import (
    AsyncClerkM2MClient,
    AsyncTokenManager,
    AuthenticationError,
    ClerkM2MClient,
    ConfigurationError,
    M2MAgentError,
    M2MAuth,
    NotFoundError,
    RefreshPolicy,
    ServerError,
    TokenManager,
    TokenUnavailableError,
    TransportError,
)
from m2m_agent.emulator import Emulator, Fault, Machine

from .conftest import API_URL, FAST, async_client, sync_client

pytestmark = pytest.mark.anyio


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (a script folder, not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"m2m_bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = load_bench("chaos")


class TestChaos:
    async def test_sustained_fault_mix(self, anyio_backend):
        """Half of all mints fail (5xx, 429 + Retry-After, drops, timeouts, malformed bodies)
        for 5 s, then the API is down for 2.5 s, under 4 async tasks and 4 threads; tokens
        live 3 s. See bench/chaos.py for how each figure is measured."""
        config = chaos.ChaosConfig(seed=11)
        report = await chaos.run_scenario(config)
        policy = config.policy
        summary = "\n".join(chaos.summary_lines(report))

        resource = report["resource"]
        assert set(resource["verdicts"]) == {"ok"}, f"a bad token reached the resource\n{summary}"
        assert resource["under_margin"] == 0, summary
        assert report["emulator"]["faults_applied"] >= 10, "the faults did not happen"
        assert report["emulator"]["delivered_live_after_close"] == [], summary

        failed: dict[str, int] = {}
        for f in report["faces"].values():
            for outcome, count in f["create_outcomes_during_chaos"].items():
                if outcome != "201":
                    failed[outcome] = failed.get(outcome, 0) + count
        assert sum(failed.values()) >= 3, f"too few mints failed: {failed}\n{summary}"
        assert len(failed) >= 2, f"too few kinds of failure: {failed}\n{summary}"

        for face, f in report["faces"].items():
            where = f"{face}: {json.dumps(f, default=str)}\n{summary}"
            assert f["requests"] > 500, where
            # Callers fail only when no token was usable, and then only after the full wait.
            assert f["failures_while_valid_token"] == 0, where
            assert set(f["failure_kinds"]) <= {"TokenUnavailableError"}, where
            if f["failures"]:
                assert f["failure_wait_s"][0] >= policy.wait_timeout - 0.2, where
            assert f["slowest_request_s"] < policy.wait_timeout + 1.0, where
            # One attempt in flight, Retry-After honoured, the rate set by backoff, not callers.
            assert f["max_creates_in_flight"] == 1, where
            assert f["retry_after_violations"] == [], where
            assert f["attempts_per_minute_chaos"] <= 600, where
            assert f["attempts_per_minute_outage"] <= 1200, where
            assert f["create_attempts"] * 50 < f["requests"], where
            # Back within one backoff step of the API's return.
            assert f["recovery_s"] is not None, where
            assert f["recovery_s"] <= policy.max_backoff + 0.5, where
            stats = f["statistics"]
            assert stats["refresh_failures"] >= 3, where
            assert stats["consecutive_failures"] == 0, where
            assert stats["mints"] == f["tokens_delivered"], "every delivered token was used"
            assert stats["mints"] == stats["refreshes"] + 1, where
            assert stats["invalidations"] == 0, where

    # Regression: past 1024 consecutive failures the backoff used to overflow (0.5 * 2**1024)
    # and the manager retried a down API in a tight loop.
    @pytest.mark.parametrize("face", ["sync", "async"])
    async def test_a_very_long_outage_keeps_backing_off(self, anyio_backend, face):
        """After hours of outage (1100 consecutive failures: ~4.5 h at the default 30 s cap,
        set directly here), attempts must stay spaced by the backoff."""
        if anyio_backend == "trio" and face == "sync":
            pytest.skip("the sync face does not depend on the backend")
        emulator = Emulator(seed=3)
        machine = emulator.create_machine()
        emulator.inject(Fault(status=503, endpoints=frozenset({"create"})))
        if face == "sync":
            manager: Any = TokenManager(client=sync_client(emulator, machine), refresh=FAST)
        else:
            manager = AsyncTokenManager(client=async_client(emulator, machine), refresh=FAST)
        with manager._lock:
            manager._core.failures = 1100
        get = (
            (lambda: anyio.to_thread.run_sync(manager.get_token))
            if face == "sync"
            else manager.get_token
        )
        started = time.monotonic()
        with pytest.raises(TokenUnavailableError):
            await get()
        elapsed = time.monotonic() - started
        attempts = emulator.counters.requests["create"]
        # FAST caps the backoff at 0.2 s: about 10 attempts a second, never hundreds.
        assert attempts <= 5 + 2 * elapsed / FAST.max_backoff * 2, attempts


# --- secrets audit -------------------------------------------------------------------------------


class KeyRecordingEmulator(Emulator):
    """An emulator that remembers every machine key it hands out."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys: list[str] = []

    def create_machine(self, *args: Any, **kwargs: Any) -> Machine:
        machine = super().create_machine(*args, **kwargs)
        self.keys.append(machine.secret_key)
        return machine


def render(exc: BaseException) -> str:
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


async def deliberate_failures(
    emulator: KeyRecordingEmulator, errors: list[BaseException], seen: list[str]
) -> list[str]:
    """Every way an error reaches a caller, over TCP and in-process; returns JWT secrets."""

    def caught(fn: Any) -> None:
        try:
            fn()
        except M2MAgentError as exc:
            errors.append(exc)

    async def acaught(fn: Any) -> None:
        try:
            await fn()
        except M2MAgentError as exc:
            errors.append(exc)

    jwt_secrets: list[str] = []
    resource = chaos.Resource(emulator, time.time, margin=6.0)
    machine = emulator.create_machine("tcp")
    with emulator.serve() as server:
        # Over real sockets (httpcore logs at DEBUG): a drop, a rotation, a 401 and a replay.
        sync = TokenManager(machine_secret_key=machine.secret_key, api_url=server.url, refresh=FAST)
        asyn = AsyncTokenManager(
            machine_secret_key=machine.secret_key, api_url=server.url, refresh=FAST
        )
        for manager in (sync, asyn):
            token = await (
                anyio.to_thread.run_sync(manager.get_token)
                if manager is sync
                else manager.get_token()
            )
            # Revoked behind its back: the resource answers 401, M2MAuth invalidates it and
            # replays with a new one, whose first mint attempt is dropped.
            emulator.revoke(manager.statistics().token_id or "", reason="audit")
            emulator.inject(Fault(drop=True, times=1, endpoints=frozenset({"create"})))
            seen.append(f"fingerprint of {len(token)} chars")
            if manager is sync:
                with httpx.Client(
                    auth=M2MAuth(sync), transport=httpx.MockTransport(resource.handle)
                ) as http:
                    response = await anyio.to_thread.run_sync(http.get, "https://svc.test/")
            else:
                async with httpx.AsyncClient(
                    auth=M2MAuth(asyn), transport=httpx.MockTransport(resource.handle)
                ) as ahttp:
                    response = await ahttp.get("https://svc.test/")
            seen.append(f"{response.status_code} {response.headers}")
            seen.append(f"{manager!r} {manager.statistics()!r} {M2MAuth(manager)!r}")
        await anyio.to_thread.run_sync(sync.close)
        await asyn.aclose()

        # A wrong key, over TCP: 401 to the caller, chained.
        wrong = "ak_test_" + "badbad" * 5 + "00"
        emulator.keys.append(wrong)
        bad = TokenManager(machine_secret_key=wrong, api_url=server.url, refresh=FAST)
        caught(bad.get_token)
        bad.close()
        abad = AsyncTokenManager(machine_secret_key=wrong, api_url=server.url, refresh=FAST)
        await acaught(abad.get_token)
        await abad.aclose()

    # No token and the API down three ways: every cause chained under TokenUnavailableError.
    short = RefreshPolicy(wait_timeout=0.3, initial_backoff=0.02, max_backoff=0.05)
    other = emulator.create_machine("down")
    kinds: list[dict[str, Any]] = [{"status": 503}, {"drop": True}, {"malformed": "html"}]
    for kind in kinds:
        emulator.inject(Fault(endpoints=frozenset({"create"}), **kind))
        down = AsyncTokenManager(client=async_client(emulator, other), refresh=short)
        await acaught(down.get_token)
        await down.aclose()
        emulator.clear_faults()

    # Configuration mistakes and refusals, with the secrets at hand.
    key = other.secret_key
    client = ClerkM2MClient(
        key, api_url=API_URL, http_client=httpx.Client(transport=emulator.transport())
    )
    minted = client.create_token(seconds_until_expiration=60)
    secret = minted.token or ""
    seen.append(f"{minted!r} {minted} {client!r}")
    caught(lambda: ClerkM2MClient(key + "\n"))
    caught(lambda: ClerkM2MClient(" " + key))
    caught(lambda: ClerkM2MClient(key, api_url="http://api.clerk.com"))
    caught(lambda: TokenManager(machine_secret_key=key, client=client))
    caught(lambda: client.revoke_token(secret))  # the token where its id belongs
    caught(lambda: client.revoke_token("mt_" + "0" * 32))
    caught(lambda: client.verify_token(secret + " "))
    caught(lambda: client.verify_token(secret))  # not in its own scopes: 404
    plain = TokenManager(client=client, refresh=FAST)
    with httpx.Client(auth=M2MAuth(plain), transport=httpx.MockTransport(resource.handle)) as http:
        caught(lambda: http.get("http://svc.example/"))  # refuses to send a token in clear
    plain.close()

    # A JWT-format token: its string must not show either.
    jwt = AsyncTokenManager(
        client=AsyncClerkM2MClient(
            key,
            api_url=API_URL,
            http_client=httpx.AsyncClient(transport=emulator.async_transport()),
        ),
        token_format="jwt",
        refresh=FAST,
    )
    jwt_secrets.append(await jwt.get_token())
    seen.append(f"{jwt!r} {jwt.statistics()!r}")
    await jwt.aclose()
    return jwt_secrets


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_secrets_audit(anyio_backend, caplog, capfd):
    """Every logger at DEBUG, structlog captured and rendered, every exception's traceback: no
    machine key and no token string anywhere."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access", "m2m_agent"):
        caplog.set_level(logging.DEBUG, logger=name)
    emulator = KeyRecordingEmulator(seed=5)
    errors: list[BaseException] = []
    seen: list[str] = []

    # 1. A short chaos run, structlog events captured as dicts.
    config = chaos.ChaosConfig(
        seed=5, lifetime=2.0, warmup_seconds=0.3, chaos_seconds=1.5, outage_seconds=1.0, workers=2
    )
    with structlog.testing.capture_logs() as events:
        report = await chaos.run_scenario(config, emulator=emulator)
    errors.extend(report.pop("caller_errors"))
    seen.append(json.dumps(report, default=repr))

    # 2. Deliberate failures, structlog rendered through stdlib logging with exception info.
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    jwt_secrets = await deliberate_failures(emulator, errors, seen)
    output = capfd.readouterr()

    secrets = [*emulator.keys, emulator.instance_secret_key, *jwt_secrets]
    secrets += [t.token for t in emulator.tokens]
    # The random part alone, too (a log that strips the prefix still leaks the rest).
    secrets += [s.split("_")[-1] for s in secrets if s.startswith(("ak_", "mt_", "sk_"))]
    secrets += [s.rsplit(".", 1)[-1] for s in jwt_secrets]
    haystack = "\n".join(
        [
            caplog.text,
            *(logging.Formatter().format(r) for r in caplog.records),
            *(repr(r.__dict__) for r in caplog.records),
            *(repr(e) for e in events),
            *(render(e) for e in errors),
            *seen,
            output.out,
            output.err,
        ]
    )
    # The audit saw what it should have: else it proves nothing.
    names = {e["event"] for e in events}
    assert {"m2m_agent.token.minted", "m2m_agent.token.refresh_failed"} <= names, names
    loggers = {r.name for r in caplog.records}
    assert {"httpx", "m2m_agent"} <= loggers, loggers
    assert any(n.startswith("httpcore") for n in loggers), loggers
    assert len(emulator.tokens) >= 8
    kinds = {type(e) for e in errors} | {type(e.__cause__) for e in errors}
    for expected in (
        TokenUnavailableError,
        AuthenticationError,
        ServerError,
        TransportError,
        ConfigurationError,
        NotFoundError,
    ):
        assert expected in kinds, (expected, kinds)
    assert "The above exception was the direct cause" in haystack

    leaked = [s for s in secrets if len(s) >= 16 and s in haystack]
    assert not leaked, f"{len(leaked)} secrets leaked, e.g. at: " + next(
        haystack[max(0, haystack.index(s) - 200) : haystack.index(s) + 50] for s in leaked
    )
