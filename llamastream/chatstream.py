"""ChatStream: the facade an endpoint calls to stream one chat turn under load control."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from llamastream.api.errors import error_response, invalid_from_validation
from llamastream.chat.prompt import ChatPrompt
from llamastream.config import Settings
from llamastream.engine.pool import WorkerPool
from llamastream.engine.sampling import GenerationParams, SamplingParams
from llamastream.engine.slots import SlotController, Ticket
from llamastream.errors import (
    BodyTooLargeError,
    InputTooLongError,
    InvalidRequestError,
    LlamaStreamError,
    NothingToRegenerateError,
    NotReadyError,
    PromptTemplateError,
)
from llamastream.metrics import Metrics
from llamastream.sessions.middleware import SessionManager
from llamastream.sessions.store import Session, SessionStore, new_session_id
from llamastream.streaming import Callback, Run, Runner

logger = logging.getLogger(__name__)

RequestBody = bytes | str | Mapping[str, Any] | None

MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
PROMPT_KEY = "chat_prompt"
PARAMS_KEY = "generation_params"


class ChatRequest(BaseModel):
    """The body of a chat turn."""

    model_config = ConfigDict(extra="ignore")

    user_input: StrictStr | None = Field(None, min_length=1)
    regenerate: StrictBool = False

    def check_length(self, max_chars: int) -> None:
        if self.user_input is not None and len(self.user_input) > max_chars:
            raise InvalidRequestError(
                f"user_input: at most {max_chars} characters", field="user_input"
            )


RENEW_TICK_S = 0.25  # how often held turn locks are checked for renewal


@dataclasses.dataclass
class _HeldLock:
    store: SessionStore
    token: str
    renewed_at: float = dataclasses.field(default_factory=time.monotonic)


class PlainTextFraming:
    """ChatStream's wire format: the reply as bare UTF-8 text chunks."""

    streaming = True

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        return 200, [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
            (MESSAGE_ID_HEADER.lower().encode(), run.id.encode()),
        ]

    def piece(self, run: Run, text: str) -> bytes:
        return text.encode()

    def tail(self, run: Run) -> bytes:
        return b""

    def error_tail(self, run: Run) -> bytes | None:
        return None  # plain text has no way to say so: the connection is cut

    def error_response(self, exc: LlamaStreamError) -> Response:
        return error_response(exc)


