"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A translation onto the same slots, queue, callbacks, tool calls and reasoning as the OpenAI
routes: the request becomes the chat request the engine serves, the reply Anthropic's content
blocks and events; errors use Anthropic's envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.anthropic.framing import AnthropicFraming
from llamastream.api.anthropic.models import CountTokensRequest, MessagesRequest, ThinkingEnabled
from llamastream.api.body import parse_body
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import AnthropicRoute, invalid_from_validation, renamed, renaming
from llamastream.api.openai.models import ChatCompletionRequest
from llamastream.api.openai.routes import OTHER_V1_ROUTES, prepare_chat, sampling_for
from llamastream.api.openapi import ANTHROPIC_ERROR_SCHEMA, error_responses, model_body
from llamastream.service import Service
from llamastream.streaming import Run

# The translated chat request's fields, as Anthropic's clients name them.
_FIELDS = [
    (r"tools\.(\d+)\.function\.parameters", r"tools.\1.input_schema"),
    (r"tools\.(\d+)\.function\.", r"tools.\1."),
    (r"messages(\.\d+)?", "messages"),  # (system and tool results shift the indices)
    ("reasoning_budget", "thinking.budget_tokens"),
]

router = APIRouter(prefix="/v1", route_class=AnthropicRoute, dependencies=[Depends(require("v1"))])

_MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "content", "stop_reason", "usage"],
    "properties": {"type": {"const": "message"}, "content": {"type": "array"}},
}
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}


@router.post(
    "/messages",
    openapi_extra=model_body(MessagesRequest),
    responses={
        200: {
            "description": "One Message, or with `stream: true` its events (message_start, "
            "content blocks, message_delta, message_stop).",
            "content": {
                "application/json": {"schema": _MESSAGE},
                "text/event-stream": {"schema": _SSE_EVENT},
            },
        },
        **error_responses(400, 401, 403, 404, 413, 429, 503, schema=ANTHROPIC_ERROR_SCHEMA),
    },
)
async def messages(request: Request, service: ServiceDep) -> Response:
    """Anthropic's Messages: text, tool use and thinking blocks, streamed as its events."""
    req = await _request(request, service, MessagesRequest)
    thinks = isinstance(req.thinking, ThinkingEnabled) and req.thinking.budget_tokens > 0
    chat = _chat(req)
    async with service.use(req.model) as model:
        with renaming(_FIELDS):
            wants = "thinking" if thinks else None
            text, tool_use, thinking = prepare_chat(model, chat, wants_thinking=wants)
            tokens = await model.tokenize(text)
            params = sampling_for(model, chat, tokens, tool_use, thinking)
        params = params.updated(stop=tuple(req.stop_sequences or ()) or None)
        ticket = model.admit(tokens)
        split = model.settings.reasoning_format == "auto"
        framing = AnthropicFraming(
            req.model,
            stream=req.stream,
            tools=tool_use.format.parser() if tool_use is not None else None,
            reasoning=thinking.splitter() if thinking is not None and split else None,
        )
        run = Run(
            request,
            tokens,
            params,
            ticket,
            framing,
            service.callback,
            cache_key=chat.conversation_key(),
        )
        return model.respond(run)


@router.post(
    "/messages/count_tokens",
    openapi_extra=model_body(CountTokensRequest),
    responses={
        200: {
            "description": "The tokens the prompt of such a request takes.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["input_tokens"],
                        "properties": {"input_tokens": {"type": "integer"}},
                    }
                }
            },
        },
        **error_responses(400, 401, 403, 404, 413, 503, schema=ANTHROPIC_ERROR_SCHEMA),
    },
)
async def count_tokens(request: Request, service: ServiceDep) -> Response:
    """The prompt tokens a Messages request with these messages, system and tools reads."""
    req = await _request(request, service, CountTokensRequest)
    chat = _chat(req.as_messages())
    async with service.use(req.model) as model:
        with renaming(_FIELDS):
            text, _, _ = prepare_chat(model, chat)
        tokens = await model.tokenize(text)
    return JSONResponse({"input_tokens": len(tokens)})


async def _request(
    request: Request, service: Service, model: type[MessagesRequest] | type[CountTokensRequest]
) -> Any:
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, model)
    service.models.get(req.model)  # 404 before anything else for an unknown model
    return req


def _chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat request (its own 400s name Anthropic's fields already)."""
    try:
        return req.chat_request()
    except ValidationError as exc:
        raise renamed(invalid_from_validation(exc), _FIELDS) from None


OTHER_V1_ROUTES.extend(router.routes)
