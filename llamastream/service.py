"""Service: the core every route family stands on.

It owns the worker pool, the slots and their queue, the runner of accepted requests, the
metrics, readiness and draining, the session turn locks, and admission (a slot, a place in the
queue, or 429/503). It exists, whole, from construction: `start` loads the model, `stop` frees
it. The HTTP side (``llamastream.api``) reaches it through one typed accessor and never the
other way round: nothing here imports ``llamastream.api``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio.to_thread

from llamastream.chat.reasoning import ReasoningBudget, Thinking, think_tags
from llamastream.config import Settings
from llamastream.engine.embeddings import Embedder
from llamastream.engine.pool import WorkerPool
from llamastream.engine.sampling import SamplingParams
from llamastream.engine.slots import SlotController, Ticket
from llamastream.errors import ModelNotFoundError, NotReadyError
from llamastream.metrics import Metrics
from llamastream.sessions.locks import TurnLocks
from llamastream.streaming import Callback, Run, Runner, WatchedStreamResponse

logger = logging.getLogger(__name__)

Status = Literal["ok", "loading", "draining"]


class Service:
    """One model's engine under load control.

    >>> service = Service(Settings(model_path="models/tiny.gguf"))
    >>> service.status, service.slots.load().max_processing
    ('loading', 2)
    """

    def __init__(self, settings: Settings, *, callback: Callback | None = None) -> None:
        self.settings = settings
        self.callback = callback  # fired once per accepted request of create_app's routes
        self.slots = SlotController(settings.num_of_concurrent_executions, settings.max_queue_size)
        self.metrics = Metrics(self.slots)
        self.pool = WorkerPool(settings)
        self.runner = Runner(
            self.pool,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_generation_s=settings.max_generation_s,
            metrics=self.metrics,
        )
        self.turn_locks = TurnLocks()
        self.embedder: Embedder | None = None  # built by start() when embeddings are set up
        self._closing: dict[str, tuple[int, ...]] = {}  # reasoning tags' closing tokens
        self.loaded = False
        self.draining = False

    # lifecycle

    @property
    def status(self) -> Status:
        if self.draining:
            return "draining"
        return "ok" if self.loaded else "loading"

    async def start(self) -> None:
        """Load the model into every worker."""
        self.draining = False
        await self.pool.start()
        await anyio.to_thread.run_sync(self.thinking, "")  # the closing tag's tokens, once
        path = self.settings.embedding_model_path
        if path is None and self.settings.embeddings_from_chat_model:
            path = self.pool.model_path
        if path is not None:
            embedder = Embedder(
                path,
                pooling=self.settings.embedding_pooling,
                n_ctx=self.settings.embedding_n_ctx,
                n_gpu_layers=self.settings.n_gpu_layers,
                n_threads=self.settings.n_threads,
                max_waiting=max(1, self.settings.max_queue_size),
            )
            try:
                await embedder.start()
            except BaseException:
                await self.pool.stop()
                raise
            self.embedder = embedder
        self.loaded = True
        self.turn_locks.start()

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
        self.turn_locks.stop()
        if self.loaded:
            self.loaded = False
            await self.pool.stop()
            if self.embedder is not None:
                await self.embedder.stop()
                self.embedder = None

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def load(self) -> dict[str, int]:
        """Busy and waiting requests, and their limits."""
        load = self.slots.load()
        return {
            "processing": load.processing,
            "waiting": load.waiting,
            "max_processing": load.max_processing,
            "max_waiting": load.max_waiting,
        }

    # admission

    def check_ready(self) -> None:
        """`NotReadyError` (503) while the model loads or the server drains."""
        if self.draining:
            raise _shutting_down()
        if not self.loaded:
            raise NotReadyError("the model is not loaded", retry_after=5)

    def admit(self, tokens: list[int], count: int = 1) -> Ticket:
        """A place for a prompt (``count`` slots for as many candidates): preferably the free
        slot whose cache holds most of it, else a place in the queue, else `QueueFullError`
        (429)."""
        prefer = self.pool.best_slot(tokens, self.slots.free_slots())
        return self.slots.reserve(prefer=prefer, count=count)

    def respond(self, run: Run) -> WatchedStreamResponse:
        """The response that runs an admitted request and streams it in its framing."""
        return self.runner.response(run)

    # the model

    @property
    def model_id(self) -> str:
        """The id the APIs serve the model under."""
        return self.settings.model_alias or self.pool.model_path.stem

    @property
    def model_names(self) -> set[str]:
        """The names a request may give the model by: its id and its aliases."""
        return {self.model_id, *self.settings.model_aliases}

    def embeddings(self) -> tuple[Embedder, str]:
        """The embedder and the id it serves under; 404 naming ``model`` when this server
        serves no embeddings."""
        embedder, served = self.embedder, self.embedding_model_id
        if embedder is None or served is None:
            raise ModelNotFoundError(
                "this server serves no embeddings (settings embedding_model_path or "
                "embeddings_from_chat_model)",
                field="model",
            )
        return embedder, served

    @property
    def embedding_model_id(self) -> str | None:
        """The id /v1/embeddings serves under (None: no embeddings)."""
        if self.embedder is None:
            return None
        if self.settings.embedding_model_path is None:
            return self.model_id  # the chat model
        return self.embedder.model_path.stem

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: the model file and the llama.cpp build."""
        return f"fp_{self.pool.fingerprint[:12]}"

    def default_params(self) -> SamplingParams:
        """The server's default sampling parameters."""
        return SamplingParams.from_settings(self.settings)

    def thinking(self, prompt: str, budget: int | None = None) -> Thinking | None:
        """How the model thinks in its reply to ``prompt`` (None: its template does not
        think); ``budget`` in tokens over the ``reasoning_budget`` setting (-1: none)."""
        tags = think_tags(self.pool.template.source)
        if tags is None:
            return None
        limit = self.settings.reasoning_budget if budget is None else budget
        inside = tags.opened_by(prompt)
        held = None
        if limit >= 0:
            close = self._closing.get(tags.close)
            if close is None:
                close = tuple(self.pool.tokenize_piece(f"\n{tags.close}\n\n"))
                self._closing[tags.close] = close
            held = ReasoningBudget(tags, limit, close, inside)
        return Thinking(tags, inside, self.pool.is_control(tags.open), held)

    async def tokenize(self, text: str) -> list[int]:
        """Prompt text → tokens, off the event loop."""
        return await anyio.to_thread.run_sync(self.pool.tokenize, text)


def _shutting_down() -> NotReadyError:
    return NotReadyError("the server is shutting down", retry_after=5)
