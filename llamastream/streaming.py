"""Thread → event-loop bridge, and a streaming response that watches for the client leaving.

The wire format (plain text chunks here) is the caller's; this module only runs the body
producer and a disconnect watcher side by side: the first to finish cancels the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

T = TypeVar("T")


class EventBridge(Generic[T]):
    """``put()`` from any thread; ``await get()`` on the loop that created the bridge."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> T:
        return await self._queue.get()


class WatchedStreamResponse(Response):
    """Runs ``producer(send)`` while listening for ``http.disconnect``.

    The producer sends the response itself (it may choose its status late, after queueing).
    If the client leaves before the last body message is sent, the producer is cancelled and
    ``disconnected`` is True;
    ``on_close()`` always runs afterwards, shielded, whatever happened. The producer handles
    its own errors; whatever ``on_close`` raises ends the response (and the connection).
    """

    def __init__(
        self,
        producer: Callable[[Send], Awaitable[None]],
        on_close: Callable[[WatchedStreamResponse], Awaitable[None]],
    ) -> None:
        self.producer = producer
        self.on_close = on_close
        self.disconnected = False
        self.completed = False
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    # Servers also report a disconnect once the response is complete.
                    self.disconnected = not self.completed
                    tg.cancel_scope.cancel()

                async def tracked_send(message: Message) -> None:
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        self.completed = True
                    await send(message)

                tg.start_soon(watch)
                await self.producer(tracked_send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close(self)
