"""``M2MAuth``: an ``httpx.Auth`` that puts the manager's token on every request.

The flows only ask the manager for a token (a dictionary read when one is cached) and set a
header: no network I/O of their own. A 401 from the target invalidates that token and replays the
request once with a fresh one, when the body can be replayed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from m2m_agent._async_manager import AsyncTokenManager
from m2m_agent._config import is_loopback_host
from m2m_agent._sync_manager import TokenManager
from m2m_agent.errors import ConfigurationError

__all__ = ["M2MAuth"]


class AuthFlows:
    """The request/response logic of ``M2MAuth``, shared by the httpx and httpx2 classes."""

    def __init__(
        self,
        manager: TokenManager | AsyncTokenManager,
        *,
        allow_insecure_http: bool = False,
        retry_on_401: bool = True,
    ) -> None:
        if not isinstance(manager, (TokenManager, AsyncTokenManager)):
            raise ConfigurationError(
                "M2MAuth needs a TokenManager or an AsyncTokenManager, got "
                f"{type(manager).__name__}."
            )
        self.manager = manager
        self.allow_insecure_http = allow_insecure_http
        self.retry_on_401 = retry_on_401

    def __repr__(self) -> str:
        return f"<{type(self).__name__} manager={self.manager!r}>"

    def _check(self, request: Any) -> None:
        url = request.url
        if (
            url.scheme != "https"
            and not self.allow_insecure_http
            and not is_loopback_host(url.host)
        ):
            raise ConfigurationError(
                f"Refusing to send an M2M token over plain {url.scheme}:// to {url.host}: anyone "
                "on the path could reuse it. Use https, or M2MAuth(..., allow_insecure_http=True)."
            )

    def _replayable(self, request: Any) -> bool:
        """Whether a 401 to ``request`` may be answered by sending it again.

        Decided before the first send: a transport may read a streaming body into memory while
        sending it (``MockTransport`` does, a network transport does not), and the answer must
        not depend on that. Only a body the caller gave in memory (bytes, str, ``json=``,
        ``data=``; httpx and httpx2 keep it in ``request._content`` behind a ``ByteStream``) is
        replayed; a generator, file or multipart stream is not.
        """
        return hasattr(request, "_content") or type(request.stream).__name__ == "ByteStream"

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        """The flow for ``httpx.Client`` and ``httpx2.Client``: needs a :class:`TokenManager`."""
        manager = self.manager
        if not isinstance(manager, TokenManager):
            raise RuntimeError(
                "This M2MAuth wraps an AsyncTokenManager: use it with httpx.AsyncClient, or "
                "give a TokenManager for httpx.Client."
            )
        self._check(request)
        token = manager.get_token()
        request.headers["Authorization"] = f"Bearer {token}"
        replayable = self._replayable(request)
        response = yield request
        if response.status_code == 401 and self.retry_on_401:
            manager.invalidate(token)
            if replayable:
                fresh = manager.get_token()
                if fresh != token:
                    request.headers["Authorization"] = f"Bearer {fresh}"
                    yield request

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        """The flow for ``httpx.AsyncClient`` and ``httpx2.AsyncClient``: needs an async manager."""
        manager = self.manager
        if not isinstance(manager, AsyncTokenManager):
            raise RuntimeError(
                "This M2MAuth wraps a TokenManager: use it with httpx.Client, or give an "
                "AsyncTokenManager for httpx.AsyncClient."
            )
        self._check(request)
        token = await manager.get_token()
        request.headers["Authorization"] = f"Bearer {token}"
        replayable = self._replayable(request)
        response = yield request
        if response.status_code == 401 and self.retry_on_401:
            manager.invalidate(token)
            if replayable:
                fresh = await manager.get_token()
                if fresh != token:
                    request.headers["Authorization"] = f"Bearer {fresh}"
                    yield request


class M2MAuth(AuthFlows, httpx.Auth):
    """Authenticate httpx requests with the manager's M2M token.

    With a :class:`TokenManager` it serves ``httpx.Client``; with an :class:`AsyncTokenManager`,
    ``httpx.AsyncClient``; the wrong pairing raises ``RuntimeError``. Sets
    ``Authorization: Bearer <token>``. On a 401 it invalidates the token and replays the request
    once with a fresh one, if the body can be replayed and the manager has a different token
    (a token younger than ``RefreshPolicy.min_invalidate_age`` is kept: see there).

    Args:
        manager: The token manager to draw tokens from.
        allow_insecure_http: Permit plain ``http://`` to a non-loopback host (the token would
            travel in clear text).
        retry_on_401: Replay once on a 401 with a fresh token (default True).

    Example:
        ```python
        manager = TokenManager()
        with httpx.Client(auth=M2MAuth(manager)) as http:
            http.get("https://service.internal/api")
        ```
    """

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Not used: httpx calls the sync or async flow, which may wait for a mint."""
        raise RuntimeError("M2MAuth runs through sync_auth_flow or async_auth_flow.")
        yield request  # pragma: no cover - makes this a generator
