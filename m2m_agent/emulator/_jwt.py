"""JWT-format tokens: a lazily generated RSA key, RS256 signing, verification and the JWKS.

``cryptography`` and ``pyjwt`` are imported only when a JWT is first needed, so the emulator
serves opaque tokens without the ``jwt`` extra installed.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["M2M_CATEGORY", "RESERVED_CLAIMS", "Signer"]

#: The ``cat`` header of M2M JWTs.
M2M_CATEGORY = "cl_B7d4PD333AAA"
#: Payload names Clerk sets itself; custom claims never override them.
RESERVED_CLAIMS = frozenset({"iss", "sub", "jti", "iat", "nbf", "exp"})


def _b64uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Signer:
    """Signs and checks the emulator's M2M JWTs with one RSA key, made on first use.

    Args:
        kid: The key id: the instance id.
        issuer: The ``iss`` of every token.
    """

    def __init__(self, kid: str, issuer: str) -> None:
        self.kid = kid
        self.issuer = issuer
        self._key: RSAPrivateKey | None = None

    def _private_key(self) -> RSAPrivateKey:
        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric import rsa

            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._key

    def mint(
        self, *, subject: str, jti: str, now: float, lifetime: float, claims: Any
    ) -> tuple[str, int, int]:
        """Sign a new token.

        Args:
            subject: The minting machine's id (``sub``).
            jti: The token id.
            now: The creation time, seconds.
            lifetime: Seconds until expiry.
            claims: Custom claims; a JSON object's members are merged flat into the payload
                (reserved names excepted), anything else is left out.

        Returns:
            The JWT, its ``iat`` and its ``exp``.
        """
        import jwt

        iat = int(now)
        exp = int(now + lifetime)
        payload: dict[str, Any] = {}
        if isinstance(claims, dict):
            payload.update((k, v) for k, v in claims.items() if k not in RESERVED_CLAIMS)
        payload.update(iss=self.issuer, sub=subject, jti=jti, iat=iat, nbf=iat - 5, exp=exp)
        headers = {"kid": self.kid, "typ": "JWT", "cat": M2M_CATEGORY}
        token = jwt.encode(payload, self._private_key(), algorithm="RS256", headers=headers)
        return token, iat, exp

    def decode(self, token: str) -> dict[str, Any] | None:
        """Check a token's signature, ``kid`` and ``cat``, without checking times.

        Args:
            token: A JWT string.

        Returns:
            The payload, or ``None`` when the token is not one of this emulator's M2M JWTs.
        """
        if self._key is None:
            return None  # nothing was ever signed, so nothing can verify
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            if header.get("kid") != self.kid or header.get("cat", M2M_CATEGORY) != M2M_CATEGORY:
                return None
            payload: dict[str, Any] = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                },
            )
        except jwt.PyJWTError:
            return None
        sub, jti, exp = payload.get("sub"), payload.get("jti"), payload.get("exp")
        if not (isinstance(sub, str) and sub.startswith("mch_") and isinstance(jti, str)):
            return None
        if not isinstance(exp, (int, float)):
            return None
        return payload

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set: one RS256 signing key whose ``kid`` is the instance id."""
        numbers = self._private_key().public_key().public_numbers()
        key = {"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256"}
        key.update(n=_b64uint(numbers.n), e=_b64uint(numbers.e))
        return {"keys": [key]}

    def public_key_pem(self) -> str:
        """The public key in PEM (SubjectPublicKeyInfo), like the dashboard's ``CLERK_JWT_KEY``."""
        from cryptography.hazmat.primitives import serialization

        pem = (
            self._private_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return pem.decode("ascii")
