"""Shared fixtures: the emulator, managers over it, and both anyio backends."""

from __future__ import annotations

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
