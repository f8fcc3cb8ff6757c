"""The emulator in-process: every endpoint, error path, fault kind, counter and clock rule.

Plain httpx clients talk to it through ``Emulator.transport()`` / ``async_transport()``.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from typing import Any

import anyio
import httpx
import jwt
import pytest

from m2m_agent.emulator import Counters, Emulator, Fault, Machine, Outcome, TokenRecord

BASE = "https://api.clerk.test"
TOKEN_FIELDS = {
    "object",
    "id",
    "subject",
    "claims",
    "scopes",
    "revoked",
    "revocation_reason",
    "expired",
    "expiration",
    "last_used_at",
    "created_at",
    "updated_at",
}
ID_RE = re.compile(r"^mt_[0-9a-f]{32}$")
OPAQUE_RE = re.compile(r"^mt_[A-Za-z0-9]{48}$")
# The fake clock runs ahead of real time, so pyjwt must not judge exp/nbf/iat by time.time().
NO_TIME_CHECKS: Any = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}


class FakeClock:
    """Wall-clock seconds that only move when told."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Emulator:
    return Emulator(clock=clock)


@pytest.fixture
def verifier(emu: Emulator) -> Machine:
    """The machine tokens are presented to."""
    return emu.create_machine("api")


@pytest.fixture
def minter(emu: Emulator, verifier: Machine) -> Machine:
    """The machine that mints tokens, scoped to ``verifier``."""
    return emu.create_machine("worker", scoped_machines=[verifier.id])


@pytest.fixture
def client(emu: Emulator) -> Any:
    with httpx.Client(transport=emu.transport(), base_url=BASE) as client:
        yield client


@pytest.fixture(params=["", "/v1"], ids=["bapi-proxy", "v1"])
def prefix(request: pytest.FixtureRequest) -> str:
    return request.param


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create(client: httpx.Client, machine: Machine, prefix: str = "", **body: Any) -> httpx.Response:
    return client.post(f"{prefix}/m2m_tokens", json=body, headers=auth(machine.secret_key))


def mint(client: httpx.Client, machine: Machine, prefix: str = "", **body: Any) -> dict[str, Any]:
    response = create(client, machine, prefix, **body)
    assert response.status_code == 201, response.text
    return response.json()


def verify(client: httpx.Client, key: str, token: str, prefix: str = "") -> httpx.Response:
    return client.post(f"{prefix}/m2m_tokens/verify", json={"token": token}, headers=auth(key))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is a complete Clerk error envelope with this status (and code)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"errors", "clerk_trace_id"}
    assert isinstance(body["clerk_trace_id"], str)
    assert body["clerk_trace_id"]
    (error,) = body["errors"]
    assert set(error) == {"message", "long_message", "code", "meta"}
    assert all(isinstance(error[k], str) and error[k] for k in ("message", "long_message", "code"))
    assert isinstance(error["meta"], dict)
    if code is not None:
        assert error["code"] == code
    return error


class TestMachines:
    def test_ids_and_keys_have_clerk_shapes(self, emu: Emulator) -> None:
        """Machine ids, keys and the instance id/key follow Clerk's formats."""
        machine = emu.create_machine("worker")
        assert re.fullmatch(r"mch_\w{27}", machine.id)
        assert re.fullmatch(r"ak_test_[0-9a-f]{32}", machine.secret_key)
        assert re.fullmatch(r"ins_\w{27}", emu.instance_id)
        assert emu.instance_secret_key.startswith("sk_test_")
        assert machine.default_token_ttl == 3600
        assert machine.scoped_machines == ()

    def test_reprs_hide_secrets(self, emu: Emulator, client: httpx.Client) -> None:
        """Neither a machine, a token record nor the emulator shows a key or token."""
        machine = emu.create_machine("worker", secret_key="ak_live_supersecret")
        token = mint(client, machine)["token"]
        (record,) = emu.tokens
        assert record.token == token
        for text in (repr(machine), str(machine), repr(record), repr(emu), repr(emu.counters)):
            assert "supersecret" not in text
            assert token not in text
            assert emu.instance_secret_key not in text

    def test_explicit_id_and_validation(self, emu: Emulator) -> None:
        """A given id and key are used; malformed or duplicate ones are refused."""
        machine_id = "mch_" + "a" * 27
        machine = emu.create_machine("m", machine_id=machine_id, secret_key="ak_mine_123")
        assert machine.id == machine_id
        assert machine.secret_key == "ak_mine_123"
        with pytest.raises(ValueError):
            emu.create_machine("m", machine_id=machine_id)
        with pytest.raises(ValueError):
            emu.create_machine("m", secret_key="ak_mine_123")
        with pytest.raises(ValueError):
            emu.create_machine("m", machine_id="mch_short")
        with pytest.raises(ValueError):
            emu.create_machine("m", secret_key="sk_test_nope")
        with pytest.raises(ValueError):
            emu.create_machine("m", default_token_ttl=0)
        with pytest.raises(KeyError):
            emu.add_scope(machine_id, "mch_" + "b" * 27)


