"""ChatStream: the session-chat facade an endpoint calls to stream one chat turn.

It stands on a `Service` (slots, queue, workers, callbacks) and adds what a chat session needs:
the session's turn lock, its history (a `ChatPrompt` in the session), the prompt fitted to the
context, and ChatStream's wire format (the reply as plain text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llamastream.api.body import RequestBody, parse_body
from llamastream.api.errors import NATIVE, invalid_from_validation
from llamastream.chat.prompt import ChatPrompt
from llamastream.chat.reasoning import Kind, Thinking
from llamastream.config import Settings
from llamastream.engine.pool import WorkerPool
from llamastream.engine.sampling import GenerationParams, SamplingParams
from llamastream.engine.slots import SlotController
from llamastream.errors import (
    InputTooLongError,
    InvalidRequestError,
    LlamaStreamError,
    NothingToRegenerateError,
)
from llamastream.metrics import Metrics
from llamastream.registry import ServedModel
from llamastream.service import Service
from llamastream.sessions.middleware import SessionManager
from llamastream.sessions.record import Session, new_session_id
from llamastream.streaming import Callback, Run

logger = logging.getLogger(__name__)

MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
PROMPT_KEY = "chat_prompt"
PARAMS_KEY = "generation_params"
MODEL_KEY = "model"  # the session's model (unset: the server's default)


class SessionParams(GenerationParams):
    """What a session may set: its generation parameters and its model."""

    model: StrictStr | None = None


class ChatRequest(BaseModel):
    """The body of a chat turn."""

    model_config = ConfigDict(extra="ignore")

    user_input: StrictStr | None = None
    regenerate: StrictBool = False
    model: StrictStr | None = None  # a configured model; kept as the session's model

    def check(self, max_chars: int) -> None:
        """Refuse a turn with no input (unless regenerating: then an empty input is none, as
        ChatStream's clients send it) or too long an input."""
        if self.regenerate and self.user_input == "":
            self.user_input = None
        if not self.regenerate and not self.user_input:
            raise InvalidRequestError("user_input is required", field="user_input")
        if self.user_input is not None and len(self.user_input) > max_chars:
            raise InvalidRequestError(
                f"user_input: at most {max_chars} characters", field="user_input"
            )


class PlainTextFraming:
    """ChatStream's wire format: the reply as bare UTF-8 text chunks.

    A thinking model's reasoning, when kept apart, comes first between its model's tags, always
    both written (``<think>…</think>`` then a blank line), so a client can tell it from the
    answer even when the prompt opened the tag.
    """

    streaming = True
    media_type = b"text/plain; charset=utf-8"

    def __init__(self, thinking: Thinking | None = None) -> None:
        self.thinking = thinking
        self._splitter = thinking.splitter() if thinking is not None else None
        self._in: Kind | None = None  # the part being written

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        return 200, [
            (b"content-type", self.media_type),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
            (MESSAGE_ID_HEADER.lower().encode(), run.id.encode()),
        ]

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        if self._splitter is None:
            return self._part("content", text)
        return b"".join(self._part(kind, part) for kind, part in self._splitter.feed(text))

    def tail(self, run: Run) -> bytes:
        parts = self._splitter.finish() if self._splitter is not None else []
        out = b"".join(self._part(kind, part) for kind, part in parts)
        return out + self._end(run)

    def _part(self, kind: Kind, text: str) -> bytes:
        tags = self.thinking.tags if self.thinking is not None else None
        out = ""
        if kind == "reasoning" and self._in is None and tags is not None:
            out = tags.open
        elif kind == "content" and self._in == "reasoning" and tags is not None:
            out = tags.close + "\n\n"
        self._in = kind
        return (out + text).encode()

    def _end(self, run: Run) -> bytes:
        if self._in == "reasoning" and self.thinking is not None:
            return self.thinking.tags.close.encode()  # the reply ended while thinking
        return b""

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        return NATIVE.mid_stream(exc)

    def error_response(self, exc: LlamaStreamError) -> Response:
        return NATIVE.response(exc)


class NdjsonFraming(PlainTextFraming):
    """The reply as JSON lines (``Accept: application/x-ndjson``): ``{"type": "reasoning" |
    "content", "text"}`` as they come, then ``{"type": "done", "finish_reason", "message_id",
    "usage"}``; an error after the stream started ends it with ``{"type": "error", ...}``."""

    media_type = b"application/x-ndjson"

    def _part(self, kind: Kind, text: str) -> bytes:
        return _line({"type": kind, "text": text}) if text else b""

    def _end(self, run: Run) -> bytes:
        finished = run.finished
        completion = finished.completion_tokens if finished is not None else 0
        return _line(
            {
                "type": "done",
                "finish_reason": "length" if finished and finished.reason == "length" else "stop",
                "message_id": run.id,
                "usage": {
                    "prompt_tokens": len(run.tokens),
                    "completion_tokens": completion,
                    "cached_tokens": finished.cached_tokens if finished is not None else 0,
                },
            }
        )

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        return _line({"type": "error", **NATIVE.body(exc)})


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


def _framing(request: Request, thinking: Thinking | None) -> PlainTextFraming:
    """The framing the client asked for: JSON lines, or ChatStream's plain text."""
    accept = request.headers.get("accept", "")
    if "application/x-ndjson" in accept:
        return NdjsonFraming(thinking)
    return PlainTextFraming(thinking)


@dataclasses.dataclass
class _Turn:
    """A chat turn under way: how to store its outcome and release its session."""

    service: Service
    manager: SessionManager | None
    prompt: ChatPrompt
    before: list[Any]  # the messages before the turn
    lock: str | None
    thinking: Thinking | None = None  # a thinking model's reasoning, kept apart

    async def settle(self, run: Run) -> None:
        """Store the turn: the reply (partial if cut short), or the history as it was."""
        prompt = self.prompt
        try:
            if run.started or run.outcome == "success":
                reasoning, answer = "", run.reply
                if self.thinking is not None:
                    reasoning, answer = self.thinking.splitter().split(run.reply)
                prompt.add_assistant_message(
                    answer,
                    reasoning=reasoning,
                    partial=run.outcome != "success",
                    message_id=run.id,
                )
            else:
                prompt.messages[:] = self.before
            if prompt.messages != self.before:
                await _save(self.manager)
        finally:
            await self.service.turn_locks.unlock(self.manager, self.lock)


class ChatStream:
    """Streams chat turns of the caller's session from a `Service`.

    >>> from fastapi import FastAPI
    >>> chat_stream = ChatStream(model_path="models/tiny.gguf", num_of_concurrent_executions=2)
    >>> app = FastAPI(lifespan=chat_stream.lifespan)
    """

    def __init__(
        self, settings: Settings | None = None, *, service: Service | None = None, **overrides: Any
    ) -> None:
        if service is None:
            service = Service(Settings.merged(settings, **overrides))
        elif settings is not None or overrides:
            raise ValueError("settings come with the service")
        self.service = service
        self.settings = service.settings

    # the service's parts, as ChatStream has always shown them

    @property
    def slots(self) -> SlotController:
        return self.service.slots

    @property
    def pool(self) -> WorkerPool:
        return self.service.pool

    @property
    def metrics(self) -> Metrics:
        return self.service.metrics

    @property
    def draining(self) -> bool:
        return self.service.draining

    @property
    def ready(self) -> bool:
        return self.service.status == "ok"

    # lifecycle, the service's

    async def start(self) -> None:
        """Load the model into every worker."""
        await self.service.start()

    async def start_queue_worker(self) -> None:
        """ChatStream's name for `start`, for applications written against it."""
        await self.start()

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests (503, health too) and let running streams finish.

        Queued requests get 503 at once; streams still running after ``grace_s`` (default
        ``shutdown_grace_s``) are stopped, their partial replies saved and callbacks fired.
        """
        await self.service.drain(grace_s)

    async def stop(self) -> None:
        await self.service.stop()

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[None]:
        return self.service.lifespan(app)

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
        service = self.service
        try:
            service.check_ready()
            chat = await parse_body(
                request, request_body, self.settings.max_body_bytes, ChatRequest
            )
            chat.check(self.settings.max_input_chars)
            if chat.model is not None:  # 404 naming the field before anything else
                chat.model = service.models.get(chat.model).name  # an alias: the model's id
            manager, session = _session_of(request)
            lock = await service.turn_locks.lock(manager)
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        try:
            if chat.model is not None:
                session[MODEL_KEY] = chat.model
            async with service.use(self._model_name(session)) as model:
                run = await self._prepare_turn(request, manager, session, chat, lock, model)
                run.callback = callback
                return model.respond(run)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await service.turn_locks.unlock(manager, lock)
            if isinstance(exc, LlamaStreamError):
                return NATIVE.response(exc)
            raise

    async def handle_starlette_request(
        self,
        request: Request,
        request_body: RequestBody = None,
        callback: Callback | None = None,
    ) -> Response:
        """ChatStream's older name for `handle_chat_stream_request`."""
        return await self.handle_chat_stream_request(request, request_body, callback)

    async def handle_clear_context_request(self, request: Request) -> Response:
        """Forget the conversation of the caller's session."""
        manager, session = _session_of(request)
        try:
            async with self.service.turn_locks.locked(manager):
                self._prompt_of(session).clear()
                await _save(manager)
                await self.service.models.forget(session.id)
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        return JSONResponse({"status": "cleared"})

    async def handle_get_prompt_request(self, request: Request) -> Response:
        """The caller's conversation: the rendered prompt and its messages."""
        manager, session = _session_of(request)
        try:
            await _ensure_loaded(manager)
            model = self.service.models.get(self._model_name(session))
            prompt = self._prompt_of(session, model)
            # Rendered with the model's template when it is loaded; reading a conversation
            # never loads a model (nor evicts another).
            text = prompt.create_prompt() if model.loaded else None
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        return JSONResponse(
            {
                "prompt": text,
                "messages": [m.to_dict() for m in prompt.messages],
                "model": model.name,
            }
        )

    async def handle_get_load_request(self, request: Request) -> Response:
        """Busy and waiting requests over every model, and per model with its state."""
        models = {m.name: {**m.load(), "state": m.state} for m in self.service.models.models}
        return JSONResponse({**self.service.load(), "models": models})

    async def handle_get_models_request(self, request: Request) -> Response:
        """The configured models with their state, and the caller's session's model."""
        manager, session = _session_of(request)
        try:
            await _ensure_loaded(manager)
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        models = [
            {
                "id": m.name,
                "state": m.state,
                "n_ctx": m.settings.n_ctx,
                **({"error": m.error} if m.error else {}),
            }
            for m in self.service.models.models
        ]
        return JSONResponse(
            {
                "models": models,
                "default": self.service.default.name,
                "model": self._model_name(session) or self.service.default.name,
            }
        )

    async def handle_set_generation_params_request(
        self, request: Request, request_body: RequestBody = None
    ) -> Response:
        """Store the caller's generation parameters; out-of-range values get 400."""
        manager, session = _session_of(request)
        try:
            params = await parse_body(
                request, request_body, self.settings.max_body_bytes, SessionParams
            )
            model = self.service.models.get(params.model or self._model_name(session))
            params.check_cap(model.settings.reply_limit())
            async with self.service.turn_locks.locked(manager):
                stored = dict(session.get(PARAMS_KEY) or {})
                stored.update(params.model_dump(exclude_unset=True, exclude={"model"}))
                session[PARAMS_KEY] = stored
                if params.model is not None:
                    session[MODEL_KEY] = model.name
                await _save(manager)
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        return JSONResponse(self._effective_params(session))

    async def handle_get_generation_params_request(self, request: Request) -> Response:
        manager, session = _session_of(request)
        try:
            await _ensure_loaded(manager)
        except LlamaStreamError as exc:
            return NATIVE.response(exc)
        return JSONResponse(self._effective_params(session))

    # a turn

    async def _prepare_turn(
        self,
        request: Request,
        manager: SessionManager | None,
        session: Session,
        chat: ChatRequest,
        lock: str | None,
        model: ServedModel,
    ) -> Run:
        # Written before anything is generated: a store that cannot keep the reply refuses
        # the turn (503) instead of losing it; the write also refreshes the session's TTL.
        await _save(manager)
        prompt = self._prompt_of(session, model)
        turn = _Turn(self.service, manager, prompt, list(prompt.messages), lock)
        _add_input(prompt, chat)
        try:
            params = self._sampling_params(session, model)
            tokens, prompt_text = await anyio.to_thread.run_sync(
                self._tokenize_fitting, model, prompt, params
            )
            max_new = min(params.max_new_tokens, model.settings.n_ctx - len(tokens))
            params = params.updated(max_new_tokens=max_new)
            thinking = model.thinking(prompt_text)
            if thinking is not None:
                params = params.updated(
                    reasoning=thinking.budget, special_tokens=thinking.special or None
                )
                if model.settings.reasoning_format == "none":
                    thinking = None
            turn.thinking = thinking
            ticket = model.admit(tokens)
        except BaseException:
            prompt.messages[:] = turn.before
            raise
        # Only conversations under way have their cache saved when they lose their slot: most
        # first turns are never continued, and saving costs the worker a pause.
        under_way = any(m.role == "assistant" for m in turn.before)
        key = session.id if manager is not None and under_way else None
        return Run(
            request,
            tokens,
            params,
            ticket,
            _framing(request, thinking),
            on_settle=turn.settle,
            cache_key=key,
        )

    def _tokenize_fitting(
        self, model: ServedModel, prompt: ChatPrompt, params: SamplingParams
    ) -> tuple[list[int], str]:
        """The prompt's tokens and text, its oldest turns dropped until it fits."""
        pool, settings = model.pool, model.settings
        # Room kept for the reply: what the session asks, at most the default length (a
        # longer reply is cut to the room the prompt leaves, as on /v1).
        budget = settings.n_ctx - min(params.max_new_tokens, settings.max_new_tokens)
        view = prompt.copy()
        for message in view.messages:
            message.content = pool.defuse(message.content)
            message.reasoning = pool.defuse(message.reasoning)
        if view.fit(lambda text: len(pool.tokenize(text)), budget) > budget:
            raise InputTooLongError(
                f"the input does not fit in the context window ({budget} tokens)",
                field="user_input",
            )
        text = view.create_prompt()
        return pool.tokenize(text), text

    def _model_name(self, session: Session) -> str | None:
        """The session's model (None: the default; so is one no longer configured)."""
        name = session.get(MODEL_KEY)
        if isinstance(name, str) and name in self.service.models.by_name:
            return name
        return None

    def _prompt_of(self, session: Session, model: ServedModel | None = None) -> ChatPrompt:
        """The session's conversation, as a `ChatPrompt` kept in the session (rendered with
        ``model``'s template)."""
        stored = session.get(PROMPT_KEY)
        if isinstance(stored, ChatPrompt):
            prompt = stored
        else:
            prompt = session[PROMPT_KEY] = ChatPrompt.from_record(stored)
        model = model or self.service.default
        prompt.system_prompt = model.settings.system_prompt
        prompt.template = model.pool.template
        return prompt

    def _sampling_params(self, session: Session, model: ServedModel) -> SamplingParams:
        """The model's defaults with the session's own parameters (validated when set)."""
        try:
            stored = GenerationParams.model_validate(session.get(PARAMS_KEY) or {})
        except ValidationError as exc:  # set under older limits: the session must set them again
            error = invalid_from_validation(exc)
            raise InvalidRequestError(
                f"generation_params.{error.message}", field=f"generation_params.{error.field}"
            ) from None
        return stored.apply(model.default_params())

    def _effective_params(self, session: Session) -> dict[str, Any]:
        """The session's parameters in force: exactly the fields a session may set, and its
        model."""
        model = self.service.models.get(self._model_name(session))
        params = self._sampling_params(session, model)
        return {
            **{name: getattr(params, name) for name in GenerationParams.model_fields},
            "model": model.name,
        }


def _add_input(prompt: ChatPrompt, chat: ChatRequest) -> None:
    """Add the user's turn, or drop the last reply to regenerate it (with a new input if one
    is given); `NothingToRegenerateError` leaves the prompt as it was."""
    if not chat.regenerate:
        assert chat.user_input is not None
        prompt.add_user_message(chat.user_input)
        return
    before = list(prompt.messages)
    prompt.remove_trailing_assistant()
    if not prompt.messages or prompt.messages[-1].role != "user":
        prompt.messages[:] = before
        raise NothingToRegenerateError(
            "there is no user input to regenerate a reply for", field="regenerate"
        )
    if chat.user_input is not None:
        prompt.messages[-1] = dataclasses.replace(prompt.messages[-1], content=chat.user_input)


def _session_of(request: Request) -> tuple[SessionManager | None, Session]:
    manager = getattr(request.state, "session", None)
    if isinstance(manager, SessionManager):
        return manager, manager.get_session()
    # Without SessionMiddleware every request is a conversation of its own.
    return None, Session(new_session_id())


async def _ensure_loaded(manager: SessionManager | None) -> None:
    """Read the session again if the store failed when the request came in."""
    if manager is not None and not manager.loaded:
        await manager.reload()


async def _save(manager: SessionManager | None) -> None:
    if manager is not None:
        await manager.save_session()
