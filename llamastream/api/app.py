"""create_app: the complete server, built from one Settings object."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from llamastream import __version__
from llamastream.api import admin, native, openai, ops, tokens
from llamastream.api.anthropic import routes as anthropic
from llamastream.api.chatstream import ChatStream
from llamastream.api.errors import install_error_handlers
from llamastream.api.middleware import RequestContextMiddleware
from llamastream.api.ollama import routes as ollama
from llamastream.config import Settings
from llamastream.service import Service
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
    service = Service(Settings.merged(settings, **overrides), callback=callback)
    settings = service.settings
    store = open_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with service.lifespan(app):
                yield
        finally:
            await store.close()

    app = FastAPI(title="llamastream", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.chat_stream = ChatStream(service=service)
    app.state.session_store = store
    app.add_middleware(
        SessionMiddleware,
        store=store,
        cookie_name=settings.session_cookie,
        secure=settings.cookie_secure,
    )
    app.add_middleware(RequestContextMiddleware, metrics=service.metrics)
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(anthropic.router)  # before the /v1 catch-all of the OpenAI family
    app.include_router(openai.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(tokens.router)
    app.include_router(ollama.router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
