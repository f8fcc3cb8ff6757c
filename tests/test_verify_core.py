"""The sans-IO verification core: type detection, JWT checks, the verdict cache, the JWKS policy.

No network, no clock: every time is an argument.
"""

from __future__ import annotations

import base64
import json
import pickle
from datetime import datetime, timedelta, timezone

import pytest

from m2m_agent._token import M2MToken
from m2m_agent._verify_core import (
    FETCH,
    M2M_CATEGORY,
    MAX_TOKEN_LENGTH,
    JwksState,
    JwtToken,
    OpaqueToken,
    Rejection,
    Requirements,
    VerdictCache,
    VerifiedToken,
    check_jwt_header,
    classify,
    verdict_from_api,
    verified_from_jwt,
    verified_from_m2m_token,
)
from m2m_agent.errors import (
    BadRequestError,
    InvalidTokenError,
    NotFoundError,
    ServerError,
    TransportError,
)

MACHINE = "mch_" + "a" * 27
OTHER = "mch_" + "b" * 27
NOW = 1_800_000_000.0


def b64(data: object) -> str:
    raw = json.dumps(data).encode() if not isinstance(data, bytes) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_string(header: dict | None = None, payload: dict | None = None, sig: bytes = b"sig") -> str:
    head = {"alg": "RS256", "typ": "JWT", "kid": "ins_1", "cat": M2M_CATEGORY}
    head.update(header or {})
    body = {"sub": MACHINE, "jti": "mt_" + "0" * 32, "iat": NOW, "nbf": NOW - 5, "exp": NOW + 60}
    body.update(payload or {})
    return f"{b64(head)}.{b64(body)}.{b64(sig)}"


def reason_of(token: object) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        classify(token)
    return caught.value.reason


class TestClassify:
    def test_opaque_token(self):
        parsed = classify("mt_" + "x" * 32)
        assert isinstance(parsed, OpaqueToken)
        assert len(parsed.digest) == 32
        assert len(parsed.fingerprint) == 12
        assert "x" * 32 not in repr(parsed)

    def test_m2m_jwt(self):
        parsed = classify(jwt_string())
        assert isinstance(parsed, JwtToken)
        assert parsed.kid == "ins_1"
        assert parsed.payload["sub"] == MACHINE
        assert parsed.signature == b"sig"

    def test_m2m_jwt_without_cat_is_accepted_as_older_token(self):
        head = {"alg": "RS256", "kid": "ins_1"}
        body = {"sub": MACHINE, "jti": "mt_1", "exp": NOW}
        assert isinstance(classify(f"{b64(head)}.{b64(body)}.{b64(b's')}"), JwtToken)

    @pytest.mark.parametrize(
        ("token", "reason"),
        [
            ("garbage", "not_m2m_token"),
            ("ak_" + "1" * 32, "not_m2m_token"),
            ("oat_" + "1" * 32, "not_m2m_token"),
            ("sk_test_" + "1" * 32, "not_m2m_token"),
            ("m2m_" + "1" * 32, "not_m2m_token"),
            ("Bearer mt_" + "1" * 32, "not_m2m_token"),
            ("a.b", "not_m2m_token"),
            ("a.b.c.d", "not_m2m_token"),
            ("", "malformed"),
            ("mt_", "malformed"),
            ("mt_has space", "malformed"),
            ("mt_\u00e9", "malformed"),
            ("mt_" + "x" * MAX_TOKEN_LENGTH, "malformed"),
            ("aaaa.bbbb.cccc", "malformed"),
            (None, "malformed"),
            (b"mt_bytes", "malformed"),
        ],
    )
    def test_rejects(self, token, reason):
        assert reason_of(token) == reason

    def test_session_token_is_not_m2m(self):
        token = jwt_string({"cat": "cl_B7d4PD111AAA"}, {"sub": "user_2abc"})
        assert reason_of(token) == "not_m2m_token"

    def test_machine_subject_with_session_category_is_not_m2m(self):
        assert reason_of(jwt_string({"cat": "cl_B7d4PD111AAA"})) == "not_m2m_token"

    def test_jwt_template_category_is_not_m2m(self):
        assert reason_of(jwt_string({"cat": "cl_B7d4PD222AAA"})) == "not_m2m_token"

    def test_non_canonical_base64_is_malformed(self):
        head, body, _ = jwt_string().split(".")
        assert b64(b"si") == "c2k"  # "c2l" decodes to the same bytes: a malleable twin
        assert isinstance(classify(f"{head}.{body}.c2k"), JwtToken)
        assert reason_of(f"{head}.{body}.c2l") == "malformed"
        assert reason_of(f"{head}.{body}.c2lnA") == "malformed"  # length 1 mod 4

    def test_non_object_payload_is_malformed(self):
        token = f"{b64({'alg': 'RS256'})}.{b64([1, 2])}.{b64(b's')}"
        assert reason_of(token) == "malformed"

    def test_message_never_contains_the_token(self):
        secret = "ak_" + "s3cr3t" * 6
        with pytest.raises(InvalidTokenError) as caught:
            classify(secret)
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)


