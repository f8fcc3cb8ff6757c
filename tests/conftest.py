"""Shared fixtures: the emulator, managers over it, and both anyio backends."""

from __future__ import annotations

import json
import os
import select
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from m2m_agent import AsyncClerkM2MClient, ClerkM2MClient, RefreshPolicy
from m2m_agent.emulator import Emulator, Machine

API_URL = "https://api.clerk.test"

FAST = RefreshPolicy(
    wait_timeout=1.0,
    initial_backoff=0.02,
    max_backoff=0.2,
    rotation_grace=0.1,
    jitter=0.0,
    min_invalidate_age=0.0,
)
"""A policy scaled down for tests: short waits and backoffs, no jitter."""


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def emulator() -> Emulator:
    return Emulator()


@pytest.fixture
def worker(emulator: Emulator) -> Machine:
    return emulator.create_machine("worker")


def sync_client(emulator: Emulator, machine: Machine) -> ClerkM2MClient:
    return ClerkM2MClient(
        machine.secret_key,
        api_url=API_URL,
        http_client=httpx.Client(transport=emulator.transport()),
    )


def async_client(emulator: Emulator, machine: Machine) -> AsyncClerkM2MClient:
    return AsyncClerkM2MClient(
        machine.secret_key,
        api_url=API_URL,
        http_client=httpx.AsyncClient(transport=emulator.async_transport()),
    )


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """The CLI configures structlog (it is an application); undo that after each test."""
    yield
    import structlog

    structlog.reset_defaults()


def in_child(fn: Callable[[], dict[str, Any]], timeout: float = 10.0) -> dict[str, Any]:
    """Run ``fn()`` in a forked child; return the JSON-able dict it returns.

    Fails if the child hangs (a deadlock after fork) or exits non-zero.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            result = fn()
        except BaseException as exc:
            result, code = {"error": repr(exc)}, 1
        os.write(write_end, json.dumps(result).encode())
        os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        assert ready, "the child hung (deadlock after fork?)"
        data = os.read(read_end, 65536)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result
