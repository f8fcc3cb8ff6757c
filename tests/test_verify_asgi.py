"""``m2m_agent.asgi``: the plain-ASGI middleware and the FastAPI dependency, over the emulator."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from m2m_agent import ClerkM2MClient
from m2m_agent.asgi import STATE_KEY, M2MAuthMiddleware, bearer_token, require_m2m
from m2m_agent.emulator import Emulator, Fault
from m2m_agent.errors import ConfigurationError
from m2m_agent.verify import AsyncTokenVerifier, TokenVerifier, VerifiedToken

API_URL = "https://api.clerk.test"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class World:
    def __init__(self) -> None:
        self.emu = Emulator()
        self.service = self.emu.create_machine("service")
        self.other = self.emu.create_machine("other")
        self.worker = self.emu.create_machine("worker", scoped_machines=[self.service.id])
        self.minter = ClerkM2MClient(
            self.worker.secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=self.emu.transport()),
        )

    def token(self, token_format: str = "opaque") -> str:
        minted = self.minter.create_token(
            seconds_until_expiration=600,
            token_format=token_format,  # type: ignore[arg-type]
        )
        assert minted.token is not None
        return minted.token

    def verifier(self, **kwargs: Any) -> AsyncTokenVerifier:
        return AsyncTokenVerifier(
            machine_secret_key=self.service.secret_key,
            secret_key=self.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.AsyncClient(transport=self.emu.async_transport()),
            **kwargs,
        )

    def sync_verifier(self, **kwargs: Any) -> TokenVerifier:
        return TokenVerifier(
            machine_secret_key=self.service.secret_key,
            secret_key=self.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=self.emu.transport()),
            **kwargs,
        )


@pytest.fixture
def world() -> World:
    return World()


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI app that answers with who called (from the middleware's state)."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        return
    verified = (scope.get("state") or {}).get(STATE_KEY)
    body = json.dumps(
        {
            "path": scope["path"],
            "machine_id": verified.machine_id if isinstance(verified, VerifiedToken) else None,
            "other_state": (scope.get("state") or {}).get("db"),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TestBearerToken:
    @pytest.mark.parametrize(
        ("header", "token"),
        [
            ("Bearer abc", "abc"),
            ("bearer   abc  ", "abc"),
            ("BEARER abc", "abc"),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer a b", None),
            ("", None),
            (None, None),
        ],
    )
    def test_parses(self, header, token):
        assert bearer_token(header) == token


class TestMiddleware:
    @pytest.mark.anyio
    async def test_valid_token_reaches_the_app_with_state(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        async with client_for(app) as http:
            for kind in ("opaque", "jwt"):
                reply = await http.get("/reports", headers=bearer(world.token(kind)))
                assert reply.status_code == 200
                assert reply.json()["machine_id"] == world.worker.id

    @pytest.mark.anyio
    async def test_keeps_the_rest_of_the_state(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        state = {"db": "pool"}

        async def with_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app({**scope, "state": state}, receive, send)

        async with client_for(with_state) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
        assert reply.json()["other_state"] == "pool"
        assert state == {"db": "pool"}  # the server's dict was not mutated

    @pytest.mark.anyio
    async def test_missing_token_is_401_without_error_code(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier(), realm="reports")
        async with client_for(app) as http:
            reply = await http.get("/reports")
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"] == 'Bearer realm="reports"'
        assert reply.json()["error"] == "invalid_request"

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        "token", ["garbage", "mt_" + "0" * 32, "ak_" + "1" * 32], ids=["garbage", "unknown", "key"]
    )
    async def test_invalid_token_is_401_invalid_token(self, world: World, token: str):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(token))
        assert reply.status_code == 401
        challenge = reply.headers["www-authenticate"]
        assert challenge.startswith('Bearer error="invalid_token"')
        assert token not in reply.text
        assert token not in challenge
        assert reply.headers["cache-control"] == "no-store"

    @pytest.mark.anyio
    async def test_revoked_token_is_401(self, world: World):
        minted = world.minter.create_token(seconds_until_expiration=600)
        world.emu.revoke(minted.id)
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(minted.token or ""))
        assert reply.status_code == 401

    @pytest.mark.anyio
    async def test_missing_scope_is_403_insufficient_scope(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier(required_scopes=[world.other.id]))
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(world.token("jwt")))
        assert reply.status_code == 403
        assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]

    @pytest.mark.anyio
    async def test_outage_is_503(self, world: World):
        world.emu.inject(Fault(status=503, retry_after=3, endpoints=frozenset({"verify"})))
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "3"
        assert reply.json()["error"] == "temporarily_unavailable"
        assert "www-authenticate" not in reply.headers

    @pytest.mark.anyio
    async def test_dropped_connection_is_503(self, world: World):
        world.emu.inject(Fault(drop=True, endpoints=frozenset({"verify"})))
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
        assert reply.status_code == 503
        assert "retry-after" not in reply.headers

    @pytest.mark.anyio
    async def test_excluded_paths(self, world: World):
        app = M2MAuthMiddleware(
            echo_app, verifier=world.verifier(), exclude_paths=["/health", "/public/*"]
        )
        async with client_for(app) as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/public/logo.png")).status_code == 200
            assert (await http.get("/healthz")).status_code == 401
            assert (await http.get("/publicity")).status_code == 401

    @pytest.mark.anyio
    async def test_sync_verifier_runs_in_a_thread(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.sync_verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
            assert reply.json()["machine_id"] == world.worker.id
            assert (await http.get("/reports", headers=bearer("nope"))).status_code == 401

    @pytest.mark.anyio
    async def test_lifespan_passes_through(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "lifespan"}, receive, send)
        assert sent == [{"type": "lifespan.startup.complete"}]

    @pytest.mark.anyio
    async def test_websocket_without_token_is_closed_before_accept(self, world: World):
        app = M2MAuthMiddleware(echo_app, verifier=world.verifier())
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "websocket", "path": "/ws", "headers": [(b"authorization", b"Bearer x")]}
        await app(scope, receive, send)
        assert sent[0]["type"] == "websocket.close"
        assert sent[0]["code"] == 1008

    @pytest.mark.parametrize("realm", ['a"b', "a\\b", "a\nb"])
    def test_refuses_a_realm_that_would_break_the_header(self, world: World, realm: str):
        with pytest.raises(ConfigurationError, match="realm"):
            M2MAuthMiddleware(echo_app, verifier=world.verifier(), realm=realm)

    def test_refuses_a_non_verifier(self):
        with pytest.raises(ConfigurationError, match="AsyncTokenVerifier"):
            M2MAuthMiddleware(echo_app, verifier=object())  # type: ignore[arg-type]


class TestStarlette:
    @pytest.mark.anyio
    async def test_request_state(self, world: World):
        pytest.importorskip("starlette")
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def reports(request: Request) -> JSONResponse:
            caller: VerifiedToken = request.state.m2m
            return JSONResponse({"caller": caller.machine_id, "scopes": list(caller.scopes)})

        app = Starlette(routes=[Route("/reports", reports)])
        app.add_middleware(M2MAuthMiddleware, verifier=world.verifier())
        async with client_for(app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
            assert reply.json() == {"caller": world.worker.id, "scopes": [world.service.id]}
            assert (await http.get("/reports")).status_code == 401


class TestFastAPIDependency:
    # ``Depends(...)`` as a default is FastAPI's idiom (B008 is about ordinary functions).
    @pytest.fixture
    def fastapi_app(self, world: World) -> Any:
        pytest.importorskip("fastapi")
        from fastapi import Depends, FastAPI

        verifier = world.verifier()
        app = FastAPI()

        @app.get("/reports")
        async def reports(caller: VerifiedToken = Depends(require_m2m(verifier))) -> dict:  # noqa: B008
            return {"caller": caller.machine_id}

        @app.get("/admin")
        async def admin(
            caller: VerifiedToken = Depends(require_m2m(verifier, scopes=[world.other.id])),  # noqa: B008
        ) -> dict:
            return {"caller": caller.machine_id}

        app.state.verifier = verifier
        return app

    @pytest.mark.anyio
    async def test_valid_token(self, world: World, fastapi_app: Any):
        async with client_for(fastapi_app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
            assert reply.status_code == 200
            assert reply.json() == {"caller": world.worker.id}
            reply = await http.get("/reports", headers=bearer(world.token("jwt")))
            assert reply.json() == {"caller": world.worker.id}

    @pytest.mark.anyio
    async def test_missing_and_invalid(self, world: World, fastapi_app: Any):
        async with client_for(fastapi_app) as http:
            missing = await http.get("/reports")
            invalid = await http.get("/reports", headers=bearer("mt_" + "0" * 32))
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert invalid.status_code == 401
        assert invalid.headers["www-authenticate"].startswith('Bearer error="invalid_token"')

    @pytest.mark.anyio
    async def test_route_scope(self, world: World, fastapi_app: Any):
        async with client_for(fastapi_app) as http:
            reply = await http.get("/admin", headers=bearer(world.token()))
        assert reply.status_code == 403
        assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]

    @pytest.mark.anyio
    async def test_outage(self, world: World, fastapi_app: Any):
        world.emu.inject(Fault(status=502, endpoints=frozenset({"verify"})))
        async with client_for(fastapi_app) as http:
            reply = await http.get("/reports", headers=bearer(world.token()))
        assert reply.status_code == 503

    @pytest.mark.anyio
    async def test_reuses_what_the_middleware_verified(self, world: World, fastapi_app: Any):
        verifier = fastapi_app.state.verifier
        fastapi_app.add_middleware(M2MAuthMiddleware, verifier=verifier)
        token = world.token()
        async with client_for(fastapi_app) as http:
            reply = await http.get("/reports", headers=bearer(token))
            assert reply.status_code == 200
            assert verifier.statistics().cache_hits == 0  # verified once, by the middleware
            assert (await http.get("/admin", headers=bearer(token))).status_code == 403

    def test_sync_verifier(self, world: World):
        pytest.importorskip("fastapi")
        from fastapi import Depends, FastAPI
        from fastapi.testclient import TestClient

        app = FastAPI()
        dependency = require_m2m(world.sync_verifier())

        @app.get("/reports")
        def reports(caller: VerifiedToken = Depends(dependency)) -> dict:  # noqa: B008
            return {"caller": caller.machine_id}

        with TestClient(app) as http:
            assert http.get("/reports", headers=bearer(world.token())).json() == {
                "caller": world.worker.id
            }
            assert http.get("/reports").status_code == 401
