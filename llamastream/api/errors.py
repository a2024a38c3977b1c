"""Domain exceptions → JSON error responses, in one place."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from llamastream.errors import InvalidRequestError, LlamaStreamError


def error_response(exc: LlamaStreamError) -> JSONResponse:
    """``{"error": code, "message": ..., "field": ...}`` with the exception's status."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.field is not None:
        body["field"] = exc.field
    return JSONResponse(body, status_code=exc.status_code, headers=_headers(exc))


def invalid_from_validation(exc: ValidationError) -> InvalidRequestError:
    """The first problem pydantic found, naming its field (``messages.0.content``)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in _field_path(first["loc"])) or "body"
    return InvalidRequestError(f"{field}: {first['msg']}", field=field)


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


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def openai_error_response(exc: LlamaStreamError) -> JSONResponse:
    """The same errors in OpenAI's envelope: ``{"error": {message, type, param, code}}``."""
    body = {
        "error": {
            "message": exc.message,
            "type": OPENAI_ERROR_TYPES.get(exc.status_code, "server_error"),
            "param": exc.field,
            "code": exc.code,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=_headers(exc))


def _headers(exc: LlamaStreamError) -> dict[str, str]:
    """The headers of every error answer, native or OpenAI-shaped."""
    headers = {"Cache-Control": "no-store"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers
