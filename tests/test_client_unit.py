"""The API client against hand-made responses: requests as the contract says, every error mapped."""

from __future__ import annotations

import inspect
import json
import pickle

import httpx
import pytest
import structlog

from m2m_agent import (
    AsyncClerkM2MClient,
    AuthenticationError,
    BadRequestError,
    ClerkAPIError,
    ClerkM2MClient,
    ConfigurationError,
    InvalidTokenError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
)
from m2m_agent._api import parse_retry_after

KEY = "ak_test_5ec2e7k3y5ec2e7k3y5ec2e7k3y5ec2e7"
SECRET = "mt_SECRETsecretSECRETsecretSECRETsecret1234567890"
TOKEN_ID = "mt_0123456789abcdef0123456789abcdef"
MACHINE = "mch_2xhFjEI5X2qWRvtV13BzSj8H6Dk"


def token_json(**overrides):
    data = {
        "object": "machine_to_machine_token",
        "id": TOKEN_ID,
        "subject": MACHINE,
        "claims": None,
        "scopes": [],
        "token": SECRET,
        "revoked": False,
        "revocation_reason": None,
        "expired": False,
        "expiration": 1716886800000,
        "last_used_at": None,
        "created_at": 1716883200000,
        "updated_at": 1716883200000,
    }
    data.update(overrides)
    return data


def error_json(status, code="some_code", message="msg", long_message="long msg"):
    return {
        "errors": [{"message": message, "long_message": long_message, "code": code, "meta": {}}],
        "clerk_trace_id": "trace_123",
    }


def client_for(handler, **kwargs):
    return ClerkM2MClient(
        KEY,
        api_url="https://api.clerk.test",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        **kwargs,
    )


