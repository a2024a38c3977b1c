"""Operations endpoints: health for balancers and orchestrators, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.chatstream import ChatStream

router = APIRouter()


@router.get("/health")
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


@router.get("/metrics", dependencies=[Depends(require("metrics"))])
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    chat_stream: ChatStream = request.app.state.chat_stream
    return Response(chat_stream.metrics.render(), media_type=CONTENT_TYPE_LATEST)
