"""ClerkM2MClient round trip: create, verify, list and revoke M2M tokens.

Run it: ``python examples/api_client.py``. It uses the embedded Clerk emulator (no account, no
network) with two machines: a "worker" that mints tokens and a "service" that verifies them
(Clerk verifies a token only for a machine listed in the token's scopes).

Against real Clerk: build the worker's client as ``ClerkM2MClient()`` with
CLERK_MACHINE_SECRET_KEY set to its key, and the service's with the service machine's key;
nothing else changes. The same methods exist, awaited, on AsyncClerkM2MClient.
"""

import logging

import httpx
import structlog

from m2m_agent import ClerkM2MClient, NotFoundError
from m2m_agent.emulator import Emulator

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

emu = Emulator()
service_machine = emu.create_machine("service")
worker_machine = emu.create_machine("worker", scoped_machines=[service_machine.id])


def clerk_client(secret_key: str) -> ClerkM2MClient:
    http = httpx.Client(transport=emu.transport())  # answered in-process by the emulator
    return ClerkM2MClient(secret_key, api_url="https://api.clerk.test", http_client=http)


# --8<-- [start:usage]
worker = clerk_client(worker_machine.secret_key)
service = clerk_client(service_machine.secret_key)
with worker, service:
    minted = worker.create_token(seconds_until_expiration=300, claims={"job": "nightly"})
    print(f"created  {minted}")  # the repr shows the id and a fingerprint, never the secret
    assert minted.token is not None  # the secret is on the create response only

    verified = service.verify_token(minted.token)
    print(f"verified {verified.id} subject={verified.subject} claims={verified.claims}")

    page = worker.list_tokens(subject=minted.subject)
    print(f"listed   {page.total_count} live token(s): {[t.id for t in page]}")

    revoked = worker.revoke_token(minted.id, reason="job finished")
    print(f"revoked  {revoked.id} revoked={revoked.revoked} reason={revoked.revocation_reason!r}")
    try:
        service.verify_token(minted.token)
        raise SystemExit("a revoked token verified")
    except NotFoundError as exc:
        print(f"verify after revoke -> {type(exc).__name__} (HTTP {exc.status_code})")

    live = worker.list_tokens(subject=minted.subject).total_count
    total = worker.list_tokens(subject=minted.subject, revoked=True).total_count
    print(f"listed   {live} live token(s), {total} with revoked ones")
# --8<-- [end:usage]
