"""The sans-IO core on its own: policy arithmetic and state decisions, no I/O, no clock."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from m2m_agent import ConfigurationError, RefreshPolicy, TokenState
from m2m_agent._refresh import Coordinator
from m2m_agent._token import M2MToken
from m2m_agent.errors import AuthenticationError, MalformedResponseError, ServerError

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def minted(token_id: str = "mt_" + "1" * 32, lifetime: float = 100.0, **kw) -> M2MToken:
    return M2MToken(
        id=token_id,
        subject="mch_x",
        token="secret-" + token_id,
        created_at=NOW,
        expiration=NOW + timedelta(seconds=lifetime),
        **kw,
    )


def core(**policy) -> Coordinator:
    policy.setdefault("jitter", 0.0)
    return Coordinator(RefreshPolicy(**policy), requested_lifetime=100.0, rng=random.Random(1))


class TestPolicy:
    def test_defaults_and_margin_cap(self):
        p = RefreshPolicy()
        assert p.margin_seconds(3600) == 60
        assert p.margin_seconds(100) == 10
        assert p.refresh_offset(3600, random.Random(0)) <= 0.75 * 3600

    def test_backoff_is_full_jitter_capped_and_honours_retry_after(self):
        p = RefreshPolicy(initial_backoff=1, max_backoff=8)
        rng = random.Random(0)
        draws = [p.backoff(10, retry_after=None, rng=rng) for _ in range(500)]
        assert 0 <= min(draws) < 0.5
        assert max(draws) <= 8
        assert p.backoff(1, retry_after=5, rng=rng) == 5
        assert p.backoff(1, retry_after=500, rng=rng) == 8

    @pytest.mark.parametrize(
        "kwargs", [{"refresh_at": 1.0}, {"jitter": 0.9}, {"margin": -1}, {"max_backoff": 0.1}]
    )
    def test_bad_policies(self, kwargs):
        with pytest.raises(ConfigurationError):
            RefreshPolicy(**kwargs)


class TestCoordinator:
    def test_timeline(self):
        c = core()
        plan = c.plan(0.0)
        assert plan.token is None
        assert plan.start_flight
        c.flight_started()
        assert not c.plan(0.0).start_flight, "one flight at a time"
        c.attempt_succeeded(minted(), sent_at=0.0, now=0.1)
        c.flight_finished()
        assert c.plan(10).token
        assert not c.plan(10).start_flight
        assert c.current is not None
        assert c.current.state(80) is TokenState.STALE
        stale = c.plan(80)
        assert stale.token
        assert stale.start_flight
        assert c.current.state(95) is TokenState.UNUSABLE
        assert c.plan(95).token is None

    def test_anchored_before_the_request(self):
        c = core()
        entry = c.attempt_succeeded(minted(), sent_at=5.0, now=9.0)
        assert entry.expires_at == 105.0

    def test_refuses_expired_short_or_repeated_tokens(self):
        c = core()
        with pytest.raises(MalformedResponseError):
            c.attempt_succeeded(minted(expired=True), sent_at=0, now=0)
        with pytest.raises(MalformedResponseError):
            c.attempt_succeeded(minted(lifetime=1), sent_at=0, now=0.95)
        c.attempt_succeeded(minted(), sent_at=0, now=0)
        with pytest.raises(MalformedResponseError):
            c.attempt_succeeded(minted(), sent_at=1, now=1)

    def test_fatal_failure_fails_fast_until_the_gate(self):
        c = core(initial_backoff=1, max_backoff=1)
        c.flight_started()
        c.attempt_failed(AuthenticationError("no", status_code=401), now=0)
        c.flight_finished()
        assert not c.should_retry(0)
        plan = c.plan(0.001)
        assert isinstance(plan.fail, AuthenticationError)
        assert c.plan(2).start_flight

    def test_transient_failure_retries_while_someone_needs_a_token(self):
        c = core(wait_timeout=5)
        c.plan(0)
        c.attempt_failed(ServerError("down", status_code=503), now=0)
        assert c.should_retry(1)
        assert not c.should_retry(6), "nobody asked for 5 s and nothing to serve"

    def test_rotation_queues_the_old_token_for_revocation(self):
        c = core(rotation_grace=10)
        c.attempt_succeeded(minted("mt_" + "1" * 32), sent_at=0, now=0)
        c.attempt_succeeded(minted("mt_" + "2" * 32), sent_at=80, now=80)
        assert c.due_revocations(85) == []
        assert c.due_revocations(91) == ["mt_" + "1" * 32]

    def test_shared_tokens_are_never_revoked(self):
        c = core()
        c.attempt_succeeded(minted(), sent_at=0, now=0, owned=False)
        assert c.close(revoke_current=True) == []
