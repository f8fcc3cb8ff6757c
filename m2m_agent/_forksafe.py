"""Fork hooks for the objects that hold locks, threads or connections.

One process-wide set of ``os.register_at_fork`` hooks serves managers, clients and stores. An
object registers itself and may define ``_before_fork``, ``_after_fork_in_parent`` and
``_after_fork_in_child``. Only the objects whose ``_before_fork`` ran get the parent hook, so an
object created by another thread while the fork is under way is never "released" without
having been "acquired".
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["register"]

_objects: weakref.WeakSet[Any] = weakref.WeakSet()
_registry_lock = threading.Lock()
_prepared: list[Any] = []
_installed = False


def register(obj: Any) -> None:
    """Call ``obj``'s fork hooks (those it defines) around every ``os.fork()``, while it lives."""
    global _installed
    with _registry_lock:
        _objects.add(obj)
        if _installed or not hasattr(os, "register_at_fork"):
            return
        _installed = True
    os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)


def _before() -> None:
    _registry_lock.acquire()
    _prepared.clear()
    for obj in list(_objects):
        hook = getattr(obj, "_before_fork", None)
        if hook is not None:
            hook()
        _prepared.append(obj)


def _in_parent() -> None:
    try:
        for obj in _prepared:
            hook = getattr(obj, "_after_fork_in_parent", None)
            if hook is not None:
                hook()
    finally:
        _prepared.clear()
        _registry_lock.release()


def _in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    prepared, _prepared[:] = list(_prepared), []
    for obj in prepared:
        hook = getattr(obj, "_after_fork_in_child", None)
        if hook is not None:
            hook()
