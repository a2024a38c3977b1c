"""ChatStream-style endpoints: chat, regenerate, clear, prompt, load, generation parameters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from llamastream.api.access import require
from llamastream.api.chatstream import SessionParams
from llamastream.api.deps import ServiceDep, chat_stream_of
from llamastream.api.errors import NativeRoute
from llamastream.api.openapi import error_responses, json_body, json_ok
from llamastream.engine.sampling import GenerationParams

router = APIRouter(route_class=NativeRoute)

_ROLES = (401, 403)

_CHAT_REQUEST = {
    "type": "object",
    "properties": {
        "user_input": {"type": "string"},
        "regenerate": {"type": "boolean", "default": False},
    },
    # user_input is required unless regenerating (then an empty one is no input, as in
    # ChatStream).
    "anyOf": [
        {"required": ["user_input"], "properties": {"user_input": {"minLength": 1}}},
        {"required": ["regenerate"], "properties": {"regenerate": {"const": True}}},
    ],
}

_NDJSON_LINE = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["reasoning", "content", "done", "error"]},
        "text": {"type": "string"},
        "finish_reason": {"enum": ["stop", "length"]},
        "message_id": {"type": "string"},
        "usage": {"type": "object"},
    },
}

_PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {k: v for k, v in schema.items() if k != "title"}
        for name, schema in SessionParams.model_json_schema()["properties"].items()
    },
}

_EFFECTIVE_PARAMS = {
    "type": "object",
    "required": [*GenerationParams.model_fields, "model"],
    "properties": {
        "model": {"type": "string"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "top_k": {"type": "integer"},
        "repeat_penalty": {"type": "number"},
        "max_new_tokens": {"type": "integer"},
        "seed": {"type": ["integer", "null"]},
    },
}

_LOAD = {
    "type": "object",
    "required": ["processing", "waiting", "max_processing", "max_waiting", "models"],
    "properties": {
        "processing": {"type": "integer", "minimum": 0},
        "waiting": {"type": "integer", "minimum": 0},
        "max_processing": {"type": "integer", "minimum": 1},
        "max_waiting": {"type": "integer", "minimum": 0},
        "models": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}

_MODELS = {
    "type": "object",
    "required": ["models", "default", "model"],
    "properties": {
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "state", "n_ctx"],
                "properties": {
                    "id": {"type": "string"},
                    "state": {"enum": ["unloaded", "loading", "loaded", "failed", "unloading"]},
                    "n_ctx": {"type": "integer"},
                    "error": {"type": "string"},
                },
            },
        },
        "default": {"type": "string"},
        "model": {"type": "string"},
    },
}

_PROMPT = {
    "type": "object",
    "required": ["prompt", "messages"],
    "properties": {
        "prompt": {"type": ["string", "null"]},
        "messages": {"type": "array", "items": {"type": "object"}},
    },
}


@router.post(
    "/chat_stream",
    openapi_extra=json_body(_CHAT_REQUEST),
    response_class=Response,
    responses={
        200: {
            "description": "The reply, streamed as it is generated: plain text (a thinking "
            "model's reasoning first, between its tags), or with `Accept: application/x-ndjson` "
            "JSON lines: `reasoning` and `content` parts, then `done` (or `error`).",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": _NDJSON_LINE},
            },
        },
        **error_responses(400, *_ROLES, 404, 409, 413, 429, 500, 503),
    },
    dependencies=[Depends(require("chat_stream"))],
)
async def chat_stream(request: Request, service: ServiceDep) -> Response:
    """Stream the reply to ``user_input`` (or regenerate the last reply): plain text, or JSON
    lines with ``Accept: application/x-ndjson``."""
    facade = chat_stream_of(request)
    return await facade.handle_chat_stream_request(request, callback=service.callback)


@router.post(
    "/clear_context",
    responses={
        200: json_ok({"type": "object", "properties": {"status": {"const": "cleared"}}}),
        **error_responses(*_ROLES, 409, 503),
    },
    dependencies=[Depends(require("clear_context"))],
)
async def clear_context(request: Request) -> Response:
    """Forget this session's conversation."""
    return await chat_stream_of(request).handle_clear_context_request(request)


@router.get(
    "/get_prompt",
    responses={200: json_ok(_PROMPT), **error_responses(*_ROLES, 503)},
    dependencies=[Depends(require("get_prompt"))],
)
async def get_prompt(request: Request) -> Response:
    """This session's rendered prompt and messages."""
    return await chat_stream_of(request).handle_get_prompt_request(request)


@router.get(
    "/get_load",
    responses={200: json_ok(_LOAD), **error_responses(*_ROLES)},
    dependencies=[Depends(require("get_load"))],
)
async def get_load(request: Request) -> Response:
    """Busy and waiting requests, and their limits: over every model, and per model."""
    return await chat_stream_of(request).handle_get_load_request(request)


@router.get(
    "/get_models",
    responses={200: json_ok(_MODELS), **error_responses(*_ROLES, 503)},
    dependencies=[Depends(require("get_models"))],
)
async def get_models(request: Request) -> Response:
    """The configured models with their state, and this session's model."""
    return await chat_stream_of(request).handle_get_models_request(request)


@router.post(
    "/set_generation_params",
    openapi_extra=json_body(_PARAMS),
    responses={
        200: json_ok(_EFFECTIVE_PARAMS),
        **error_responses(400, *_ROLES, 404, 409, 413, 503),
    },
    dependencies=[Depends(require("set_generation_params"))],
)
async def set_generation_params(request: Request) -> Response:
    """Set this session's temperature, top_p, top_k, repeat_penalty, max_new_tokens, seed,
    and model."""
    return await chat_stream_of(request).handle_set_generation_params_request(request)


@router.get(
    "/get_generation_params",
    responses={200: json_ok(_EFFECTIVE_PARAMS), **error_responses(*_ROLES, 503)},
    dependencies=[Depends(require("get_generation_params"))],
)
async def get_generation_params(request: Request) -> Response:
    """This session's effective generation parameters."""
    return await chat_stream_of(request).handle_get_generation_params_request(request)
