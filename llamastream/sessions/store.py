"""Session storage: the SessionStore protocol and DiskSessionStore (diskcache).

A session is a dict-like `Session`. Its values are stored as JSON; a `ChatPrompt` value is
stored as its messages (its template is attached again by `ChatStream` when it is used), so
records stay readable across code versions and restarts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio.to_thread
import diskcache

from llamastream.chat.prompt import ChatPrompt
from llamastream.config import Settings
from llamastream.errors import SessionBusyError, SessionStoreError

logger = logging.getLogger(__name__)

_PROMPT_TAG = "__chat_prompt__"

T = TypeVar("T")


def new_session_id() -> str:
    """A server-issued id with 256 bits of randomness."""
    return secrets.token_urlsafe(32)


class Session(dict):  # type: ignore[type-arg]
    """The data of one session: a plain dict with its id."""

    def __init__(self, session_id: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self.id = session_id

    def to_json(self) -> str:
        def encode(value: Any) -> Any:
            if isinstance(value, ChatPrompt):
                return {_PROMPT_TAG: value.to_dict()}
            raise TypeError(f"session value of type {type(value).__name__} is not storable")

        return json.dumps(dict(self), default=encode, ensure_ascii=False)

    @classmethod
    def from_json(cls, session_id: str, text: str) -> Session:
        def decode(obj: dict[str, Any]) -> Any:
            if set(obj) == {_PROMPT_TAG}:
                return ChatPrompt.from_dict(obj[_PROMPT_TAG])
            return obj

        return cls(session_id, json.loads(text, object_hook=decode))


class SessionStore(Protocol):
    """Where sessions live; every implementation keeps the same semantics.

    - ``load`` returns None for an unknown or expired id; a read refreshes the TTL.
    - ``save`` writes the whole record (last writer wins: callers serialize turns with
      ``lock``) and raises `SessionStoreError` when it cannot, never losing silently.
    - ``lock`` takes the session's turn lock without waiting, returning a token, or raises
      `SessionBusyError`. The lock expires ``lock_ttl_s`` after it was taken or last
      ``renew``-ed, so a dead holder cannot keep a session locked for good.
    - Past ``max_count`` sessions or ``max_bytes`` of records, the least recently saved go.
    """

    ttl_s: float
    lock_ttl_s: float

    async def load(self, session_id: str) -> Session | None: ...

    async def save(self, session: Session) -> None: ...

    async def delete(self, session_id: str) -> None: ...

    async def lock(self, session_id: str) -> str: ...

    async def renew(self, session_id: str, token: str) -> bool: ...

    async def unlock(self, session_id: str, token: str) -> None: ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


class DiskSessionStore:
    """Sessions in a diskcache directory (SQLite: a record is written whole or not at all).

    >>> import asyncio, tempfile
    >>> store = DiskSessionStore(tempfile.mkdtemp())
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


def open_store(settings: Settings) -> SessionStore:
    """The session store Settings ask for (`session_backend`)."""
    limits: dict[str, Any] = {
        "ttl_s": settings.session_ttl_s,
        "max_count": settings.session_max_count,
        "max_bytes": settings.session_max_bytes,
        "lock_ttl_s": settings.session_lock_ttl_s,
    }
    if settings.session_backend == "redis":
        from llamastream.sessions.redis_store import RedisSessionStore

        return RedisSessionStore(settings.redis_url, **limits)
    return DiskSessionStore(settings.session_dir, **limits)
