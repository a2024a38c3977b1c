"""The /v1 routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Same engine, slots, queue and completion callback as the native endpoints; only the wire
format differs (OpenAI's JSON objects, SSE for ``stream: true``, its error envelope, also for
unknown paths and methods under /v1).
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from llamastream.api.access import require
from llamastream.api.body import parse_body
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import OpenAIRoute, renaming, unmatched
from llamastream.api.openai.framing import Kind, OpenAIFraming
from llamastream.api.openai.models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ToolUse,
)
from llamastream.api.openai.responses import ResponsesFraming, ResponsesRequest
from llamastream.api.openapi import OPENAI_ERROR_SCHEMA, error_responses, model_body
from llamastream.chat.reasoning import Thinking
from llamastream.engine.sampling import SamplingParams
from llamastream.errors import InvalidRequestError, ModelNotFoundError, RouteNotFoundError
from llamastream.registry import ServedModel
from llamastream.service import Service
from llamastream.streaming import Run

# The translated chat request's fields, as Responses clients name them.
_RESPONSES_FIELDS = [
    ("max_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    (r"tools\.(\d+)\.function\.", r"tools.\1."),
    (r"messages(\.\d+)?", "input"),  # (the indices of items and messages differ)
]

RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest, ResponsesRequest)

router = APIRouter(prefix="/v1", route_class=OpenAIRoute)
# Routes of other families under /v1 (Anthropic's), with their full paths: the catch-all
# answers 405, not 404, for a method they do not serve.
OTHER_V1_ROUTES: list[BaseRoute] = []
_routes = APIRouter(dependencies=[Depends(require("v1"))], route_class=OpenAIRoute)

_MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "context_length": {"type": "integer"},
                },
            },
        },
    },
}

_EMBEDDINGS = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "anyOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string"},
                        ]
                    },
                },
            },
        },
        "model": {"type": "string"},
        "usage": {"type": "object"},
    },
}

# One server-sent event: `data:` holds a JSON chunk, or `[DONE]` at the end.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

_COMPLETION_RESPONSES: dict[int | str, Any] = {
    200: {
        "description": "One JSON object, or with `stream: true` server-sent events ending with "
        "`data: [DONE]`.",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["id", "choices"]}},
            "text/event-stream": {"schema": _SSE_EVENT},
        },
    },
    **error_responses(400, 401, 403, 404, 413, 429, 500, 503, schema=OPENAI_ERROR_SCHEMA),
}


@_routes.get(
    "/models",
    responses={
        200: {
            "description": "The served model.",
            "content": {"application/json": {"schema": _MODELS}},
        },
        **error_responses(401, 403, 503, schema=OPENAI_ERROR_SCHEMA),
    },
)
async def list_models(service: ServiceDep) -> Response:
    """Every configured model, with its state (loaded, loading, unloaded, failed) and
    context length; the default first."""
    service.check_ready()
    entries = [model_entry(m) for m in service.models.models]
    embedder, embedding_id = service.embedder, service.embedding_model_id
    if embedder is not None and embedding_id is not None and embedding_id != service.model_id:
        entries.append(
            {
                "id": embedding_id,
                "object": "model",
                "created": int(embedder.model_path.stat().st_mtime),
                "owned_by": "llamastream",
                "context_length": embedder.n_ctx,
                "state": "loaded",
            }
        )
    return JSONResponse({"object": "list", "data": entries})


def model_entry(model: ServedModel) -> dict[str, Any]:
    """A configured model as /v1/models lists it."""
    path = model.settings.model_path
    created = int(path.stat().st_mtime) if path is not None and path.is_file() else 0
    return {
        "id": model.model_id,
        "object": "model",
        "created": created,
        "owned_by": "llamastream",
        "context_length": model.settings.n_ctx,
        "state": model.state,
    }


@_routes.post(
    "/chat/completions",
    openapi_extra=model_body(ChatCompletionRequest),
    responses=_COMPLETION_RESPONSES,
)
async def chat_completions(request: Request, service: ServiceDep) -> Response:
    """Chat: ``messages`` rendered with the model's template; streamed as SSE when asked."""
    req = await _request(request, service, ChatCompletionRequest)
    async with service.use(req.model) as model:
        text, tool_use, thinking = prepare_chat(model, req)
        split = (req.reasoning_format or model.settings.reasoning_format) == "auto"
        return await _complete(
            request,
            service,
            model,
            req,
            "chat",
            [text],
            req.conversation_key(),
            tool_use,
            thinking,
            split,
        )