class TestRequests:
    def test_create_sends_the_contract(self):
        """POST /m2m_tokens with the key as bearer, JSON body, explicit lifetime and format."""
        seen = []

        def handler(request):
            seen.append(request)
            return httpx.Response(201, json=token_json())

        with client_for(handler) as client:
            token = client.create_token(seconds_until_expiration=60, claims={"role": "svc"})
        request = seen[0]
        assert request.method == "POST"
        assert request.url == "https://api.clerk.test/m2m_tokens"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["clerk-api-version"]
        assert request.headers["user-agent"].startswith("m2m-agent/")
        assert json.loads(request.content) == {
            "token_format": "opaque",
            "seconds_until_expiration": 60,
            "claims": {"role": "svc"},
        }
        assert request.extensions["timeout"]["read"] == 10.0
        assert token.id == TOKEN_ID
        assert token.token == SECRET
        assert token.expiration is not None
        assert token.expiration.tzinfo is not None
        assert token.lifetime == 3600.0

    def test_versioned_prefix_is_kept(self):
        seen = []

        def handler(request):
            seen.append(request.url)
            return httpx.Response(200, json=token_json(token=None, revoked=True))

        client = ClerkM2MClient(
            KEY,
            api_url="https://api.clerk.test/v1/",
            http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        )
        client.revoke_token(TOKEN_ID, reason="rotated")
        assert seen == [httpx.URL(f"https://api.clerk.test/v1/m2m_tokens/{TOKEN_ID}/revoke")]

    def test_revoke_and_verify_and_list_bodies(self):
        seen = []

        def handler(request):
            seen.append(request)
            if request.url.path.endswith("/verify"):
                return httpx.Response(200, json=token_json(token=None))
            if request.method == "GET":
                return httpx.Response(
                    200, json={"m2m_tokens": [token_json(token=None)], "total_count": 7}
                )
            return httpx.Response(
                200, json=token_json(token=None, revoked=True, revocation_reason="r")
            )

        with client_for(handler) as client:
            revoked = client.revoke_token(TOKEN_ID, reason="r")
            verified = client.verify_token(SECRET)
            page = client.list_tokens(subject=MACHINE, limit=5, offset=2)
        assert json.loads(seen[0].content) == {"revocation_reason": "r"}
        assert revoked.revoked
        assert revoked.revocation_reason == "r"
        assert json.loads(seen[1].content) == {"token": SECRET}
        assert verified.token is None
        assert seen[2].url.params == httpx.QueryParams(
            subject=MACHINE, revoked="false", expired="false", limit="5", offset="2"
        )
        assert page.total_count == 7
        assert [t.id for t in page] == [TOKEN_ID]
        assert len(page) == 1

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"seconds_until_expiration": 0}, "positive"),
            ({"seconds_until_expiration": float("inf")}, "positive"),
            ({"token_format": "paseto"}, "token_format"),
            ({"claims": ["not", "a", "mapping"]}, "mapping"),
            ({"claims": {"x": object()}}, "JSON"),
            ({"min_remaining_ttl_seconds": 60, "token_format": "jwt"}, "opaque"),
            ({"min_remaining_ttl_seconds": -1}, "non-negative"),
            ({"min_remaining_ttl_seconds": 3600}, "less than"),
        ],
    )
    def test_bad_create_arguments_fail_before_sending(self, kwargs, match):
        def handler(request):  # pragma: no cover - must not be reached
            raise AssertionError("sent")

        with client_for(handler) as client, pytest.raises(ConfigurationError, match=match):
            client.create_token(**kwargs)

    def test_revoke_refuses_a_token_secret_without_echoing_it(self):
        """Passing the token instead of its id is caught, and the secret is not in the error."""
        with client_for(lambda r: httpx.Response(500)) as client:
            with pytest.raises(ConfigurationError, match="token id") as info:
                client.revoke_token(SECRET)
        assert SECRET not in str(info.value)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"subject": "user_1"}, "machine id"),
            ({"subject": MACHINE, "limit": 0}, "limit"),
            ({"subject": MACHINE, "offset": -1}, "offset"),
        ],
    )
    def test_bad_list_arguments(self, kwargs, match):
        with (
            client_for(lambda r: httpx.Response(500)) as client,
            pytest.raises(ConfigurationError, match=match),
        ):
            client.list_tokens(**kwargs)


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "cls"),
        [
            (400, BadRequestError),
            (401, AuthenticationError),
            (403, PermissionDeniedError),
            (404, NotFoundError),
            (409, ClerkAPIError),
            (422, BadRequestError),
            (429, RateLimitError),
            (500, ServerError),
            (503, ServerError),
        ],
    )
    def test_status_maps_to_class_with_fields(self, status, cls):
        headers = {"Retry-After": "7"} if status == 429 else {}
        response = httpx.Response(
            status, json=error_json(status, code=f"c{status}"), headers=headers
        )
        with client_for(lambda r: response) as client, pytest.raises(cls) as info:
            client.create_token()
        error = info.value
        assert type(error) is cls
        assert error.status_code == status
        assert error.code == f"c{status}"
        assert error.long_message == "long msg"
        assert error.trace_id == "trace_123"
        assert error.retry_after == (7.0 if status == 429 else None)
        assert f"{status}" in str(error)

    def test_html_error_page_still_maps_by_status(self):
        """A proxy's 502 page is a ServerError, with the cf-ray as trace id."""
        response = httpx.Response(
            502,
            text="<html>bad gateway</html>",
            headers={"cf-ray": "ray1", "content-type": "text/html"},
        )
        with client_for(lambda r: response) as client, pytest.raises(ServerError) as info:
            client.verify_token(SECRET)
        assert info.value.code is None
        assert info.value.trace_id == "ray1"

    @pytest.mark.parametrize(
        ("response", "match"),
        [
            (
                httpx.Response(201, text="hello", headers={"content-type": "text/plain"}),
                "content type",
            ),
            (
                httpx.Response(
                    201, content=b"{not json", headers={"content-type": "application/json"}
                ),
                "not valid JSON",
            ),
            (httpx.Response(201, json=[1, 2]), "not a JSON object"),
            (httpx.Response(201, json=token_json(id=None)), "'id'"),
            (httpx.Response(201, json=token_json(token=None)), "no 'token'"),
            (httpx.Response(201, json=token_json(scopes="mch_x")), "'scopes'"),
            (httpx.Response(201, json=token_json(revoked="no")), "'revoked'"),
            (httpx.Response(201, json=token_json(expiration="tomorrow")), "'expiration'"),
            (httpx.Response(201, json=token_json(expiration=10**30)), "out of range"),
            (httpx.Response(201, json=token_json(claims=[1])), "'claims'"),
        ],
    )
    def test_malformed_responses(self, response, match):
        with (
            client_for(lambda r: response) as client,
            pytest.raises(MalformedResponseError, match=match),
        ):
            client.create_token()

    def test_malformed_list(self):
        for body in ({"m2m_tokens": "x"}, {"m2m_tokens": [], "total_count": "many"}, []):
            with client_for(lambda r, b=body: httpx.Response(200, json=b)) as client:
                with pytest.raises(MalformedResponseError):
                    client.list_tokens(subject=MACHINE)

    def test_huge_body_is_refused_not_buffered(self):
        """A multi-megabyte body stops at the cap with a clear error."""
        chunks = (b"x" * 65536 for _ in range(100))
        response = httpx.Response(200, content=chunks, headers={"content-type": "application/json"})
        with (
            client_for(lambda r: response) as client,
            pytest.raises(MalformedResponseError, match="exceeded"),
        ):
            client.create_token()

    def test_verify_rejects_a_200_that_says_revoked(self):
        """Defence in depth: a 200 body marked revoked or expired is not a pass."""
        for field, reason in (("revoked", "revoked"), ("expired", "expired")):
            body = token_json(token=None, **{field: True})
            with client_for(lambda r, b=body: httpx.Response(200, json=b)) as client:
                with pytest.raises(InvalidTokenError) as info:
                    client.verify_token(SECRET)
            assert info.value.reason == reason

    def test_transport_failure(self):
        def handler(request):
            raise httpx.ConnectError("connection refused")

        with (
            client_for(handler) as client,
            pytest.raises(TransportError, match=r"api\.clerk\.test") as info,
        ):
            client.create_token()
        assert isinstance(info.value.__cause__, httpx.ConnectError)

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("5", 5.0),
            ("0.5", 0.5),
            ("-3", 0.0),
            ("soon", None),
            (None, None),
            ("nan", None),
            ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ],
    )
    def test_retry_after(self, value, expected):
        now = 1445412480.0  # 07:28:00 that day
        assert parse_retry_after(value, now=now) == expected


