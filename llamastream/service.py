"""Service: the core every route family stands on.

It owns the configured models (each with its worker pool, slots and queue, and runner: the
`ModelRegistry`), the metrics, readiness and draining, the session turn locks, and admission
(the named model, loaded; a slot, a place in the queue, or 429/503). It exists, whole, from
construction: `start` loads the default model, `stop` frees every model. The HTTP side
(``llamastream.api``) reaches it through one typed accessor and never the other way round:
nothing here imports ``llamastream.api``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

from llamastream.config import Settings
from llamastream.engine.embeddings import Embedder
from llamastream.engine.pool import WorkerPool
from llamastream.engine.slots import SlotController
from llamastream.errors import ModelNotFoundError, NotReadyError
from llamastream.metrics import Metrics
from llamastream.registry import ModelRegistry, ServedModel
from llamastream.sessions.locks import TurnLocks
from llamastream.streaming import Callback

logger = logging.getLogger(__name__)

Status = Literal["ok", "loading", "draining"]


class Service:
    """The configured models' engines under load control.

    >>> service = Service(Settings(model_path="models/tiny.gguf"))
    >>> service.status, service.slots.load().max_processing, service.model_id
    ('loading', 2, 'tiny')
    """

    def __init__(self, settings: Settings, *, callback: Callback | None = None) -> None:
        self.settings = settings
        self.callback = callback  # fired once per accepted request of create_app's routes
        self.metrics = Metrics()
        self.models = ModelRegistry(settings, self.metrics)
        self.turn_locks = TurnLocks()
        self.embedder: Embedder | None = None  # built by start() when embeddings are set up
        self.started = False
        self.draining = False

    # lifecycle

    @property
    def loaded(self) -> bool:
        """Started, with the default model loaded."""
        return self.started and self.default.loaded

    @property
    def status(self) -> Status:
        if self.draining:
            return "draining"
        return "ok" if self.started else "loading"

    async def start(self) -> None:
        """Load the default model (the others load when a request names them)."""
        self.draining = False
        await self.models.ensure_loaded(self.default, original=True)
        path = self.settings.embedding_model_path
        if path is None and self.settings.embeddings_from_chat_model:
            path = self.default.pool.model_path
        if path is not None:
            layers = self.default.settings.n_gpu_layers
            if layers == "auto":  # as many as the chat model got (none without a GPU)
                fit = self.default.pool.layer_fit
                layers = fit.layers if fit is not None else 0
            embedder = Embedder(
                path,
                pooling=self.settings.embedding_pooling,
                n_ctx=self.settings.embedding_n_ctx,
                n_gpu_layers=layers,
                n_threads=self.settings.n_threads,
                max_waiting=max(1, self.settings.max_queue_size),
            )
            try:
                await embedder.start()
            except BaseException:
                await self.models.stop()
                raise
            self.embedder = embedder
        self.started = True
        self.models.start()
        self.turn_locks.start()

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests (503, health too) and let running streams finish.

        Queued requests get 503 at once; streams still running after ``grace_s`` (default
        ``shutdown_grace_s``) are stopped, their partial replies saved and callbacks fired.
        """
        self.draining = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        running = sum(len(m.runner.active) for m in self.models.models)
        logger.info("draining: %d request(s) in flight, %g s grace", running, grace)
        await asyncio.gather(*(m.runner.drain(grace, _shutting_down) for m in self.models.models))

    async def stop(self) -> None:
        if any(m.runner.active for m in self.models.models):
            await self.drain(0)
        self.turn_locks.stop()
        self.started = False
        await self.models.stop()
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
        """Busy and waiting requests, and their limits, over every model."""
        total = {"processing": 0, "waiting": 0, "max_processing": 0, "max_waiting": 0}
        for model in self.models.models:
            for key, value in model.load().items():
                total[key] += value
        return total

    # admission

    def check_ready(self) -> None:
        """`NotReadyError` (503) while the server starts or drains."""
        if self.draining:
            raise _shutting_down()
        if not self.started:
            raise NotReadyError("the model is not loaded", retry_after=5)

    def use(
        self, name: str | None, keep_alive_s: float | None = None
    ) -> AbstractAsyncContextManager[ServedModel]:
        """The model a request names (None: the default), loaded; see `ModelRegistry.use`."""
        self.check_ready()
        return self.models.use(name, keep_alive_s)

    # the default model (the only one of a one-model server)

    @property
    def default(self) -> ServedModel:
        return self.models.default

    @property
    def pool(self) -> WorkerPool:
        return self.default.pool

    @property
    def slots(self) -> SlotController:
        return self.default.slots

    @property
    def model_id(self) -> str:
        """The id the APIs serve the default model under."""
        return self.default.model_id

    # embeddings

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


def _shutting_down() -> NotReadyError:
    return NotReadyError("the server is shutting down", retry_after=5)
