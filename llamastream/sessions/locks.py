"""TurnLocks: the session turn locks this server holds, renewed while their turns run."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from llamastream.errors import LlamaStreamError
from llamastream.sessions.middleware import SessionManager
from llamastream.sessions.store import SessionStore

logger = logging.getLogger(__name__)

RENEW_TICK_S = 0.25  # how often held turn locks are checked for renewal


@dataclasses.dataclass
class _HeldLock:
    store: SessionStore
    token: str
    renewed_at: float = dataclasses.field(default_factory=time.monotonic)


class TurnLocks:
    """Takes and releases sessions' turn locks, and keeps the held ones from expiring.

    A request without a session (no `SessionMiddleware`) is a conversation of its own and
    takes no lock: every method accepts ``manager=None`` and does nothing for it.
    """

    def __init__(self) -> None:
        self._held: dict[str, _HeldLock] = {}
        self._renewer: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_all())

    def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def lock(self, manager: SessionManager | None) -> str | None:
        """Take the session's turn lock (409 when held) and read its latest record.

        Reading again under the lock means a turn always extends the latest history, even
        when the previous turn ran on another replica after this request's session was loaded.
        """
        if manager is None:
            return None
        token = await manager.store.lock(manager.session_id)
        self._held[manager.session_id] = _HeldLock(manager.store, token)
        try:
            await manager.reload()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.unlock(manager, token)
            raise
        return token

    async def unlock(self, manager: SessionManager | None, token: str | None) -> None:
        if manager is None or token is None:
            return
        held = self._held.get(manager.session_id)
        if held is not None and held.token == token:
            del self._held[manager.session_id]
        try:
            await manager.store.unlock(manager.session_id, token)
        except LlamaStreamError:
            logger.warning("session %s: the lock expires by itself", manager.session_id[:8])

    @asynccontextmanager
    async def locked(self, manager: SessionManager | None) -> AsyncIterator[None]:
        token = await self.lock(manager)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.unlock(manager, token)

    async def _renew_all(self) -> None:
        """Renew each held lock every third of its expiry, all at once (a slow store must
        not make the last of them late)."""
        while True:
            await asyncio.sleep(RENEW_TICK_S)
            now = time.monotonic()
            due = [
                (session_id, held)
                for session_id, held in list(self._held.items())
                if now - held.renewed_at >= held.store.lock_ttl_s / 3
            ]
            await asyncio.gather(*(self._renew(session_id, held) for session_id, held in due))

    async def _renew(self, session_id: str, held: _HeldLock) -> None:
        try:
            renewed = await held.store.renew(session_id, held.token)
        except Exception:
            logger.warning("session %s: could not renew its turn lock", session_id[:8])
            return
        held.renewed_at = time.monotonic()
        if not renewed and self._held.get(session_id) is held:
            logger.warning("session %s: its turn lock was lost", session_id[:8])
