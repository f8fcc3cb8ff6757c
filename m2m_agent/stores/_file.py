"""``FileStore``: one token file shared by the processes of one host (cron, CLI, workers)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path

import structlog

from m2m_agent import _forksafe
from m2m_agent.errors import ConfigurationError, StoreError
from m2m_agent.stores._base import StoredToken, TokenStore

__all__ = ["FileStore", "default_cache_path"]

_log = structlog.get_logger("m2m_agent")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/m2m-agent/tokens.json`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m2m-agent" / "tokens.json"


class FileStore(TokenStore):
    """Tokens in a JSON file readable by its owner only, shared by processes on one host.

    - Writes are atomic (a temporary file in the same folder, fsync, rename), mode 0600.
    - A file (or folder) that others can read or write, or that another user owns, is refused:
      it holds bearer tokens.
    - The mint lease is an exclusive ``flock`` on ``<path>.lock``: released by the kernel when
      the holder exits, so a killed minter never blocks the others.

    Args:
        path: The cache file; default :func:`default_cache_path`. Its folder is created (0700).

    Raises:
        ConfigurationError: the platform has no ``fcntl`` (Windows), or the file or its folder
            is unsafe.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise ConfigurationError("FileStore needs POSIX file locks (fcntl); use RedisStore.")
        self.path = Path(path) if path is not None else default_cache_path()
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._leases: dict[str, int] = {}
        self._mutex = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot create the token cache folder {self.path.parent}: "
                f"{exc.strerror or type(exc).__name__}. Choose another path."
            ) from None
        self._check_private(self.path.parent, folder=True)
        _forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        # A lease the parent held is the parent's: close our copy of the lock file so the
        # lock dies with the parent, and start with a mutex no parent thread can be holding.
        self._mutex = threading.Lock()
        leases, self._leases = self._leases, {}
        for fd in leases.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"<FileStore {str(self.path)!r}>"

    def _check_private(self, path: Path, *, folder: bool = False) -> None:
        try:
            info = path.stat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"Cannot stat {path}: {exc.strerror}.") from None
        if info.st_uid != os.getuid():
            raise ConfigurationError(
                f"{path} belongs to another user (uid {info.st_uid}); the token cache must be "
                "your own. Choose another path."
            )
        # A folder may be group/world *traversable* (the usual ~/.cache), never writable.
        loose = stat.S_IWGRP | stat.S_IWOTH if folder else 0o077
        if info.st_mode & loose:
            what = "writable by others" if folder else "readable or writable by others"
            raise ConfigurationError(
                f"{path} is {what} (mode {stat.S_IMODE(info.st_mode):o}); it holds bearer "
                f"tokens. Fix it with: chmod {'700' if folder else '600'} {path}"
            )

    def _read_all(self) -> dict[str, object]:
        self._check_private(self.path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"Cannot read {self.path}: {exc.strerror}.") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            _log.warning("m2m_agent.store.corrupted", path=str(self.path))
            return {}
        return data

    def load(self, key: str) -> StoredToken | None:
        """The token saved under ``key``; None if absent, or if the file is corrupted."""
        entry = self._read_all().get(key)
        if entry is None:
            return None
        try:
            return StoredToken.from_json(json.dumps(entry))
        except StoreError:
            _log.warning("m2m_agent.store.corrupted", path=str(self.path))
            return None

    def save(self, key: str, token: StoredToken) -> None:
        """Replace the token under ``key`` atomically (other keys are kept)."""
        with self._mutex:
            data = self._read_all()
            data[key] = json.loads(token.to_json())
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(data, file, separators=(",", ":"))
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, self.path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise StoreError(f"Cannot write {self.path}: {exc.strerror}.") from None

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the host-wide mint lease without waiting.

        ``ttl`` is moot here: the kernel frees a dead holder's lock at once.
        """
        assert fcntl is not None
        with self._mutex:
            if owner in self._leases:
                return True
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StoreError(f"Cannot open {self._lock_path}: {exc.strerror}.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._leases[owner] = fd
            return True

    def release(self, key: str, owner: str) -> None:
        """Drop the lease if ``owner`` holds it."""
        assert fcntl is not None
        with self._mutex:
            fd = self._leases.pop(owner, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)
