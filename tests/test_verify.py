"""``TokenVerifier`` and ``AsyncTokenVerifier`` against the emulator.

Most cases run on three faces (the sync verifier, and the async one on asyncio and on trio)
through :class:`Face`, so the twins are held to the same verdicts. The concurrency tests are
written per face: threads for the sync verifier, ``@pytest.mark.anyio`` tasks for the async one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from m2m_agent import ClerkM2MClient, M2MToken
from m2m_agent.emulator import Emulator, Fault, Machine
from m2m_agent.errors import (
    ClerkAPIError,
    ConfigurationError,
    InvalidTokenError,
    ServerError,
    TransportError,
)
from m2m_agent.verify import AsyncTokenVerifier, TokenVerifier, VerifiedToken

API_URL = "https://api.clerk.test"
M2M_CAT = "cl_B7d4PD333AAA"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- the world: an emulated instance with a service (verifying) and a worker (minting) ---------


class World:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.service = emulator.create_machine("service")
        self.other = emulator.create_machine("other")
        self.worker = emulator.create_machine("worker", scoped_machines=[self.service.id])
        self.minter = ClerkM2MClient(
            self.worker.secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=emulator.transport()),
        )

    def opaque(self, lifetime: float = 600, **kwargs: Any) -> M2MToken:
        return self.minter.create_token(seconds_until_expiration=lifetime, **kwargs)

    def jwt(self, lifetime: float = 600, **kwargs: Any) -> M2MToken:
        return self.minter.create_token(
            seconds_until_expiration=lifetime, token_format="jwt", **kwargs
        )

    def verifications(self) -> int:
        return self.emu.counters.verifications

    def verify_requests(self) -> int:
        """Verify requests sent, including those a fault answered."""
        return self.emu.counters.requests.get("verify", 0)

    def jwks_requests(self) -> int:
        return self.emu.counters.requests.get("jwks", 0)

    def jwks_fetches(self) -> int:
        return self.emu.counters.jwks


@pytest.fixture
def world() -> World:
    return World(Emulator())


@pytest.fixture(autouse=True)
def _no_clerk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLERK_MACHINE_SECRET_KEY", "CLERK_SECRET_KEY", "CLERK_JWT_KEY", "CLERK_API_URL"):
        monkeypatch.delenv(name, raising=False)


class Face:
    """One verifier face with a synchronous ``verify``: the sync verifier, or the async one run
    on a backend (``anyio.run`` per call)."""

    def __init__(self, name: str, world: World, **kwargs: Any) -> None:
        self.name = name
        settings: dict[str, Any] = {
            "machine_secret_key": world.service.secret_key,
            "secret_key": world.emu.instance_secret_key,
            "api_url": API_URL,
        }
        settings.update(kwargs)
        if name == "sync":
            settings.setdefault("http_client", httpx.Client(transport=world.emu.transport()))
            self.verifier: TokenVerifier | AsyncTokenVerifier = TokenVerifier(**settings)
        else:
            settings.setdefault(
                "http_client", httpx.AsyncClient(transport=world.emu.async_transport())
            )
            self.verifier = AsyncTokenVerifier(**settings)

    def verify(self, token: str) -> VerifiedToken:
        if isinstance(self.verifier, TokenVerifier):
            return self.verifier.verify(token)
        return anyio.run(self.verifier.verify, token, backend=self.name)

    def reason(self, token: Any) -> str:
        with pytest.raises(InvalidTokenError) as caught:
            self.verify(token)
        if isinstance(token, str) and len(token) > 8:
            assert token not in str(caught.value)
        return caught.value.reason


class FaceMaker:
    """Builds verifiers of one face over the world, and HTTP clients of the matching kind."""

    def __init__(self, name: str, world: World) -> None:
        self.name = name
        self.world = world

    def __call__(self, **kwargs: Any) -> Face:
        return Face(self.name, self.world, **kwargs)

    def http(self, handler: Callable[[httpx.Request], httpx.Response]) -> Any:
        transport = httpx.MockTransport(handler)
        if self.name == "sync":
            return httpx.Client(transport=transport)
        return httpx.AsyncClient(transport=transport)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def make(request: pytest.FixtureRequest, world: World) -> FaceMaker:
    return FaceMaker(str(request.param), world)


@pytest.fixture
def face(make: FaceMaker) -> Face:
    return make()


# --- tokens we sign ourselves ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_of(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def payload_for(machine: Machine, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": "https://emulator.test",
        "sub": machine.id,
        "jti": "mt_" + "f" * 32,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 600,
    }
    body.update(extra)
    return body


def sign(key: rsa.RSAPrivateKey, payload: dict[str, Any], **headers: Any) -> str:
    head = {"kid": "ins_ours", "cat": M2M_CAT}
    head.update(headers)
    return jwt.encode(payload, key, algorithm="RS256", headers=head)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def handmade(
    header: dict[str, Any], payload: dict[str, Any], signer: Callable[[bytes], bytes]
) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{b64(signer(signing_input))}"


# --- it verifies ----------------------------------------------------------------------------


class TestVerifies:
    def test_opaque(self, world: World, face: Face):
        minted = world.opaque(claims={"role": "reporter"})
        verified = face.verify(minted.token or "")
        assert verified.token_type == "m2m_token"
        assert verified.token_id == minted.id
        assert verified.machine_id == world.worker.id
        assert verified.scopes == (world.service.id,)
        assert verified.claims == {"role": "reporter"}
        assert verified.expiration == minted.expiration
        assert verified.format == "opaque"
        assert world.verifications() == 1

    def test_jwt_with_jwks(self, world: World, face: Face):
        minted = world.jwt(claims={"role": "reporter"})
        verified = face.verify(minted.token or "")
        assert verified.token_id == minted.id
        assert verified.machine_id == world.worker.id
        assert verified.claims == {"role": "reporter"}
        assert verified.format == "jwt"
        assert verified.expiration == minted.expiration
        assert world.verifications() == 0
        assert world.jwks_fetches() == 1
        face.verify(minted.token or "")
        assert world.jwks_fetches() == 1  # cached

    def test_jwt_with_pem_needs_no_network(self, world: World, make: FaceMaker):
        minted = world.jwt()
        offline = make.http(lambda request: pytest.fail("no request expected"))
        face = make(jwt_key=world.emu.public_key_pem(), secret_key=None, http_client=offline)
        assert face.verify(minted.token or "").machine_id == world.worker.id

    def test_jwt_scopes_from_claims(self, world: World, face: Face):
        minted = world.jwt(claims={"scopes": f"{world.service.id} {world.other.id}"})
        assert face.verify(minted.token or "").scopes == (world.service.id, world.other.id)

    def test_opaque_with_the_instance_key_only(self, world: World, make: FaceMaker):
        face = make(machine_secret_key=None)
        assert face.verify(world.opaque().token or "").machine_id == world.worker.id

    def test_bring_your_own_client(self, world: World, make: FaceMaker):
        from m2m_agent import AsyncClerkM2MClient

        if make.name == "sync":
            client: Any = ClerkM2MClient(
                world.service.secret_key,
                api_url=API_URL,
                http_client=httpx.Client(transport=world.emu.transport()),
            )
        else:
            client = AsyncClerkM2MClient(
                world.service.secret_key,
                api_url=API_URL,
                http_client=httpx.AsyncClient(transport=world.emu.async_transport()),
            )
        face = make(machine_secret_key=None, secret_key=None, client=client, cache_ttl=0)
        token = world.opaque().token or ""
        face.verify(token)
        face.verify(token)
        assert face.verifier.statistics().api_calls == 2 == world.verifications()

    def test_versioned_api_url(self, world: World, make: FaceMaker):
        seen: list[str] = []

        def spy(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            outcome = world.emu.handle(request)
            assert outcome.response is not None
            return outcome.response

        face = make(api_url=API_URL + "/v1", http_client=make.http(spy))
        face.verify(world.opaque().token or "")
        face.verify(world.jwt().token or "")
        assert seen == ["/v1/m2m_tokens/verify", "/v1/jwks"]

    def test_public_jwks_url_gets_no_key(self, world: World, make: FaceMaker):
        headers: list[httpx.Headers] = []

        def spy(request: httpx.Request) -> httpx.Response:
            headers.append(request.headers)
            outcome = world.emu.handle(request)
            assert outcome.response is not None
            return outcome.response

        face = make(
            secret_key=None,
            jwks_url=API_URL + "/.well-known/jwks.json",
            http_client=make.http(spy),
        )
        face.verify(world.jwt().token or "")
        assert len(headers) == 1
        assert "authorization" not in headers[0]


class TestAsyncVerifies:
    @pytest.mark.anyio
    async def test_opaque_and_jwt(self, world: World):
        async with AsyncTokenVerifier(
            machine_secret_key=world.service.secret_key,
            secret_key=world.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.AsyncClient(transport=world.emu.async_transport()),
        ) as verifier:
            opaque = await verifier.verify(world.opaque().token or "")
            signed = await verifier.verify(world.jwt().token or "")
        assert opaque.machine_id == signed.machine_id == world.worker.id
        assert (opaque.format, signed.format) == ("opaque", "jwt")

    def test_sync_context_manager(self, world: World):
        with TokenVerifier(machine_secret_key=world.service.secret_key, api_url=API_URL) as v:
            assert v.api_url == httpx.URL(API_URL + "/")


# --- it refuses (one test per case) ---------------------------------------------------------


class TestRefuses:
    def test_revoked_opaque(self, world: World, face: Face):
        minted = world.opaque()
        world.emu.revoke(minted.id)
        # Clerk answers 404 for a revoked token, like an unknown one; it does not say which.
        assert face.reason(minted.token) == "unknown"

    def test_revoked_in_a_200_answer(self, world: World, make: FaceMaker):
        body = {
            "object": "machine_to_machine_token",
            "id": "mt_" + "1" * 32,
            "subject": world.worker.id,
            "scopes": [],
            "claims": None,
            "revoked": True,
            "revocation_reason": "compromised",
            "expired": False,
            "expiration": None,
            "last_used_at": None,
            "created_at": 0,
            "updated_at": 0,
        }
        client = make.http(lambda request: httpx.Response(200, json=body))
        assert make(http_client=client).reason("mt_" + "z" * 32) == "revoked"

    def test_expired_opaque(self, make: FaceMaker):
        now = [time.time()]
        emulator = Emulator(clock=lambda: now[0])
        world = World(emulator)
        minted = world.opaque(lifetime=60)
        face = Face(make.name, world)
        now[0] += 61
        assert face.reason(minted.token) == "unknown"

    def test_expired_opaque_seen_before(self, make: FaceMaker):
        now = [time.time()]
        world = World(Emulator(clock=lambda: now[0]))
        minted = world.opaque(lifetime=60)
        face = Face(make.name, world, cache_ttl=0, clock=lambda: now[0])
        face.verify(minted.token or "")
        now[0] += 61
        assert face.reason(minted.token) == "expired"

    def test_expired_jwt(self, world: World, make: FaceMaker):
        minted = world.jwt(lifetime=60)
        face = make(clock=lambda: time.time() + 66)
        assert face.reason(minted.token) == "expired"

    def test_jwt_not_valid_yet(self, world: World, make: FaceMaker):
        minted = world.jwt(lifetime=60)
        face = make(clock=lambda: time.time() - 3600)
        assert face.reason(minted.token) == "expired"

    def test_tampered_jwt(self, world: World, face: Face):
        token = world.jwt().token or ""
        head, body, sig = token.split(".")
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload["role"] = "admin"
        forged_body = b64(json.dumps(payload).encode())
        assert face.reason(f"{head}.{forged_body}.{sig}") == "bad_signature"

    def test_tampered_signature(self, world: World, face: Face):
        token = world.jwt().token or ""
        head, body, sig = token.split(".")
        flipped = ("A" if sig[10] != "A" else "B").join((sig[:10], sig[11:]))
        assert face.reason(f"{head}.{body}.{flipped}") == "bad_signature"

    def test_wrong_kid(self, world: World, face: Face, rsa_key: rsa.RSAPrivateKey):
        token = sign(rsa_key, payload_for(world.worker), kid="ins_somebody_else")
        assert face.reason(token) == "bad_signature"

    def test_right_kid_wrong_key(self, world: World, face: Face, rsa_key: rsa.RSAPrivateKey):
        token = sign(rsa_key, payload_for(world.worker), kid=world.emu.instance_id)
        assert face.reason(token) == "bad_signature"

    def test_alg_none(self, world: World, face: Face):
        header = {"alg": "none", "typ": "JWT", "kid": world.emu.instance_id, "cat": M2M_CAT}
        token = handmade(header, payload_for(world.worker), lambda data: b"")
        assert token.endswith(".")
        assert face.reason(token) == "bad_signature"

    @pytest.mark.parametrize("mode", ["jwks", "pem"])
    def test_hs256_signed_with_the_public_key(self, world: World, make: FaceMaker, mode: str):
        pem = world.emu.public_key_pem()
        header = {"alg": "HS256", "typ": "JWT", "kid": world.emu.instance_id, "cat": M2M_CAT}

        def mac(data: bytes) -> bytes:
            return hmac.new(pem.encode(), data, hashlib.sha256).digest()

        token = handmade(header, payload_for(world.worker), mac)
        face = make(jwt_key=pem) if mode == "pem" else make()
        assert face.reason(token) == "bad_signature"

    def test_session_token(self, make: FaceMaker, rsa_key: rsa.RSAPrivateKey):
        face = make(jwt_key=pem_of(rsa_key))
        token = jwt.encode(
            {"sub": "user_2abc", "sid": "sess_1", "exp": int(time.time()) + 60},
            rsa_key,
            algorithm="RS256",
            headers={"kid": "ins_ours", "cat": "cl_B7d4PD111AAA"},
        )
        assert face.reason(token) == "not_m2m_token"

    def test_session_category_with_machine_subject(
        self, world: World, make: FaceMaker, rsa_key: rsa.RSAPrivateKey
    ):
        face = make(jwt_key=pem_of(rsa_key))
        token = sign(rsa_key, payload_for(world.worker), cat="cl_B7d4PD111AAA")
        assert face.reason(token) == "not_m2m_token"

    def test_signed_by_our_pem_verifies(
        self, world: World, make: FaceMaker, rsa_key: rsa.RSAPrivateKey
    ):
        face = make(jwt_key=pem_of(rsa_key))
        assert face.verify(sign(rsa_key, payload_for(world.worker))).machine_id == world.worker.id

    @pytest.mark.parametrize(
        ("token", "reason"),
        [
            ("garbage", "not_m2m_token"),
            ("ak_" + "0" * 32, "not_m2m_token"),
            ("oat_" + "0" * 32, "not_m2m_token"),
            ("", "malformed"),
            ("mt_ spaced", "malformed"),
            ("x" * 100_000, "malformed"),
            ("eyJh.eyJi.c2ln", "malformed"),
            (None, "malformed"),
        ],
    )
    def test_garbage(self, world: World, face: Face, token: Any, reason: str):
        assert face.reason(token) == reason
        assert world.verifications() == 0

    def test_unknown_opaque(self, world: World, face: Face):
        assert face.reason("mt_" + "0" * 32) == "unknown"

    def test_not_scoped_to_this_machine(self, world: World, make: FaceMaker):
        face = make(machine_secret_key=world.other.secret_key)
        assert face.reason(world.opaque().token) == "unknown"

    def test_missing_required_scope_opaque(self, world: World, make: FaceMaker):
        face = make(machine_secret_key=None, required_scopes=[world.other.id])
        assert face.reason(world.opaque().token) == "missing_scope"

    def test_required_scope_present(self, world: World, make: FaceMaker):
        face = make(required_scopes=world.service.id)
        assert face.verify(world.opaque().token or "").scopes == (world.service.id,)

    def test_missing_required_scope_jwt(self, world: World, make: FaceMaker):
        face = make(required_scopes=[world.service.id])
        assert face.reason(world.jwt().token) == "missing_scope"

    def test_subject_not_allowed(self, world: World, make: FaceMaker):
        face = make(allowed_subjects=[world.other.id])
        assert face.reason(world.opaque().token) == "missing_scope"
        assert face.reason(world.jwt().token) == "missing_scope"
        assert make(allowed_subjects=world.worker.id).verify(world.jwt().token or "")


# --- the cache -------------------------------------------------------------------------------


class TestCache:
    def test_ten_thousand_verifications_one_call(self, world: World, make: FaceMaker):
        face = make()
        token = world.opaque().token or ""
        if isinstance(face.verifier, TokenVerifier):
            for _ in range(10_000):
                face.verifier.verify(token)
        else:
            verifier = face.verifier

            async def many() -> None:
                for _ in range(10_000):
                    await verifier.verify(token)

            anyio.run(many, backend=face.name)
        assert world.verifications() == 1
        stats = face.verifier.statistics()
        assert (stats.api_calls, stats.cache_hits, stats.cached) == (1, 9_999, 1)

    def test_revoked_token_stops_verifying_within_cache_ttl(self, world: World, make: FaceMaker):
        face = make(cache_ttl=0.3)
        minted = world.opaque()
        token = minted.token or ""
        face.verify(token)
        world.emu.revoke(minted.id)
        face.verify(token)  # still cached: the documented bound is cache_ttl
        time.sleep(0.35)
        # Accepted before, refused now: the verifier can tell it was revoked.
        assert face.reason(token) == "revoked"
        assert world.verifications() == 2

    def test_entry_never_outlives_the_token(self, world: World, make: FaceMaker):
        minted = world.opaque(lifetime=600)
        assert minted.expiration is not None
        # Our clock says the token has 0.2 s left: a 30 s cache must not keep it longer.
        expires = minted.expiration.timestamp()
        face = make(cache_ttl=30, clock=lambda: time.time() + (expires - time.time() - 0.2))
        face.verify(minted.token or "")
        face.verify(minted.token or "")
        assert world.verifications() == 1
        time.sleep(0.25)
        face.verify(minted.token or "")
        assert world.verifications() == 2

    def test_negative_cache(self, world: World, make: FaceMaker):
        face = make(negative_cache_ttl=0.2)
        for _ in range(5):
            assert face.reason("mt_" + "0" * 32) == "unknown"
        assert world.verifications() == 1
        assert face.verifier.statistics().negative_cache_hits == 4
        time.sleep(0.25)
        face.reason("mt_" + "0" * 32)
        assert world.verifications() == 2

    def test_negative_cache_is_bounded(self, world: World, make: FaceMaker):
        face = make(negative_cache_max_entries=10)
        good = world.opaque().token or ""
        face.verify(good)
        for n in range(50):
            face.reason(f"mt_{n:032x}")
        stats = face.verifier.statistics()
        assert (stats.cached, stats.negative_cached) == (1, 10)
        face.verify(good)
        assert world.verifications() == 51  # the good token stayed cached

    def test_positive_cache_is_bounded(self, world: World, make: FaceMaker):
        face = make(cache_max_entries=3)
        for _ in range(5):
            face.verify(world.opaque().token or "")
        assert face.verifier.statistics().cached == 3

    def test_cache_can_be_disabled_and_cleared(self, world: World, make: FaceMaker):
        token = world.opaque().token or ""
        face = make(cache_ttl=0)
        face.verify(token)
        face.verify(token)
        assert world.verifications() == 2
        cached = make()
        cached.verify(token)
        cached.verifier.clear_cache()
        cached.verify(token)
        assert world.verifications() == 4

    @pytest.mark.parametrize(
        ("fault", "error"),
        [
            (Fault(status=503, endpoints=frozenset({"verify"})), ServerError),
            (Fault(status=429, retry_after=2, endpoints=frozenset({"verify"})), ClerkAPIError),
            (Fault(drop=True, endpoints=frozenset({"verify"})), TransportError),
            (Fault(malformed="html", endpoints=frozenset({"verify"})), ClerkAPIError),
        ],
    )
    def test_outage_propagates_and_is_not_cached(
        self, world: World, face: Face, fault: Fault, error: type[Exception]
    ):
        token = world.opaque().token or ""
        world.emu.inject(fault)
        with pytest.raises(error) as caught:
            face.verify(token)
        assert not isinstance(caught.value, InvalidTokenError)
        assert token not in str(caught.value)
        world.emu.clear_faults()
        assert face.verify(token).machine_id == world.worker.id

    def test_our_key_refused_is_not_the_tokens_fault(self, world: World, make: FaceMaker):
        face = make(machine_secret_key="ak_" + "9" * 32)
        with pytest.raises(ClerkAPIError) as caught:
            face.verify(world.opaque().token or "")
        assert caught.value.status_code == 401


# --- JWKS --------------------------------------------------------------------------------------


class TestJwks:
    def test_unknown_kid_refetch_is_rate_limited(
        self, world: World, face: Face, rsa_key: rsa.RSAPrivateKey
    ):
        face.verify(world.jwt().token or "")
        assert world.jwks_fetches() == 1
        for n in range(50):
            token = sign(rsa_key, payload_for(world.worker), kid=f"ins_forged_{n}")
            assert face.reason(token) == "bad_signature"
        assert world.jwks_fetches() == 1  # the set is < 30 s old: no refetch for made-up kids

    def test_unknown_kid_refetches_after_the_interval(
        self, world: World, make: FaceMaker, rsa_key: rsa.RSAPrivateKey
    ):
        face = make(jwks_refetch_interval=0.1)
        face.verify(world.jwt().token or "")
        forged = sign(rsa_key, payload_for(world.worker), kid="ins_new")
        face.reason(forged)
        assert world.jwks_fetches() == 1
        time.sleep(0.12)
        face.reason(forged)
        assert world.jwks_fetches() == 2

    def test_rotation_picks_up_the_new_key(self, world: World, make: FaceMaker):
        old = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        served = {"keys": [jwk_of(old, "ins_old")]}
        fetches = []

        def jwks(request: httpx.Request) -> httpx.Response:
            fetches.append(request.headers.get("authorization"))
            return httpx.Response(200, json=served)

        face = make(http_client=make.http(jwks), jwks_refetch_interval=0)
        face.verify(sign(old, payload_for(world.worker), kid="ins_old"))
        served["keys"].append(jwk_of(new, "ins_new"))
        face.verify(sign(new, payload_for(world.worker), kid="ins_new"))
        assert fetches == [f"Bearer {world.emu.instance_secret_key}"] * 2

    def test_stale_keys_serve_through_a_jwks_outage(self, world: World, make: FaceMaker):
        face = make(jwks_cache_ttl=0, jwks_refetch_interval=0.05)
        token = world.jwt().token or ""
        face.verify(token)
        time.sleep(0.06)
        world.emu.inject(Fault(status=503, endpoints=frozenset({"jwks"})))
        assert face.verify(token).machine_id == world.worker.id
        assert face.verify(token).machine_id == world.worker.id
        assert world.jwks_requests() == 2  # one failed refresh, then the stale set is kept

    def test_jwks_outage_before_any_key_is_a_transport_error(self, world: World, face: Face):
        world.emu.inject(Fault(drop=True, endpoints=frozenset({"jwks"})))
        with pytest.raises(TransportError):
            face.verify(world.jwt().token or "")
        world.emu.clear_faults()
        assert face.verify(world.jwt().token or "")

    def test_jwks_without_usable_keys(self, world: World, make: FaceMaker):
        client = make.http(lambda r: httpx.Response(200, json={"keys": []}))
        with pytest.raises(ClerkAPIError, match="no RS256 signing key"):
            make(http_client=client).verify(world.jwt().token or "")


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update(kid=kid, alg="RS256", use="sig")
    return data


# --- single flight ---------------------------------------------------------------------------


LATENCY = Fault(latency=0.2, endpoints=frozenset({"verify", "jwks"}))


class TestSingleFlightThreads:
    def verifier(self, world: World, **kwargs: Any) -> TokenVerifier:
        return TokenVerifier(
            machine_secret_key=world.service.secret_key,
            secret_key=world.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=world.emu.transport()),
            **kwargs,
        )

    def run_threads(self, fn: Callable[[], Any], threads: int = 64) -> list[Any]:
        barrier = threading.Barrier(threads)

        def call() -> Any:
            barrier.wait()
            try:
                return fn()
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda _: call(), range(threads)))

    def test_one_call_for_many_threads(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        results = self.run_threads(lambda: verifier.verify(token))
        assert all(isinstance(r, VerifiedToken) for r in results)
        assert world.verifications() == 1

    def test_one_call_even_without_a_cache(self, world: World):
        verifier = self.verifier(world, cache_ttl=0)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        self.run_threads(lambda: verifier.verify(token))
        assert world.verifications() == 1

    def test_ten_thousand_through_a_pool(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: verifier.verify(token), range(10_000)))
        assert len(results) == 10_000
        assert world.verifications() == 1

    def test_shared_failure(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        world.emu.inject(Fault(status=503, endpoints=frozenset({"verify"}), times=1))
        results = self.run_threads(lambda: verifier.verify(token))
        assert all(isinstance(r, ServerError) for r in results)
        assert len({id(r) for r in results}) == len(results)  # each caller its own copy
        assert world.verify_requests() == 1

    def test_shared_rejection(self, world: World):
        verifier = self.verifier(world)
        world.emu.inject(LATENCY)
        results = self.run_threads(lambda: verifier.verify("mt_" + "0" * 32))
        assert all(isinstance(r, InvalidTokenError) and r.reason == "unknown" for r in results)
        assert world.verifications() == 1

    def test_one_jwks_fetch(self, world: World):
        verifier = self.verifier(world)
        token = world.jwt().token or ""
        world.emu.inject(LATENCY)
        results = self.run_threads(lambda: verifier.verify(token))
        assert all(isinstance(r, VerifiedToken) for r in results)
        assert world.jwks_fetches() == 1


class TestSingleFlightTasks:
    def verifier(self, world: World, **kwargs: Any) -> AsyncTokenVerifier:
        return AsyncTokenVerifier(
            machine_secret_key=world.service.secret_key,
            secret_key=world.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.AsyncClient(transport=world.emu.async_transport()),
            **kwargs,
        )

    @pytest.mark.anyio
    async def test_ten_thousand_tasks_one_call(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        results: list[VerifiedToken] = []

        async def call() -> None:
            results.append(await verifier.verify(token))

        async with anyio.create_task_group() as tasks:
            for _ in range(10_000):
                tasks.start_soon(call)
        assert len(results) == 10_000
        assert world.verifications() == 1
        assert verifier.statistics().api_calls == 1

    @pytest.mark.anyio
    async def test_one_call_even_without_a_cache(self, world: World):
        verifier = self.verifier(world, cache_ttl=0)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        async with anyio.create_task_group() as tasks:
            for _ in range(100):
                tasks.start_soon(verifier.verify, token)
        assert world.verifications() == 1

    @pytest.mark.anyio
    async def test_shared_failure(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        world.emu.inject(Fault(status=503, endpoints=frozenset({"verify"}), times=1))
        errors: list[Exception] = []

        async def call() -> None:
            try:
                await verifier.verify(token)
            except ServerError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tasks:
            for _ in range(100):
                tasks.start_soon(call)
        assert len(errors) == 100
        assert world.verify_requests() == 1
        assert (await verifier.verify(token)).machine_id == world.worker.id  # not cached

    @pytest.mark.anyio
    async def test_cancelled_leader_hands_over(self, world: World):
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(LATENCY)
        results: list[VerifiedToken] = []

        async def leader() -> None:
            with anyio.move_on_after(0.05):
                await verifier.verify(token)
            results.append(None)  # type: ignore[arg-type]

        async def follower() -> None:
            await anyio.sleep(0.01)
            results.append(await verifier.verify(token))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(leader)
            tasks.start_soon(follower)
        assert results[0] is None
        assert isinstance(results[1], VerifiedToken)
        assert world.verifications() == 2

    @pytest.mark.anyio
    async def test_one_jwks_fetch(self, world: World):
        verifier = self.verifier(world)
        token = world.jwt().token or ""
        world.emu.inject(LATENCY)
        async with anyio.create_task_group() as tasks:
            for _ in range(200):
                tasks.start_soon(verifier.verify, token)
        assert world.jwks_fetches() == 1

    def test_across_event_loops(self, world: World):
        """Threads with their own loops share one flight and one call."""
        verifier = self.verifier(world)
        token = world.opaque().token or ""
        world.emu.inject(Fault(latency=0.3, endpoints=frozenset({"verify"})))
        results: list[Any] = []

        def thread(backend: str) -> None:
            results.append(anyio.run(verifier.verify, token, backend=backend))

        threads = [
            threading.Thread(target=thread, args=(backend,))
            for backend in ("asyncio", "trio", "asyncio", "trio")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert len(results) == 4
        assert all(isinstance(r, VerifiedToken) for r in results)
        assert world.verifications() == 1


# --- configuration ---------------------------------------------------------------------------


class TestConfiguration:
    def test_nothing_to_verify_with(self):
        with pytest.raises(ConfigurationError) as caught:
            TokenVerifier()
        message = str(caught.value)
        for name in ("CLERK_MACHINE_SECRET_KEY", "CLERK_SECRET_KEY", "CLERK_JWT_KEY"):
            assert name in message

    def test_environment_fallbacks(self, world: World, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.setenv("CLERK_MACHINE_SECRET_KEY", world.service.secret_key)
        monkeypatch.setenv("CLERK_JWT_KEY", world.emu.public_key_pem().replace("\n", "\\n"))
        monkeypatch.setenv("CLERK_API_URL", API_URL)
        verifier = TokenVerifier(http_client=httpx.Client(transport=world.emu.transport()))
        assert verifier.api_url == httpx.URL(API_URL + "/")
        assert verifier.verify(world.opaque().token or "").format == "opaque"
        assert verifier.verify(world.jwt().token or "").format == "jwt"
        assert world.jwks_fetches() == 0

    def test_secret_key_from_environment(self, world: World, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.setenv("CLERK_SECRET_KEY", world.emu.instance_secret_key)
        verifier = TokenVerifier(
            api_url=API_URL, http_client=httpx.Client(transport=world.emu.transport())
        )
        assert verifier.verify(world.jwt().token or "").format == "jwt"
        assert verifier.verify(world.opaque().token or "").format == "opaque"

    def test_bare_pem_body(self, world: World):
        pem = world.emu.public_key_pem()
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        verifier = TokenVerifier(jwt_key=body)
        assert verifier.verify(world.jwt().token or "").machine_id == world.worker.id

    def test_opaque_token_without_an_opaque_key(self, world: World):
        verifier = TokenVerifier(jwt_key=world.emu.public_key_pem())
        with pytest.raises(ConfigurationError, match="CLERK_MACHINE_SECRET_KEY"):
            verifier.verify(world.opaque().token or "")

    def test_jwt_without_a_jwt_key(self, world: World):
        verifier = TokenVerifier(machine_secret_key=world.service.secret_key, api_url=API_URL)
        with pytest.raises(ConfigurationError, match="CLERK_JWT_KEY"):
            verifier.verify(world.jwt().token or "")

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"machine_secret_key": "sk_test_" + "1" * 32}, "instance secret key"),
            ({"secret_key": "ak_" + "1" * 32}, "machine secret key"),
            ({"secret_key": "pk_test_" + "1" * 32}, "publishable"),
            ({"secret_key": "nonsense"}, "instance secret key"),
            ({"jwt_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}, "PEM"),
            (
                {"jwt_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"},
                "private",
            ),
            ({"jwks_url": "http://keys.example.com/jwks.json"}, "plain http"),
            ({"secret_key": "sk_test_" + "1" * 32, "cache_ttl": -1}, "cache_ttl"),
            ({"secret_key": "sk_test_" + "1" * 32, "cache_max_entries": 1.5}, "cache_max_entries"),
        ],
    )
    def test_bad_settings(self, kwargs: dict[str, Any], match: str):
        with pytest.raises(ConfigurationError, match=match) as caught:
            TokenVerifier(**kwargs)
        for value in kwargs.values():
            if isinstance(value, str) and value.startswith(("sk_", "ak_", "pk_")):
                assert value not in str(caught.value)

    def test_client_and_key_together(self, world: World):
        client = ClerkM2MClient(world.service.secret_key, api_url=API_URL)
        with pytest.raises(ConfigurationError, match="either client"):
            TokenVerifier(client=client, machine_secret_key=world.service.secret_key)

    def test_jwt_needs_pyjwt(self, world: World, monkeypatch: pytest.MonkeyPatch):
        import sys

        from m2m_agent import _verify_keys

        token = world.jwt().token or ""
        pem = world.emu.public_key_pem()
        monkeypatch.setitem(sys.modules, "jwt", None)
        monkeypatch.setattr(_verify_keys, "_crypto", None)
        verifier = TokenVerifier(
            machine_secret_key=world.service.secret_key,
            secret_key=world.emu.instance_secret_key,
            api_url=API_URL,
            http_client=httpx.Client(transport=world.emu.transport()),
        )
        with pytest.raises(ConfigurationError, match=r"pip install 'm2m-agent\[jwt\]'"):
            verifier.verify(token)
        assert verifier.verify(world.opaque().token or "").format == "opaque"
        with pytest.raises(ConfigurationError, match="m2m-agent"):
            TokenVerifier(jwt_key=pem)


# --- secrets ---------------------------------------------------------------------------------


class TestSecrets:
    def test_repr_shows_no_key(self, world: World):
        verifier = TokenVerifier(
            machine_secret_key=world.service.secret_key,
            secret_key=world.emu.instance_secret_key,
            api_url=API_URL,
        )
        text = repr(verifier)
        assert world.service.secret_key not in text
        assert world.emu.instance_secret_key not in text
        assert "TokenVerifier" in text

    def test_logs_and_errors_carry_no_secret(self, world: World, make: FaceMaker):
        face = make(negative_cache_ttl=0)
        opaque = world.opaque().token or ""
        signed = world.jwt().token or ""
        revoked = world.opaque()
        world.emu.revoke(revoked.id)
        secrets = [opaque, signed, revoked.token or "", world.service.secret_key]
        secrets.append(world.emu.instance_secret_key)
        messages: list[str] = []
        with structlog.testing.capture_logs() as logs:
            face.verify(opaque)
            face.verify(signed)
            for bad in (revoked.token, "mt_" + "0" * 32, signed[:-3] + "abc", "ak_" + "x" * 30):
                try:
                    face.verify(bad or "")
                except InvalidTokenError as exc:
                    messages += [str(exc), repr(exc), repr(pickle.loads(pickle.dumps(exc)))]
            world.emu.inject(Fault(status=500, endpoints=frozenset({"verify"})))
            try:
                face.verify(world.opaque().token or "")
            except ServerError as exc:
                messages += [str(exc), repr(exc)]
        assert logs, "expected some log events"
        events = " ".join(repr(entry) for entry in logs)
        assert "m2m_agent.verify.rejected" in events
        assert any("token_fingerprint" in entry for entry in logs)
        for secret in secrets:
            assert secret not in events
            for message in messages:
                assert secret not in message

    def test_verified_token_holds_no_secret(self, world: World, face: Face):
        token = world.opaque().token or ""
        verified = face.verify(token)
        assert token not in repr(verified)
        assert token not in repr(pickle.dumps(verified))


# --- fork ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
class TestFork:
    def run_in_child(self, fn: Callable[[], bool], timeout: float = 5.0) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                code = 0 if fn() else 1
            except BaseException:
                code = 2
            os.write(write_end, bytes([code]))
            os._exit(code)
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read_end)
            _, status = os.waitpid(pid, 0)
        assert ready, "the child hung (deadlock after fork?)"
        assert os.waitstatus_to_exitcode(status) == 0

    def test_child_works_though_a_parent_thread_held_the_lock(self, world: World):
        verifier = TokenVerifier(
            machine_secret_key=world.service.secret_key,
            jwt_key=world.emu.public_key_pem(),
            api_url=API_URL,
            http_client=httpx.Client(transport=world.emu.transport()),
        )
        cached = world.opaque().token or ""
        fresh = world.opaque().token or ""
        signed = world.jwt().token or ""
        verifier.verify(cached)
        with verifier._lock:  # as if another thread were inside the cache at fork time

            def child() -> bool:
                return all(
                    verifier.verify(token).machine_id == world.worker.id
                    for token in (cached, fresh, signed)
                )

            self.run_in_child(child)
        assert verifier.verify(fresh).machine_id == world.worker.id
