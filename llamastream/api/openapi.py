"""OpenAPI text for routes that read their JSON bodies themselves, and for their errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "The error code."},
        "message": {"type": "string"},
        "field": {"type": "string", "description": "The offending field, for 400 and 413."},
    },
}

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

ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}

_WHY = {
    400: "The body or a parameter is not acceptable (`field` names it).",
    401: "An API key is required and none, or a wrong one, was given.",
    403: "The key given may not use this endpoint.",
    404: "No such model.",
    409: "Another request of this session is still running.",
    413: "The body is larger than max_body_bytes.",
    429: "Every slot is busy and the wait queue is full.",
    500: "Generation failed before any text was sent.",
    503: "Not ready (loading or draining), no slot within max_queue_wait_s, or the session "
    "store is unavailable.",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error_responses(*statuses: int, schema: dict[str, Any] = ERROR_SCHEMA) -> dict[int | str, Any]:
    """OpenAPI entries for the JSON errors a route can answer with."""
    out: dict[int | str, Any] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _WHY[status],
            "content": {"application/json": {"schema": schema}},
        }
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI text for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def model_body(model: type[BaseModel]) -> dict[str, Any]:
    """`json_body` of a pydantic model's schema, its ``$defs`` inlined (a route's text cannot
    add to the document's components)."""
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


def json_ok(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}
