"""The typed accessors every route uses to reach the core (built by `create_app`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from llamastream.service import Service

if TYPE_CHECKING:
    from llamastream.api.chatstream import ChatStream


def service_of(conn: HTTPConnection) -> Service:
    """The app's `Service`."""
    service = conn.app.state.service
    assert isinstance(service, Service)
    return service


def chat_stream_of(conn: HTTPConnection) -> ChatStream:
    """The app's `ChatStream`, the session-chat facade over its `Service`."""
    return conn.app.state.chat_stream  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(service_of)]
