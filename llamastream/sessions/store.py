"""The SessionStore protocol, and `open_store`: the store Settings ask for."""

from __future__ import annotations

from typing import Any, Protocol

from llamastream.config import Settings
from llamastream.sessions.disk_store import DiskSessionStore
from llamastream.sessions.record import Session
from llamastream.sessions.redis_store import RedisSessionStore


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


def open_store(settings: Settings) -> SessionStore:
    """The session store Settings ask for (`session_backend`)."""
    limits: dict[str, Any] = {
        "ttl_s": settings.session_ttl_s,
        "max_count": settings.session_max_count,
        "max_bytes": settings.session_max_bytes,
        "lock_ttl_s": settings.session_lock_ttl_s,
    }
    if settings.session_backend == "redis":
        return RedisSessionStore(settings.redis_url, **limits)
    return DiskSessionStore(settings.session_dir, **limits)
