"""Operations endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the model is loaded and serving, 503 otherwise; with the slot figures."""
    chat_stream = request.app.state.chat_stream
    load = chat_stream.slots.load()
    body = {
        "status": "ok" if chat_stream.ready else "unavailable",
        "model": chat_stream.pool.model_name if chat_stream.ready else None,
        "processing": load.processing,
        "waiting": load.waiting,
        "max_processing": load.max_processing,
        "max_waiting": load.max_waiting,
    }
    return JSONResponse(body, status_code=200 if chat_stream.ready else 503)