class TestJwtChecks:
    @pytest.mark.parametrize("alg", ["none", "HS256", "RS384", "ES256", None, 7])
    def test_only_rs256(self, alg):
        parsed = classify(jwt_string({"alg": alg}))
        assert isinstance(parsed, JwtToken)
        with pytest.raises(InvalidTokenError) as caught:
            check_jwt_header(parsed, needs_kid=False)
        assert caught.value.reason == "bad_signature"

    def test_crit_header_is_refused(self):
        parsed = classify(jwt_string({"crit": ["b64"], "b64": False}))
        assert isinstance(parsed, JwtToken)
        with pytest.raises(InvalidTokenError, match="crit"):
            check_jwt_header(parsed, needs_kid=False)

    def test_kid_needed_only_for_jwks(self):
        parsed = classify(jwt_string({"kid": None}))
        assert isinstance(parsed, JwtToken)
        check_jwt_header(parsed, needs_kid=False)
        with pytest.raises(InvalidTokenError) as caught:
            check_jwt_header(parsed, needs_kid=True)
        assert caught.value.reason == "malformed"

    def verify(self, payload: dict, now: float = NOW, skew: float = 5.0) -> VerifiedToken:
        parsed = classify(jwt_string(payload=payload))
        assert isinstance(parsed, JwtToken)
        return verified_from_jwt(parsed, now=now, skew=skew)

    def test_maps_payload_like_clerk(self):
        verified = self.verify({"role": "reporter", "iss": "https://clerk.example"})
        assert verified.token_type == "m2m_token"
        assert verified.token_id == "mt_" + "0" * 32
        assert verified.machine_id == MACHINE
        assert verified.scopes == ()
        assert verified.claims == {"role": "reporter"}
        assert verified.expiration == datetime.fromtimestamp(NOW + 60, tz=timezone.utc)
        assert verified.format == "jwt"

    def test_no_custom_claims_gives_none(self):
        assert self.verify({}).claims is None

    def test_scopes_from_space_separated_string(self):
        verified = self.verify({"scopes": f"{MACHINE} {OTHER}", "aud": ["ignored"]})
        assert verified.scopes == (MACHINE, OTHER)
        assert verified.claims is not None
        assert "scopes" in verified.claims

    def test_scopes_from_aud(self):
        assert self.verify({"aud": [OTHER]}).scopes == (OTHER,)
        assert self.verify({"aud": OTHER}).scopes == (OTHER,)

    def test_scopes_of_the_wrong_type_are_none(self):
        assert self.verify({"scopes": 5, "aud": [1, 2]}).scopes == ()

    @pytest.mark.parametrize(
        ("now", "reason"),
        [
            (NOW + 60 + 5, "expired"),  # exp <= now - skew
            (NOW + 64, None),  # within the skew
            (NOW - 20, "expired"),  # iat/nbf in the future beyond the skew
            (NOW - 4, None),
        ],
    )
    def test_times_with_skew(self, now, reason):
        if reason is None:
            self.verify({}, now=now)
        else:
            with pytest.raises(InvalidTokenError) as caught:
                self.verify({}, now=now)
            assert caught.value.reason == reason

    @pytest.mark.parametrize(
        "payload",
        [{"jti": None}, {"jti": 5}, {"exp": None}, {"exp": "soon"}, {"exp": True}, {"exp": 1e300}],
    )
    def test_missing_or_bad_claims_are_malformed(self, payload):
        with pytest.raises(InvalidTokenError) as caught:
            self.verify(payload)
        assert caught.value.reason == "malformed"


class TestVerifiedToken:
    def make(self) -> VerifiedToken:
        return VerifiedToken(
            token_id="mt_1",
            machine_id=MACHINE,
            scopes=[OTHER],  # type: ignore[arg-type]
            claims={"role": "x"},
            expiration=datetime.fromtimestamp(NOW, tz=timezone.utc),
        )

    def test_is_immutable(self):
        verified = self.make()
        with pytest.raises(AttributeError):
            verified.machine_id = OTHER  # type: ignore[misc]
        with pytest.raises(TypeError):
            verified.claims["role"] = "admin"  # type: ignore[index]
        assert verified.scopes == (OTHER,)

    def test_pickles(self):
        verified = self.make()
        assert pickle.loads(pickle.dumps(verified)) == verified

    def test_repr(self):
        text = repr(self.make())
        assert "mt_1" in text
        assert MACHINE in text

    def test_from_clerk_answer(self):
        token = M2MToken(
            id="mt_1",
            subject=MACHINE,
            scopes=(OTHER,),
            claims={"a": 1},
            expiration=datetime.fromtimestamp(NOW, tz=timezone.utc),
        )
        verified = verified_from_m2m_token(token)
        assert (verified.token_id, verified.machine_id, verified.scopes) == (
            "mt_1",
            MACHINE,
            (OTHER,),
        )
        assert verified.claims == {"a": 1}
        assert verified.format == "opaque"


