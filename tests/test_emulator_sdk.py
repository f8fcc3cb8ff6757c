"""The official Clerk Python SDK (clerk-backend-api) against the served emulator.

If the SDK's strict pydantic models parse every answer, the emulator's wire format is faithful.
"""

from __future__ import annotations

from typing import Any

import pytest

from m2m_agent.emulator import Emulator, EmulatorServer, Machine

clerk_backend_api = pytest.importorskip("clerk_backend_api")

from clerk_backend_api import Clerk, models  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def emu() -> Emulator:
    return Emulator()


@pytest.fixture(scope="module")
def server(emu: Emulator) -> Any:
    with emu.serve() as server:
        yield server


@pytest.fixture
def machines(emu: Emulator) -> tuple[Machine, Machine]:
    """A minting machine and the machine it is scoped to."""
    verifier = emu.create_machine("api")
    return emu.create_machine("worker", scoped_machines=[verifier.id]), verifier


def sdk(server: EmulatorServer, key: str) -> Clerk:
    return Clerk(bearer_auth=key, server_url=f"{server.url}/v1")


def test_create_verify_list_revoke(
    emu: Emulator, server: EmulatorServer, machines: tuple[Machine, Machine]
) -> None:
    """The SDK creates, verifies, lists and revokes without a parse error."""
    minter, verifier = machines
    with sdk(server, minter.secret_key) as clerk, sdk(server, verifier.secret_key) as receiver:
        created = clerk.m2m.create_token(seconds_until_expiration=60, claims={"role": "svc"})
        assert isinstance(created, models.CreateM2MTokenResponseBody)
        assert created.subject == minter.id
        assert created.scopes == [verifier.id]
        assert created.claims == {"role": "svc"}
        assert created.expiration == created.created_at + 60_000

        verified = receiver.m2m.verify_token(token=created.token)
        assert verified.id == created.id
        assert verified.last_used_at is not None

        listed = clerk.m2m.list_tokens(subject=minter.id)
        assert listed.total_count == 1
        assert [token.id for token in listed.m2m_tokens] == [created.id]

        revoked = clerk.m2m.revoke_token(m2m_token_id=created.id, revocation_reason="rotated")
        assert revoked.revoked is True
        assert revoked.revocation_reason == "rotated"

        with pytest.raises(models.ClerkBaseError) as caught:
            receiver.m2m.verify_token(token=created.token)
        assert caught.value.raw_response.status_code == 404

        everything = clerk.m2m.list_tokens(subject=minter.id, revoked=True)
        assert everything.m2m_tokens[0].revoked is True


def test_reuse_jwt_and_instance_key(
    emu: Emulator, server: EmulatorServer, machines: tuple[Machine, Machine]
) -> None:
    """min_remaining reuse, JWT tokens and the instance key all parse in the SDK."""
    minter, _ = machines
    with sdk(server, minter.secret_key) as clerk, sdk(server, emu.instance_secret_key) as admin:
        first = clerk.m2m.create_token(seconds_until_expiration=300, min_remaining_ttl_seconds=60)
        second = clerk.m2m.create_token(seconds_until_expiration=300, min_remaining_ttl_seconds=60)
        assert first.id == second.id
        assert first.token == second.token

        jwt_token = clerk.m2m.create_token(token_format=models.TokenFormat.JWT, claims={"tier": 1})
        assert jwt_token.token.count(".") == 2
        verified = admin.m2m.verify_token(token=jwt_token.token)
        assert verified.subject == minter.id
        assert verified.claims == {"tier": 1}

        assert admin.m2m.list_tokens(subject=minter.id).total_count == 1
        assert admin.m2m.revoke_token(m2m_token_id=first.id).revoked is True


def test_typed_errors(server: EmulatorServer, machines: tuple[Machine, Machine]) -> None:
    """The SDK's typed 400/403 errors parse the emulator's envelopes; 401 is an SDKError."""
    minter, verifier = machines
    with sdk(server, minter.secret_key) as clerk:
        with pytest.raises(models.ClerkBaseError) as bad_request:
            clerk.m2m.create_token(seconds_until_expiration=60, min_remaining_ttl_seconds=60)
        assert bad_request.value.raw_response.status_code == 400
        assert not isinstance(bad_request.value, models.SDKError)

        with pytest.raises(models.ClerkBaseError) as forbidden:
            clerk.m2m.list_tokens(subject=verifier.id)
        assert forbidden.value.raw_response.status_code == 403
        assert not isinstance(forbidden.value, models.SDKError)

    with sdk(server, "ak_test_unknown") as stranger, pytest.raises(models.SDKError) as unauthorized:
        stranger.m2m.create_token()
    assert unauthorized.value.status_code == 401
