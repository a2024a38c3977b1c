"""The OpenAI-compatible API: request models, their wire format, and the /v1 routes."""

from llamastream.api.openai.routes import router

__all__ = ["router"]
