"""A minimal ASGI 3 adapter serving the emulator's handler (no framework needed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import httpx

if TYPE_CHECKING:
    from ._records import Outcome

__all__ = ["AsgiApp", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A dropped connection: announce more body than is ever sent, then return, so the server
# closes the connection mid-response and the client sees an incomplete message.
_DROP_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
}
_DROP_BODY = {"type": "http.response.body", "body": b'{"object":"machine_to_mac', "more_body": True}


class AsgiApp:
    """An ASGI 3 application answering HTTP requests from the emulator.

    Lifespan events are acknowledged; websocket connections are refused.

    Args:
        handle: The emulator's decision function, :meth:`Emulator.handle`.
    """

    def __init__(self, handle: Callable[[httpx.Request], Outcome]) -> None:
        self._handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif kind == "http":
            await self._http(scope, receive, send)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        outcome = self._handle(_request(scope, bytes(body)))
        if outcome.delay > 0:
            await anyio.sleep(outcome.delay)
        response = outcome.response
        if outcome.drop or response is None:
            await send(dict(_DROP_START))
            await send(dict(_DROP_BODY))
            return
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.multi_items()
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": response.content})


def _request(scope: Scope, body: bytes) -> httpx.Request:
    server = scope.get("server") or ("127.0.0.1", None)
    url = httpx.URL(
        scheme=scope.get("scheme", "http"),
        host=server[0],
        port=server[1],
        path=scope["path"],
        query=scope.get("query_string", b""),
    )
    headers = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    return httpx.Request(scope["method"], url, headers=headers, content=body)
