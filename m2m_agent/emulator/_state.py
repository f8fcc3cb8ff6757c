"""The emulator's mutable state: machines, stored tokens, JWT metadata and counters.

Nothing here locks: callers hold :attr:`State.lock` around every use, so one request's
decision is atomic with respect to every other thread (test threads and the server thread).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import types
from collections import Counter
from typing import TYPE_CHECKING, Any

from ._ids import (
    MACHINE_ID_PATTERN,
    new_instance_id,
    new_instance_key,
    new_machine_id,
    new_machine_key,
    new_opaque_token,
    new_token_id,
)
from ._records import Counters, Machine, TokenRecord

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["ENDPOINTS", "JwtMeta", "State", "canonical", "snapshot"]

#: The endpoint names used by counters and fault filters.
ENDPOINTS: tuple[str, ...] = ("create", "verify", "revoke", "list", "jwks")


def canonical(value: Any) -> str:
    """A JSON text that is equal for equal JSON values (sorted keys, no whitespace).

    Args:
        value: Any JSON-compatible value.

    Returns:
        The canonical JSON text.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def snapshot(record: TokenRecord) -> TokenRecord:
    """A copy of ``record`` whose claims can be changed without touching the stored token."""
    return dataclasses.replace(record, claims=copy.deepcopy(record.claims))


@dataclasses.dataclass(frozen=True)
class JwtMeta:
    """What the emulator remembers of a JWT-format token, only to answer verify calls."""

    subject: str
    scopes: tuple[str, ...]
    claims: Any
    created_at: float


