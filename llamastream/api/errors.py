"""Domain exceptions → JSON error responses, in one place."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from llamastream.errors import InvalidRequestError, LlamaStreamError, QueueFullError


def error_response(exc: LlamaStreamError) -> JSONResponse:
    """``{"error": code, "message": ..., "field": ...}`` with the exception's status."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.field is not None:
        body["field"] = exc.field
    headers = {"Cache-Control": "no-store"}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def invalid_from_validation(exc: ValidationError) -> InvalidRequestError:
    """The first problem pydantic found, naming its field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return InvalidRequestError(f"{field}: {first['msg']}", field=field)
