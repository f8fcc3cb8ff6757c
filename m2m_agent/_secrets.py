"""Secrets that never show themselves: keys and tokens in reprs, logs and errors."""

from __future__ import annotations

import hashlib
from typing import final

__all__ = ["Secret", "fingerprint"]


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a secret, for logs and reprs.

    Twelve hex characters of SHA-256: enough to tell tokens apart in a log, useless to an attacker.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


@final
class Secret:
    """A string that hides itself from ``repr``, ``str`` and f-strings.

    Only :meth:`reveal` gives the value; everything else shows its kind prefix and fingerprint.
    """

    __slots__ = ("_fingerprint", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._fingerprint = fingerprint(value)

    @property
    def fingerprint(self) -> str:
        """The secret's short fingerprint (see :func:`fingerprint`)."""
        return self._fingerprint

    @property
    def kind(self) -> str:
        """The secret's prefix (``ak_``, ``sk_``, ``mt_``...), safe to show."""
        head, sep, _ = self._value.partition("_")
        return f"{head}_" if sep and head.isalpha() and len(head) <= 4 else ""

    def reveal(self) -> str:
        """The secret itself: only for the Authorization header."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{self.kind}…{self._fingerprint}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))