class TestSecrets:
    def test_no_secret_in_reprs_errors_or_logs(self):
        """The key and the token never appear in a repr, str, error, pickle-round-trip or log."""

        def handler(request):
            if request.url.path.endswith("/verify"):
                return httpx.Response(401, json=error_json(401, code="machine_secret_key_invalid"))
            return httpx.Response(201, json=token_json())

        with structlog.testing.capture_logs() as logs, client_for(handler) as client:
            token = client.create_token()
            texts = [repr(client), str(client), repr(token), str(token), f"{token}"]
            with pytest.raises(AuthenticationError) as info:
                client.verify_token(SECRET)
            texts += [repr(info.value), str(info.value)]
            texts += [repr(pickle.loads(pickle.dumps(info.value)))]
        texts += [json.dumps(entry, default=str) for entry in logs]
        assert logs, "the client logs its calls"
        for text in texts:
            assert KEY not in text
            assert SECRET not in text
        assert token.fingerprint is not None
        assert token.fingerprint in repr(token)


class TestPickling:
    @pytest.mark.parametrize(
        "error",
        [
            RateLimitError(
                "slow down", status_code=429, code="too_many", retry_after=3.0, trace_id="t"
            ),
            ConfigurationError("bad"),
            TransportError("down"),
            InvalidTokenError("nope", reason="revoked"),
        ],
    )
    def test_errors_round_trip(self, error):
        """Celery pickles exceptions across processes: every field survives."""
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error)
        assert clone.__dict__ == error.__dict__
        assert str(clone) == str(error)


class TestFacesMatch:
    def test_sync_and_async_have_the_same_methods_and_signatures(self):
        """The two faces cannot drift: same public methods, same parameters."""
        lifecycle = {"close", "aclose"}
        sync = {n for n in dir(ClerkM2MClient) if not n.startswith("_")} - lifecycle
        async_ = {n for n in dir(AsyncClerkM2MClient) if not n.startswith("_")} - lifecycle
        assert sync == async_
        for name in sync:
            s, a = getattr(ClerkM2MClient, name), getattr(AsyncClerkM2MClient, name)
            if callable(s):
                assert inspect.iscoroutinefunction(a), name
                assert inspect.signature(s) == inspect.signature(a), name
        assert (
            inspect.signature(ClerkM2MClient.__init__).parameters.keys()
            == inspect.signature(AsyncClerkM2MClient.__init__).parameters.keys()
        )
