"""Operations endpoints: health for balancers and orchestrators, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import NativeRoute
from llamastream.api.openapi import error_responses

router = APIRouter(route_class=NativeRoute)

_HEALTH = {
    "type": "object",
    "required": [
        "status",
        "model",
        "models",
        "processing",
        "waiting",
        "max_processing",
        "max_waiting",
    ],
    "properties": {
        "status": {"enum": ["ok", "loading", "draining"]},
        "model": {"type": ["string", "null"]},
        "models": {"type": "object", "additionalProperties": {"type": "string"}},
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
async def health(service: ServiceDep) -> JSONResponse:
    """200 when serving; 503 while the default model loads or the server drains; which
    models are loaded, and slot figures."""
    serving = service.status == "ok"
    body = {
        "status": service.status,
        "model": service.pool.model_name if service.loaded else None,
        "models": {m.name: m.state for m in service.models.models},
        **service.load(),
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
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
