"""Admin endpoints for several models: list the configured models with their memory, slots,
queue and placement; load one; unload one (the `admin` role)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.body import parse_body
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import NativeRoute
from llamastream.api.openapi import error_responses, json_ok, model_body
from llamastream.engine.gpu import MIB
from llamastream.errors import ModelBusyError, NotReadyError
from llamastream.registry import mem_available
from llamastream.service import Service

router = APIRouter(
    prefix="/admin", route_class=NativeRoute, dependencies=[Depends(require("admin"))]
)

_LISTING = {
    "type": "object",
    "required": ["models", "memory"],
    "properties": {
        "models": {"type": "array", "items": {"type": "object", "required": ["id", "state"]}},
        "memory": {"type": "object"},
    },
}


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    keep_alive_s: float | None = Field(None, ge=-1)  # unset: the model's own


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    force: StrictBool = False  # stop its running and queued requests first


@router.get("/models", responses={200: json_ok(_LISTING), **error_responses(401, 403, 503)})
async def list_models(service: ServiceDep) -> Response:
    """Every configured model: state, memory, slots, queue, placement; the memory budget."""
    return JSONResponse(_listing(service))


@router.post(
    "/models/load",
    openapi_extra=model_body(LoadRequest),
    responses={200: json_ok(_LISTING), **error_responses(400, 401, 403, 404, 429, 503)},
)
async def load(request: Request, service: ServiceDep) -> Response:
    """Load a model now (making room as a request for it would); the listing after."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, LoadRequest)
    async with service.use(req.model, req.keep_alive_s):
        pass
    return JSONResponse(_listing(service))


@router.post(
    "/models/unload",
    openapi_extra=model_body(UnloadRequest),
    responses={200: json_ok(_LISTING), **error_responses(400, 401, 403, 404, 409, 503)},
)
async def unload(request: Request, service: ServiceDep) -> Response:
    """Unload a model; 409 while requests use it, unless ``force`` (they are stopped first,
    their partial replies kept, as at shutdown)."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, UnloadRequest)
    model = service.models.get(req.model)
    if model.busy() and req.force:
        await model.runner.drain(
            0, lambda: NotReadyError(f"the model {model.name!r} was unloaded", retry_after=5)
        )
        model.runner.resume()
    if not await service.models.unload(model) and model.busy():
        raise ModelBusyError(
            f"the model {model.name!r} has running or queued requests; send force: true to "
            "stop them",
            field="model",
        )
    return JSONResponse(_listing(service))


def _listing(service: Service) -> dict[str, Any]:
    registry = service.models
    budget = registry.budget_bytes()
    available = mem_available()
    return {
        "models": [m.describe() for m in registry.models],
        "memory": {
            "budget_mib": None if budget == float("inf") else round(budget / MIB, 1),
            "used_mib": round(registry.used_bytes() / MIB, 1),
            "host_available_mib": None if available is None else round(available / MIB, 1),
        },
    }
