"""Celery integration: one token manager per worker process, made after fork, closed at shutdown.

Call :func:`configure` once in the module that defines your Celery app, then use the accessors in
tasks::

    from celery import Celery

    import m2m_agent.celery as m2m
    from m2m_agent.stores import RedisStore

    app = Celery("reports", broker="redis://localhost:6379/0")
    m2m.configure(store=RedisStore("redis://localhost:6379/1"), lifetime=3600)


    @app.task
    def fetch_report(report_id: str) -> int:
        http = m2m.get_client(base_url="https://reports.internal")
        return http.get(f"/reports/{report_id}").status_code

How it works, per process:

- Each process that runs tasks gets its own :class:`~m2m_agent.TokenManager`, made on first use
  by :func:`get_manager` (so idle pool processes never mint). A prefork child never uses what its
  parent made: the state is dropped in the child right after the fork (``os.register_at_fork``,
  and again on Celery's ``worker_process_init``), without closing it, since the parent owns it.
- The solo and threads pools run tasks in the worker's main process: there, every task shares
  the one manager (it is thread-safe).
- At shutdown (``worker_process_shutdown`` in a prefork child, ``worker_shutdown`` in the main
  process, ``atexit`` in any other process) the clients are closed and the manager is closed,
  which revokes the process's own opaque token (with ``revoke_on_close``). A token kept in a
  shared store (:class:`~m2m_agent.stores.RedisStore`, :class:`~m2m_agent.stores.FileStore`) is
  never revoked there: other processes may still be using it.

With the default in-memory store, each pool process mints its own token (a prefork worker with
``--concurrency 8`` mints up to 8 per rotation). With a ``RedisStore`` shared by the fleet, the
whole fleet mints once per rotation.

Celery's worker signals are process-wide, not per app, so the configuration is per process too:
one machine identity serves every app in the process.

Needs the ``celery`` extra: ``pip install 'm2m-agent[celery]'``.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

import httpx
import structlog

from m2m_agent._auth import M2MAuth
from m2m_agent._sync_manager import TokenManager
from m2m_agent.errors import ConfigurationError

try:
    from celery import signals
except ImportError as exc:  # pragma: no cover - exercised in a test with celery hidden
    raise ImportError("m2m_agent.celery needs Celery: pip install 'm2m-agent[celery]'") from exc

__all__ = ["close", "configure", "get_auth", "get_client", "get_manager"]

_log = structlog.get_logger("m2m_agent")

_MANAGER_PARAMETERS = inspect.signature(TokenManager)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What :func:`configure` was given."""

    manager_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    factory: Callable[[], TokenManager] | None = None
    background_refresh: bool = True


@dataclasses.dataclass
class _ProcessState:
    """What one process made: its manager, its auth, its clients (with their arguments)."""

    pid: int
    manager: TokenManager | None = None
    auth: M2MAuth | None = None
    clients: list[tuple[dict[str, Any], httpx.Client]] = dataclasses.field(default_factory=list)


_settings = _Settings()
_state = _ProcessState(os.getpid())
_lock = threading.RLock()
_connected = False


def configure(
    *,
    factory: Callable[[], TokenManager] | None = None,
    background_refresh: bool = True,
    **manager_kwargs: Any,
) -> None:
    """Set how each worker process builds its token manager, and hook into the worker's life.

    Call it once at import time of your Celery app module (it is cheap: nothing is minted and
    nothing connects). Calling it again replaces the settings; this process's current manager
    and clients, if any, are closed and made afresh on next use.

    Without a call, :func:`get_manager` builds ``TokenManager()`` from the environment
    (``CLERK_MACHINE_SECRET_KEY``, ``CLERK_API_URL``).

    Args:
        factory: Builds the manager instead of ``TokenManager(**manager_kwargs)``; called once
            in each process that runs tasks. Use it for anything that must not cross a fork,
            such as your own ``ClerkM2MClient``: ``factory=lambda: TokenManager(client=...)``.
        background_refresh: Enter the manager when it is made, which starts its background
            refresher: tokens are renewed ahead of expiry even between tasks, so tasks never
            wait for a mint after the first one. With False, tokens are refreshed on demand.
        **manager_kwargs: Keyword arguments for :class:`~m2m_agent.TokenManager`: ``store``,
            ``lifetime``, ``machine_secret_key``, ``api_url``, ``claims``, ``token_format``,
            ``refresh``, ``revoke_on_close``. A store object is made here, once, and shared by
            the processes forked from this one (``RedisStore`` and ``FileStore`` are fine with
            that).

    Raises:
        ConfigurationError: both ``factory`` and manager arguments, or ``client=`` (an HTTP
            client must not be shared across forked processes: use ``factory``).
        TypeError: an argument ``TokenManager`` does not take.
    """
    global _settings
    if factory is not None and manager_kwargs:
        raise ConfigurationError(
            "Give either factory= or TokenManager keyword arguments to configure(), not both."
        )
    if factory is not None and not callable(factory):
        raise ConfigurationError("factory must be a callable returning a TokenManager.")
    if "client" in manager_kwargs:
        raise ConfigurationError(
            "configure(client=...) would share one HTTP connection pool between forked worker "
            "processes. Build it in each process instead: "
            "configure(factory=lambda: TokenManager(client=...))."
        )
    _MANAGER_PARAMETERS.bind(**manager_kwargs)  # TypeError names an unknown argument
    with _lock:
        _settings = _Settings(
            manager_kwargs=dict(manager_kwargs),
            factory=factory,
            background_refresh=bool(background_refresh),
        )
        _connect()
    close()


