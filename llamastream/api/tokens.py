"""`/tokenize` and `/detokenize`, as llama-server has them: tools count and inspect the served
model's tokens with them."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.responses import JSONResponse, Response

from llamastream.api.access import require
from llamastream.api.body import parse_body
from llamastream.api.deps import ServiceDep
from llamastream.api.errors import NativeRoute
from llamastream.api.openapi import error_responses, json_ok, model_body
from llamastream.errors import InvalidRequestError

router = APIRouter(route_class=NativeRoute, dependencies=[Depends(require("tokenize"))])

MAX_TOKENS_PER_REQUEST = 1_000_000


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: StrictStr
    model: StrictStr | None = None  # a configured model's name; unset: the default model
    add_special: StrictBool = False  # the BOS token a prompt begins with, if the model adds one
    with_pieces: StrictBool = False  # each token's text too


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: Annotated[list[StrictInt], Field(max_length=MAX_TOKENS_PER_REQUEST)]
    model: StrictStr | None = None


_TOKENS = {
    "type": "object",
    "required": ["tokens"],
    "properties": {
        "tokens": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "integer"},
                    {
                        "type": "object",
                        "required": ["id", "piece"],
                        "properties": {
                            "id": {"type": "integer"},
                            "piece": {
                                "anyOf": [
                                    {"type": "string"},
                                    {"type": "array", "items": {"type": "integer"}},
                                ]
                            },
                        },
                    },
                ]
            },
        }
    },
}
_CONTENT = {
    "type": "object",
    "required": ["content"],
    "properties": {"content": {"type": "string"}},
}


def _piece(data: bytes) -> str | list[int]:
    """A token's text, or its bytes when they are not whole UTF-8 (part of a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post(
    "/tokenize",
    openapi_extra=model_body(TokenizeRequest),
    responses={200: json_ok(_TOKENS), **error_responses(400, 401, 403, 404, 413, 429, 503)},
)
async def tokenize(request: Request, service: ServiceDep) -> Response:
    """``content`` → the model's token ids (control-token spellings are read as them)."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, TokenizeRequest)
    async with service.use(req.model) as model:
        pool = model.pool
        tokens = await anyio.to_thread.run_sync(
            lambda: pool.tokenize(req.content, bos=req.add_special) if req.content else []
        )
        if not req.with_pieces:
            return JSONResponse({"tokens": tokens})
        pieces = await anyio.to_thread.run_sync(pool.detokenize, tokens)
    out: list[Any] = [{"id": t, "piece": _piece(p)} for t, p in zip(tokens, pieces, strict=True)]
    return JSONResponse({"tokens": out})


@router.post(
    "/detokenize",
    openapi_extra=model_body(DetokenizeRequest),
    responses={200: json_ok(_CONTENT), **error_responses(400, 401, 403, 404, 413, 429, 503)},
)
async def detokenize(request: Request, service: ServiceDep) -> Response:
    """Token ids → their text (invalid UTF-8, such as half a character, as U+FFFD)."""
    service.check_ready()
    req = await parse_body(request, None, service.settings.max_body_bytes, DetokenizeRequest)
    async with service.use(req.model) as model:
        n_vocab = model.pool.n_vocab
        for i, token in enumerate(req.tokens):
            if not 0 <= token < n_vocab:
                field = f"tokens.{i}"
                raise InvalidRequestError(
                    f"{field}: {token} is not a token id of this model (0 to {n_vocab - 1})",
                    field=field,
                )
        pieces = await anyio.to_thread.run_sync(model.pool.detokenize, req.tokens)
    return JSONResponse({"content": b"".join(pieces).decode("utf-8", errors="replace")})
