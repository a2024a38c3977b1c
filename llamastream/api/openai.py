"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Same engine, slots, queue and completion callback as the native endpoints; only the wire
format differs (OpenAI's JSON objects, SSE for ``stream: true``, its error envelope).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Request
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)
from starlette.responses import JSONResponse, Response

from llamastream.api.access import check_access
from llamastream.api.errors import invalid_from_validation, openai_error_response
from llamastream.api.native import error_responses, json_body
from llamastream.chatstream import ChatStream, read_json_body
from llamastream.engine.pool import WorkerPool
from llamastream.errors import (
    ContextLengthError,
    GenerationError,
    InvalidRequestError,
    LlamaStreamError,
    ModelNotFoundError,
)
from llamastream.streaming import Run

router = APIRouter(prefix="/v1")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False

    @field_validator(
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "top_k",
        "min_p",
        "repeat_penalty",
        mode="before",
    )
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("Input should be a number, not a boolean")
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        return value


Kind = Literal["chat", "text"]


class OpenAIFraming:
    """OpenAI's objects for a run: SSE chunks when streaming, one JSON body otherwise."""

    def __init__(self, kind: Kind, model: str, *, stream: bool, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.streaming = stream
        self.include_usage = include_usage
        self.created = int(time.time())
        self._role_sent = False

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        media = b"text/event-stream; charset=utf-8" if self.streaming else b"application/json"
        return 200, [
            (b"content-type", media),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]

    def piece(self, run: Run, text: str) -> bytes:
        return self._role(run) + self._event(self._chunk(run, text, None))

    def tail(self, run: Run) -> bytes:
        finished = run.finished
        reason = "length" if finished is not None and finished.reason == "length" else "stop"
        if not self.streaming:
            return json.dumps(self._whole(run, reason), ensure_ascii=False).encode()
        out = self._role(run) + self._event(self._chunk(run, None, reason))
        if self.include_usage:
            usage = {**self._envelope(run), "choices": [], "usage": _usage(run)}
            out += self._event(usage)
        return out + b"data: [DONE]\n\n"

    def error_tail(self, run: Run) -> bytes | None:
        if not self.streaming:
            return None
        exc = run.error
        if not isinstance(exc, LlamaStreamError):
            exc = GenerationError("generation failed")
        error = {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}
        return self._event({"error": error})

    def error_response(self, exc: LlamaStreamError) -> Response:
        return openai_error_response(exc)

    def _role(self, run: Run) -> bytes:
        """The opening chunk of a chat stream, which names the role."""
        if self.kind != "chat" or self._role_sent:
            return b""
        self._role_sent = True
        delta = {"role": "assistant", "content": ""}
        return self._event({**self._envelope(run), **self._chunk_with(delta, None)})

    def _envelope(self, run: Run) -> dict[str, Any]:
        prefix, obj = (
            ("chatcmpl-", "chat.completion")
            if self.kind == "chat"
            else ("cmpl-", "text_completion")
        )
        if self.kind == "chat" and self.streaming:
            obj = "chat.completion.chunk"
        return {"id": prefix + run.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, run: Run, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {"content": text} if text is not None else {}
            chunk = self._chunk_with(delta, reason)
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            chunk = {"choices": [choice]}
        return {**self._envelope(run), **chunk}

    def _chunk_with(self, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    def _whole(self, run: Run, reason: str) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": run.reply}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": run.reply, "logprobs": None, "finish_reason": reason}
        return {**self._envelope(run), "choices": [choice], "usage": _usage(run)}

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _usage(run: Run) -> dict[str, int]:
    completion = run.finished.completion_tokens if run.finished else 0
    return {
        "prompt_tokens": len(run.tokens),
        "completion_tokens": completion,
        "total_tokens": len(run.tokens) + completion,
    }


def model_id(chat_stream: ChatStream, pool: WorkerPool) -> str:
    return chat_stream.settings.model_alias or pool.model_path.stem


OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

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


@router.get(
    "/models",
    responses={
        200: {
            "description": "The served model.",
            "content": {"application/json": {"schema": _MODELS}},
        },
        **error_responses(401, 403, 503, schema=OPENAI_ERROR_SCHEMA),
    },
)
async def list_models(request: Request) -> Response:
    """The model this server runs."""
    chat_stream: ChatStream = request.app.state.chat_stream
    try:
        check_access(chat_stream.settings, request, "v1")
        pool = chat_stream.require_pool()
    except LlamaStreamError as exc:
        return openai_error_response(exc)
    entry = {
        "id": model_id(chat_stream, pool),
        "object": "model",
        "created": int(pool.model_path.stat().st_mtime),
        "owned_by": "llamastream",
        "context_length": chat_stream.settings.n_ctx,
    }
    return JSONResponse({"object": "list", "data": [entry]})


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI text for a route that parses its JSON body itself.

    pydantic's ``$defs`` are inlined: the route's text cannot add to the document's components.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return json_body(inline(schema))


@router.post(
    "/chat/completions",
    openapi_extra=_body_doc(ChatCompletionRequest),
    responses=_COMPLETION_RESPONSES,
)
async def chat_completions(request: Request) -> Response:
    """Chat: ``messages`` rendered with the model's template; streamed as SSE when asked."""
    return await _complete(request, "chat")


@router.post(
    "/completions", openapi_extra=_body_doc(CompletionRequest), responses=_COMPLETION_RESPONSES
)
async def completions(request: Request) -> Response:
    """Plain completion of ``prompt`` (special tokens in it are honoured)."""
    return await _complete(request, "text")


async def _complete(request: Request, kind: Kind) -> Response:
    chat_stream: ChatStream = request.app.state.chat_stream
    settings = chat_stream.settings
    try:
        check_access(chat_stream.settings, request, "v1")
        pool = chat_stream.require_pool()
        body = await read_json_body(request, None, settings.max_body_bytes)
        model = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            raise invalid_from_validation(exc) from None
        _check_lengths(req, settings.max_input_chars)
        served = model_id(chat_stream, pool)
        if req.model != served:
            raise ModelNotFoundError(
                f"the model {req.model!r} does not exist; this server runs {served!r}",
                field="model",
            )
        text = _prompt_text(req, pool, settings.system_prompt)
        tokens = await anyio.to_thread.run_sync(pool.tokenize, text)
        params = _sampling(req, chat_stream, len(tokens))
        ticket = chat_stream.reserve_slot(pool, tokens)
    except LlamaStreamError as exc:
        return openai_error_response(exc)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    framing = OpenAIFraming(kind, served, stream=req.stream, include_usage=include_usage)
    run = Run(
        request,
        tokens,
        params,
        ticket,
        framing,
        request.app.state.chat_callback,
        cache_key=conversation_key(req),
    )
    return chat_stream.runner.response(pool, run)


def conversation_key(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """Which conversation a stateless chat request continues, for its saved KV cache.

    /v1 clients resend the whole history, so a conversation is known by how it begins: its
    messages up to the first user message, and the ``user`` field; None for a first turn.
    Conversations that begin alike share a key, which costs at most a miss: a saved cache is
    restored only into a prompt it is a prefix of.
    """
    if not isinstance(req, ChatCompletionRequest):
        return None
    if not any(m.role == "assistant" for m in req.messages):
        return None  # a first turn: most are never continued, saving its cache costs a pause
    head = []
    for message in req.messages:
        head.append([message.role, message.text()])
        if message.role == "user":
            break
    text = json.dumps([req.user, head], ensure_ascii=False)
    return "v1:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _check_lengths(req: ChatCompletionRequest | CompletionRequest, max_chars: int) -> None:
    if isinstance(req, CompletionRequest):
        texts = [("prompt", req.prompt if isinstance(req.prompt, str) else req.prompt[0])]
    else:
        texts = [(f"messages.{i}.content", m.text()) for i, m in enumerate(req.messages)]
    for field, text in texts:
        if len(text) > max_chars:
            raise InvalidRequestError(f"{field}: at most {max_chars} characters", field=field)


def _prompt_text(
    req: ChatCompletionRequest | CompletionRequest, pool: WorkerPool, system_prompt: str | None
) -> str:
    if isinstance(req, CompletionRequest):
        return req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": pool.defuse(m.text())}
        for m in req.messages
    ]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return pool.template.render(messages)
    except Exception as exc:
        raise InvalidRequestError(f"the chat template refused: {exc}", field="messages") from None


def _sampling(req: _Common, chat_stream: ChatStream, n_prompt: int) -> Any:
    settings = chat_stream.settings
    asked = req.max_completion_tokens or req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_new_tokens:
        raise InvalidRequestError(
            f"{field}: at most {settings.max_new_tokens} on this server", field=field
        )
    room = settings.n_ctx - n_prompt
    if (asked is not None and asked > room) or room < 1:
        raise ContextLengthError(
            f"the prompt takes {n_prompt} tokens; with {asked or 1} more it exceeds the "
            f"context window of {settings.n_ctx}",
            field="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
        )
    grammar = None
    if req.response_format is not None and req.response_format.type == "json_object":
        grammar = JSON_GBNF
    elif req.response_format is not None and req.response_format.type == "json_schema":
        schema = (req.response_format.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "json_schema.schema must be a JSON schema object", field="response_format"
            )
        try:
            grammar = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:
            raise InvalidRequestError(
                f"unsupported JSON schema: {exc}", field="response_format"
            ) from None
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return chat_stream.default_params().updated(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        max_new_tokens=min(asked or settings.max_new_tokens, room),
        grammar=grammar,
        stop=stop,
        ignore_eos=req.ignore_eos or None,
    )
