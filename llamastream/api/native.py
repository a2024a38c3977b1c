"""ChatStream-style endpoints: chat, regenerate, clear, prompt, load, generation parameters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from llamastream.api.access import require
from llamastream.chatstream import ChatStream
from llamastream.engine.sampling import GenerationParams

router = APIRouter()

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "The error code."},
        "message": {"type": "string"},
        "field": {"type": "string", "description": "The offending field, for 400 and 413."},
    },
}

_WHY = {
    400: "The body or a parameter is not acceptable (`field` names it).",
    401: "An API key is required and none, or a wrong one, was given.",
    403: "The key given may not use this endpoint.",
    404: "No such model.",
    409: "Another request of this session is still running.",
    413: "The body is larger than max_body_bytes.",
    429: "Every slot is busy and the wait queue is full.",
    500: "Generation failed before any text was sent.",
    503: "Not ready (loading or draining), no slot within max_queue_wait_s, or the session "
    "store is unavailable.",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error_responses(*statuses: int, schema: dict[str, Any] = ERROR_SCHEMA) -> dict[int | str, Any]:
    """OpenAPI entries for the JSON errors a route can answer with."""
    out: dict[int | str, Any] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _WHY[status],
            "content": {"application/json": {"schema": schema}},
        }
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI text for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def json_ok(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ROLES = (401, 403)

_CHAT_REQUEST = {
    "type": "object",
    "properties": {
        "user_input": {"type": "string", "minLength": 1},
        "regenerate": {"type": "boolean", "default": False},
    },
    # user_input is required unless regenerating.
    "anyOf": [
        {"required": ["user_input"]},
        {"required": ["regenerate"], "properties": {"regenerate": {"const": True}}},
    ],
}

_PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {k: v for k, v in schema.items() if k != "title"}
        for name, schema in GenerationParams.model_json_schema()["properties"].items()
    },
}

_EFFECTIVE_PARAMS = {
    "type": "object",
    "required": list(GenerationParams.model_fields),
    "properties": {
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
    "required": ["processing", "waiting", "max_processing", "max_waiting"],
    "properties": {
        "processing": {"type": "integer", "minimum": 0},
        "waiting": {"type": "integer", "minimum": 0},
        "max_processing": {"type": "integer", "minimum": 1},
        "max_waiting": {"type": "integer", "minimum": 0},
    },
}

_PROMPT = {
    "type": "object",
    "required": ["prompt", "messages"],
    "properties": {
        "prompt": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object"}},
    },
}


def _chat_stream(request: Request) -> ChatStream:
    return request.app.state.chat_stream  # type: ignore[no-any-return]


@router.post(
    "/chat_stream",
    openapi_extra=json_body(_CHAT_REQUEST),
    response_class=Response,
    responses={
        200: {
            "description": "The reply, streamed as it is generated.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(400, *_ROLES, 409, 413, 429, 500, 503),
    },
    dependencies=[Depends(require("chat_stream"))],
)
async def chat_stream(request: Request) -> Response:
    """Stream the reply to ``user_input`` (or regenerate the last reply) as plain text."""
    callback = request.app.state.chat_callback
    return await _chat_stream(request).handle_chat_stream_request(request, callback=callback)


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
    return await _chat_stream(request).handle_clear_context_request(request)


@router.get(
    "/get_prompt",
    responses={200: json_ok(_PROMPT), **error_responses(*_ROLES, 503)},
    dependencies=[Depends(require("get_prompt"))],
)
async def get_prompt(request: Request) -> Response:
    """This session's rendered prompt and messages."""
    return await _chat_stream(request).handle_get_prompt_request(request)


@router.get(
    "/get_load",
    responses={200: json_ok(_LOAD), **error_responses(*_ROLES)},
    dependencies=[Depends(require("get_load"))],
)
async def get_load(request: Request) -> Response:
    """Busy and waiting requests, and their limits."""
    return await _chat_stream(request).handle_get_load_request(request)


@router.post(
    "/set_generation_params",
    openapi_extra=json_body(_PARAMS),
    responses={
        200: json_ok(_EFFECTIVE_PARAMS),
        **error_responses(400, *_ROLES, 409, 413, 503),
    },
    dependencies=[Depends(require("set_generation_params"))],
)
async def set_generation_params(request: Request) -> Response:
    """Set this session's temperature, top_p, top_k, repeat_penalty, max_new_tokens, seed."""
    return await _chat_stream(request).handle_set_generation_params_request(request)


@router.get(
    "/get_generation_params",
    responses={200: json_ok(_EFFECTIVE_PARAMS), **error_responses(*_ROLES, 503)},
    dependencies=[Depends(require("get_generation_params"))],
)
async def get_generation_params(request: Request) -> Response:
    """This session's effective generation parameters."""
    return await _chat_stream(request).handle_get_generation_params_request(request)
