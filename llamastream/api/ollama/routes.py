"""Ollama's API: /api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps,
/api/version. A translation onto the same slots, queue, callbacks, tool calls and reasoning as
the other dialects; errors are Ollama's ``{"error": "..."}``, also for unknown /api paths."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.body import parse_body
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import OllamaRoute, invalid_from_validation, renamed, unmatched
from llamastream.api.ollama.framing import Kind, OllamaFraming, now
from llamastream.api.ollama.models import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    ShowRequest,
    _Generating,
)
from llamastream.api.openai.models import ChatCompletionRequest
from llamastream.api.openai.routes import prepare_chat, sampling_for
from llamastream.api.openapi import error_responses, json_ok, model_body
from llamastream.chat.reasoning import think_tags
from llamastream.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError
from llamastream.registry import ServedModel
from llamastream.service import Service
from llamastream.streaming import Run

# The version of Ollama's API these routes follow (clients check it).
OLLAMA_API_VERSION = "0.12.0"
# llama.cpp's file types, as Ollama names the quantization.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_OBJECT = {"type": "object"}
_STREAMED: dict[int | str, Any] = {
    200: {
        "description": "NDJSON chunks (`done: false`, then one `done: true`), or with "
        "`stream: false` one object.",
        "content": {
            "application/x-ndjson": {"schema": _OBJECT},
            "application/json": {"schema": _OBJECT},
        },
    }
}

# The translated chat request's fields, as Ollama's clients name them.
_FIELDS = [
    ("max_tokens", "options.num_predict"),
    ("response_format", "format"),
    ("reasoning_budget", "think"),
    ("(top_p|top_k|min_p|repeat_penalty|presence_penalty|frequency_penalty|seed)", r"options.\1"),
]

RequestT = TypeVar("RequestT", ChatRequest, GenerateRequest, EmbedRequest, ShowRequest)

router = APIRouter(prefix="/api", route_class=OllamaRoute)
_routes = APIRouter(dependencies=[Depends(require("ollama"))], route_class=OllamaRoute)


def _errors(*statuses: int) -> dict[int | str, Any]:
    return error_responses(*statuses, schema=_ERROR)


@_routes.get("/version", responses={200: json_ok(_OBJECT)})
async def version() -> Response:
    """The Ollama API version these routes follow."""
    return JSONResponse({"version": OLLAMA_API_VERSION})


@_routes.get("/tags", responses={200: json_ok(_OBJECT), **_errors(401, 403, 503)})
async def tags(service: ServiceDep) -> Response:
    """Every configured model (and the embedding model, if another), loaded or not."""
    service.check_ready()
    return JSONResponse({"models": _models(service)})


@_routes.get("/ps", responses={200: json_ok(_OBJECT), **_errors(401, 403, 503)})
async def ps(service: ServiceDep) -> Response:
    """The loaded models, with their memory and when their keep-alive runs out."""
    service.check_ready()
    models = []
    for model in service.models.models:
        if not model.loaded:
            continue
        host, gpu = model.memory
        models.append(
            {
                **_entry(model),
                "size": host + gpu,
                "size_vram": gpu,
                "expires_at": _expires(model.keep_alive_s, model.last_used, model.busy()),
                "context_length": model.settings.n_ctx,
            }
        )
    forever = _expires(-1, 0, False)
    embedding = [e for e in _models(service)[len(service.models.models) :]]
    models += [{**e, "expires_at": forever, "size_vram": 0} for e in embedding]
    return JSONResponse({"models": models})


@_routes.post(
    "/show",
    openapi_extra=model_body(ShowRequest),
    responses={200: json_ok(_OBJECT), **_errors(400, 401, 403, 404, 429, 503)},
)
async def show(request: Request, service: ServiceDep) -> Response:
    """The model's template, details, metadata and capabilities."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, ShowRequest)
    name = req.model or req.name
    base = name.removesuffix(":latest")
    if base == service.embedding_model_id and base not in service.models.by_name:
        # an embedding model of its own (embedding_model_path)
        return JSONResponse(
            {
                "details": {"format": "gguf", "family": "", "families": []},
                "capabilities": ["embedding"],
            }
        )
    model = service.models.get(_model_name(service, name))
    pool = model.pool
    try:
        await pool.peek()  # metadata and template only: showing a model never loads it
    except Exception as exc:
        raise ModelUnavailableError(
            f"the model {name!r} cannot be read: {exc}", field="model"
        ) from None
    capabilities = ["completion", "tools"]
    if think_tags(pool.template.source) is not None:
        capabilities.append("thinking")
    if service.embedder is not None and base == service.embedding_model_id:
        capabilities.append("embedding")
    # The vocabulary's long lists only with verbose, as Ollama does.
    info = {
        k: v for k, v in pool.metadata.items() if req.verbose or not k.startswith("tokenizer.ggml.")
    }
    return JSONResponse(
        {
            "modelfile": f"FROM {pool.model_path}\n",
            "parameters": "",
            "template": pool.template.source,
            "details": _details(model),
            "model_info": {**info, "llamastream.n_ctx": model.settings.n_ctx, "model": name},
            "capabilities": capabilities,
            "modified_at": _modified(pool.model_path.stat().st_mtime),
        }
    )


