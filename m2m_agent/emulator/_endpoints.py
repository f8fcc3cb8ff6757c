"""The four M2M endpoints: create, verify, revoke and list, on an authenticated caller.

Each method takes the caller (a machine, or ``None`` for the instance key), returns the success
response, and raises :class:`ApiError` for every error answer. The caller holds the state lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._ids import JWT_PATTERN, TOKEN_ID_PATTERN, new_token_id
from ._params import ApiError, parse_create, parse_list, parse_revoke, parse_verify
from ._state import JwtMeta
from ._wire import json_response, millis, opaque_token_object, token_object

if TYPE_CHECKING:
    import httpx

    from ._jwt import Signer
    from ._records import Machine
    from ._state import State

__all__ = ["Endpoints"]


def _not_found(what: str) -> ApiError:
    return ApiError(404, "resource_not_found", "Resource not found", f"{what} not found")


class Endpoints:
    """The endpoint logic over the state and the JWT signer.

    Args:
        state: Machines, tokens and counters.
        signer: Signs and checks JWT-format tokens.
    """

    def __init__(self, state: State, signer: Signer) -> None:
        self._state = state
        self._signer = signer

    def create_token(self, machine: Machine, body: bytes, now: float) -> httpx.Response:
        """``POST /m2m_tokens``: mint (or, with ``min_remaining_ttl_seconds``, reuse) a token."""
        params = parse_create(body)
        lifetime = params.seconds_until_expiration or float(machine.default_token_ttl)
        if params.token_format == "jwt":
            return self._create_jwt(machine, params.claims, lifetime, now)
        min_remaining = params.min_remaining_ttl_seconds
        if min_remaining is not None:
            if min_remaining >= lifetime:
                raise ApiError(
                    400,
                    "form_param_value_invalid",
                    "is invalid",
                    f"min_remaining_ttl_seconds must be below the token lifetime ({lifetime:g} s).",
                    {"param_name": "min_remaining_ttl_seconds"},
                )
            reused = self._state.find_reusable(machine, params.claims, min_remaining)
            if reused is not None:
                self._state.count("reused")
                return json_response(201, opaque_token_object(reused, now, include_token=True))
        record = self._state.mint_opaque(machine, lifetime, params.claims)
        return json_response(201, opaque_token_object(record, now, include_token=True))

    def _create_jwt(
        self, machine: Machine, claims: Any, lifetime: float, now: float
    ) -> httpx.Response:
        jti = new_token_id()
        token, _, exp = self._signer.mint(
            subject=machine.id, jti=jti, now=now, lifetime=lifetime, claims=claims
        )
        self._state.remember_jwt(jti, JwtMeta(machine.id, machine.scoped_machines, claims, now))
        created = millis(now)
        body = token_object(
            id=jti,
            subject=machine.id,
            claims=claims,
            scopes=machine.scoped_machines,
            revoked=False,
            revocation_reason=None,
            expired=False,
            expiration=exp * 1000,
            last_used_at=None,
            created_at=created,
            updated_at=created,
            token=token,
        )
        return json_response(201, body)

    def verify_token(self, caller: Machine | None, body: bytes, now: float) -> httpx.Response:
        """``POST /m2m_tokens/verify``: 404 unless the token is live and granted to the caller."""
        token = parse_verify(body)
        if JWT_PATTERN.match(token):
            return self._verify_jwt(caller, token, now)
        record = self._state.token_by_secret(token)
        if record is None or record.revoked or record.is_expired(now):
            raise _not_found("M2M token")
        if caller is not None and caller.id not in record.scopes:
            raise _not_found("M2M token")
        return json_response(200, opaque_token_object(self._state.touch(record.id), now))

    def _verify_jwt(self, caller: Machine | None, token: str, now: float) -> httpx.Response:
        payload = self._signer.decode(token)
        if payload is None or now >= payload["exp"]:
            raise _not_found("M2M token")
        meta = self._state.jwt_meta(payload["jti"])
        scopes = meta.scopes if meta is not None else ()
        if caller is not None and caller.id not in scopes:
            raise _not_found("M2M token")
        created = millis(meta.created_at) if meta is not None else int(payload.get("iat", 0)) * 1000
        body = token_object(
            id=payload["jti"],
            subject=payload["sub"],
            claims=meta.claims if meta is not None else None,
            scopes=scopes,
            revoked=False,
            revocation_reason=None,
            expired=False,
            expiration=int(payload["exp"]) * 1000,
            last_used_at=None,
            created_at=created,
            updated_at=created,
        )
        return json_response(200, body)

    def revoke_token(
        self, caller: Machine | None, token_id: str, body: bytes, now: float
    ) -> httpx.Response:
        """``POST /m2m_tokens/{id}/revoke``: a machine may revoke only its own tokens."""
        if not TOKEN_ID_PATTERN.match(token_id):
            raise ApiError(
                400,
                "form_param_format_invalid",
                "is invalid",
                "m2m_token_id must match ^mt_[0-9A-Fa-f]{32}$.",
                {"param_name": "m2m_token_id"},
            )
        reason = parse_revoke(body)
        record = self._state.token(token_id)
        if record is None or (caller is not None and record.subject != caller.id):
            raise _not_found("M2M token")
        return json_response(200, opaque_token_object(self._state.revoke(token_id, reason), now))

    def list_tokens(
        self, caller: Machine | None, request: httpx.Request, now: float
    ) -> httpx.Response:
        """``GET /m2m_tokens``: a page of the subject's stored tokens, newest first."""
        params = parse_list(request.url.params)
        known = self._state.has_machine(params.subject)
        if caller is not None and params.subject != caller.id and known:
            raise ApiError(
                403,
                "authorization_invalid",
                "Unauthorized request",
                "A Machine Secret Key can only list the tokens of its own machine.",
            )
        if not known:
            raise _not_found("Machine")
        records = self._state.list_tokens(
            params.subject, revoked=params.revoked, expired=params.expired
        )
        page = records[params.offset : params.offset + params.limit]
        items = [opaque_token_object(record, now) for record in page]
        return json_response(200, {"m2m_tokens": items, "total_count": len(records)})
