"""In-process API tests: the real app and engine on the tiny GGUF, reached through httpx's ASGI
transport (no socket, no uvicorn)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from llamastream import create_app

Client = Callable[..., contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI]]]


@pytest.fixture
def api(settings_kwargs: dict[str, Any]) -> Client:
    """``async with api(**settings) as (client, app)``: the app, started unless ``start=False``.

    Afterwards, no slot is busy and nothing waits.
    """

    @contextlib.asynccontextmanager
    async def open_client(
        start: bool = True, **changes: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
        app = create_app(**{**settings_kwargs, **changes})
        transport = httpx.ASGITransport(app=app)
        async with contextlib.AsyncExitStack() as stack:
            if start:
                await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)
            )
            yield client, app
            load = app.state.service.slots.load()
            assert (load.processing, load.waiting) == (0, 0)

    return open_client
