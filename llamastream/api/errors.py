"""Domain exceptions → each route family's error envelope, in one place.

A route family (native, OpenAI) is a route class carrying its `Envelope`; the app's exception
handlers answer in the envelope of the route that matched, never by testing the path. Each
envelope gives an error before a response starts (a JSON answer with the exception's status)
and, beside it, after a stream started (what the stream's last bytes say, if anything).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import Scope

from llamastream.errors import (
    InvalidRequestError,
    LlamaStreamError,
    MethodNotAllowedError,
    RouteNotFoundError,
)


class Envelope(Protocol):
    """How one API dialect shapes its errors."""

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        """The JSON error object."""
        ...

    def response(self, exc: LlamaStreamError) -> JSONResponse:
        """The answer to a request that fails before its response starts."""
        ...

    def mid_stream(self, exc: LlamaStreamError) -> bytes | None:
        """The last bytes of a stream that fails after it started; None cuts the connection."""
        ...


class _JSONEnvelope:
    """An envelope whose errors are JSON objects with the exception's status and headers."""

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, exc: LlamaStreamError) -> JSONResponse:
        return JSONResponse(self.body(exc), status_code=exc.status_code, headers=_headers(exc))


class NativeEnvelope(_JSONEnvelope):
    """``{"error": code, "message": ..., "field": ...}``; a plain-text stream is cut."""

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        body: dict[str, Any] = {"error": exc.code, "message": exc.message}
        if exc.field is not None:
            body["field"] = exc.field
        return body

    def mid_stream(self, exc: LlamaStreamError) -> bytes | None:
        return None  # plain text has no way to say so: the connection is cut


class OpenAIEnvelope(_JSONEnvelope):
    """OpenAI's ``{"error": {message, type, param, code}}``; an SSE stream ends with it."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        return {
            "error": {
                "message": exc.message,
                "type": self.TYPES.get(exc.status_code, "server_error"),
                "param": exc.field,
                "code": exc.code,
            }
        }

    def mid_stream(self, exc: LlamaStreamError) -> bytes | None:
        return b"data: " + json.dumps(self.body(exc), ensure_ascii=False).encode() + b"\n\n"


class AnthropicEnvelope(_JSONEnvelope):
    """Anthropic's ``{"type": "error", "error": {"type", "message"}}`` (the field named in the
    message); a stream ends with an ``error`` event of the same shape."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "invalid_request_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
    }

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        message = exc.message
        if exc.field is not None and not message.startswith(exc.field):
            message = f"{exc.field}: {message}"
        kind = self.TYPES.get(exc.status_code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def mid_stream(self, exc: LlamaStreamError) -> bytes | None:
        body = json.dumps(self.body(exc), ensure_ascii=False)
        return f"event: error\ndata: {body}\n\n".encode()


class OllamaEnvelope(_JSONEnvelope):
    """Ollama's ``{"error": "message"}`` (the field named in the message); a stream of JSON
    lines ends with one of the same shape."""

    def body(self, exc: LlamaStreamError) -> dict[str, Any]:
        message = exc.message
        if exc.field is not None and not message.startswith(exc.field):
            message = f"{exc.field}: {message}"
        return {"error": message}

    def mid_stream(self, exc: LlamaStreamError) -> bytes | None:
        return json.dumps(self.body(exc), ensure_ascii=False).encode() + b"\n"


NATIVE = NativeEnvelope()
OPENAI = OpenAIEnvelope()
ANTHROPIC = AnthropicEnvelope()
OLLAMA = OllamaEnvelope()


class NativeRoute(APIRoute):
    """A route of the native (ChatStream-style) family."""

    envelope: ClassVar[Envelope] = NATIVE


class OpenAIRoute(APIRoute):
    """A route of the OpenAI-compatible family."""

    envelope: ClassVar[Envelope] = OPENAI


class AnthropicRoute(APIRoute):
    """A route of the Anthropic-compatible family (Messages)."""

    envelope: ClassVar[Envelope] = ANTHROPIC


class OllamaRoute(APIRoute):
    """A route of the Ollama-compatible family (/api)."""

    envelope: ClassVar[Envelope] = OLLAMA


def envelope_of(scope: Scope) -> Envelope:
    """The envelope of the route that matched (native when none did)."""
    return getattr(scope.get("route"), "envelope", NATIVE)  # type: ignore[no-any-return]


def install_error_handlers(app: FastAPI) -> None:
    """Answer domain errors, and Starlette's own 404/405, in the matched route's envelope."""

    async def domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LlamaStreamError)
        return envelope_of(request.scope).response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            error: LlamaStreamError = MethodNotAllowedError(
                f"{request.method} is not allowed here", allow=allow.split(", ") if allow else []
            )
        elif exc.status_code == 404:
            error = RouteNotFoundError(f"no endpoint at {request.url.path}")
        else:
            error = _HttpError(exc.status_code, str(exc.detail))
        return envelope_of(request.scope).response(error)

    app.add_exception_handler(LlamaStreamError, domain_error)
    app.add_exception_handler(HTTPException, http_error)


