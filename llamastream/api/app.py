"""create_app: the complete server, built from one Settings object."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from llamastream import __version__
from llamastream.api import native, openai, ops
from llamastream.api.errors import error_response, openai_error_response
from llamastream.api.middleware import RequestContextMiddleware
from llamastream.chatstream import ChatStream
from llamastream.config import Settings
from llamastream.errors import LlamaStreamError
from llamastream.sessions.middleware import SessionMiddleware
from llamastream.sessions.store import open_store
from llamastream.streaming import Callback

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(
    settings: Settings | None = None, *, callback: Callback | None = None, **overrides: Any
) -> FastAPI:
    """The llamastream server app: native and OpenAI endpoints, sessions, health and metrics.

    ``callback(request, message)`` is called once after every accepted chat request.
    """
    chat_stream = ChatStream(settings, **overrides)
    settings = chat_stream.settings
    store = open_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with chat_stream.lifespan(app):
                yield
        finally:
            await store.close()

    app = FastAPI(title="llamastream", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.chat_stream = chat_stream
    app.state.chat_callback = callback
    app.state.session_store = store
    app.add_middleware(
        SessionMiddleware,
        store=store,
        cookie_name=settings.session_cookie,
        secure=settings.cookie_secure,
    )
    app.add_middleware(RequestContextMiddleware, metrics=chat_stream.metrics)

    @app.exception_handler(LlamaStreamError)
    async def domain_error(request: Request, exc: LlamaStreamError) -> Response:
        if request.url.path.startswith("/v1/"):
            return openai_error_response(exc)
        return error_response(exc)

    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(ops.router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