class ChatStream:
    """Streams chat turns from a pool of llama.cpp workers behind a slot controller.

    >>> from fastapi import FastAPI
    >>> chat_stream = ChatStream(model_path="models/tiny.gguf", num_of_concurrent_executions=2)
    >>> app = FastAPI(lifespan=chat_stream.lifespan)
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings.model_dump() if settings is not None else {}
        self.settings = Settings(**{**base, **overrides})
        self.slots = SlotController(
            self.settings.num_of_concurrent_executions, self.settings.max_queue_size
        )
        self.metrics = Metrics(self.slots)
        self.runner = Runner(
            max_queue_wait_s=self.settings.max_queue_wait_s,
            max_generation_s=self.settings.max_generation_s,
            metrics=self.metrics,
        )
        self.pool: WorkerPool | None = None
        self.draining = False
        self._held_locks: dict[str, _HeldLock] = {}
        self._renewer: asyncio.Task[None] | None = None

    # lifecycle

    @property
    def ready(self) -> bool:
        return self.pool is not None

    async def start(self) -> None:
        """Load the model into every worker."""
        self.draining = False
        pool = WorkerPool(self.settings)
        await pool.start()
        self.pool = pool
        self._renewer = asyncio.create_task(self._renew_locks())

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests (503, health too) and let running streams finish.

        Queued requests get 503 at once; streams still running after ``grace_s`` (default
        ``shutdown_grace_s``) are stopped, their partial replies saved and callbacks fired.
        """
        self.draining = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        logger.info("draining: %d request(s) in flight, %g s grace", len(self.runner.active), grace)
        await self.runner.drain(grace, _shutting_down)

    async def stop(self) -> None:
        if self.runner.active:
            await self.drain(0)
        pool, self.pool = self.pool, None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if pool is not None:
            await pool.stop()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # endpoints

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: RequestBody = None,
        callback: Callback | None = None,
    ) -> Response:
        """Queue one chat turn and stream its reply as plain text.

        Errors before the request is accepted come back as 4xx/5xx JSON and change nothing;
        once accepted, ``callback(request, message)`` fires exactly once, after the stream.
        """
        try:
            pool = self.require_pool()
            body = await read_json_body(request, request_body, self.settings.max_body_bytes)
            try:
                chat = ChatRequest.model_validate(body)
            except ValidationError as exc:
                raise invalid_from_validation(exc) from None
            if not chat.regenerate and chat.user_input is None:
                raise InvalidRequestError("user_input is required", field="user_input")
            chat.check_length(self.settings.max_input_chars)
            manager, session = self._session_of(request)
            lock = await self._lock(manager)
        except LlamaStreamError as exc:
            return error_response(exc)
        try:
            run = await self._prepare_turn(request, manager, session, chat, pool, callback, lock)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._unlock(manager, lock)
            if isinstance(exc, LlamaStreamError):
                return error_response(exc)
            raise
        return self.runner.response(pool, run)

    async def handle_clear_context_request(self, request: Request) -> Response:
        """Forget the conversation of the caller's session."""
        manager, session = self._session_of(request)
        try:
            async with self._session_locked(manager):
                prompt = self._prompt_of(session)
                prompt.clear()
                await self._save(manager)
                if self.pool is not None:
                    await self.pool.forget(session.id)
        except LlamaStreamError as exc:
            return error_response(exc)
        return JSONResponse({"status": "cleared"})

    async def handle_get_prompt_request(self, request: Request) -> Response:
        """The caller's conversation: the rendered prompt and its messages."""
        manager, session = self._session_of(request)
        try:
            await self._ensure_loaded(manager)
        except LlamaStreamError as exc:
            return error_response(exc)
        prompt = self._prompt_of(session)
        return JSONResponse(
            {
                "prompt": prompt.create_prompt(),
                "messages": [m.to_dict() for m in prompt.messages],
            }
        )

    async def handle_get_load_request(self, request: Request) -> Response:
        load = self.slots.load()
        return JSONResponse(
            {
                "processing": load.processing,
                "waiting": load.waiting,
                "max_processing": load.max_processing,
                "max_waiting": load.max_waiting,
            }
        )

    async def handle_set_generation_params_request(
        self, request: Request, request_body: RequestBody = None
    ) -> Response:
        """Store the caller's generation parameters; out-of-range values get 400."""
        manager, session = self._session_of(request)
        try:
            body = await read_json_body(request, request_body, self.settings.max_body_bytes)
            try:
                params = GenerationParams.model_validate(body)
            except ValidationError as exc:
                raise invalid_from_validation(exc) from None
            if params.max_new_tokens is not None and (
                params.max_new_tokens > self.settings.max_new_tokens
            ):
                raise InvalidRequestError(
                    f"max_new_tokens: at most {self.settings.max_new_tokens}",
                    field="max_new_tokens",
                )
            async with self._session_locked(manager):
                stored = dict(session.get(PARAMS_KEY) or {})
                stored.update(params.model_dump(exclude_unset=True))
                session[PARAMS_KEY] = stored
                await self._save(manager)
        except LlamaStreamError as exc:
            return error_response(exc)
        return JSONResponse(self._effective_params(session))

    async def handle_get_generation_params_request(self, request: Request) -> Response:
        manager, session = self._session_of(request)
        try:
            await self._ensure_loaded(manager)
        except LlamaStreamError as exc:
            return error_response(exc)
        return JSONResponse(self._effective_params(session))

    # a turn

    async def _prepare_turn(
        self,
        request: Request,
        manager: SessionManager | None,
        session: Session,
        chat: ChatRequest,
        pool: WorkerPool,
        callback: Callback | None,
        lock: str | None,
    ) -> Run:
        # Written before anything is generated: a store that cannot keep the reply refuses
        # the turn (503) instead of losing it; the write also refreshes the session's TTL.
        await self._save(manager)
        prompt = self._prompt_of(session)
        before = list(prompt.messages)
        if chat.regenerate:
            prompt.remove_trailing_assistant()
            if not prompt.messages or prompt.messages[-1].role != "user":
                prompt.messages[:] = before
                raise NothingToRegenerateError(
                    "there is no user input to regenerate a reply for", field="regenerate"
                )
            if chat.user_input is not None:
                prompt.messages[-1] = dataclasses.replace(
                    prompt.messages[-1], content=chat.user_input
                )
        else:
            assert chat.user_input is not None
            prompt.add_user_message(chat.user_input)
        params = self._sampling_params(session)
        try:
            tokens = await anyio.to_thread.run_sync(self._tokenize_fitting, pool, prompt, params)
            max_new = min(params.max_new_tokens, self.settings.n_ctx - len(tokens))
            params = params.updated(max_new_tokens=max_new)
            ticket = self.reserve_slot(pool, tokens)
        except BaseException:
            prompt.messages[:] = before
            raise

        async def settle(run: Run) -> None:
            """Store the turn: the reply (partial if cut short), or the history as it was."""
            try:
                if run.outcome == "success":
                    prompt.add_assistant_message(run.reply, message_id=run.id)
                elif run.started:
                    prompt.add_assistant_message(run.reply, partial=True, message_id=run.id)
                else:
                    prompt.messages[:] = before
                if prompt.messages != before:
                    await self._save(manager)
            finally:
                await self._unlock(manager, lock)

        # Only conversations under way have their cache saved when they lose their slot: most
        # first turns are never continued, and saving costs the worker a pause.
        under_way = any(m.role == "assistant" for m in before)
        key = session.id if manager is not None and under_way else None
        return Run(
            request,
            tokens,
            params,
            ticket,
            PlainTextFraming(),
            callback,
            on_settle=settle,
            cache_key=key,
        )

    def _tokenize_fitting(
        self, pool: WorkerPool, prompt: ChatPrompt, params: SamplingParams
    ) -> list[int]:
        budget = self.settings.n_ctx - params.max_new_tokens
        view = prompt.copy()
        for message in view.messages:
            message.content = pool.defuse(message.content)
        try:
            if view.fit(lambda text: len(pool.tokenize(text)), budget) > budget:
                raise InputTooLongError(
                    f"the input does not fit in the context window ({budget} tokens)",
                    field="user_input",
                )
            return pool.tokenize(view.create_prompt())
        except TemplateError as exc:
            logger.error("the chat template failed: %s", exc)
            raise PromptTemplateError(f"the model's chat template failed: {exc}") from None

    # sessions

    def _session_of(self, request: Request) -> tuple[SessionManager | None, Session]:
        manager = getattr(request.state, "session", None)
        if isinstance(manager, SessionManager):
            return manager, manager.get_session()
        # Without SessionMiddleware every request is a conversation of its own.
        return None, Session(new_session_id())

    async def _lock(self, manager: SessionManager | None) -> str | None:
        """Take the session's turn lock (409 when held) and read its latest record.

        Reading again under the lock means a turn always extends the latest history, even
        when the previous turn ran on another replica after this request's session was loaded.
        """
        if manager is None:
            return None
        token = await manager.store.lock(manager.session_id)
        self._held_locks[manager.session_id] = _HeldLock(manager.store, token)
        try:
            await manager.reload()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._unlock(manager, token)
            raise
        return token

    async def _unlock(self, manager: SessionManager | None, token: str | None) -> None:
        if manager is None or token is None:
            return
        held = self._held_locks.get(manager.session_id)
        if held is not None and held.token == token:
            del self._held_locks[manager.session_id]
        try:
            await manager.store.unlock(manager.session_id, token)
        except LlamaStreamError:
            logger.warning("session %s: the lock expires by itself", manager.session_id[:8])

    @asynccontextmanager
    async def _session_locked(self, manager: SessionManager | None) -> AsyncIterator[None]:
        token = await self._lock(manager)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._unlock(manager, token)

    async def _ensure_loaded(self, manager: SessionManager | None) -> None:
        """Read the session again if the store failed when the request came in."""
        if manager is not None and not manager.loaded:
            await manager.reload()

    async def _renew_locks(self) -> None:
        """Keep the turn locks of running turns from expiring: each renewed every third of its
        expiry, all at once (a slow store must not make the last of them late)."""
        while True:
            await asyncio.sleep(RENEW_TICK_S)
            now = time.monotonic()
            due = [
                (session_id, held)
                for session_id, held in list(self._held_locks.items())
                if now - held.renewed_at >= held.store.lock_ttl_s / 3
            ]
            await asyncio.gather(*(self._renew(session_id, held) for session_id, held in due))

    async def _renew(self, session_id: str, held: _HeldLock) -> None:
        try:
            renewed = await held.store.renew(session_id, held.token)
        except Exception:
            logger.warning("session %s: could not renew its turn lock", session_id[:8])
            return
        held.renewed_at = time.monotonic()
        if not renewed and self._held_locks.get(session_id) is held:
            logger.warning("session %s: its turn lock was lost", session_id[:8])

    def _prompt_of(self, session: Session) -> ChatPrompt:
        prompt = session.get(PROMPT_KEY)
        if not isinstance(prompt, ChatPrompt):
            prompt = session[PROMPT_KEY] = ChatPrompt()
        prompt.system_prompt = self.settings.system_prompt
        if self.pool is not None:
            prompt.template = self.pool.template
        return prompt

    async def _save(self, manager: SessionManager | None) -> None:
        if manager is not None:
            await manager.save_session()

    def default_params(self) -> SamplingParams:
        """The server's default sampling parameters, from Settings."""
        s = self.settings
        return SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repeat_penalty=s.repeat_penalty,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed,
        )

    def _sampling_params(self, session: Session) -> SamplingParams:
        return self.default_params().updated(**(session.get(PARAMS_KEY) or {}))

    def _effective_params(self, session: Session) -> dict[str, Any]:
        """The session's parameters in force: exactly the fields a session may set."""
        params = self._sampling_params(session)
        return {name: getattr(params, name) for name in GenerationParams.model_fields}

    # helpers

    def reserve_slot(self, pool: WorkerPool, tokens: list[int]) -> Ticket:
        """A place for a prompt: preferably the free slot whose cache holds most of it."""
        return self.slots.reserve(prefer=pool.best_slot(tokens, self.slots.free_slots()))

    def require_pool(self) -> WorkerPool:
        """The loaded pool, or `NotReadyError` (503) while loading or shutting down."""
        if self.draining:
            raise _shutting_down()
        if self.pool is None:
            raise NotReadyError("the model is not loaded", retry_after=5)
        return self.pool


def _shutting_down() -> NotReadyError:
    return NotReadyError("the server is shutting down", retry_after=5)


async def read_json_body(request: Request, given: RequestBody, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object (or the body an endpoint already read and handed on).

    Raises `BodyTooLargeError` past ``max_bytes`` (before reading, when Content-Length says so)
    and `InvalidRequestError` naming ``body`` for anything that is not a UTF-8 JSON object.
    """
    if isinstance(given, Mapping):
        return dict(given)
    if given is None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise BodyTooLargeError(f"the body is larger than {max_bytes} bytes", field="body")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLargeError(
                        f"the body is larger than {max_bytes} bytes", field="body"
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise InvalidRequestError(
                "the client left while sending the body", field="body"
            ) from None
        given = b"".join(chunks)
    raw = given.encode() if isinstance(given, str) else given
    if len(raw) > max_bytes:
        raise BodyTooLargeError(f"the body is larger than {max_bytes} bytes", field="body")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequestError("the body is not valid UTF-8", field="body") from None
    except ValueError:
        raise InvalidRequestError("the body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object", field="body")
    return data
