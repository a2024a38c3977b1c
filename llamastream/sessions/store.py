"""Session storage: the SessionStore protocol and DiskSessionStore (diskcache, TTL, size cap).

A session is a dict-like `Session`. Its values are stored as JSON; a `ChatPrompt` value is
stored as its messages (its template is attached again by `ChatStream` when it is used), so
records stay readable across code versions and restarts.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any, Protocol

import diskcache

from llamastream.chat.prompt import ChatPrompt

logger = logging.getLogger(__name__)

_PROMPT_TAG = "__chat_prompt__"


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
    """Where sessions live. ``load`` returns None for an unknown or expired id."""

    def load(self, session_id: str) -> Session | None: ...

    def save(self, session: Session) -> None: ...

    def delete(self, session_id: str) -> None: ...

    def close(self) -> None: ...


class DiskSessionStore:
    """Sessions in a diskcache directory; each record expires ``ttl_s`` after its last use.

    >>> import tempfile
    >>> store = DiskSessionStore(tempfile.mkdtemp())
    >>> session = Session(new_session_id(), {"theme": "dark"})
    >>> store.save(session)
    >>> store.load(session.id)["theme"]
    'dark'
    >>> store.close()
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        ttl_s: float = 7 * 24 * 3600.0,
        size_limit: int = 1 << 30,
    ) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self._cache = diskcache.Cache(
            str(self.directory), size_limit=size_limit, eviction_policy="least-recently-stored"
        )

    def load(self, session_id: str) -> Session | None:
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

    def save(self, session: Session) -> None:
        self._cache.set(_key(session.id), session.to_json(), expire=self.ttl_s)

    def delete(self, session_id: str) -> None:
        self._cache.delete(_key(session_id))

    def __len__(self) -> int:
        return sum(1 for key in self._cache.iterkeys() if str(key).startswith("session:"))

    def close(self) -> None:
        self._cache.close()


def _key(session_id: str) -> str:
    return f"session:{session_id}"
