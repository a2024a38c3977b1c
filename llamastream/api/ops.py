"""Operations endpoints: health for balancers and orchestrators, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.native import error_responses
from llamastream.chatstream import ChatStream

router = APIRouter()

_HEALTH = {
    "type": "object",
    "required": ["status", "model", "processing", "waiting", "max_processing", "max_waiting"],
    "properties": {
        "status": {"enum": ["ok", "loading", "draining"]},
        "model": {"type": ["string", "null"]},
        "processing": {"type": "integer", "minimum": 0},
        "waiting": {"type": "integer", "minimum": 0},
        "max_processing": {"type": "integer", "minimum": 1},
        "max_waiting": {"type": "integer", "minimum": 0},
    },
}


@router.get(
    "/health",
    responses={
        200: {"description": "Serving.", "content": {"application/json": {"schema": _HEALTH}}},
        503: {
            "description": "Loading or draining.",
            "content": {"application/json": {"schema": _HEALTH}},
            "headers": {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
        },
    },
)
async def health(request: Request) -> JSONResponse:
    """200 when serving; 503 while the model loads or the server drains; with slot figures."""
    chat_stream: ChatStream = request.app.state.chat_stream
    load = chat_stream.slots.load()
    serving = chat_stream.ready and not chat_stream.draining
    status = "ok" if serving else "draining" if chat_stream.draining else "loading"
    body = {
        "status": status,
        "model": chat_stream.pool.model_name if chat_stream.pool is not None else None,
        "processing": load.processing,
        "waiting": load.waiting,
        "max_processing": load.max_processing,
        "max_waiting": load.max_waiting,
    }
    headers = {"Cache-Control": "no-store"}
    if not serving:
        headers["Retry-After"] = "5"
    return JSONResponse(body, status_code=200 if serving else 503, headers=headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 403),
    },
    dependencies=[Depends(require("metrics"))],
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    chat_stream: ChatStream = request.app.state.chat_stream
    return Response(chat_stream.metrics.render(), media_type=CONTENT_TYPE_LATEST)