class TestCreate:
    def test_opaque_token_object(
        self, client: httpx.Client, minter: Machine, verifier: Machine, prefix: str
    ) -> None:
        """A create answers 201 with the exact token object, including the token."""
        response = create(
            client, minter, prefix, seconds_until_expiration=60, claims={"role": "svc"}
        )
        assert response.status_code == 201
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == TOKEN_FIELDS | {"token"}
        assert body["object"] == "machine_to_machine_token"
        assert ID_RE.match(body["id"])
        assert OPAQUE_RE.match(body["token"])
        assert not ID_RE.match(body["token"])
        assert body["subject"] == minter.id
        assert body["scopes"] == [verifier.id]
        assert body["claims"] == {"role": "svc"}
        assert body["revoked"] is False
        assert body["expired"] is False
        assert body["revocation_reason"] is None
        assert body["last_used_at"] is None
        assert body["created_at"] == body["updated_at"] == 1_800_000_000_000
        assert body["expiration"] == body["created_at"] + 60_000

    def test_lifetime_defaults_and_floats(self, emu: Emulator, client: httpx.Client) -> None:
        """No or null lifetime means the machine's default TTL; floats like 60.0 are accepted."""
        machine = emu.create_machine("short", default_token_ttl=120)
        for body in ({}, {"seconds_until_expiration": None}):
            token = mint(client, machine, **body)
            assert token["expiration"] - token["created_at"] == 120_000
            assert token["claims"] is None
            assert token["scopes"] == []
        token = mint(client, machine, seconds_until_expiration=60.0)
        assert token["expiration"] - token["created_at"] == 60_000

    def test_empty_body_is_a_default_create(self, client: httpx.Client, minter: Machine) -> None:
        """A create without a body mints with defaults."""
        response = client.post("/m2m_tokens", headers=auth(minter.secret_key))
        assert response.status_code == 201

    def test_instance_key_is_rejected(self, emu: Emulator, client: httpx.Client) -> None:
        """Only a machine secret key may create: sk_ gets 401 machine_secret_key_invalid."""
        response = client.post("/v1/m2m_tokens", json={}, headers=auth(emu.instance_secret_key))
        error = assert_error(response, 401, "machine_secret_key_invalid")
        assert error["message"] == (
            "The provided Machine Secret Key is invalid."
            " Make sure that your Machine Secret Key is correct."
        )

    @pytest.mark.parametrize(
        "header", [None, "Basic abc", "Bearer", "Bearer ", "Bearer a b", "ak_x"]
    )
    def test_missing_or_garbled_authorization(
        self, client: httpx.Client, header: str | None
    ) -> None:
        """A missing or garbled Authorization header gets 401."""
        headers = {} if header is None else {"Authorization": header}
        assert_error(client.post("/m2m_tokens", json={}, headers=headers), 401)

    def test_unknown_key(self, client: httpx.Client) -> None:
        """An unknown machine key gets 401 machine_secret_key_invalid."""
        response = client.post("/m2m_tokens", json={}, headers=auth("ak_test_" + "0" * 32))
        assert_error(response, 401, "machine_secret_key_invalid")

    @pytest.mark.parametrize(
        "body",
        [
            {"unknown": 1},
            {"token_format": "pem"},
            {"seconds_until_expiration": 0},
            {"seconds_until_expiration": -5},
            {"seconds_until_expiration": "60"},
            {"seconds_until_expiration": True},
            {"min_remaining_ttl_seconds": -1},
            {"min_remaining_ttl_seconds": 1.5},
            {"min_remaining_ttl_seconds": "10"},
            {"seconds_until_expiration": 60, "min_remaining_ttl_seconds": 60},
            {"seconds_until_expiration": 60, "min_remaining_ttl_seconds": 61},
            {"min_remaining_ttl_seconds": 3600},
        ],
    )
    def test_bad_params(self, client: httpx.Client, minter: Machine, body: dict[str, Any]) -> None:
        """Unknown fields and out-of-range values get 400."""
        assert_error(create(client, minter, **body), 400)

    @pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"'])
    def test_bad_json_body(self, client: httpx.Client, minter: Machine, content: bytes) -> None:
        """A body that is not a JSON object gets 400."""
        headers = {**auth(minter.secret_key), "Content-Type": "application/json"}
        assert_error(client.post("/m2m_tokens", content=content, headers=headers), 400)


