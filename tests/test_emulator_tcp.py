"""The emulator served over loopback TCP by uvicorn: round trips, drops, latency, lifecycle."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import httpx
import pytest

from m2m_agent.emulator import Emulator, EmulatorServer, Fault, Machine

pytestmark = pytest.mark.integration


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def emu() -> Emulator:
    return Emulator()


@pytest.fixture(scope="module")
def server(emu: Emulator) -> Any:
    with emu.serve() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_faults(emu: Emulator) -> Any:
    emu.clear_faults()
    yield
    emu.clear_faults()


@pytest.fixture
def machines(emu: Emulator) -> tuple[Machine, Machine]:
    """A minting machine and the machine it is scoped to."""
    verifier = emu.create_machine("api")
    return emu.create_machine("worker", scoped_machines=[verifier.id]), verifier


@pytest.fixture
def client(server: EmulatorServer) -> Any:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class TestServer:
    def test_url_and_port(self, server: EmulatorServer) -> None:
        """The server reports a loopback URL with the bound port."""
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert "running" in repr(server)

    @pytest.mark.parametrize(
        ("prefix", "jwks"), [("", "/jwks"), ("/v1", "/v1/jwks")], ids=["bapi-proxy", "v1"]
    )
    def test_round_trip(
        self,
        emu: Emulator,
        client: httpx.Client,
        machines: tuple[Machine, Machine],
        prefix: str,
        jwks: str,
    ) -> None:
        """Create, verify, list, revoke and JWKS over TCP on both prefixes."""
        minter, verifier = machines
        created = client.post(
            f"{prefix}/m2m_tokens",
            json={"seconds_until_expiration": 60.0, "claims": {"k": "v"}},
            headers=auth(minter.secret_key),
        )
        assert created.status_code == 201
        assert created.headers["content-type"] == "application/json"
        body = created.json()
        verified = client.post(
            f"{prefix}/m2m_tokens/verify",
            json={"token": body["token"]},
            headers=auth(verifier.secret_key),
        )
        assert verified.status_code == 200
        assert verified.json()["id"] == body["id"]
        listed = client.get(
            f"{prefix}/m2m_tokens",
            params={"subject": minter.id, "limit": "10.0", "offset": "0.0"},
            headers=auth(minter.secret_key),
        )
        assert listed.status_code == 200
        assert [item["id"] for item in listed.json()["m2m_tokens"]] == [body["id"]]
        revoked = client.post(
            f"{prefix}/m2m_tokens/{body['id']}/revoke",
            json={"revocation_reason": "done"},
            headers=auth(minter.secret_key),
        )
        assert revoked.status_code == 200
        assert revoked.json()["revoked"] is True
        keys = client.get(jwks, headers=auth(emu.instance_secret_key))
        assert keys.status_code == 200
        assert keys.json()["keys"][0]["kid"] == emu.instance_id
        missing = client.get(f"{prefix}/nowhere")
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "resource_not_found"

    def test_dropped_connection(
        self, emu: Emulator, client: httpx.Client, machines: tuple[Machine, Machine]
    ) -> None:
        """A drop fault closes the connection mid-response: the client gets a TransportError."""
        minter, _ = machines
        emu.inject(Fault(drop=True, times=1))
        with pytest.raises(httpx.TransportError):
            client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))
        assert (
            client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key)).status_code == 201
        )

    def test_latency(
        self, emu: Emulator, server: EmulatorServer, machines: tuple[Machine, Machine]
    ) -> None:
        """Latency delays the answer over TCP; a shorter client timeout gives ReadTimeout."""
        minter, _ = machines
        emu.jwks()  # make the signing key now, so its generation does not count as latency
        emu.inject(Fault(latency=0.2, times=1))
        with httpx.Client(base_url=server.url, timeout=5) as client:
            started = time.monotonic()
            response = client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))
            assert time.monotonic() - started >= 0.2
            assert response.status_code == 201
        emu.inject(Fault(latency=1.0, times=1))
        with (
            httpx.Client(base_url=server.url, timeout=0.2) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))

    def test_status_and_malformed_faults(
        self, emu: Emulator, client: httpx.Client, machines: tuple[Machine, Machine]
    ) -> None:
        """Status faults, Retry-After and malformed bodies cross the wire intact."""
        minter, _ = machines
        emu.inject(Fault(status=429, retry_after=2.5, times=1))
        response = client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"
        assert response.json()["errors"][0]["code"] == "too_many_requests"
        emu.inject(Fault(malformed="html", status=502, times=1))
        response = client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
        emu.inject(Fault(malformed="huge", times=1))
        response = client.get("/.well-known/jwks.json")
        assert len(response.content) > 5_000_000

    def test_no_secrets_in_logs(
        self,
        emu: Emulator,
        client: httpx.Client,
        machines: tuple[Machine, Machine],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Nothing the server or emulator logs contains a key or a token."""
        minter, verifier = machines
        caplog.set_level(logging.DEBUG)
        token = client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key)).json()["token"]
        client.post("/m2m_tokens/verify", json={"token": token}, headers=auth(verifier.secret_key))
        client.post("/m2m_tokens/verify", json={"token": "mt_bogus"}, headers=auth("ak_test_wrong"))
        emu.inject(Fault(drop=True, times=1))
        with pytest.raises(httpx.TransportError):
            client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))
        time.sleep(0.05)  # let the server thread log the drop
        for secret in (minter.secret_key, verifier.secret_key, token, emu.instance_secret_key):
            assert secret not in caplog.text

    @pytest.mark.anyio
    async def test_async_client(
        self, server: EmulatorServer, machines: tuple[Machine, Machine]
    ) -> None:
        """An AsyncClient on asyncio or trio talks to the served emulator."""
        minter, verifier = machines
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            created = await client.post("/v1/m2m_tokens", json={}, headers=auth(minter.secret_key))
            assert created.status_code == 201
            verified = await client.post(
                "/v1/m2m_tokens/verify",
                json={"token": created.json()["token"]},
                headers=auth(verifier.secret_key),
            )
            assert verified.status_code == 200

    @pytest.mark.anyio
    async def test_async_drop(
        self, emu: Emulator, server: EmulatorServer, machines: tuple[Machine, Machine]
    ) -> None:
        """The drop reaches an AsyncClient as a TransportError too."""
        minter, _ = machines
        emu.inject(Fault(drop=True, times=1))
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            with pytest.raises(httpx.TransportError):
                await client.post("/m2m_tokens", json={}, headers=auth(minter.secret_key))


