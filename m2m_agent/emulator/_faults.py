"""Fault injection: what can go wrong, when it applies, and the responses it produces."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import TYPE_CHECKING, Literal, get_args

import httpx

from ._state import ENDPOINTS
from ._wire import error_response

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Fault", "FaultBook", "MalformedKind", "fault_response"]

#: The kinds of malformed body a fault can produce.
MalformedKind = Literal["not_json", "wrong_shape", "truncated", "html", "huge"]

_HUGE_BYTES = 6 * 1024 * 1024
_HTML = (
    b"<!DOCTYPE html><html><head><title>Error</title></head>"
    b"<body><h1>Something went wrong</h1><p>The upstream service is unavailable.</p></body></html>"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fault:
    """Something to go wrong on matching requests; inject it with :meth:`Emulator.inject`.

    When several faults apply to one request, their latencies add up and the first one injected
    that changes the answer (``drop``, ``status``, ``malformed``, ``retry_after``) decides it.

    Attributes:
        status: Answer with this status and a Clerk-shaped error envelope (with ``malformed``:
            the status of the malformed body).
        retry_after: Set ``Retry-After`` to this many seconds, rounded up to an integer.
            Alone, it means a 429.
        latency: Seconds to wait before answering; alone, it delays the real response.
        malformed: Answer with a broken body (status 200 unless ``status`` is given):
            ``"not_json"``, ``"wrong_shape"`` (valid JSON, wrong fields), ``"truncated"`` (the
            request is processed and its real answer cut in half), ``"html"`` (``text/html``),
            ``"huge"`` (a JSON body of several megabytes).
        drop: Close the connection without a complete response.
        times: Apply to the next N matching requests only (``None``: no limit).
        duration: Apply for this many seconds on the emulator's clock from injection.
        endpoints: The endpoints it applies to, a subset of ``{"create", "verify", "revoke",
            "list", "jwks"}``; ``None`` for all.
        probability: The chance it applies to a matching request (seed with
            ``Emulator(seed=...)``). A request it skips does not use up ``times``.

    Raises:
        ValueError: A setting is out of range, or the fault would do nothing.
    """

    status: int | None = None
    retry_after: float | None = None
    latency: float = 0.0
    malformed: MalformedKind | None = None
    drop: bool = False
    times: int | None = None
    duration: float | None = None
    endpoints: frozenset[str] | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        if self.endpoints is not None:
            endpoints = frozenset(self.endpoints)
            unknown = endpoints - set(ENDPOINTS)
            if unknown or not endpoints:
                raise ValueError(f"endpoints must be a non-empty subset of {sorted(ENDPOINTS)}")
            object.__setattr__(self, "endpoints", endpoints)
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.status is not None and self.status < 400 and self.malformed is None:
            raise ValueError("a status below 400 needs a malformed body to go with it")
        if self.retry_after is not None and not self.retry_after >= 0:
            raise ValueError("retry_after must be >= 0")
        if not self.latency >= 0 or math.isinf(self.latency):
            raise ValueError("latency must be a finite number >= 0")
        if self.malformed is not None and self.malformed not in get_args(MalformedKind):
            raise ValueError(f"malformed must be one of {get_args(MalformedKind)}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.drop and (self.status is not None or self.malformed is not None):
            raise ValueError("a dropped connection has no status or body")
        if not (self.changes_answer or self.latency > 0):
            raise ValueError(
                "this fault does nothing: give a status, latency, malformed, retry_after or drop"
            )

    @property
    def changes_answer(self) -> bool:
        """Whether it replaces the real answer (anything but pure latency)."""
        return (
            self.drop
            or self.status is not None
            or self.malformed is not None
            or self.retry_after is not None
        )


@dataclasses.dataclass
class _Entry:
    fault: Fault
    injected_at: float
    remaining: int | None


class FaultBook:
    """The injected faults, in injection order, with their remaining uses and deadlines.

    Args:
        seed: Seeds the draws for faults with a ``probability`` below 1.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._entries: list[_Entry] = []
        self._random = random.Random(seed)  # noqa: S311 - fault dice, not cryptography

    def add(self, fault: Fault, now: float) -> None:
        """Start applying ``fault``; its ``duration`` counts from ``now``."""
        self._entries.append(_Entry(fault, now, fault.times))

    def clear(self) -> None:
        """Forget every fault."""
        self._entries.clear()

    def active(self, now: float) -> tuple[Fault, ...]:
        """The faults still in force at ``now``."""
        self._expire(now)
        return tuple(entry.fault for entry in self._entries)

    def fire(self, endpoint: str, now: float) -> list[Fault]:
        """The faults that apply to one request on ``endpoint`` at ``now``, using them up.

        Args:
            endpoint: The endpoint name.
            now: Seconds on the emulator's clock.

        Returns:
            The applying faults, in injection order.
        """
        self._expire(now)
        fired = []
        for entry in self._entries:
            fault = entry.fault
            if fault.endpoints is not None and endpoint not in fault.endpoints:
                continue
            if fault.probability < 1.0 and self._random.random() >= fault.probability:
                continue
            if entry.remaining is not None:
                entry.remaining -= 1
            fired.append(fault)
        self._expire(now)
        return fired

    def _expire(self, now: float) -> None:
        self._entries = [
            entry
            for entry in self._entries
            if (entry.remaining is None or entry.remaining > 0)
            and (entry.fault.duration is None or now < entry.injected_at + entry.fault.duration)
        ]


def fault_response(fault: Fault, real: Callable[[], httpx.Response]) -> httpx.Response:
    """The answer a fault that changes the answer gives instead of (or made from) the real one.

    Args:
        fault: A fault with :attr:`Fault.changes_answer` and not ``drop``.
        real: Produces the real answer; called only for ``truncated``.

    Returns:
        The response to send.
    """
    headers = {}
    if fault.retry_after is not None:
        headers["retry-after"] = str(math.ceil(fault.retry_after))
    if fault.malformed is None:
        return error_response(fault.status or 429, headers=headers)
    status = fault.status or 200
    if fault.malformed == "truncated":
        response = real()
        content = response.content[: len(response.content) // 2]
        kept = {"content-type": response.headers.get("content-type", "application/json")}
        return httpx.Response(
            fault.status or response.status_code, headers={**kept, **headers}, content=content
        )
    if fault.malformed == "html":
        return httpx.Response(
            status, headers={"content-type": "text/html; charset=utf-8", **headers}, content=_HTML
        )
    content = _malformed_json(fault.malformed)
    return httpx.Response(
        status, headers={"content-type": "application/json", **headers}, content=content
    )


def _malformed_json(kind: str) -> bytes:
    if kind == "not_json":
        return b"this is not JSON: {'object': machine_to_machine_token,"
    if kind == "wrong_shape":
        return json.dumps({"object": "list", "data": [{"id": 42}], "total_count": "many"}).encode()
    padding = "x" * _HUGE_BYTES
    return json.dumps({"object": "machine_to_machine_token", "padding": padding}).encode()
