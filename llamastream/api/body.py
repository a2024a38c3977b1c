"""Reading a request's JSON body: size caps, UTF-8, a JSON object."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from llamastream.api.errors import invalid_from_validation
from llamastream.errors import BodyTooLargeError, InvalidRequestError

# What an endpoint may hand on when it read the body itself: the raw bytes or text, or the
# parsed object.
RequestBody = bytes | str | Mapping[str, Any] | None
ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json_body(request: Request, given: RequestBody, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object (or the body an endpoint already read and handed on).

    Raises `BodyTooLargeError` past ``max_bytes`` (before reading, when Content-Length says so)
    and `InvalidRequestError` naming ``body`` for anything that is not a UTF-8 JSON object.
    """
    if isinstance(given, Mapping):
        return dict(given)
    if given is None:
        given = await _read(request, max_bytes)
    raw = given.encode() if isinstance(given, str) else given
    if len(raw) > max_bytes:
        raise _too_large(max_bytes)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequestError("the body is not valid UTF-8", field="body") from None
    except ValueError:
        raise InvalidRequestError("the body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object", field="body")
    return data


async def parse_body(
    request: Request, given: RequestBody, max_bytes: int, model: type[ModelT]
) -> ModelT:
    """The body validated as ``model``; a 400 naming the first offending field."""
    body = await read_json_body(request, given, max_bytes)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


async def _read(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequestError("the client left while sending the body", field="body") from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"the body is larger than {max_bytes} bytes", field="body")
