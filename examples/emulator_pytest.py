"""Testing your own code that uses m2m-agent: the emulator as a pytest fixture, plus faults.

Run it: ``python examples/emulator_pytest.py`` (runs the tests below with pytest), or
``pytest examples/emulator_pytest.py``. Copy the fixtures into your own ``conftest.py``.

The tests need no Clerk account and no network. The code under test runs against real Clerk
unchanged: in production, build ``TokenManager()`` with CLERK_MACHINE_SECRET_KEY set.
"""

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from m2m_agent import ClerkM2MClient, M2MAuth, RefreshPolicy, TokenManager, TokenUnavailableError
from m2m_agent.emulator import Emulator, Fault


def fetch_report(http: httpx.Client) -> dict:  # the code under test: your application's
    response = http.get("https://reports.example/today")
    response.raise_for_status()
    return response.json()


# Short waits and backoffs, so failure paths take milliseconds instead of the 30 s defaults.
FAST = RefreshPolicy(wait_timeout=0.5, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def emulator() -> Emulator:
    return Emulator()


@pytest.fixture
def manager(emulator: Emulator) -> Iterator[TokenManager]:
    worker = emulator.create_machine("worker")
    with httpx.Client(transport=emulator.transport()) as http:
        client = ClerkM2MClient(
            worker.secret_key, api_url="https://api.clerk.test", http_client=http
        )
        # Not entered with `with`: no background refresher, so it mints on the first
        # get_token and a fault injected by the test applies to that mint.
        manager = TokenManager(client=client, lifetime=60, refresh=FAST)
        yield manager
        manager.close()


@pytest.fixture
def http(emulator: Emulator, manager: TokenManager) -> Iterator[httpx.Client]:
    def service(request: httpx.Request) -> httpx.Response:  # stands in for the real service
        token = request.headers["authorization"].removeprefix("Bearer ")
        known = token in {t.token for t in emulator.tokens if not t.revoked}
        return httpx.Response(200, json={"rows": 3}) if known else httpx.Response(401)

    with httpx.Client(auth=M2MAuth(manager), transport=httpx.MockTransport(service)) as http:
        yield http


def test_sends_a_token_clerk_minted(http: httpx.Client, emulator: Emulator) -> None:
    assert fetch_report(http) == {"rows": 3}
    assert fetch_report(http) == {"rows": 3}
    assert emulator.counters.mints == 1  # one token, reused


def test_rides_out_a_short_outage(
    http: httpx.Client, manager: TokenManager, emulator: Emulator
) -> None:
    emulator.inject(Fault(status=503, times=2, endpoints=frozenset({"create"})))
    assert fetch_report(http) == {"rows": 3}  # two 503s, retried with backoff, then a mint
    stats = manager.statistics()
    assert (stats.refresh_failures, stats.mints) == (2, 1)


def test_long_outage_is_a_typed_error(http: httpx.Client, emulator: Emulator) -> None:
    emulator.inject(Fault(status=503, endpoints=frozenset({"create"})))  # down until cleared
    with pytest.raises(TokenUnavailableError) as info:  # after wait_timeout, not a hang
        fetch_report(http)
    assert "503" in str(info.value.__cause__)  # the last failure is the cause
    emulator.clear_faults()
    assert fetch_report(http) == {"rows": 3}  # recovers once the API is back


if __name__ == "__main__":  # run the tests above with pytest, in a fresh interpreter
    raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))