@_routes.post(
    "/chat",
    openapi_extra=model_body(ChatRequest),
    responses={**_STREAMED, **_errors(400, 401, 403, 404, 413, 429, 503)},
)
async def chat(request: Request, service: ServiceDep) -> Response:
    """Chat, streamed as NDJSON unless ``stream: false``."""
    req = await _request(request, service, ChatRequest)
    if not req.messages:  # a client loading (or, keep_alive 0, unloading) the model
        return await _load(service, req, "chat")
    async with service.use(_model_name(service, req.model), req.keep_alive_s()) as model:
        try:
            body = req.chat_request(model.settings.n_ctx)
        except ValidationError as exc:
            raise renamed(invalid_from_validation(exc), _FIELDS) from None
        return await _run(request, service, model, req, "chat", body, None)


@_routes.post(
    "/generate",
    openapi_extra=model_body(GenerateRequest),
    responses={**_STREAMED, **_errors(400, 401, 403, 404, 413, 429, 503)},
)
async def generate(request: Request, service: ServiceDep) -> Response:
    """A completion of ``prompt`` (through the chat template unless ``raw``)."""
    req = await _request(request, service, GenerateRequest)
    if not req.prompt:
        return await _load(service, req, "generate")
    messages = [{"role": "system", "content": req.system}] if req.system else []
    messages.append({"role": "user", "content": req.prompt})
    async with service.use(_model_name(service, req.model), req.keep_alive_s()) as model:
        try:
            body = ChatCompletionRequest.model_validate(
                req.chat_body(messages, model.settings.n_ctx)
            )
        except ValidationError as exc:
            raise renamed(invalid_from_validation(exc), _FIELDS) from None
        raw = req.prompt if req.raw else None
        return await _run(request, service, model, req, "generate", body, raw)


@_routes.post(
    "/embed",
    openapi_extra=model_body(EmbedRequest),
    responses={200: json_ok(_OBJECT), **_errors(400, 401, 403, 404, 413, 429, 503)},
)
async def embed(request: Request, service: ServiceDep) -> Response:
    """Unit vectors of ``input`` (the embedding model's own thread and context)."""
    started = time.monotonic_ns()
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, EmbedRequest)
    embedder, served = service.embeddings()
    if req.model.removesuffix(":latest") != served:
        raise ModelNotFoundError(
            f"model {req.model!r} gives no embeddings here; {served!r} does", field="model"
        )
    name = req.model
    settings = service.settings
    texts = req.check(settings.embedding_max_inputs, settings.max_input_chars)
    embedder.check_dimensions(req.dimensions)
    done = await embedder.embed([*texts])
    return JSONResponse(
        {
            "model": name,
            "embeddings": [[float(x) for x in v] for v in done.vectors],
            "total_duration": time.monotonic_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": sum(done.tokens),
        }
    )


async def _request(request: Request, service: Service, model: type[RequestT]) -> RequestT:
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, model)
    if isinstance(req, _Generating):
        _model_name(service, req.model)  # 404 before anything else
        req.keep_alive_s()  # 400 for a keep_alive that is no duration
    return req