class _HttpError(LlamaStreamError):
    """Another HTTP error Starlette raised, with its status."""

    code = "http_error"

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def unmatched(
    path: str, method: str, routes: Sequence[BaseRoute], *, full_path: str
) -> LlamaStreamError:
    """Why none of a family's ``routes`` serves ``method`` at ``path`` (relative to the family's
    prefix): 405 naming the methods the path has, or 404. For a family's catch-all route, which
    then answers in its family's envelope."""
    allow = {
        method
        for route in routes
        if isinstance(route, APIRoute) and route.path_regex.match(path)
        for method in route.methods or ()
    }
    if allow:
        return MethodNotAllowedError(f"{method} is not allowed here", allow=sorted(allow))
    return RouteNotFoundError(f"no endpoint at {full_path}")


def invalid_from_validation(exc: ValidationError) -> InvalidRequestError:
    """The first problem pydantic found, naming its field (``messages.0.content``)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in _field_path(first["loc"])) or "body"
    return InvalidRequestError(f"{field}: {first['msg']}", field=field)


def renamed(exc: InvalidRequestError, rules: Sequence[tuple[str, str]]) -> InvalidRequestError:
    """``exc`` naming the field as a dialect's client knows it: the first of ``rules``
    (regular expression, replacement) that matches the translated request's field name."""
    field = exc.field
    if field is None:
        return exc
    for pattern, replacement in rules:
        new, count = re.subn(f"^{pattern}", replacement, field)
        if count:
            message = exc.message
            if message.startswith(field):
                message = new + message[len(field) :]
            exc.message, exc.field = message, new
            break
    return exc


@contextlib.contextmanager
def renaming(rules: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Within: a 400 (or a pydantic refusal) names its field as `renamed` says."""
    try:
        yield
    except ValidationError as exc:
        raise renamed(invalid_from_validation(exc), rules) from None
    except InvalidRequestError as exc:
        raise renamed(exc, rules) from None


# pydantic adds the member tried to the location of an error in a union: `prompt.str`,
# `content.list[TextPart]`, `value.function-after[...]`; the client's field ends before it.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|bytes|none|[A-Za-z_-]+\[.*\]|[A-Z]\w*)$")


def _field_path(loc: tuple[int | str, ...]) -> list[int | str]:
    path: list[int | str] = []
    for part in loc:
        if isinstance(part, str) and _UNION_MEMBER.match(part) and path:
            break
        path.append(part)
    return path


def _headers(exc: LlamaStreamError) -> dict[str, str]:
    """The headers of every error answer, in every envelope."""
    headers = {"Cache-Control": "no-store"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, MethodNotAllowedError) and exc.allow:
        headers["Allow"] = ", ".join(exc.allow)
    return headers
