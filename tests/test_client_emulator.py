"""The API client against the emulator, in-process and over TCP, sync and async: round trips and
every error path of the contract mapped to its exception."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from m2m_agent import (
    AsyncClerkM2MClient,
    AuthenticationError,
    BadRequestError,
    ClerkM2MClient,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
)
from m2m_agent.emulator import Emulator, EmulatorServer, Fault, Machine

from .conftest import API_URL

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def shared_emulator() -> Emulator:
    return Emulator()


@pytest.fixture(scope="module")
def server(shared_emulator: Emulator) -> Iterator[EmulatorServer]:
    with shared_emulator.serve() as server:
        yield server


@pytest.fixture(params=["in-process", "tcp"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(where: str, request: pytest.FixtureRequest, shared_emulator: Emulator) -> Any:
    """An emulator, a (worker, service) pair, and a factory for clients of either face."""
    emulator = shared_emulator if where == "tcp" else Emulator()
    emulator.clear_faults()
    service = emulator.create_machine("service")
    worker = emulator.create_machine("worker", scoped_machines=[service.id])

    def sync(machine: Machine) -> ClerkM2MClient:
        if where == "tcp":
            url = request.getfixturevalue("server").url
            return ClerkM2MClient(machine.secret_key, api_url=url)
        http = httpx.Client(transport=emulator.transport())
        return ClerkM2MClient(machine.secret_key, api_url=API_URL, http_client=http)

    def async_(machine: Machine) -> AsyncClerkM2MClient:
        if where == "tcp":
            url = request.getfixturevalue("server").url
            return AsyncClerkM2MClient(machine.secret_key, api_url=url)
        http = httpx.AsyncClient(transport=emulator.async_transport())
        return AsyncClerkM2MClient(machine.secret_key, api_url=API_URL, http_client=http)

    yield emulator, worker, service, sync, async_
    emulator.clear_faults()


class TestRoundTrip:
    def test_sync_all_four_endpoints(self, env):
        _emulator, worker, service, sync, _ = env
        with sync(worker) as w, sync(service) as s:
            minted = w.create_token(seconds_until_expiration=120, claims={"job": "nightly"})
            assert minted.token
            assert minted.token.startswith("mt_")
            assert minted.subject == worker.id
            assert minted.scopes == (service.id,)
            assert minted.lifetime == pytest.approx(120, abs=0.01)
            verified = s.verify_token(minted.token)
            assert verified.id == minted.id
            assert verified.claims == {"job": "nightly"}
            assert verified.last_used_at is not None
            page = w.list_tokens(subject=worker.id)
            assert minted.id in [t.id for t in page]
            assert all(t.token is None for t in page)
            revoked = w.revoke_token(minted.id, reason="done")
            assert revoked.revoked
            assert revoked.revocation_reason == "done"
            with pytest.raises(NotFoundError):
                s.verify_token(minted.token)
            assert minted.id not in [t.id for t in w.list_tokens(subject=worker.id)]
            assert minted.id in [t.id for t in w.list_tokens(subject=worker.id, revoked=True)]

    async def test_async_all_four_endpoints(self, env):
        _emulator, worker, service, _, async_ = env
        async with async_(worker) as w, async_(service) as s:
            minted = await w.create_token(seconds_until_expiration=60)
            assert minted.token is not None
            assert (await s.verify_token(minted.token)).id == minted.id
            assert minted.id in [t.id for t in await w.list_tokens(subject=worker.id)]
            assert (await w.revoke_token(minted.id)).revoked
            with pytest.raises(NotFoundError):
                await s.verify_token(minted.token)

    def test_jwt_format(self, env):
        _emulator, worker, service, sync, _ = env
        with sync(worker) as w, sync(service) as s:
            minted = w.create_token(token_format="jwt", seconds_until_expiration=60)
            assert minted.format == "jwt"
            assert s.verify_token(minted.token or "").id == minted.id
            with pytest.raises(NotFoundError):
                w.revoke_token(minted.id)

    def test_min_remaining_ttl_reuses(self, env):
        _emulator, worker, _, sync, _ = env
        with sync(worker) as w:
            first = w.create_token(seconds_until_expiration=300, min_remaining_ttl_seconds=60)
            again = w.create_token(seconds_until_expiration=300, min_remaining_ttl_seconds=60)
        assert again.id == first.id
        assert again.token == first.token

    def test_versioned_path_prefix(self, env, where):
        emulator, worker, _, sync, _ = env
        with sync(worker) as w:
            url = f"{w.api_url}".rstrip("/") + "/v1"
        http = httpx.Client(transport=emulator.transport()) if where == "in-process" else None
        with ClerkM2MClient(worker.secret_key, api_url=url, http_client=http) as v1:
            assert v1.create_token().token


class TestErrorPaths:
    def test_unknown_key_is_401(self, env):
        _emulator, _worker, _, sync, _ = env
        ghost = Machine(id="mch_" + "g" * 27, name="ghost", secret_key="ak_test_" + "f" * 32)
        with sync(ghost) as g, pytest.raises(AuthenticationError) as info:
            g.create_token()
        assert info.value.status_code == 401
        assert info.value.code == "machine_secret_key_invalid"
        assert info.value.trace_id

    def test_verify_unknown_revoked_expired_out_of_scope(self, env):
        emulator, worker, service, sync, _ = env
        outsider = emulator.create_machine("outsider")
        with sync(worker) as w, sync(service) as s, sync(outsider) as o:
            with pytest.raises(NotFoundError):
                s.verify_token("mt_" + "Z" * 48)
            minted = w.create_token(seconds_until_expiration=60)
            secret = minted.token or ""
            with pytest.raises(NotFoundError):
                o.verify_token(secret)  # not in the token's scopes
            emulator.revoke(minted.id)
            with pytest.raises(NotFoundError):
                s.verify_token(secret)
            short = w.create_token(seconds_until_expiration=0.2)
            time.sleep(0.3)
            with pytest.raises(NotFoundError):
                s.verify_token(short.token or "")

    def test_revoke_another_machines_token_is_404(self, env):
        _emulator, worker, service, sync, _ = env
        with sync(worker) as w, sync(service) as s:
            minted = w.create_token()
            with pytest.raises(NotFoundError):
                s.revoke_token(minted.id)

    def test_list_another_machine_is_403(self, env):
        _emulator, worker, service, sync, _ = env
        with sync(worker) as w, pytest.raises(PermissionDeniedError):
            w.list_tokens(subject=service.id)

    def test_bad_parameters_are_400(self, env):
        """min_remaining_ttl_seconds not below the machine's default TTL: Clerk says 400."""
        _emulator, worker, _, sync, _ = env
        with sync(worker) as w, pytest.raises(BadRequestError) as info:
            w.create_token(seconds_until_expiration=None, min_remaining_ttl_seconds=4000)
        assert info.value.status_code == 400
        assert info.value.code

    def test_429_with_retry_after(self, env):
        emulator, worker, _, sync, _ = env
        emulator.inject(Fault(status=429, retry_after=7, times=1))
        with sync(worker) as w, pytest.raises(RateLimitError) as info:
            w.create_token()
        assert info.value.retry_after == 7.0

    def test_5xx(self, env):
        emulator, worker, _, sync, _ = env
        emulator.inject(Fault(status=503, times=1))
        with sync(worker) as w, pytest.raises(ServerError) as info:
            w.create_token()
        assert info.value.status_code == 503

    @pytest.mark.parametrize("kind", ["not_json", "wrong_shape", "truncated", "html", "huge"])
    def test_malformed_bodies(self, env, kind):
        emulator, worker, _, sync, _ = env
        emulator.inject(Fault(malformed=kind, times=1))  # type: ignore[arg-type]
        with sync(worker) as w, pytest.raises((MalformedResponseError, ServerError)):
            w.create_token()

    def test_dropped_connection(self, env):
        emulator, worker, _, sync, _ = env
        emulator.inject(Fault(drop=True, times=1))
        with sync(worker) as w, pytest.raises(TransportError):
            w.create_token()

    async def test_async_errors_match(self, env):
        emulator, worker, _, _, async_ = env
        emulator.inject(Fault(status=429, retry_after=3, times=1))
        async with async_(worker) as w:
            with pytest.raises(RateLimitError):
                await w.create_token()
            emulator.inject(Fault(drop=True, times=1))
            with pytest.raises(TransportError):
                await w.create_token()

    def test_connection_refused(self):
        with socket_free_port() as port:
            pass
        with (
            ClerkM2MClient(
                "ak_test_" + "a" * 32, api_url=f"http://127.0.0.1:{port}", timeout=2
            ) as client,
            pytest.raises(TransportError, match=r"127\.0\.0\.1"),
        ):
            client.create_token()


class socket_free_port:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
