"""SessionMiddleware: the session cookie ↔ ``request.state.session``.

Ids are issued by the server only: a cookie naming no stored session gets a fresh id, so a
client can neither choose nor guess its way into another session.
"""

from __future__ import annotations

import threading
from http.cookies import SimpleCookie

import anyio.to_thread
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamastream.sessions.store import Session, SessionStore, new_session_id


class SessionManager:
    """What ``request.state.session`` holds: the request's session and how to save it."""

    def __init__(self, store: SessionStore, session: Session, *, is_new: bool) -> None:
        self.store = store
        self.session = session
        self.is_new = is_new
        self._lock = threading.Lock()

    @property
    def session_id(self) -> str:
        return self.session.id

    def get_session(self) -> Session:
        return self.session

    def save_session(self) -> None:
        """Write the session to the store (blocking: call it from a thread in async code)."""
        with self._lock:
            self.store.save(self.session)

    def clear_session(self) -> None:
        self.session.clear()
        self.save_session()


class SessionMiddleware:
    """Loads the session named by the cookie before the app runs, and (re)sets the cookie."""

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore,
        *,
        cookie_name: str = "llamastream_session",
        max_age: int | None = None,
        secure: bool = False,
    ) -> None:
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.max_age = max_age if max_age is not None else int(getattr(store, "ttl_s", 0)) or None
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        requested = HTTPConnection(scope).cookies.get(self.cookie_name)
        session = await anyio.to_thread.run_sync(self.store.load, requested) if requested else None
        manager = SessionManager(
            self.store, session or Session(new_session_id()), is_new=session is None
        )
        scope.setdefault("state", {})["session"] = manager

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", self._cookie(manager))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _cookie(self, manager: SessionManager) -> str:
        cookie: SimpleCookie = SimpleCookie()
        cookie[self.cookie_name] = manager.session_id
        morsel = cookie[self.cookie_name]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"
        if self.max_age:
            morsel["max-age"] = self.max_age
        if self.secure:
            morsel["secure"] = True
        return morsel.OutputString()