class TestLifecycle:
    @pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "example.com", "::", "192.168.1.1"])
    def test_refuses_non_loopback(self, host: str) -> None:
        """Only loopback hosts are served."""
        with pytest.raises(ValueError, match="loopback"):
            Emulator().serve(host=host)

    def test_stops_cleanly(self) -> None:
        """Leaving the block stops the thread and frees the port; a stopped server stays stopped."""
        emu = Emulator()
        machine = emu.create_machine()
        with emu.serve(host="localhost") as server:
            assert server.host == "127.0.0.1"
            response = httpx.post(
                f"{server.url}/m2m_tokens", json={}, headers=auth(machine.secret_key), timeout=5
            )
            assert response.status_code == 201
            port = server.port
        assert "stopped" in repr(server)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=1)
        with pytest.raises(RuntimeError):
            server.start()
        server.stop()  # idempotent

    def test_ipv6_loopback(self) -> None:
        """``::1`` is served with a bracketed URL, where IPv6 exists."""
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        try:
            server = Emulator().serve(host="::1")
        except OSError:
            pytest.skip("IPv6 loopback unavailable")
        with server:
            assert server.url == f"http://[::1]:{server.port}"
            assert httpx.get(f"{server.url}/.well-known/jwks.json", timeout=5).status_code == 200
