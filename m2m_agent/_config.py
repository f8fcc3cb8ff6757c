"""Key and URL hygiene: turn what the user gave (or the environment) into checked settings.

Every failure is a :class:`~m2m_agent.errors.ConfigurationError` whose message says what to fix,
and none of them echoes the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping

import httpx

from m2m_agent._secrets import Secret
from m2m_agent.errors import ConfigurationError

__all__ = [
    "DEFAULT_API_URL",
    "finite_number",
    "ENV_API_URL",
    "ENV_MACHINE_SECRET_KEY",
    "is_loopback_host",
    "resolve_api_url",
    "resolve_machine_secret_key",
]

DEFAULT_API_URL = "https://api.clerk.com"
"""Clerk's Backend API. M2M paths hang off it without ``/v1`` (as Clerk's JS SDK calls them)."""

ENV_MACHINE_SECRET_KEY = "CLERK_MACHINE_SECRET_KEY"
ENV_API_URL = "CLERK_API_URL"

_KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-]+$")
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def finite_number(value: object) -> float | None:
    """``value`` as a float if it is a real, finite number (not a bool), else None.

    Safe on ints too large for a float, which ``math.isfinite`` refuses with ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_timeout(value: object) -> None:
    """Refuse a timeout that is not None, a positive number of seconds or an ``httpx.Timeout``.

    Raises:
        ConfigurationError: naming what was given.
    """
    if value is None or isinstance(value, httpx.Timeout):
        return
    number = finite_number(value)
    if number is None or number <= 0:
        raise ConfigurationError(
            f"timeout must be a positive number of seconds, None or an httpx.Timeout, got "
            f"{type(value).__name__}."
        )


def resolve_machine_secret_key(
    value: str | Secret | None, *, environ: Mapping[str, str] | None = None
) -> Secret:
    """Check a machine secret key (``ak_...``), falling back to ``CLERK_MACHINE_SECRET_KEY``.

    Raises:
        ConfigurationError: the key is missing, or is not a machine secret key.
    """
    if isinstance(value, Secret):
        value = value.reveal()
    source = "machine_secret_key"
    if value is None:
        value = (os.environ if environ is None else environ).get(ENV_MACHINE_SECRET_KEY)
        source = ENV_MACHINE_SECRET_KEY
        if not value:
            raise ConfigurationError(
                "No machine secret key: pass machine_secret_key='ak_...' or set "
                f"{ENV_MACHINE_SECRET_KEY}. Find it on the machine's page in the Clerk "
                "dashboard (Machines > your machine > Secret key), or run `m2m-agent emulator` "
                "for a local one."
            )
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be a str, not {type(value).__name__}.")
    if value != value.strip():
        raise ConfigurationError(
            f"{source} has leading or trailing whitespace (often a newline from a file or a "
            "shell variable); strip it."
        )
    if not value:
        raise ConfigurationError(f"{source} is empty; it must be a machine secret key 'ak_...'.")
    problem = _wrong_kind(value)
    if problem:
        raise ConfigurationError(f"{source} {problem}")
    if not _KEY_CHARS.match(value) or len(value) < 8:
        raise ConfigurationError(
            f"{source} is malformed: a machine secret key is 'ak_' followed by letters, digits "
            "and underscores, with no spaces or quotes. Copy it again from the dashboard."
        )
    return Secret(value)


def _wrong_kind(value: str) -> str | None:
    """Explain why ``value`` is some other kind of Clerk credential, or None if it is not."""
    if value.startswith("ak_"):
        return None
    if value.startswith("sk_"):
        return (
            "is an instance secret key (sk_...), but minting M2M tokens needs the machine's own "
            "secret key (ak_...), from the machine's page in the Clerk dashboard."
        )
    if value.startswith("pk_"):
        return "is a publishable key (pk_...); M2M tokens need a machine secret key (ak_...)."
    if value.startswith(("mt_", "m2m_")) or _JWT_SHAPE.match(value):
        return (
            "looks like an M2M token, not a key: pass the machine secret key (ak_...) that mints "
            "tokens."
        )
    return "is not a machine secret key: it must start with 'ak_'."


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_url(
    value: str | httpx.URL | None,
    *,
    allow_insecure_http: bool = False,
    environ: Mapping[str, str] | None = None,
) -> httpx.URL:
    """Check the Backend API URL, falling back to ``CLERK_API_URL``, then Clerk's own.

    The URL may carry a path prefix (``https://api.clerk.com/v1`` for the versioned paths);
    M2M paths are appended to it.

    Raises:
        ConfigurationError: the URL is malformed, or plain ``http://`` to a host that is not
            loopback without ``allow_insecure_http=True``.
    """
    source = "api_url"
    if value is None:
        value = (os.environ if environ is None else environ).get(ENV_API_URL) or DEFAULT_API_URL
        source = ENV_API_URL if value != DEFAULT_API_URL else "api_url"
    try:
        url = httpx.URL(str(value).strip())
        host = url.host  # may raise for a punycode host that is not valid IDNA
    except Exception:  # httpx.InvalidURL, idna.IDNAError, TypeError...
        raise ConfigurationError(
            f"{source} is not a valid URL; it must look like {DEFAULT_API_URL!r}."
        ) from None
    # Messages name the scheme and host only: a key pasted as (or into) the URL never echoes.
    where = f"{url.scheme}://{host}" if url.scheme in ("http", "https") and host else None
    if url.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"{source} must be an absolute http(s) URL such as {DEFAULT_API_URL!r}; the value "
            "given is not (is it a key in the wrong place?)."
        )
    if url.userinfo or url.query or url.fragment:
        raise ConfigurationError(
            f"{source} ({where}) must not carry credentials, a query or a fragment."
        )
    if url.scheme == "http" and not is_loopback_host(host) and not allow_insecure_http:
        raise ConfigurationError(
            f"{source} ({where}) is plain http to a non-loopback host, which would send the "
            "machine secret key in clear text. Use https, or pass allow_insecure_http=True if "
            "you really mean it."
        )
    return url.copy_with(path=url.path.rstrip("/") or "/")
