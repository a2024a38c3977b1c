"""ChatStream-style endpoints: chat, regenerate, clear, prompt, load, generation parameters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from llamastream.api.access import require
from llamastream.chatstream import ChatStream

router = APIRouter()

_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "user_input": {"type": "string", "minLength": 1},
                        "regenerate": {"type": "boolean", "default": False},
                    },
                }
            }
        },
    },
    "responses": {"200": {"content": {"text/plain": {"schema": {"type": "string"}}}}},
}


def _chat_stream(request: Request) -> ChatStream:
    return request.app.state.chat_stream  # type: ignore[no-any-return]


@router.post(
    "/chat_stream",
    openapi_extra=_CHAT_BODY,
    response_class=Response,
    dependencies=[Depends(require("chat_stream"))],
)
async def chat_stream(request: Request) -> Response:
    """Stream the reply to ``user_input`` (or regenerate the last reply) as plain text."""
    callback = request.app.state.chat_callback
    return await _chat_stream(request).handle_chat_stream_request(request, callback=callback)


@router.post("/clear_context", dependencies=[Depends(require("clear_context"))])
async def clear_context(request: Request) -> Response:
    """Forget this session's conversation."""
    return await _chat_stream(request).handle_clear_context_request(request)


@router.get("/get_prompt", dependencies=[Depends(require("get_prompt"))])
async def get_prompt(request: Request) -> Response:
    """This session's rendered prompt and messages."""
    return await _chat_stream(request).handle_get_prompt_request(request)


@router.get("/get_load", dependencies=[Depends(require("get_load"))])
async def get_load(request: Request) -> Response:
    """Busy and waiting requests, and their limits."""
    return await _chat_stream(request).handle_get_load_request(request)


@router.post("/set_generation_params", dependencies=[Depends(require("set_generation_params"))])
async def set_generation_params(request: Request) -> Response:
    """Set this session's temperature, top_p, top_k, repeat_penalty, max_new_tokens, seed."""
    return await _chat_stream(request).handle_set_generation_params_request(request)


@router.get("/get_generation_params", dependencies=[Depends(require("get_generation_params"))])
async def get_generation_params(request: Request) -> Response:
    """This session's effective generation parameters."""
    return await _chat_stream(request).handle_get_generation_params_request(request)
