"""A session record: a dict of JSON values with its server-issued id.

The store persists what the record serializes and knows nothing of its values' types: a value
that is an object (a `ChatPrompt`) is written as its ``to_record()`` and read back as that JSON
object; its owner turns it into the object again when it uses it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Protocol, runtime_checkable


def new_session_id() -> str:
    """A server-issued id with 256 bits of randomness."""
    return secrets.token_urlsafe(32)


@runtime_checkable
class Storable(Protocol):
    """A session value that is stored as the JSON object ``to_record()`` returns."""

    def to_record(self) -> dict[str, Any]: ...


class Session(dict):  # type: ignore[type-arg]
    """The data of one session: a plain dict with its id.

    >>> session = Session("id", {"theme": "dark"})
    >>> Session.from_json("id", session.to_json())["theme"]
    'dark'
    """

    def __init__(self, session_id: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self.id = session_id

    def to_json(self) -> str:
        def encode(value: Any) -> Any:
            if isinstance(value, Storable):
                return value.to_record()
            raise TypeError(f"session value of type {type(value).__name__} is not storable")

        return json.dumps(dict(self), default=encode, ensure_ascii=False)

    @classmethod
    def from_json(cls, session_id: str, text: str) -> Session:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a session record is a JSON object")
        return cls(session_id, data)