class TestVerdictFromApi:
    def test_not_found_is_unknown(self):
        rejection = verdict_from_api(NotFoundError("x", status_code=404))
        assert rejection is not None
        assert rejection.reason == "unknown"

    def test_bad_request_is_malformed(self):
        rejection = verdict_from_api(BadRequestError("x", status_code=400))
        assert rejection is not None
        assert rejection.reason == "malformed"

    def test_200_marked_revoked_keeps_its_reason(self):
        rejection = verdict_from_api(InvalidTokenError("Token mt_1 is revoked.", reason="revoked"))
        assert rejection == Rejection("revoked", "Token mt_1 is revoked.")

    @pytest.mark.parametrize(
        "error", [ServerError("x", status_code=503), TransportError("x"), RuntimeError("x")]
    )
    def test_outages_say_nothing_about_the_token(self, error):
        assert verdict_from_api(error) is None


class TestRequirements:
    verified = VerifiedToken(token_id="mt_1", machine_id=MACHINE, scopes=(OTHER,))

    def test_nothing_required(self):
        Requirements().check(self.verified)

    def test_scopes(self):
        Requirements(frozenset({OTHER})).check(self.verified)
        with pytest.raises(InvalidTokenError) as caught:
            Requirements(frozenset({OTHER, "mch_x"})).check(self.verified)
        assert caught.value.reason == "missing_scope"
        assert "mch_x" in str(caught.value)

    def test_extra_scopes(self):
        with pytest.raises(InvalidTokenError):
            Requirements().check(self.verified, ["mch_x"])

    def test_subjects(self):
        Requirements(subjects=frozenset({MACHINE})).check(self.verified)
        with pytest.raises(InvalidTokenError) as caught:
            Requirements(subjects=frozenset({OTHER})).check(self.verified)
        assert caught.value.reason == "missing_scope"


def verified(expires_in: float | None) -> VerifiedToken:
    expiration = (
        None
        if expires_in is None
        else datetime.fromtimestamp(NOW, tz=timezone.utc) + timedelta(seconds=expires_in)
    )
    return VerifiedToken(token_id="mt_1", machine_id=MACHINE, expiration=expiration)