class State:
    """Machines, tokens and counters of one emulated Clerk instance."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.instance_id = new_instance_id()
        self.instance_key = new_instance_key()
        self._machines: dict[str, Machine] = {}
        self._machine_by_key: dict[str, str] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._token_by_secret: dict[str, str] = {}
        self._jwts: dict[str, JwtMeta] = {}
        self._requests: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    # Machines

    def add_machine(
        self,
        name: str,
        *,
        secret_key: str | None,
        scoped_machines: Iterable[str],
        default_token_ttl: int,
        machine_id: str | None,
    ) -> Machine:
        """Register a machine; see :meth:`Emulator.create_machine`."""
        machine_id = new_machine_id() if machine_id is None else machine_id
        secret_key = new_machine_key() if secret_key is None else secret_key
        scopes = tuple(dict.fromkeys(scoped_machines))
        if not MACHINE_ID_PATTERN.match(machine_id):
            raise ValueError("machine_id must be 'mch_' followed by 27 word characters")
        if machine_id in self._machines:
            raise ValueError(f"machine {machine_id} already exists")
        if not secret_key.startswith("ak_") or len(secret_key) < 8:
            raise ValueError("a machine secret key must start with 'ak_'")
        if secret_key in self._machine_by_key:
            raise ValueError("another machine already uses this secret key")
        for scope in scopes:
            if not MACHINE_ID_PATTERN.match(scope):
                raise ValueError(f"scoped machine {scope!r} is not a machine id")
        if isinstance(default_token_ttl, bool) or default_token_ttl < 1:
            raise ValueError("default_token_ttl must be a positive number of seconds")
        machine = Machine(machine_id, name, secret_key, scopes, int(default_token_ttl))
        self._machines[machine_id] = machine
        self._machine_by_key[secret_key] = machine_id
        return machine

    def add_scope(self, machine_id: str, target_machine_id: str) -> Machine:
        """Let ``machine_id``'s future tokens be presented to ``target_machine_id``."""
        machine = self.machine(machine_id)
        self.machine(target_machine_id)
        if target_machine_id in machine.scoped_machines:
            return machine
        scopes = (*machine.scoped_machines, target_machine_id)
        machine = dataclasses.replace(machine, scoped_machines=scopes)
        self._machines[machine_id] = machine
        return machine

    def machine(self, machine_id: str) -> Machine:
        """The machine with this id.

        Raises:
            KeyError: No such machine.
        """
        try:
            return self._machines[machine_id]
        except KeyError:
            raise KeyError(f"unknown machine {machine_id}") from None

    def has_machine(self, machine_id: str) -> bool:
        """Whether a machine with this id exists."""
        return machine_id in self._machines

    def machine_by_key(self, secret_key: str) -> Machine | None:
        """The machine whose secret key this is, if any."""
        machine_id = self._machine_by_key.get(secret_key)
        return None if machine_id is None else self._machines[machine_id]

    # Tokens

    def mint_opaque(self, machine: Machine, lifetime: float | None, claims: Any) -> TokenRecord:
        """Create and store a new opaque token for ``machine``."""
        now = self.clock()
        record = TokenRecord(
            id=new_token_id(),
            subject=machine.id,
            token=new_opaque_token(),
            claims=copy.deepcopy(claims),
            scopes=machine.scoped_machines,
            created_at=now,
            expires_at=None if lifetime is None else now + lifetime,
            updated_at=now,
        )
        self._tokens[record.id] = record
        self._token_by_secret[record.token] = record.id
        self.count("mints")
        return record

    def find_reusable(
        self, machine: Machine, claims: Any, min_remaining: float
    ) -> TokenRecord | None:
        """A live token to reuse instead of minting (``min_remaining_ttl_seconds``).

        It must belong to ``machine``, carry equal claims and the machine's current scopes, and
        have at least ``min_remaining`` seconds left; the longest-lived one wins.
        """
        now = self.clock()
        wanted = canonical(claims)
        best: TokenRecord | None = None
        for record in self._tokens.values():
            if (
                record.subject == machine.id
                and not record.revoked
                and record.remaining(now) >= min_remaining
                and record.remaining(now) > 0
                and record.scopes == machine.scoped_machines
                and canonical(record.claims) == wanted
                and (best is None or record.remaining(now) > best.remaining(now))
            ):
                best = record
        return best

    def token(self, token_id: str) -> TokenRecord | None:
        """The stored token with this id, if any."""
        return self._tokens.get(token_id)

    def token_by_secret(self, secret: str) -> TokenRecord | None:
        """The stored token whose opaque string this is, if any."""
        token_id = self._token_by_secret.get(secret)
        return None if token_id is None else self._tokens[token_id]

    def tokens(self) -> tuple[TokenRecord, ...]:
        """Snapshots of every stored token, oldest first (claims copied, so edits stay local)."""
        return tuple(snapshot(record) for record in self._tokens.values())

    def touch(self, token_id: str) -> TokenRecord:
        """Record a successful verification: set ``last_used_at`` and ``updated_at``."""
        now = self.clock()
        record = dataclasses.replace(self._tokens[token_id], last_used_at=now, updated_at=now)
        self._tokens[token_id] = record
        return record

    def revoke(self, token_id: str, reason: str | None) -> TokenRecord:
        """Revoke a stored token; a second revocation keeps the first reason.

        Raises:
            KeyError: No stored token has this id.
        """
        record = self._tokens.get(token_id)
        if record is None:
            raise KeyError(f"unknown token {token_id}")
        if record.revoked:
            return record
        now = self.clock()
        record = dataclasses.replace(record, revoked=True, revocation_reason=reason, updated_at=now)
        self._tokens[token_id] = record
        return record

    def list_tokens(self, subject: str, *, revoked: bool, expired: bool) -> list[TokenRecord]:
        """The subject's stored tokens, newest first; revoked or expired ones only if asked."""
        now = self.clock()
        records = [
            record
            for record in reversed(self._tokens.values())
            if record.subject == subject
            and (revoked or not record.revoked)
            and (expired or not record.is_expired(now))
        ]
        records.sort(key=lambda record: record.created_at, reverse=True)
        return records

    def remember_jwt(self, jti: str, meta: JwtMeta) -> None:
        """Keep what a verify call needs to know about a minted JWT (never listed or revoked)."""
        self._jwts[jti] = meta
        self.count("mints")

    def jwt_meta(self, jti: str) -> JwtMeta | None:
        """What was remembered about the JWT with this ``jti``, if anything."""
        return self._jwts.get(jti)

    # Counters

    def count_request(self, endpoint: str) -> None:
        """Count one attempt on ``endpoint``."""
        self._requests[endpoint] += 1

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (a field of :class:`Counters`)."""
        self._counts[name] += 1

    def counters(self) -> Counters:
        """An immutable snapshot of the counters."""
        requests = dict.fromkeys(ENDPOINTS, 0)
        requests.update(self._requests)
        counts = self._counts
        return Counters(
            requests=types.MappingProxyType(requests),
            mints=counts["mints"],
            reused=counts["reused"],
            verifications=counts["verifications"],
            revocations=counts["revocations"],
            lists=counts["lists"],
            jwks=counts["jwks"],
            faults=counts["faults"],
            errors=counts["errors"],
        )

    def reset_counters(self) -> None:
        """Set every counter back to zero."""
        self._requests.clear()
        self._counts.clear()