class TestMinRemainingReuse:
    def test_reuses_a_live_token(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """A token with enough life left is returned again and counted as reused, not minted."""
        body = {
            "seconds_until_expiration": 300,
            "min_remaining_ttl_seconds": 60,
            "claims": {"a": 1},
        }
        first = mint(client, minter, **body)
        second = mint(client, minter, **body)
        assert second["id"] == first["id"]
        assert second["token"] == first["token"]
        counters = emu.counters
        assert (counters.mints, counters.reused, counters.requests["create"]) == (1, 1, 2)

    def test_mints_when_it_cannot_reuse(
        self,
        emu: Emulator,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
    ) -> None:
        """Other claims, too little life left, revocation or new scopes all force a new mint."""
        body = {
            "seconds_until_expiration": 300,
            "min_remaining_ttl_seconds": 60,
            "claims": {"a": 1},
        }
        first = mint(client, minter, **body)
        assert mint(client, minter, **{**body, "claims": {"a": 2}})["id"] != first["id"]
        clock.advance(241)  # 59 s left
        second = mint(client, minter, **body)
        assert second["id"] != first["id"]
        emu.revoke(second["id"])
        third = mint(client, minter, **body)
        assert third["id"] not in (first["id"], second["id"])
        emu.add_scope(minter.id, emu.create_machine("other").id)
        fourth = mint(client, minter, **body)
        assert fourth["id"] != third["id"]
        assert len(fourth["scopes"]) == 2
        assert mint(client, minter, **body)["id"] == fourth["id"]
        assert emu.counters.mints == 5
        assert emu.counters.reused == 1
        assert verifier.id in fourth["scopes"]

    def test_claims_compare_as_json(self, client: httpx.Client, minter: Machine) -> None:
        """Equal claims in another key order still match."""
        first = mint(client, minter, min_remaining_ttl_seconds=1, claims={"a": 1, "b": [1, 2]})
        second = mint(client, minter, min_remaining_ttl_seconds=1, claims={"b": [1, 2], "a": 1})
        assert first["id"] == second["id"]

    def test_ignored_for_jwt(self, emu: Emulator, client: httpx.Client, minter: Machine) -> None:
        """JWT-format tokens are never deduplicated, and the bound is not checked for them."""
        body = {
            "token_format": "jwt",
            "seconds_until_expiration": 60,
            "min_remaining_ttl_seconds": 600,
        }
        assert mint(client, minter, **body)["id"] != mint(client, minter, **body)["id"]
        assert emu.counters.mints == 2
        assert emu.counters.reused == 0


class TestJwt:
    def test_signature_header_and_payload(
        self,
        emu: Emulator,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
    ) -> None:
        """A JWT verifies with the public PEM; reserved claims cannot be overridden."""
        claims = {"role": "svc", "tier": 2, "sub": "mch_evil", "exp": 1, "iss": "evil"}
        body = mint(client, minter, token_format="jwt", seconds_until_expiration=60, claims=claims)
        token = body["token"]
        assert set(body) == TOKEN_FIELDS | {"token"}
        header = jwt.get_unverified_header(token)
        assert header == {
            "alg": "RS256",
            "typ": "JWT",
            "kid": emu.instance_id,
            "cat": "cl_B7d4PD333AAA",
        }
        payload = jwt.decode(
            token, emu.public_key_pem(), algorithms=["RS256"], options=NO_TIME_CHECKS
        )
        iat = int(clock.now)
        assert payload == {
            "iss": "https://emulator.m2m-agent.test",
            "sub": minter.id,
            "jti": body["id"],
            "iat": iat,
            "nbf": iat - 5,
            "exp": iat + 60,
            "role": "svc",
            "tier": 2,
        }
        assert body["expiration"] == (iat + 60) * 1000
        assert body["scopes"] == [verifier.id]
        assert body["claims"] == claims

    def test_issuer_is_configurable(self, clock: FakeClock) -> None:
        """``Emulator(issuer=...)`` sets ``iss``."""
        emu = Emulator(clock=clock, issuer="https://clerk.example.test")
        machine = emu.create_machine()
        with httpx.Client(transport=emu.transport(), base_url=BASE) as client:
            token = mint(client, machine, token_format="jwt")["token"]
        assert (
            jwt.decode(token, options={"verify_signature": False})["iss"]
            == "https://clerk.example.test"
        )

    def test_not_stored_listed_or_revocable(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """JWTs are not listed and their jti cannot be revoked."""
        body = mint(client, minter, token_format="jwt")
        assert emu.tokens == ()
        listed = client.get(
            "/m2m_tokens", params={"subject": minter.id}, headers=auth(minter.secret_key)
        )
        assert listed.json() == {"m2m_tokens": [], "total_count": 0}
        revoked = client.post(
            f"/m2m_tokens/{body['id']}/revoke", json={}, headers=auth(minter.secret_key)
        )
        assert_error(revoked, 404, "resource_not_found")

    def test_verify_endpoint_checks_jwts(
        self,
        emu: Emulator,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
    ) -> None:
        """Verify accepts a good JWT and 404s a tampered, out-of-scope or expired one."""
        body = mint(
            client, minter, token_format="jwt", seconds_until_expiration=60, claims={"r": 1}
        )
        token = body["token"]
        ok = verify(client, verifier.secret_key, token)
        assert ok.status_code == 200
        result = ok.json()
        assert set(result) == TOKEN_FIELDS
        assert (result["id"], result["subject"], result["claims"]) == (
            body["id"],
            minter.id,
            {"r": 1},
        )
        assert result["scopes"] == [verifier.id]
        assert result["last_used_at"] is None
        assert verify(client, emu.instance_secret_key, token).status_code == 200
        assert_error(verify(client, minter.secret_key, token), 404)  # not in its own scopes
        head, payload, signature = token.split(".")
        tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
        assert_error(verify(client, verifier.secret_key, tampered), 404)
        other = Emulator(clock=clock)
        foreign_machine = other.create_machine(scoped_machines=[verifier.id])
        with httpx.Client(transport=other.transport(), base_url=BASE) as other_client:
            foreign = mint(other_client, foreign_machine, token_format="jwt")["token"]
        assert_error(verify(client, emu.instance_secret_key, foreign), 404)
        clock.advance(60)
        assert_error(verify(client, verifier.secret_key, token), 404)

    def test_jwks_shape_and_auth(
        self, emu: Emulator, client: httpx.Client, minter: Machine, prefix: str
    ) -> None:
        """JWKS needs the instance key on /v1/jwks and /jwks, none on /.well-known/jwks.json."""
        for path in ("/v1/jwks", "/jwks"):
            response = client.get(path, headers=auth(emu.instance_secret_key))
            assert response.status_code == 200
            assert response.json() == emu.jwks()
            assert_error(
                client.get(path, headers=auth(minter.secret_key)), 401, "clerk_key_invalid"
            )
            assert_error(client.get(path), 401)
        public = client.get("/.well-known/jwks.json")
        assert public.status_code == 200
        (key,) = public.json()["keys"]
        assert set(key) == {"use", "kty", "kid", "alg", "n", "e"}
        assert (key["kty"], key["alg"], key["use"], key["kid"]) == (
            "RSA",
            "RS256",
            "sig",
            emu.instance_id,
        )
        token = mint(client, minter, prefix, token_format="jwt")["token"]
        signing_key = jwt.PyJWK(key).key
        claims = jwt.decode(token, signing_key, algorithms=["RS256"], options=NO_TIME_CHECKS)
        assert claims["sub"] == minter.id
        assert emu.counters.jwks == 7


class TestVerify:
    def test_success_sets_last_used(
        self,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
        prefix: str,
    ) -> None:
        """A scoped machine verifies: 200 without ``token``, and last_used_at/updated_at move."""
        created = mint(client, minter, seconds_until_expiration=60)
        clock.advance(2.5)
        response = verify(client, verifier.secret_key, created["token"], prefix)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == TOKEN_FIELDS
        assert body["id"] == created["id"]
        assert body["last_used_at"] == body["updated_at"] == created["created_at"] + 2500
        assert body["created_at"] == created["created_at"]

    def test_instance_key_verifies_anything(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """The sk_ key verifies any token of the instance."""
        token = mint(client, minter)["token"]
        assert verify(client, emu.instance_secret_key, token).status_code == 200

    def test_legacy_secret_body(
        self, client: httpx.Client, minter: Machine, verifier: Machine
    ) -> None:
        """The Python SDK's legacy ``{"secret": ...}`` body is accepted."""
        token = mint(client, minter)["token"]
        response = client.post(
            "/m2m_tokens/verify", json={"secret": token}, headers=auth(verifier.secret_key)
        )
        assert response.status_code == 200

    def test_rejections_are_404(
        self,
        emu: Emulator,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
    ) -> None:
        """Unknown, out-of-scope, revoked and expired tokens all get 404 resource_not_found."""
        error = assert_error(
            verify(client, verifier.secret_key, "mt_" + "x" * 48), 404, "resource_not_found"
        )
        assert "M2M token not found" in error["long_message"]
        token = mint(client, minter, seconds_until_expiration=60)
        assert_error(
            verify(client, minter.secret_key, token["token"]), 404
        )  # minter is not in scopes
        outsider = emu.create_machine("outsider")
        assert_error(verify(client, outsider.secret_key, token["token"]), 404)
        clock.advance(60)
        assert_error(verify(client, verifier.secret_key, token["token"]), 404)
        revoked = mint(client, minter)
        emu.revoke(revoked["id"], "compromised")
        assert_error(verify(client, verifier.secret_key, revoked["token"]), 404)
        assert_error(verify(client, emu.instance_secret_key, revoked["token"]), 404)

    @pytest.mark.parametrize(
        "body", [{}, {"token": 1}, {"token": ""}, {"token": "mt_x", "extra": 1}]
    )
    def test_bad_body(self, client: httpx.Client, verifier: Machine, body: dict[str, Any]) -> None:
        """A missing or non-string token, or an extra field, gets 400."""
        assert_error(
            client.post("/m2m_tokens/verify", json=body, headers=auth(verifier.secret_key)), 400
        )

    def test_bad_keys(self, client: httpx.Client) -> None:
        """Unknown keys get 401, whatever their kind."""
        for key in ("ak_test_unknown", "sk_test_unknown"):
            assert_error(verify(client, key, "mt_x"), 401)


class TestRevoke:
    def test_revoke_own_token(
        self, client: httpx.Client, minter: Machine, verifier: Machine, prefix: str
    ) -> None:
        """The minter revokes: 200, ``revoked`` true, no token; again keeps the first reason."""
        created = mint(client, minter)
        url = f"{prefix}/m2m_tokens/{created['id']}/revoke"
        response = client.post(
            url, json={"revocation_reason": "rotated"}, headers=auth(minter.secret_key)
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == TOKEN_FIELDS
        assert body["revoked"] is True
        assert body["revocation_reason"] == "rotated"
        again = client.post(
            url, json={"revocation_reason": "other"}, headers=auth(minter.secret_key)
        )
        assert again.status_code == 200
        assert again.json()["revocation_reason"] == "rotated"
        assert_error(verify(client, verifier.secret_key, created["token"]), 404)

    @pytest.mark.parametrize("kwargs", [{"json": {}}, {"json": {"revocation_reason": None}}, {}])
    def test_bodies_without_reason(
        self, client: httpx.Client, minter: Machine, kwargs: dict[str, Any]
    ) -> None:
        """``{}``, a null reason and an empty body all revoke without a reason."""
        created = mint(client, minter)
        response = client.post(
            f"/m2m_tokens/{created['id']}/revoke", headers=auth(minter.secret_key), **kwargs
        )
        assert response.status_code == 200
        assert response.json()["revocation_reason"] is None

    def test_only_own_tokens_unless_instance_key(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """Another machine gets 404 for a token it did not mint; the sk_ key revokes anything."""
        created = mint(client, minter)
        other = emu.create_machine("other")
        url = f"/m2m_tokens/{created['id']}/revoke"
        assert_error(
            client.post(url, json={}, headers=auth(other.secret_key)), 404, "resource_not_found"
        )
        assert client.post(url, json={}, headers=auth(emu.instance_secret_key)).status_code == 200

    @pytest.mark.parametrize(
        ("token_id", "body", "status"),
        [
            ("mt_123", {}, 400),
            ("not_a_token_id", {}, 400),
            ("mt_" + "0" * 32, {}, 404),
            ("VALID", {"unknown": 1}, 400),
            ("VALID", {"revocation_reason": 5}, 400),
        ],
    )
    def test_bad_requests(
        self,
        client: httpx.Client,
        minter: Machine,
        token_id: str,
        body: dict[str, Any],
        status: int,
    ) -> None:
        """A malformed id or body gets 400; an unknown id 404."""
        if token_id == "VALID":
            token_id = mint(client, minter)["id"]
        response = client.post(
            f"/m2m_tokens/{token_id}/revoke", json=body, headers=auth(minter.secret_key)
        )
        assert_error(response, status)

    def test_emulator_revoke(self, emu: Emulator) -> None:
        """``emu.revoke`` of an unknown id raises KeyError."""
        with pytest.raises(KeyError):
            emu.revoke("mt_" + "0" * 32)


class TestList:
    def test_newest_first_with_paging(
        self, emu: Emulator, clock: FakeClock, client: httpx.Client, minter: Machine, prefix: str
    ) -> None:
        """Tokens come newest first with total_count, paged by limit/offset sent as floats."""
        ids = []
        for _ in range(5):
            ids.append(mint(client, minter)["id"])
            clock.advance(1)
        params = {
            "subject": minter.id,
            "revoked": "false",
            "expired": "false",
            "limit": "2.0",
            "offset": "1.0",
        }
        response = client.get(
            f"{prefix}/m2m_tokens", params=params, headers=auth(minter.secret_key)
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"m2m_tokens", "total_count"}
        assert body["total_count"] == 5
        assert [item["id"] for item in body["m2m_tokens"]] == [ids[3], ids[2]]
        assert all(set(item) == TOKEN_FIELDS for item in body["m2m_tokens"])
        everything = client.get(
            "/m2m_tokens", params={"subject": minter.id}, headers=auth(minter.secret_key)
        )
        assert [item["id"] for item in everything.json()["m2m_tokens"]] == ids[::-1]
        assert emu.counters.lists == 2

    def test_filters(
        self, emu: Emulator, clock: FakeClock, client: httpx.Client, minter: Machine
    ) -> None:
        """Revoked and expired tokens are excluded unless asked for."""
        short = mint(client, minter, seconds_until_expiration=10)
        revoked = mint(client, minter, seconds_until_expiration=100)
        live = mint(client, minter, seconds_until_expiration=100)
        emu.revoke(revoked["id"])
        clock.advance(10)

        def listed(**params: str) -> dict[str, dict[str, Any]]:
            response = client.get(
                "/m2m_tokens",
                params={"subject": minter.id, **params},
                headers=auth(minter.secret_key),
            )
            return {item["id"]: item for item in response.json()["m2m_tokens"]}

        assert set(listed()) == {live["id"]}
        assert set(listed(revoked="true")) == {live["id"], revoked["id"]}
        assert set(listed(expired="true")) == {live["id"], short["id"]}
        assert listed(expired="true")[short["id"]]["expired"] is True
        assert set(listed(revoked="true", expired="true")) == {
            short["id"],
            revoked["id"],
            live["id"],
        }

    def test_access(
        self, emu: Emulator, client: httpx.Client, minter: Machine, verifier: Machine
    ) -> None:
        """A machine lists only itself (403 for another, 404 for unknown); sk_ lists anyone."""
        mint(client, minter)

        def get(key: str, subject: str) -> httpx.Response:
            return client.get("/v1/m2m_tokens", params={"subject": subject}, headers=auth(key))

        assert_error(get(verifier.secret_key, minter.id), 403, "authorization_invalid")
        unknown = "mch_" + "z" * 27
        assert_error(get(verifier.secret_key, unknown), 404, "resource_not_found")
        assert_error(get(emu.instance_secret_key, unknown), 404, "resource_not_found")
        assert get(emu.instance_secret_key, minter.id).json()["total_count"] == 1
        assert get(verifier.secret_key, verifier.id).json() == {"m2m_tokens": [], "total_count": 0}

    @pytest.mark.parametrize(
        "params",
        [
            {},
            {"subject": "mch_short"},
            {"subject": "user_" + "a" * 27},
            {"limit": "0"},
            {"limit": "101"},
            {"limit": "1.5"},
            {"limit": "ten"},
            {"offset": "-1"},
            {"revoked": "maybe"},
        ],
    )
    def test_bad_params(
        self, client: httpx.Client, minter: Machine, params: dict[str, str]
    ) -> None:
        """A missing or malformed subject and out-of-range paging get 400."""
        if params and "subject" not in params:
            params = {"subject": minter.id, **params}
        assert_error(client.get("/m2m_tokens", params=params, headers=auth(minter.secret_key)), 400)


class TestRouting:
    @pytest.mark.parametrize(
        "path",
        ["/", "/v2/m2m_tokens", "/m2m_tokens/x/y/revoke", "/machines", "/v1/m2m_tokens/verify/x"],
    )
    def test_unknown_path(self, client: httpx.Client, minter: Machine, path: str) -> None:
        """An unknown path gets a 404 envelope."""
        assert_error(
            client.post(path, json={}, headers=auth(minter.secret_key)), 404, "resource_not_found"
        )

    @pytest.mark.parametrize(
        ("method", "path", "allow"),
        [
            ("DELETE", "/m2m_tokens", "GET, POST"),
            ("GET", "/v1/m2m_tokens/verify", "POST"),
            ("GET", "/m2m_tokens/mt_" + "0" * 32 + "/revoke", "POST"),
            ("POST", "/v1/jwks", "GET"),
        ],
    )
    def test_wrong_method(self, client: httpx.Client, method: str, path: str, allow: str) -> None:
        """A wrong method gets 405 with Allow."""
        response = client.request(method, path)
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allow

    def test_handle_is_a_pure_decision(self, emu: Emulator, minter: Machine) -> None:
        """``handle`` returns an Outcome without sleeping, even for latency faults."""
        emu.inject(Fault(latency=30))
        request = httpx.Request(
            "POST", f"{BASE}/m2m_tokens", json={}, headers=auth(minter.secret_key)
        )
        started = time.monotonic()
        outcome = emu.handle(request)
        assert time.monotonic() - started < 5
        assert isinstance(outcome, Outcome)
        assert outcome.delay == 30
        assert not outcome.drop
        assert outcome.response is not None
        assert outcome.response.status_code == 201


class TestFaults:
    def test_status_for_next_n(self, emu: Emulator, client: httpx.Client, minter: Machine) -> None:
        """A 503 fault with times=2 answers two requests with an envelope, then stops."""
        fault = emu.inject(Fault(status=503, times=2))
        assert emu.faults == (fault,)
        assert_error(create(client, minter), 503, "service_unavailable")
        assert_error(create(client, minter), 503)
        assert create(client, minter).status_code == 201
        assert emu.faults == ()
        counters = emu.counters
        assert (counters.faults, counters.errors, counters.mints, counters.requests["create"]) == (
            2,
            2,
            1,
            3,
        )

    def test_retry_after(self, emu: Emulator, client: httpx.Client, minter: Machine) -> None:
        """retry_after alone means 429, rounded up to whole seconds."""
        emu.inject(Fault(retry_after=1.2, times=1))
        response = create(client, minter)
        assert_error(response, 429, "too_many_requests")
        assert response.headers["retry-after"] == "2"
        emu.inject(Fault(status=503, retry_after=7, times=1))
        response = create(client, minter)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"

    def test_latency_delays_the_real_answer(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """A latency-only fault delays a normal response."""
        emu.inject(Fault(latency=0.15, times=1))
        started = time.monotonic()
        response = create(client, minter)
        assert time.monotonic() - started >= 0.15
        assert response.status_code == 201
        assert emu.counters.faults == 1
        assert emu.counters.mints == 1

    def test_latency_beyond_read_timeout(self, emu: Emulator, minter: Machine) -> None:
        """Latency longer than the read timeout raises ReadTimeout after the timeout."""
        emu.inject(Fault(latency=5, times=1))
        with httpx.Client(transport=emu.transport(), base_url=BASE, timeout=0.1) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                create(client, minter)
            assert time.monotonic() - started < 2

    def test_drop(self, emu: Emulator, client: httpx.Client, minter: Machine) -> None:
        """A dropped connection raises RemoteProtocolError and mints nothing."""
        emu.inject(Fault(drop=True, times=1))
        with pytest.raises(httpx.RemoteProtocolError):
            create(client, minter)
        assert emu.counters.mints == 0
        assert emu.counters.faults == 1
        assert emu.counters.errors == 0

    def test_malformed_kinds(self, emu: Emulator, client: httpx.Client, minter: Machine) -> None:
        """Each malformed kind breaks the body in its own way."""
        emu.inject(Fault(malformed="not_json", times=1))
        response = create(client, minter)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            response.json()

        emu.inject(Fault(malformed="wrong_shape", times=1))
        response = create(client, minter)
        assert response.status_code == 200
        assert "id" not in response.json()

        emu.inject(Fault(malformed="truncated", times=1))
        response = create(client, minter)
        assert response.status_code == 201
        with pytest.raises(json.JSONDecodeError):
            response.json()
        assert emu.counters.mints == 1  # the server did the work; the answer was cut

        emu.inject(Fault(malformed="html", status=502, times=1))
        response = create(client, minter)
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
        assert response.text.startswith("<!DOCTYPE html>")

        emu.inject(Fault(malformed="huge", times=1))
        response = create(client, minter)
        assert response.status_code == 200
        assert len(response.content) > 5_000_000
        assert response.json()["object"] == "machine_to_machine_token"
        assert emu.counters.faults == 5

    def test_endpoint_filter(
        self, emu: Emulator, client: httpx.Client, minter: Machine, verifier: Machine
    ) -> None:
        """A fault limited to verify leaves create alone."""
        emu.inject(Fault(status=500, endpoints=frozenset({"verify"})))
        token = mint(client, minter)["token"]
        assert_error(verify(client, verifier.secret_key, token), 500, "internal_clerk_error")
        assert emu.counters.verifications == 0  # never reached the handler

    def test_duration_on_the_emulator_clock(
        self, emu: Emulator, clock: FakeClock, client: httpx.Client, minter: Machine
    ) -> None:
        """A fault with a duration stops once the emulator's clock passes it."""
        emu.inject(Fault(status=503, duration=30))
        clock.advance(29)
        assert create(client, minter).status_code == 503
        clock.advance(1)
        assert create(client, minter).status_code == 201

    def test_probability_is_seedable(self, clock: FakeClock) -> None:
        """A probabilistic fault hits about that share, identically for the same seed."""

        def pattern(seed: int) -> list[int]:
            emu = Emulator(clock=clock, seed=seed)
            machine = emu.create_machine()
            emu.inject(Fault(status=503, probability=0.5, times=1000))
            with httpx.Client(transport=emu.transport(), base_url=BASE) as client:
                return [create(client, machine).status_code for _ in range(200)]

        first = pattern(7)
        assert first == pattern(7)
        assert 60 < first.count(503) < 140
        assert first != pattern(8)

    def test_faults_compose_and_clear(
        self, emu: Emulator, client: httpx.Client, minter: Machine
    ) -> None:
        """Latencies add up, the first answer-changing fault wins, and clear_faults removes all."""
        emu.inject(Fault(latency=0.05))
        emu.inject(Fault(status=502))
        emu.inject(Fault(status=504, latency=0.05))
        outcome = emu.handle(
            httpx.Request("POST", f"{BASE}/m2m_tokens", json={}, headers=auth(minter.secret_key))
        )
        assert outcome.delay == pytest.approx(0.1)
        assert outcome.response is not None
        assert outcome.response.status_code == 502
        emu.clear_faults()
        assert emu.faults == ()
        assert create(client, minter).status_code == 201

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"latency": 0.0},
            {"status": 99},
            {"status": 200},
            {"drop": True, "status": 503},
            {"drop": True, "malformed": "html"},
            {"status": 503, "times": 0},
            {"status": 503, "duration": 0},
            {"status": 503, "probability": 1.5},
            {"status": 503, "endpoints": frozenset({"bogus"})},
            {"status": 503, "endpoints": frozenset()},
            {"malformed": "yaml"},
            {"latency": -1},
        ],
    )
    def test_invalid_faults(self, kwargs: dict[str, Any]) -> None:
        """A fault that does nothing or has an out-of-range setting is refused."""
        with pytest.raises(ValueError):
            Fault(**kwargs)

    def test_rate_limit(self, clock: FakeClock) -> None:
        """Beyond the rate, 429 with Retry-After; JWKS is exempt; time frees the window."""
        emu = Emulator(clock=clock, rate_limit=(2, 10))
        machine = emu.create_machine()
        with httpx.Client(transport=emu.transport(), base_url=BASE) as client:
            assert create(client, machine).status_code == 201
            clock.advance(4)
            assert create(client, machine).status_code == 201
            response = create(client, machine)
            assert_error(response, 429, "too_many_requests")
            assert response.headers["retry-after"] == "6"
            assert client.get("/.well-known/jwks.json").status_code == 200
            clock.advance(6)
            assert create(client, machine).status_code == 201
        counters = emu.counters
        assert (counters.mints, counters.errors, counters.faults, counters.requests["create"]) == (
            3,
            1,
            0,
            4,
        )


class TestAsync:
    @pytest.mark.anyio
    async def test_round_trip(self, emu: Emulator, minter: Machine, verifier: Machine) -> None:
        """The async transport serves every endpoint on asyncio and trio."""
        async with httpx.AsyncClient(transport=emu.async_transport(), base_url=BASE) as client:
            created = await client.post("/v1/m2m_tokens", json={}, headers=auth(minter.secret_key))
            assert created.status_code == 201
            body = created.json()
            verified = await client.post(
                "/m2m_tokens/verify",
                json={"token": body["token"]},
                headers=auth(verifier.secret_key),
            )
            assert verified.status_code == 200
            listed = await client.get(
                "/m2m_tokens", params={"subject": minter.id}, headers=auth(minter.secret_key)
            )
            assert listed.json()["total_count"] == 1
            revoked = await client.post(
                f"/m2m_tokens/{body['id']}/revoke", headers=auth(minter.secret_key)
            )
            assert revoked.json()["revoked"] is True

    @pytest.mark.anyio
    async def test_faults(self, emu: Emulator, minter: Machine) -> None:
        """Latency, status, malformed, drop and read timeout all work on the async transport."""
        async with httpx.AsyncClient(
            transport=emu.async_transport(), base_url=BASE, timeout=1
        ) as client:

            async def post(read_timeout: float = 1) -> httpx.Response:
                headers = auth(minter.secret_key)
                return await client.post(
                    "/m2m_tokens", json={}, headers=headers, timeout=read_timeout
                )

            emu.inject(Fault(latency=0.1, times=1))
            started = anyio.current_time()
            assert (await post()).status_code == 201
            assert anyio.current_time() - started >= 0.1
            emu.inject(Fault(status=429, retry_after=3, times=1))
            response = await post()
            assert_error(response, 429)
            assert response.headers["retry-after"] == "3"
            emu.inject(Fault(malformed="truncated", times=1))
            with pytest.raises(json.JSONDecodeError):
                (await post()).json()
            emu.inject(Fault(drop=True, times=1))
            with pytest.raises(httpx.RemoteProtocolError):
                await post()
            emu.inject(Fault(latency=10, times=1))
            with pytest.raises(httpx.ReadTimeout):
                await post(read_timeout=0.05)
        assert emu.counters.faults == 5

    @pytest.mark.anyio
    async def test_latency_does_not_block_the_loop(self, emu: Emulator, minter: Machine) -> None:
        """Two delayed requests run concurrently: the wait is anyio.sleep, not time.sleep."""
        emu.inject(Fault(latency=0.2))
        async with httpx.AsyncClient(transport=emu.async_transport(), base_url=BASE) as client:
            post = functools.partial(client.post, "/m2m_tokens", headers=auth(minter.secret_key))
            started = anyio.current_time()
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(post)
            assert anyio.current_time() - started < 0.6

    @pytest.mark.anyio
    async def test_asgi_app_in_process(self, emu: Emulator, minter: Machine) -> None:
        """The ASGI app answers like the transports (through httpx.ASGITransport)."""
        transport = httpx.ASGITransport(app=emu.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            created = await client.post(
                "/m2m_tokens", json={"claims": {"a": 1}}, headers=auth(minter.secret_key)
            )
            assert created.status_code == 201
            assert created.json()["claims"] == {"a": 1}
            missing = await client.get("/nope")
            assert_error(missing, 404)
            listed = await client.get(
                "/m2m_tokens", params={"subject": minter.id}, headers=auth(minter.secret_key)
            )
            assert listed.json()["total_count"] == 1


class TestCountersAndClock:
    def test_counters_add_up(
        self, emu: Emulator, client: httpx.Client, minter: Machine, verifier: Machine
    ) -> None:
        """Each kind of call lands in its counter; reset_counters zeroes them."""
        assert emu.counters == Counters(
            requests=dict.fromkeys(("create", "verify", "revoke", "list", "jwks"), 0)
        )
        token = mint(client, minter)
        verify(client, verifier.secret_key, token["token"])
        verify(client, verifier.secret_key, "mt_unknown")
        client.get("/m2m_tokens", params={"subject": minter.id}, headers=auth(minter.secret_key))
        client.post(f"/m2m_tokens/{token['id']}/revoke", headers=auth(minter.secret_key))
        client.get("/.well-known/jwks.json")
        client.get("/nowhere")
        counters = emu.counters
        assert dict(counters.requests) == {
            "create": 1,
            "verify": 2,
            "revoke": 1,
            "list": 1,
            "jwks": 1,
            "unknown": 1,
        }
        assert (counters.mints, counters.reused, counters.verifications) == (1, 0, 2)
        assert (counters.revocations, counters.lists, counters.jwks) == (1, 1, 1)
        assert (counters.faults, counters.errors) == (0, 2)
        with pytest.raises(TypeError):
            counters.requests["create"] = 5  # type: ignore[index]
        emu.reset_counters()
        assert emu.counters.mints == 0
        assert sum(emu.counters.requests.values()) == 0
        assert len(emu.tokens) == 1  # state is kept

    def test_expiry_follows_the_clock(
        self,
        emu: Emulator,
        clock: FakeClock,
        client: httpx.Client,
        minter: Machine,
        verifier: Machine,
    ) -> None:
        """A 60 s token verifies at 59.9 s and is gone at 60 s; its record says so."""
        token = mint(client, minter, seconds_until_expiration=60)
        clock.advance(59.9)
        assert verify(client, verifier.secret_key, token["token"]).status_code == 200
        clock.advance(0.1)
        assert_error(verify(client, verifier.secret_key, token["token"]), 404)
        (record,) = emu.tokens
        assert isinstance(record, TokenRecord)
        assert record.is_expired(clock.now)
        assert record.expires_at == 1_800_000_060.0

    def test_add_scope_affects_only_new_tokens(
        self, emu: Emulator, client: httpx.Client, minter: Machine, verifier: Machine
    ) -> None:
        """Scopes are copied at mint time."""
        newcomer = emu.create_machine("newcomer")
        old = mint(client, minter)["token"]
        updated = emu.add_scope(minter.id, newcomer.id)
        assert updated.scoped_machines == (verifier.id, newcomer.id)
        new = mint(client, minter)["token"]
        assert_error(verify(client, newcomer.secret_key, old), 404)
        assert verify(client, newcomer.secret_key, new).status_code == 200


class TestThreads:
    def test_concurrent_mints(self, emu: Emulator, minter: Machine, verifier: Machine) -> None:
        """32 threads minting and verifying at once get 32 distinct tokens; counters add up."""
        barrier = threading.Barrier(32)
        results: list[dict[str, Any]] = []
        errors: list[BaseException] = []
        transport = emu.transport()

        def work() -> None:
            try:
                with httpx.Client(transport=transport, base_url=BASE) as client:
                    barrier.wait()
                    body = mint(client, minter, seconds_until_expiration=60)
                    assert verify(client, verifier.secret_key, body["token"]).status_code == 200
                    results.append(body)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not errors
        assert len({body["id"] for body in results}) == 32
        assert len({body["token"] for body in results}) == 32
        counters = emu.counters
        assert (counters.mints, counters.verifications, counters.requests["create"]) == (32, 32, 32)
        assert len(emu.tokens) == 32
