"""Keys for verification: the instance key and PEM settings, JWKS calls, and PyJWT's RS256.

PyJWT (and ``cryptography``) are imported only when a JWT is first verified or a PEM key is
configured, so opaque-only verification works without the ``jwt`` extra.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from m2m_agent._api import CLERK_API_VERSION, USER_AGENT, ApiCall, ApiResponse, error_from_response
from m2m_agent._config import (
    ENV_MACHINE_SECRET_KEY,
    is_loopback_host,
    resolve_machine_secret_key,
)
from m2m_agent._secrets import Secret
from m2m_agent._verify_core import JwtToken
from m2m_agent.errors import ConfigurationError, MalformedResponseError

__all__ = [
    "ENV_JWT_KEY",
    "ENV_SECRET_KEY",
    "INSTALL_HINT",
    "JwtCrypto",
    "jwks_call",
    "jwks_url_for",
    "load_crypto",
    "optional_machine_secret_key",
    "resolve_jwks_url",
    "resolve_jwt_key",
    "resolve_secret_key",
]

ENV_SECRET_KEY = "CLERK_SECRET_KEY"
ENV_JWT_KEY = "CLERK_JWT_KEY"
INSTALL_HINT = "pip install 'm2m-agent[jwt]'"

_KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-]+$")
_log = structlog.get_logger("m2m_agent")


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def optional_machine_secret_key(
    value: str | Secret | None, *, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """The machine secret key if given or in ``CLERK_MACHINE_SECRET_KEY``, checked; else None.

    Raises:
        ConfigurationError: a key was given (or set in the environment) but is not one.
    """
    if value is None and not _environ(environ).get(ENV_MACHINE_SECRET_KEY):
        return None
    return resolve_machine_secret_key(value, environ=environ)


def resolve_secret_key(
    value: str | Secret | None, *, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """The instance secret key (``sk_...``), falling back to ``CLERK_SECRET_KEY``; else None.

    Raises:
        ConfigurationError: the value is not an instance secret key.
    """
    if isinstance(value, Secret):
        value = value.reveal()
    source = "secret_key"
    if value is None:
        value = _environ(environ).get(ENV_SECRET_KEY)
        source = ENV_SECRET_KEY
        if not value:
            return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be a str, not {type(value).__name__}.")
    if value != value.strip():
        raise ConfigurationError(
            f"{source} has leading or trailing whitespace (often a newline from a file); strip it."
        )
    if value.startswith("ak_"):
        raise ConfigurationError(
            f"{source} is a machine secret key (ak_...): pass it as machine_secret_key (or set "
            f"{ENV_MACHINE_SECRET_KEY}). secret_key is the instance secret key (sk_...)."
        )
    if value.startswith("pk_"):
        raise ConfigurationError(
            f"{source} is a publishable key (pk_...); it must be the instance secret key (sk_...)."
        )
    if not value.startswith("sk_") or not _KEY_CHARS.match(value) or len(value) < 8:
        raise ConfigurationError(
            f"{source} is not an instance secret key: it must be 'sk_test_...' or 'sk_live_...', "
            "from the Clerk dashboard (API keys)."
        )
    return Secret(value)


def resolve_jwt_key(
    value: str | bytes | None, *, environ: Mapping[str, str] | None = None
) -> str | None:
    r"""The PEM public key text, falling back to ``CLERK_JWT_KEY``; else None.

    Accepts the PEM as the dashboard shows it, with ``\n`` escapes (as environment variables
    often carry it), or the bare base64 body without the ``BEGIN``/``END`` lines.

    Raises:
        ConfigurationError: the value is not text.
    """
    source = "jwt_key"
    if value is None:
        value = _environ(environ).get(ENV_JWT_KEY)
        source = ENV_JWT_KEY
        if not value:
            return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{source} must be a PEM public key (ASCII text).") from None
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be a PEM str, not {type(value).__name__}.")
    text = value.strip().replace("\\n", "\n")
    if not text:
        raise ConfigurationError(f"{source} is empty; it must be a PEM public key.")
    if "-----BEGIN" not in text:
        body = "".join(text.split())
        text = "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n".format(
            "\n".join(textwrap.wrap(body, 64))
        )
    return text


def jwks_url_for(api_url: httpx.URL) -> httpx.URL:
    """``{api_url}/v1/jwks``, or ``{api_url}/jwks`` when ``api_url`` already ends in ``/v1``."""
    base = api_url.path.rstrip("/")
    path = f"{base}/jwks" if base.endswith("/v1") else f"{base}/v1/jwks"
    return api_url.copy_with(path=path)


def resolve_jwks_url(value: str | httpx.URL, *, allow_insecure_http: bool) -> httpx.URL:
    """Check a public JWKS URL (such as ``https://<frontend-api>/.well-known/jwks.json``).

    Raises:
        ConfigurationError: not an absolute https URL (http only to loopback, or when allowed):
            keys fetched in clear text could be replaced on the way.
    """
    try:
        url = httpx.URL(str(value).strip())
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigurationError(f"jwks_url is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host or url.userinfo:
        raise ConfigurationError(
            "jwks_url must be an absolute https URL without credentials, such as "
            "'https://<your-frontend-api>/.well-known/jwks.json'."
        )
    if url.scheme == "http" and not is_loopback_host(url.host) and not allow_insecure_http:
        raise ConfigurationError(
            "jwks_url is plain http to a non-loopback host: anyone on the way could swap the "
            "signing keys. Use https, or pass allow_insecure_http=True if you really mean it."
        )
    return url


class JwtCrypto:
    """PyJWT's RS256 algorithm and key loaders.

    Raises:
        ConfigurationError: PyJWT or ``cryptography`` is not installed.
    """

    def __init__(self) -> None:
        try:
            from jwt import algorithms
        except ImportError as exc:
            raise ConfigurationError(
                f"Verifying JWT-format M2M tokens needs PyJWT with cryptography: {INSTALL_HINT}"
            ) from exc
        if not algorithms.has_crypto:
            raise ConfigurationError(
                "Verifying JWT-format M2M tokens needs the cryptography package (PyJWT's crypto "
                f"extra): {INSTALL_HINT}"
            )
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

        self._rsa = algorithms.RSAAlgorithm
        self._alg = algorithms.RSAAlgorithm(algorithms.RSAAlgorithm.SHA256)
        self._public_type = RSAPublicKey
        self._private_type = RSAPrivateKey

    def verify(self, token: JwtToken, key: Any) -> bool:
        """Whether ``key`` signed ``token`` (RS256, PKCS#1 v1.5 with SHA-256)."""
        return bool(self._alg.verify(token.signing_input, key, token.signature))

    def load_pem(self, text: str) -> Any:
        """Load an RSA public key from PEM.

        Raises:
            ConfigurationError: not a PEM RSA public key (the message never shows the key).
        """
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError, UnicodeEncodeError):
            hint = (
                " It looks like a private key: give the public one."
                if "PRIVATE KEY" in text
                else ""
            )
            raise ConfigurationError(
                "jwt_key is not a PEM public key. Copy the JWT public key (PEM) from the Clerk "
                f"dashboard (API keys > Show JWT public key), or set {ENV_JWT_KEY}.{hint}"
            ) from None
        if not isinstance(key, self._public_type):
            raise ConfigurationError(
                f"jwt_key is a {type(key).__name__}, but Clerk signs M2M JWTs with RSA (RS256)."
            )
        return key

    def keys_from_jwks(self, data: Any, *, status_code: int = 200) -> dict[str, Any]:
        """The RS256 signing keys of a JWKS document, by ``kid``.

        Keys for other algorithms or uses are skipped.

        Raises:
            MalformedResponseError: not a JWKS, or no usable RSA signing key in it.
        """
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise _malformed(status_code, "the JWKS response has no 'keys' array")
        keys: dict[str, Any] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") != "RSA":
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or entry.get("alg", "RS256") != "RS256":
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = self._rsa.from_jwk(entry)
            except Exception:  # PyJWT raises several kinds for a bad JWK
                _log.warning("m2m_agent.verify.jwk_skipped", kid=kid)
                continue
            if isinstance(key, self._private_type):
                key = key.public_key()
            keys[kid] = key
        if not keys:
            raise _malformed(status_code, "the JWKS has no RS256 signing key")
        return keys


_crypto: JwtCrypto | None = None


def load_crypto() -> JwtCrypto:
    """The process-wide :class:`JwtCrypto`, made on first use.

    Raises:
        ConfigurationError: PyJWT or ``cryptography`` is not installed.
    """
    global _crypto  # a lazily built, immutable singleton
    if _crypto is None:
        _crypto = JwtCrypto()
    return _crypto


def _malformed(status_code: int, what: str) -> MalformedResponseError:
    return MalformedResponseError(
        f"Malformed JWKS response: {what}.", status_code=status_code, code="malformed_response"
    )


def jwks_call(
    url: httpx.URL, key: Secret | None, *, timeout: httpx.Timeout, crypto: JwtCrypto
) -> ApiCall[dict[str, Any]]:
    """``GET`` the JWKS (with ``Bearer sk_...`` when ``key`` is given) and load its keys."""
    headers = {
        "Accept": "application/json",
        "Clerk-API-Version": CLERK_API_VERSION,
        "User-Agent": USER_AGENT,
    }
    if key is not None:
        headers["Authorization"] = f"Bearer {key.reveal()}"
    request = httpx.Request("GET", url, headers=headers, extensions={"timeout": timeout.as_dict()})

    def parse(response: ApiResponse) -> dict[str, Any]:
        if not 200 <= response.status_code < 300:
            raise error_from_response(response)
        try:
            data = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            raise _malformed(response.status_code, "the body is not JSON") from None
        return crypto.keys_from_jwks(data, status_code=response.status_code)

    return ApiCall("jwks", request, parse)