def get_manager() -> TokenManager:
    """This process's token manager, made on first use (after any fork).

    Returns:
        The same :class:`~m2m_agent.TokenManager` for every call in this process, until
        :func:`close` or :func:`configure`.

    Raises:
        ConfigurationError: the settings are wrong (no machine secret key, a bad URL...), or the
            factory returned something other than a ``TokenManager``.
    """
    state = _state
    manager = state.manager
    if manager is not None and state.pid == os.getpid():
        return manager
    with _lock:
        state = _this_process()
        if state.manager is None:
            state.manager = _build_manager()
        return state.manager


def get_auth() -> M2MAuth:
    """An :class:`~m2m_agent.M2MAuth` over this process's manager, for your own httpx clients.

    Returns:
        The same auth object for every call in this process.

    Raises:
        ConfigurationError: as :func:`get_manager`.
    """
    with _lock:
        state = _this_process()
        if state.auth is None:
            state.auth = M2MAuth(get_manager())
        return state.auth


def get_client(**httpx_kwargs: Any) -> httpx.Client:
    """A ready ``httpx.Client`` whose requests carry this process's M2M token.

    One client per distinct set of arguments per process, reused by every task (and thread) in
    it, and closed at worker shutdown or by :func:`close`. Call it with the same arguments each
    time, e.g. ``get_client(base_url="https://reports.internal", timeout=10)``; two services get
    two clients.

    Args:
        **httpx_kwargs: Keyword arguments for ``httpx.Client`` (``base_url``, ``timeout``,
            ``headers``, ``transport``...), except ``auth``, which is :func:`get_auth`.

    Returns:
        The client.

    Raises:
        TypeError: ``auth`` was given.
        ConfigurationError: as :func:`get_manager`.
    """
    if "auth" in httpx_kwargs:
        raise TypeError(
            "get_client() sets auth itself; for another auth, build httpx.Client yourself."
        )
    with _lock:
        state = _this_process()
        for kwargs, client in state.clients:
            if kwargs == httpx_kwargs and not client.is_closed:
                return client
        client = httpx.Client(auth=get_auth(), **httpx_kwargs)
        state.clients = [(k, c) for k, c in state.clients if not c.is_closed]
        state.clients.append((dict(httpx_kwargs), client))
        return client


def close() -> None:
    """Close this process's clients and token manager (idempotent).

    Closing the manager stops its refresher and revokes the token this process alone owns (with
    ``revoke_on_close``, the default); a token in a shared store is left to expire. Called for
    you at worker shutdown and at interpreter exit; the next :func:`get_manager` makes a new
    manager.
    """
    global _state
    with _lock:
        state = _this_process()
        _state = _ProcessState(os.getpid())
    for _, client in state.clients:
        client.close()
    if state.manager is not None:
        state.manager.close()
        _log.info("m2m_agent.celery.manager_closed", pid=state.pid)


# -- internals ---------------------------------------------------------------------------------


def _this_process() -> _ProcessState:
    """This process's state; what a parent made before a fork is forgotten (call with the lock).

    Inherited objects are dropped, not closed: they belong to the parent, which still uses
    them (closing an inherited HTTP/2 connection would even say goodbye on the parent's behalf).
    """
    global _state
    if _state.pid != os.getpid():
        _state = _ProcessState(os.getpid())
    return _state


def _build_manager() -> TokenManager:
    settings = _settings
    _connect()
    if settings.factory is not None:
        manager = settings.factory()
        if not isinstance(manager, TokenManager):
            raise ConfigurationError(
                f"The configure(factory=...) callable returned {type(manager).__name__}, "
                "not a TokenManager."
            )
    else:
        manager = TokenManager(**settings.manager_kwargs)
    if settings.background_refresh:
        manager.__enter__()
    _log.info("m2m_agent.celery.manager_created", pid=os.getpid(), store=repr(manager.store))
    return manager


def _after_fork_in_child() -> None:
    # Only the forking thread exists here: whoever held the lock in the parent is gone.
    global _lock, _state
    _lock = threading.RLock()
    _state = _ProcessState(os.getpid())


def _on_worker_process_init(**_: Any) -> None:
    """A pool process starts (prefork child; solo: the main process): forget inherited state."""
    with _lock:
        _this_process()


def _on_shutdown(**_: Any) -> None:
    """A pool process or the worker stops: close what this process made."""
    try:
        close()
    except Exception as exc:  # a shutdown hook must not break the worker's own shutdown
        _log.warning("m2m_agent.celery.close_failed", error=f"{type(exc).__name__}: {exc}")


def _connect() -> None:
    """Connect the worker signals and the exit hook, once per interpreter (call with the lock)."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.worker_process_init.connect(
        _on_worker_process_init, weak=False, dispatch_uid="m2m_agent.celery.process_init"
    )
    signals.worker_process_shutdown.connect(
        _on_shutdown, weak=False, dispatch_uid="m2m_agent.celery.process_shutdown"
    )
    signals.worker_shutdown.connect(
        _on_shutdown, weak=False, dispatch_uid="m2m_agent.celery.worker_shutdown"
    )
    atexit.register(_on_shutdown)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
