"""The clock token lifetimes run on: monotonic, and counting time the machine spent suspended.

``time.monotonic()`` stops while a Linux machine (a laptop, a paused VM) is suspended, so a token
could look younger than it is after a resume. ``CLOCK_BOOTTIME`` keeps counting through suspend
and, like ``monotonic``, never jumps with the wall clock. Elsewhere ``time.monotonic`` is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["now"]


def _pick() -> Callable[[], float]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:  # pragma: no cover - not Linux
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:  # pragma: no cover - an old kernel
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


now: Callable[[], float] = _pick()
"""Seconds on a monotonic clock that includes suspend (for token lifetimes and deadlines)."""
