"""Serving the emulator over TCP on loopback: uvicorn in a daemon thread."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

    import uvicorn

    from ._asgi import AsgiApp

__all__ = ["EmulatorServer"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(f"the emulator serves on loopback only; refusing host {host!r}")
    return str(address)


class EmulatorServer:
    """The emulator served over HTTP by uvicorn in a daemon thread, on a loopback address.

    Made and started by :meth:`Emulator.serve`; use it as a context manager (or call
    :meth:`stop`) to shut it down.

    Args:
        app: The ASGI application to serve.
        host: A loopback address (``127.0.0.1``, ``::1`` or ``localhost``).
        port: The TCP port; 0 picks a free one.

    Raises:
        ValueError: ``host`` is not a loopback address.
    """

    def __init__(self, app: AsgiApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self._host = _loopback(host)
        self._port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def host(self) -> str:
        """The loopback address served on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port served on (once started; before, the port asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8123`` (append ``/v1`` for the Python SDK)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def start(self) -> EmulatorServer:
        """Start serving and wait until connections are accepted.

        Returns:
            This server.

        Raises:
            OSError: The address could not be bound.
            RuntimeError: It was stopped already, or uvicorn did not start within 10 seconds.
        """
        if self._stopped:
            raise RuntimeError(
                "a stopped EmulatorServer cannot be restarted; call Emulator.serve() again"
            )
        if self._thread is not None:
            return self
        import uvicorn

        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            loop="asyncio",
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"m2m-emulator:{self._port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the emulator's server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the server thread to end (idempotent)."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(_STOP_TIMEOUT)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        self._stopped = True

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped" if self._stopped else "new"
        return f"<EmulatorServer {self.url} {state}>"