async def _run(
    request: Request,
    service: Service,
    model: ServedModel,
    req: ChatRequest | GenerateRequest,
    kind: Kind,
    chat: ChatCompletionRequest,
    raw: str | None,
) -> Response:
    try:
        text, tool_use, thinking = prepare_chat(model, chat)
    except InvalidRequestError as exc:
        raise renamed(exc, _FIELDS) from None
    if req.think not in (None, False) and thinking is None:
        raise InvalidRequestError(
            f"think: {req.model!r} does not think (its template writes no reasoning)",
            field="think",
        )
    if raw is not None:
        text, thinking = raw, None
    tokens = await model.tokenize(text)
    limit = model.settings.reply_limit()
    try:
        params = sampling_for(model, chat, tokens, tool_use, thinking)
    except InvalidRequestError as exc:
        raise renamed(exc, _FIELDS) from None
    params = params.updated(**req.sampling_overrides())
    if req.unlimited:  # num_predict -1: as long as the context allows
        params = params.updated(max_new_tokens=min(limit, model.settings.n_ctx - len(tokens)))
    ticket = model.admit(tokens)
    framing = OllamaFraming(
        kind,
        req.model,
        stream=req.stream,
        tools=tool_use.format.parser() if tool_use is not None else None,
        reasoning=thinking.splitter() if thinking is not None else None,
        # think false: no thinking (the closing tag written for the model is no part of it);
        # reasoning_format none: the reasoning stays in the reply's text
        show_thinking=req.think is not False,
        apart=model.settings.reasoning_format == "auto",
    )
    key = chat.conversation_key() if kind == "chat" else None
    run = Run(request, tokens, params, ticket, framing, service.callback, cache_key=key)
    return model.respond(run)


async def _load(service: Service, req: _Generating, kind: Kind) -> Response:
    """The answer to an empty request, Ollama's way of loading a model (or with keep_alive
    0, of unloading it)."""
    name = _model_name(service, req.model)
    keep = req.keep_alive_s()
    last: dict[str, Any] = {"model": req.model, "created_at": now()}
    if kind == "chat":
        last["message"] = {"role": "assistant", "content": ""}
    else:
        last["response"] = ""
    if keep == 0:
        model = service.models.get(name)
        model.keep_alive_s = 0  # unloaded now if idle, else as soon as it is
        await service.models.unload(model)
        return JSONResponse({**last, "done": True, "done_reason": "unload"})
    async with service.use(name, keep):
        pass
    return JSONResponse({**last, "done": True, "done_reason": "load"})


def _model_name(service: Service, given: str) -> str:
    """The configured model a request names (``name`` or ``name:latest``); 404 otherwise."""
    base = given.removesuffix(":latest")
    if base not in service.models.by_name:
        known = ", ".join(repr(m.name) for m in service.models.models)
        raise ModelNotFoundError(
            f"model {given!r} not found; this server serves {known}", field="model"
        )
    return base


def _entry(model: ServedModel) -> dict[str, Any]:
    path = model.settings.model_path
    stat = path.stat() if path is not None and path.is_file() else None
    return {
        "name": f"{model.model_id}:latest",
        "model": f"{model.model_id}:latest",
        "modified_at": _modified(stat.st_mtime if stat else 0),
        "size": stat.st_size if stat else 0,
        "digest": hashlib.sha256(f"{path}:{stat.st_mtime if stat else 0}".encode()).hexdigest(),
        "details": _details(model),
    }


def _expires(keep_alive_s: float, last_used: float, busy: bool) -> str:
    """When an idle model's keep-alive runs out, as Ollama writes it (far ahead: never)."""
    if keep_alive_s < 0:
        return "2318-01-01T00:00:00Z"
    left = keep_alive_s if busy else max(0.0, last_used + keep_alive_s - time.monotonic())
    return _modified(time.time() + left)


def _models(service: Service) -> list[dict[str, Any]]:
    entries = [_entry(m) for m in service.models.models]
    embedder, embedding_id = service.embedder, service.embedding_model_id
    if embedder is not None and embedding_id is not None and embedding_id != service.model_id:
        estat = embedder.model_path.stat()
        entries.append(
            {
                "name": f"{embedding_id}:latest",
                "model": f"{embedding_id}:latest",
                "modified_at": _modified(estat.st_mtime),
                "size": estat.st_size,
                "digest": hashlib.sha256(str(embedder.model_path).encode()).hexdigest(),
                "details": {"format": "gguf", "family": "", "families": []},
            }
        )
    return entries


def _details(model: ServedModel) -> dict[str, Any]:
    meta = model.pool.metadata  # empty until the model is first loaded
    arch = meta.get("general.architecture", "")
    file_type = meta.get("general.file_type")
    level = _FILE_TYPES.get(int(file_type), str(file_type)) if file_type is not None else ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else [],
        "parameter_size": meta.get("general.size_label", ""),
        "quantization_level": level,
    }


def _modified(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")


router.include_router(_routes)


@router.api_route(
    "/{path:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
async def unknown(request: Request) -> Response:
    """Unknown paths and methods under /api: 404 or 405, in Ollama's envelope."""
    path = "/" + request.path_params["path"]
    raise unmatched(path, request.method, _routes.routes, full_path=request.url.path)
