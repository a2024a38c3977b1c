"""Who may call which endpoint: roles per endpoint from Settings, keys as Bearer tokens."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import Request

from llamastream.api.deps import service_of
from llamastream.config import Settings
from llamastream.errors import AuthenticationError, ForbiddenError


def check_access(settings: Settings, request: Request, endpoint: str) -> None:
    """Raise `AuthenticationError` (401) or `ForbiddenError` (403) unless the caller may.

    ``public`` endpoints take anyone; ``user`` ones a user or admin key when ``api_keys`` is
    set (anyone otherwise); ``admin`` ones an admin key.
    """
    role = settings.endpoint_roles[endpoint]
    if role == "public":
        return
    given = _bearer(request)
    if given is not None and _matches(given, settings.admin_keys):
        return
    is_user = given is not None and _matches(given, settings.api_keys)
    if role == "user" and (is_user or not settings.api_keys):
        return
    if role == "admin" and is_user:
        raise ForbiddenError(f"{endpoint} needs an admin key")
    needed = "an admin" if role == "admin" else "a valid API"
    raise AuthenticationError(
        f"{needed} key is required (Authorization: Bearer KEY, or x-api-key: KEY)"
    )


def require(endpoint: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency checking ``endpoint``'s role."""

    async def dependency(request: Request) -> None:
        check_access(service_of(request).settings, request, endpoint)

    return dependency


def _bearer(request: Request) -> str | None:
    """The key the caller gave: ``Authorization: Bearer KEY``, or Anthropic's ``x-api-key``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _matches(given: str, keys: list[str]) -> bool:
    # Compare with every key, each in constant time, so timing says nothing about any of them.
    found = False
    for key in keys:
        found |= secrets.compare_digest(given.encode(), key.encode())
    return found
