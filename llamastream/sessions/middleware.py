"""SessionMiddleware: the session cookie ↔ ``request.state.session``.

Ids are issued by the server only: a cookie naming no stored session gets a fresh id, so a
client can neither choose nor guess its way into another session.
"""

from __future__ import annotations

from http.cookies import SimpleCookie

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamastream.errors import SessionStoreError
from llamastream.sessions.record import Session, new_session_id
from llamastream.sessions.store import SessionStore

MAX_ID_LENGTH = 128  # server ids are 43 characters; anything far longer is not worth a lookup


class SessionManager:
    """What ``request.state.session`` holds: the request's session and how to save it."""

    def __init__(self, store: SessionStore, session: Session, *, loaded: bool = True) -> None:
        self.store = store
        self.session = session
        self.loaded = loaded  # False when the store failed to read it: use `reload` first

    @property
    def session_id(self) -> str:
        return self.session.id

    def get_session(self) -> Session:
        return self.session

    async def save_session(self) -> None:
        """Write the session to the store; `SessionStoreError` when it cannot."""
        await self.store.save(self.session)

    async def reload(self) -> Session:
        """Read the stored record again (another request or replica may have changed it)."""
        stored = await self.store.load(self.session.id)
        if stored is None and not self.loaded:
            # The id came from a cookie the store could not check: it names no session, so
            # it is not taken as one (ids are the server's to issue).
            raise SessionStoreError("the session store was unavailable; please retry")
        if stored is not None:
            self.session.clear()
            self.session.update(stored)
        self.loaded = True
        return self.session


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
        if requested and len(requested) > MAX_ID_LENGTH:
            requested = None
        manager = await self._manager(requested)
        scope.setdefault("state", {})["session"] = manager

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", self._cookie(manager))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _manager(self, requested: str | None) -> SessionManager:
        if not requested:
            return SessionManager(self.store, Session(new_session_id()))
        try:
            session = await self.store.load(requested)
        except SessionStoreError:
            # Keep the id (the record may well exist): the routes that need the session
            # reload it and answer 503 while the store stays unavailable.
            return SessionManager(self.store, Session(requested), loaded=False)
        if session is None:
            return SessionManager(self.store, Session(new_session_id()))
        return SessionManager(self.store, session)

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