class TestVerdictCache:
    def cache(self, **kwargs: float) -> VerdictCache:
        settings = {
            "ttl": 30.0,
            "negative_ttl": 5.0,
            "max_entries": 100,
            "negative_max_entries": 10,
        }
        settings.update(kwargs)
        return VerdictCache(**settings)  # type: ignore[arg-type]

    def test_positive_lives_ttl(self):
        cache = self.cache()
        cache.put_verified(b"k", verified(3600), now=100.0, wall=NOW)
        assert cache.get(b"k", 129.9) is not None
        assert cache.get(b"k", 130.0) is None

    @pytest.mark.parametrize(("expires_in", "last_hit"), [(10, 109.9), (0.5, 100.4)])
    def test_positive_never_outlives_the_token(self, expires_in, last_hit):
        cache = self.cache()
        cache.put_verified(b"k", verified(expires_in), now=100.0, wall=NOW)
        assert cache.get(b"k", last_hit) is not None
        assert cache.get(b"k", 100.0 + expires_in) is None

    def test_token_without_expiry_lives_ttl(self):
        cache = self.cache()
        cache.put_verified(b"k", verified(None), now=0.0, wall=NOW)
        assert cache.get(b"k", 29.0) is not None
        assert cache.get(b"k", 30.0) is None

    def test_expired_token_is_not_cached(self):
        cache = self.cache()
        cache.put_verified(b"k", verified(-1), now=0.0, wall=NOW)
        assert cache.get(b"k", 0.0) is None

    def test_negative_lives_negative_ttl(self):
        cache = self.cache()
        cache.put_rejection(b"k", Rejection("unknown", "no"), now=0.0)
        assert cache.get(b"k", 4.9) == Rejection("unknown", "no")
        assert cache.get(b"k", 5.0) is None

    def test_zero_ttl_disables(self):
        cache = self.cache(ttl=0, negative_ttl=0)
        cache.put_verified(b"a", verified(60), now=0.0, wall=NOW)
        cache.put_rejection(b"b", Rejection("unknown", "no"), now=0.0)
        assert cache.sizes == (0, 0)

    def test_bounded_least_recently_used_goes_first(self):
        cache = self.cache(max_entries=3)
        for key in (b"a", b"b", b"c"):
            cache.put_verified(key, verified(60), now=0.0, wall=NOW)
        assert cache.get(b"a", 1.0) is not None  # a is now the most recently used
        cache.put_verified(b"d", verified(60), now=1.0, wall=NOW)
        assert cache.sizes == (3, 0)
        assert cache.get(b"b", 1.0) is None
        assert cache.get(b"a", 1.0) is not None

    def test_negative_is_bounded_separately(self):
        cache = self.cache(negative_max_entries=10)
        cache.put_verified(b"good", verified(60), now=0.0, wall=NOW)
        for n in range(1000):
            cache.put_rejection(n.to_bytes(4, "big"), Rejection("unknown", "no"), now=0.0)
        assert cache.sizes == (1, 10)
        assert cache.get(b"good", 1.0) is not None

    def test_explains_a_refusal_of_a_token_accepted_before(self):
        cache = self.cache(ttl=0)  # no positive verdicts kept, but the history is
        cache.put_verified(b"k", verified(60), now=0.0, wall=NOW)
        unknown = Rejection("unknown", "404")
        assert cache.explain(b"k", unknown, wall=NOW + 10, skew=5).reason == "revoked"
        assert cache.explain(b"k", unknown, wall=NOW + 56, skew=5).reason == "expired"
        assert cache.explain(b"other", unknown, wall=NOW, skew=5) is unknown
        malformed = Rejection("malformed", "400")
        assert cache.explain(b"k", malformed, wall=NOW, skew=5) is malformed
        cache.clear()
        assert cache.explain(b"k", unknown, wall=NOW, skew=5) is unknown

    def test_a_new_verdict_replaces_the_other_kind(self):
        cache = self.cache()
        cache.put_verified(b"k", verified(60), now=0.0, wall=NOW)
        cache.put_rejection(b"k", Rejection("revoked", "no"), now=0.0)
        assert isinstance(cache.get(b"k", 1.0), Rejection)
        cache.put_verified(b"k", verified(60), now=1.0, wall=NOW)
        assert isinstance(cache.get(b"k", 2.0), VerifiedToken)


class TestJwksState:
    def state(self) -> JwksState:
        return JwksState(ttl=300.0, refetch_interval=30.0)

    def test_first_use_fetches(self):
        assert self.state().decide("ins_1", 0.0) is FETCH

    def test_fresh_key_is_used(self):
        state = self.state()
        state.begin(0.0)
        state.store({"ins_1": "KEY"}, 0.0)
        assert state.decide("ins_1", 299.0) == "KEY"

    def test_unknown_kid_refetches_at_most_once_per_interval(self):
        state = self.state()
        state.begin(0.0)
        state.store({"ins_1": "KEY"}, 0.0)
        assert state.decide("ins_2", 10.0) is None  # fetched 10 s ago: refuse
        assert state.decide("ins_2", 30.0) is FETCH
        state.begin(30.0)
        state.store({"ins_1": "KEY"}, 30.0)
        assert state.decide("ins_2", 31.0) is None
        assert state.decide("ins_3", 59.0) is None

    def test_unknown_kid_waits_for_a_fetch_in_flight(self):
        state = self.state()
        state.begin(0.0)
        state.store({"ins_1": "KEY"}, 0.0)
        state.begin(100.0)  # someone is fetching
        assert state.decide("ins_2", 100.5) is FETCH
        assert state.decide("ins_1", 100.5) == "KEY"

    def test_stale_set_is_refetched_and_used_while_the_fetch_fails(self):
        state = self.state()
        state.begin(0.0)
        state.store({"ins_1": "KEY"}, 0.0)
        assert state.decide("ins_1", 300.0) is FETCH
        state.begin(300.0)
        state.failed()
        assert state.decide("ins_1", 301.0) == "KEY"  # stale, but better than a 503
        assert state.decide("ins_1", 330.0) is FETCH

    def test_outage_before_any_keys_keeps_fetching(self):
        state = self.state()
        state.begin(0.0)
        state.failed()
        assert state.decide("ins_1", 1.0) is FETCH

    def test_rotation(self):
        state = self.state()
        state.begin(0.0)
        state.store({"ins_1": "OLD"}, 0.0)
        state.begin(40.0)
        state.store({"ins_2": "NEW"}, 40.0)
        assert state.decide("ins_2", 41.0) == "NEW"
        assert state.decide("ins_1", 41.0) is None
        assert state.kids == ("ins_2",)
