"""DiskSessionStore: sessions in a diskcache directory, for one server."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import diskcache

from llamastream.errors import SessionBusyError, SessionStoreError
from llamastream.sessions.record import Session

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DiskSessionStore:
    """Sessions in a diskcache directory (SQLite: a record is written whole or not at all).

    >>> import asyncio, tempfile
    >>> store = DiskSessionStore(tempfile.mkdtemp())
    >>> from llamastream.sessions.record import Session, new_session_id
    >>> session = Session(new_session_id(), {"theme": "dark"})
    >>> asyncio.run(store.save(session))
    >>> asyncio.run(store.load(session.id))["theme"]
    'dark'
    >>> asyncio.run(store.close())
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        ttl_s: float = 7 * 24 * 3600.0,
        max_count: int = 100_000,
        max_bytes: int = 1 << 30,
        lock_ttl_s: float = 10.0,
    ) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.lock_ttl_s = lock_ttl_s
        self.max_count = max_count
        self.max_bytes = max_bytes
        # Records in one cache, locks in another, so that the oldest record is the first row.
        # diskcache's own culling is off: it removes ten rows at a time, the one just written
        # among them; `_save` evicts oldest-first and never the record it wrote.
        self._cache = diskcache.Cache(
            str(self.directory), size_limit=max_bytes, cull_limit=0, eviction_policy="none"
        )
        self._locks = diskcache.Cache(str(self.directory / "locks"))

    async def load(self, session_id: str) -> Session | None:
        return await _blocking(self._load, session_id)

    async def save(self, session: Session) -> None:
        await _blocking(self._save, session.id, session.to_json())

    async def delete(self, session_id: str) -> None:
        await _blocking(self._cache.delete, _key(session_id))

    async def lock(self, session_id: str) -> str:
        # The holder's pid in the token: a lock left by a process that died (kill -9) on this
        # machine is taken over at once instead of blocking the session until it expires.
        token = f"{_HOST}:{os.getpid()}:{secrets.token_hex(16)}"
        if not await _blocking(self._lock, session_id, token):
            raise SessionBusyError("another request of this session is still running")
        return token

    async def renew(self, session_id: str, token: str) -> bool:
        return await _blocking(self._renew, session_id, token)

    async def unlock(self, session_id: str, token: str) -> None:
        await _blocking(self._unlock, session_id, token)

    async def count(self) -> int:
        return await _blocking(len, self._cache)

    async def close(self) -> None:
        self._cache.close()
        self._locks.close()

    def _load(self, session_id: str) -> Session | None:
        text = self._cache.get(_key(session_id))
        if text is None:
            return None
        try:
            session = Session.from_json(session_id, text)
        except (ValueError, TypeError, KeyError):
            logger.warning("session %s has an unreadable record; starting afresh", session_id[:8])
            return None
        self._cache.touch(_key(session_id), expire=self.ttl_s)
        return session

    def _save(self, session_id: str, text: str) -> None:
        key = _key(session_id)
        with self._cache.transact():
            # Re-inserted, not updated: the row moves to the end, so the first row is always
            # the least recently saved session.
            self._cache.delete(key)
            self._cache.set(key, text, expire=self.ttl_s)
        while len(self._cache) > self.max_count or (
            len(self._cache) > 1 and self._cache.volume() > self.max_bytes
        ):
            # Peek and delete in one transaction: a session saved again in between (it moves
            # to the end) must not be the one deleted.
            with self._cache.transact():
                oldest, _ = self._cache.peekitem(last=False)
                if oldest == key:
                    break
                self._cache.delete(oldest)
            logger.info("session store cap reached: evicted the least recently saved")

    def _lock(self, session_id: str, token: str) -> bool:
        key = _key(session_id)
        with self._locks.transact():
            if self._locks.add(key, token, self.lock_ttl_s):
                return True
            host, _, rest = str(self._locks.get(key, "")).partition(":")
            if host != _HOST or _alive(rest.partition(":")[0]):
                return False  # only a dead process of this machine (and pid namespace) yields
            logger.warning("session %s: taking over the lock of a dead process", session_id[:8])
            return bool(self._locks.set(key, token, self.lock_ttl_s))

    def _renew(self, session_id: str, token: str) -> bool:
        with self._locks.transact():
            if self._locks.get(_key(session_id)) != token:
                return False
            return bool(self._locks.touch(_key(session_id), expire=self.lock_ttl_s))

    def _unlock(self, session_id: str, token: str) -> None:
        with self._locks.transact():
            if self._locks.get(_key(session_id)) == token:
                self._locks.delete(_key(session_id))


async def _blocking(func: Callable[..., T], *args: Any) -> T:
    """Run a diskcache call in a thread; storage failures become `SessionStoreError`."""
    try:
        return await anyio.to_thread.run_sync(func, *args)
    except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
        logger.error("the session store failed: %s", exc)
        raise SessionStoreError(f"the session store is unavailable: {exc}") from exc


def _host_id() -> str:
    """This machine and pid namespace: pids are only comparable within one."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}".replace(":", "_")


_HOST = _host_id()


def _alive(pid_text: str) -> bool:
    """Whether the process of that pid lives (unknown pids count as alive: no takeover)."""
    if not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _key(session_id: str) -> str:
    return f"session:{session_id}"
