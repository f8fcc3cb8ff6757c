"""Random identifiers and secrets in Clerk's formats."""

from __future__ import annotations

import re
import secrets
import string

__all__ = [
    "JWT_PATTERN",
    "MACHINE_ID_PATTERN",
    "TOKEN_ID_PATTERN",
    "new_instance_id",
    "new_instance_key",
    "new_machine_id",
    "new_machine_key",
    "new_opaque_token",
    "new_token_id",
    "new_trace_id",
]

_ALPHANUMERIC = string.ascii_letters + string.digits

#: A machine id: ``mch_`` and 27 word characters.
MACHINE_ID_PATTERN = re.compile(r"^mch_\w{27}$", re.ASCII)
#: A token id (also the ``jti`` of a JWT-format token): ``mt_`` and 32 hex digits.
TOKEN_ID_PATTERN = re.compile(r"^mt_[0-9A-Fa-f]{32}$")
#: Three base64url segments: what Clerk's SDKs take for a JWT.
JWT_PATTERN = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def _alphanumeric(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def new_instance_id() -> str:
    """An instance id, ``ins_`` and 27 alphanumerics (also the JWT ``kid``)."""
    return "ins_" + _alphanumeric(27)


def new_machine_id() -> str:
    """A machine id, ``mch_`` and 27 alphanumerics."""
    return "mch_" + _alphanumeric(27)


def new_token_id() -> str:
    """A token id, ``mt_`` and 32 lowercase hex digits."""
    return "mt_" + secrets.token_hex(16)


def new_opaque_token() -> str:
    """An opaque token secret, ``mt_`` and 48 alphanumerics (never shaped like a token id)."""
    return "mt_" + _alphanumeric(48)


def new_machine_key() -> str:
    """A machine secret key, ``ak_test_`` and 32 hex digits."""
    return "ak_test_" + secrets.token_hex(16)


def new_instance_key() -> str:
    """An instance secret key, ``sk_test_`` and 40 alphanumerics."""
    return "sk_test_" + _alphanumeric(40)


def new_trace_id() -> str:
    """A ``clerk_trace_id`` for an error envelope."""
    return secrets.token_hex(16)
