"""Domain exceptions, each with its HTTP status and error code; `llamastream.api.errors` turns
them into each API's error envelope in one place."""

from __future__ import annotations


class LlamaStreamError(Exception):
    """Base of every error the server answers with a JSON body."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, field: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds, sent as Retry-After when set


class InvalidRequestError(LlamaStreamError):
    """The request body or a parameter is not acceptable; ``field`` names it."""

    status_code = 400
    code = "invalid_request"


class InputTooLongError(InvalidRequestError):
    """The input alone does not fit in the context window."""

    code = "input_too_long"


class NothingToRegenerateError(InvalidRequestError):
    """`regenerate` was asked for, but the conversation has no user input yet."""

    code = "nothing_to_regenerate"


class ContextLengthError(InvalidRequestError):
    """Prompt and requested completion together exceed the context window."""

    code = "context_length_exceeded"


class AuthenticationError(LlamaStreamError):
    status_code = 401
    code = "invalid_api_key"


class ForbiddenError(LlamaStreamError):
    """The key given is valid but its role may not use this endpoint."""

    status_code = 403
    code = "forbidden"


class ModelNotFoundError(LlamaStreamError):
    status_code = 404
    code = "model_not_found"


class BodyTooLargeError(LlamaStreamError):
    status_code = 413
    code = "body_too_large"


class SessionBusyError(LlamaStreamError):
    """Another request of the same session is still running."""

    status_code = 409
    code = "session_busy"


class ModelBusyError(LlamaStreamError):
    """A model cannot be unloaded while requests run on it or wait for it."""

    status_code = 409
    code = "model_busy"


class QueueFullError(LlamaStreamError):
    """Every slot is busy and the wait queue is full."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(
            message or "all generation slots are busy and the wait queue is full",
            retry_after=retry_after,
        )


class QueueTimeoutError(LlamaStreamError):
    """The request waited for a slot longer than ``max_queue_wait_s``."""

    status_code = 503
    code = "queue_timeout"


class NotReadyError(LlamaStreamError):
    """The engine is not started (still loading, or shutting down)."""

    status_code = 503
    code = "not_ready"


class ModelUnavailableError(LlamaStreamError):
    """A configured model cannot be loaded: its file is missing or unreadable, it cannot fit
    in memory even alone, or busy models hold the memory it needs."""

    status_code = 503
    code = "model_unavailable"


class SessionStoreError(LlamaStreamError):
    """The session store cannot be read or written: chat is refused rather than not saved."""

    status_code = 503
    code = "session_store_unavailable"


class PromptTemplateError(InvalidRequestError):
    """The model's chat template refused to render the conversation (400 on every route:
    templates refuse conversations, e.g. roles out of the order they accept)."""

    code = "template_error"


class GenerationError(LlamaStreamError):
    """llama.cpp failed while generating."""

    code = "generation_failed"


class RouteNotFoundError(LlamaStreamError):
    """No endpoint at this path."""

    status_code = 404
    code = "not_found"


class MethodNotAllowedError(LlamaStreamError):
    """The path exists, with other methods (``allow``)."""

    status_code = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow
