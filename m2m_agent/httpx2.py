"""``M2MAuth`` for httpx2, the maintained fork of httpx.

httpx2 clients accept only ``httpx2.Auth`` subclasses, so :class:`m2m_agent.M2MAuth` (an
``httpx.Auth``) cannot serve them. This module gives the same auth on the httpx2 base class::

    from m2m_agent.httpx2 import M2MAuth

It needs the ``httpx2`` extra (``pip install 'm2m-agent[httpx2]'``); nothing else in m2m-agent
imports it.
"""

from __future__ import annotations

from collections.abc import Generator

try:
    import httpx2
except ImportError as exc:
    raise ImportError(
        "m2m_agent.httpx2 needs httpx2, which is not installed: pip install 'm2m-agent[httpx2]'"
    ) from exc

from m2m_agent._auth import AuthFlows

__all__ = ["M2MAuth"]


class M2MAuth(AuthFlows, httpx2.Auth):
    """Authenticate httpx2 requests with the manager's M2M token.

    The httpx2 twin of :class:`m2m_agent.M2MAuth`, with the same behaviour. With a
    :class:`~m2m_agent.TokenManager` it serves ``httpx2.Client``; with an
    :class:`~m2m_agent.AsyncTokenManager`, ``httpx2.AsyncClient``; the wrong pairing raises
    ``RuntimeError``. Sets ``Authorization: Bearer <token>``, doing no network I/O of its own
    when a token is cached. On a 401 it invalidates the token and replays the request once with a
    fresh one, if the body can be replayed (held in memory, not streamed) and the manager has a
    different token (one younger than ``RefreshPolicy.min_invalidate_age`` is kept). Refuses plain
    ``http://`` to a non-loopback host unless ``allow_insecure_http=True``.

    Args:
        manager: The token manager to draw tokens from.
        allow_insecure_http: Permit plain ``http://`` to a non-loopback host (the token would
            travel in clear text).
        retry_on_401: Replay once on a 401 with a fresh token (default True).

    Raises:
        ConfigurationError: ``manager`` is not a token manager; or, when a request is sent, it
            goes over plain ``http://`` to a non-loopback host without ``allow_insecure_http``.

    Example:
        ```python
        from m2m_agent.httpx2 import M2MAuth

        manager = TokenManager()
        with httpx2.Client(auth=M2MAuth(manager)) as http:
            http.get("https://service.internal/api")
        ```
    """

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        """Not used: httpx2 calls the sync or async flow, which may wait for a mint."""
        raise RuntimeError("M2MAuth runs through sync_auth_flow or async_auth_flow.")
        yield request  # pragma: no cover - makes this a generator
