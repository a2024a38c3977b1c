"""An application written against ChatStream's own names: `start_queue_worker` at start-up,
`handle_starlette_request` for the endpoint, regenerate with an empty `user_input`."""

from __future__ import annotations

import warnings
from typing import Any

import httpx
from fastapi import FastAPI, Request

from llamastream import ChatStream, DiskSessionStore, SessionMiddleware


async def test_chatstreams_names_still_work(settings_kwargs: dict[str, Any]) -> None:
    chat_stream = ChatStream(**settings_kwargs)
    app = FastAPI()
    app.add_middleware(SessionMiddleware, store=DiskSessionStore(settings_kwargs["session_dir"]))

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        return await chat_stream.handle_starlette_request(request)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # FastAPI's on_event, as ChatStream's

        @app.on_event("startup")
        async def startup() -> None:
            await chat_stream.start_queue_worker()

        @app.on_event("shutdown")
        async def shutdown() -> None:
            await chat_stream.stop()

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/chat_stream", json={"user_input": "hello"})
            assert first.status_code == 200 and first.text
            again = await client.post("/chat_stream", json={"user_input": "", "regenerate": True})
            assert again.status_code == 200
            first_id = first.headers["x-chatstream-last-generated-message-id"]
            assert again.headers["x-chatstream-last-generated-message-id"] != first_id
    assert chat_stream.slots.load().processing == 0