@_routes.post(
    "/completions", openapi_extra=model_body(CompletionRequest), responses=_COMPLETION_RESPONSES
)
async def completions(request: Request, service: ServiceDep) -> Response:
    """Plain completion of ``prompt`` (special tokens in it are honoured)."""
    req = await _request(request, service, CompletionRequest)
    async with service.use(req.model) as model:
        return await _complete(request, service, model, req, "text", req.prompts(), None)


@_routes.post(
    "/embeddings",
    openapi_extra=model_body(EmbeddingRequest),
    responses={
        200: {
            "description": "One vector per input, in order.",
            "content": {"application/json": {"schema": _EMBEDDINGS}},
        },
        **error_responses(400, 401, 403, 404, 413, 429, 503, schema=OPENAI_ERROR_SCHEMA),
    },
)
async def embeddings(request: Request, service: ServiceDep) -> Response:
    """Unit vectors of ``input`` from the embedding model (its own thread and context)."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, EmbeddingRequest)
    embedder, served = service.embeddings()
    names = {served} | (service.default.model_names if served == service.model_id else set())
    if req.model is not None and req.model not in names:
        raise ModelNotFoundError(
            f"the model {req.model!r} does not exist; embeddings come from {served!r}",
            field="model",
        )
    req.check(service.settings.embedding_max_inputs, service.settings.max_input_chars)
    embedder.check_dimensions(req.dimensions)
    done = await embedder.embed(req.inputs())
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
        for i, v in enumerate(done.vectors)
    ]
    used = sum(done.tokens)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": served,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }
    )


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    """A vector as JSON numbers, or as OpenAI's base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@_routes.post(
    "/responses",
    openapi_extra=model_body(ResponsesRequest),
    responses={
        200: {
            "description": "A Response, or with `stream: true` its typed events "
            "(response.created, output items and their deltas, response.completed).",
            "content": {
                "application/json": {"schema": {"type": "object", "required": ["id", "output"]}},
                "text/event-stream": {"schema": _SSE_EVENT},
            },
        },
        **error_responses(400, 401, 403, 404, 413, 429, 500, 503, schema=OPENAI_ERROR_SCHEMA),
    },
)
async def responses(request: Request, service: ServiceDep) -> Response:
    """OpenAI's Responses API, stateless: ``input`` items in, output items back."""
    req = await _request(request, service, ResponsesRequest)
    effort = req.reasoning.effort if req.reasoning else None
    async with service.use(req.model) as model:
        with renaming(_RESPONSES_FIELDS):
            chat = req.chat_request()
            wants = "reasoning.effort" if effort not in (None, "none", "minimal") else None
            text, tool_use, thinking = prepare_chat(model, chat, wants_thinking=wants)
            tokens = await model.tokenize(text)
            params = sampling_for(model, chat, tokens, tool_use, thinking)
        ticket = model.admit(tokens)
        split = model.settings.reasoning_format == "auto"
        framing = ResponsesFraming(
            req,
            model.model_id,
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


def sampling_for(
    model: ServedModel,
    req: ChatCompletionRequest | CompletionRequest,
    tokens: list[int],
    tool_use: ToolUse | None = None,
    thinking: Thinking | None = None,
) -> SamplingParams:
    """The sampling parameters of a request whose prompt is ``tokens``: the server's
    defaults, the request's own, its tools' grammar, and the model's reasoning budget."""
    params = req.sampling(
        model.default_params(),
        n_prompt=len(tokens),
        n_ctx=model.settings.n_ctx,
        limit=model.settings.reply_limit(),
        n_vocab=model.pool.n_vocab,
        tool_use=tool_use,
    )
    if thinking is not None:
        params = params.updated(reasoning=thinking.budget, special_tokens=thinking.special or None)
    return params


def prepare_chat(
    model: ServedModel, req: ChatCompletionRequest, *, wants_thinking: str | None = None
) -> tuple[str, ToolUse | None, Thinking | None]:
    """A chat request's prompt text (the model's template, the server's system prompt, the
    tools offered), its tool use, and how the model thinks in its reply; a request that asks
    for thinking (in its field ``wants_thinking``) from a model that does not think: 400."""
    req.check_lengths(model.settings.max_input_chars)
    pool = model.pool
    tool_use = req.tool_use(pool.template)
    text = req.prompt_text(pool.template, pool.defuse, model.settings.system_prompt, tool_use)
    thinking = model.thinking(text, req.reasoning_budget)
    if wants_thinking is None and req.reasoning_budget is not None and req.reasoning_budget > 0:
        wants_thinking = "reasoning_budget"
    if wants_thinking is not None and thinking is None:
        raise InvalidRequestError(
            f"{wants_thinking}: the model {model.model_id!r} does not think (its template "
            "writes no reasoning)",
            field=wants_thinking,
        )
    return text, tool_use, thinking


async def _request(request: Request, service: Service, model: type[RequestT]) -> RequestT:
    """The body as ``model``, once the server is ready; its texts' lengths and model checked."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, model)
    req.check_lengths(service.settings.max_input_chars)
    service.models.get(req.model)  # 404 before anything else for an unknown model
    return req


async def _complete(
    request: Request,
    service: Service,
    model: ServedModel,
    req: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    prompts: list[str | list[int]],
    cache_key: str | None,
    tool_use: ToolUse | None = None,
    thinking: Thinking | None = None,
    split: bool = False,
) -> Response:
    """Tokenize, admit and run a completion in OpenAI's framing: ``n`` candidates of each
    prompt, each on a slot of its own, admitted together or not at all."""
    many = len(prompts) > 1
    candidates: list[tuple[list[int], SamplingParams]] = []
    for i, prompt in enumerate(prompts):
        field = f"prompt.{i}" if many else "prompt"
        tokens = await model.tokenize(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(prompt, str) and max(prompt) >= model.pool.n_vocab:
            raise InvalidRequestError(
                f"{field}: holds a token id outside the vocabulary (0 to {model.pool.n_vocab - 1})",
                field=field,
            )
        params = sampling_for(model, req, tokens, tool_use, thinking)
        for k in range(req.n):  # each candidate its own seed (a fixed one: seed, seed + 1...)
            seed = None if params.seed is None else (params.seed + k) % 2**32
            candidates.append((tokens, params.updated(seed=seed)))
    slots = model.settings.num_of_concurrent_executions
    if len(candidates) > slots:
        raise InvalidRequestError(
            f"{'prompt x n' if many else 'n'}: {len(candidates)} candidates, and this server "
            f"runs at most {slots} at once",
            field="prompt" if many else "n",
        )
    first_tokens, first_params = candidates[0]
    ticket = model.admit(first_tokens, count=len(candidates))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    framing = OpenAIFraming(
        kind,
        model.model_id,
        stream=req.stream,
        include_usage=include_usage,
        choices=len(candidates),
        tools=tool_use.format.parser if tool_use is not None else None,
        reasoning=thinking.splitter if thinking is not None and split else None,
        logprobs=first_params.logprobs is not None,
        fingerprint=model.fingerprint,
    )
    run = Run(
        request,
        first_tokens,
        first_params,
        ticket,
        framing,
        service.callback,
        cache_key=cache_key,
        more=candidates[1:],
    )
    return model.respond(run)


router.include_router(_routes)


@router.api_route(
    "/{path:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
async def unknown(request: Request) -> Response:
    """Unknown paths and methods under /v1: 404 or 405 (with the methods the other /v1
    families serve there too), in OpenAI's envelope."""
    path = "/" + request.path_params["path"]
    full = request.url.path
    error = unmatched(path, request.method, _routes.routes, full_path=full)
    if isinstance(error, RouteNotFoundError) and OTHER_V1_ROUTES:
        error = unmatched(full, request.method, OTHER_V1_ROUTES, full_path=full)
    raise error
