"""Embedder: an embedding model on a thread and a llama.cpp context of its own.

Serves ``/v1/embeddings``: inputs (text or token ids) are batched into as few ``llama_decode``
calls as the context allows (one sequence per input), pooled (as the model's metadata says, or
by the mean of the token states for a model without pooling, such as the chat model), and
L2-normalized. Its own context and thread keep embedding batches out of the chat workers'
steps; on a CPU they still share the cores.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from llamastream.engine.threads import CpuSet, plan_threads
from llamastream.engine.worker import _LOAD_LOCK
from llamastream.errors import (
    InputTooLongError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)

logger = logging.getLogger(__name__)

Pooling = Literal["auto", "mean", "cls", "last"]
_POOLING = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}
_POOLING_NAMES = {v: k for k, v in _POOLING.items()} | {llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank"}


@dataclass(frozen=True)
class Embedded:
    """Unit vectors, one per input, and the tokens read for each."""

    vectors: list[np.ndarray]
    tokens: list[int]


class Embedder:
    """Embeds inputs with one model, one batch at a time, on its own thread.

    ``max_waiting`` requests may wait for it; more get `QueueFullError` (429).
    """

    def __init__(
        self,
        model_path: Path,
        *,
        pooling: Pooling = "auto",
        n_ctx: int = 2048,
        max_sequences: int = 64,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        max_waiting: int = 16,
    ) -> None:
        self.model_path = model_path
        self.pooling = pooling
        self.n_ctx = n_ctx
        self.max_sequences = min(max_sequences, n_ctx)  # llama.cpp: one output per sequence
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = n_threads
        self.max_waiting = max_waiting
        self.n_embd = 0
        self.pooling_used = ""
        self._waiting = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamastream-embed")
        self._model: internals.LlamaModel | None = None
        self._ctx: internals.LlamaContext | None = None
        self._batch: internals.LlamaBatch | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    def check_dimensions(self, dimensions: int | None) -> None:
        """400 naming ``dimensions`` unless it is the model's own (vectors are not cut)."""
        if dimensions is not None and dimensions != self.n_embd:
            raise InvalidRequestError(
                f"dimensions: {self.model_path.stem} gives vectors of {self.n_embd} dimensions "
                "and cannot shorten them",
                field="dimensions",
            )

    async def embed(self, inputs: list[str | list[int]]) -> Embedded:
        """Unit vectors of ``inputs``; `InputTooLongError` naming the input that does not fit."""
        if self._ctx is None:
            raise NotReadyError("the embedding model is not loaded", retry_after=5)
        if self._waiting >= self.max_waiting:
            raise QueueFullError(retry_after=1)
        self._waiting += 1
        loop = asyncio.get_running_loop()
        job = self._executor.submit(self._embed, inputs)
        # Counted until the work itself ends (or is cancelled before it began): a client that
        # leaves does not free its place while the embedder still reads its inputs.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        return await asyncio.wrap_future(job)

    def _done(self) -> None:
        self._waiting -= 1

    # the embedder's thread

    def _load(self) -> None:
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self.n_gpu_layers
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.embeddings = True
        ctx_params.n_ctx = self.n_ctx
        ctx_params.n_batch = self.n_ctx
        ctx_params.n_ubatch = self.n_ctx
        ctx_params.n_seq_max = self.max_sequences
        ctx_params.kv_unified = True  # the sequences of a batch share the n_ctx cells
        plan = plan_threads(
            CpuSet.current(),
            n_threads=self.n_threads,
            n_threads_batch=None,
            workers_on_cpu=1,
            all_on_gpu=self.n_gpu_layers != 0,
        )
        ctx_params.n_threads = plan.n_threads
        ctx_params.n_threads_batch = plan.n_threads_batch
        with _LOAD_LOCK:
            self._model = internals.LlamaModel(
                path_model=str(self.model_path), params=model_params, verbose=False
            )
            meta = self._model.metadata()
            own = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
            if self.pooling != "auto":
                ctx_params.pooling_type = _POOLING[self.pooling]
            elif own is None or int(own) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                ctx_params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # a chat model
            self._ctx = internals.LlamaContext(model=self._model, params=ctx_params, verbose=False)
            pooling = llama_cpp.llama_pooling_type(self._ctx.ctx)
        self.pooling_used = _POOLING_NAMES.get(pooling, str(pooling))
        if self.pooling_used == "rank":
            self._unload()
            raise ValueError(f"{self.model_path.name} is a reranker, not an embedding model")
        self.n_embd = llama_cpp.llama_model_n_embd(self._model.model)
        self._batch = internals.LlamaBatch(
            n_tokens=self.n_ctx, embd=0, n_seq_max=self.max_sequences
        )
        logger.info(
            "embeddings: %s, %d dimensions, %s pooling, %d tokens per batch",
            self.model_path.name,
            self.n_embd,
            self.pooling_used,
            self.n_ctx,
        )

    def _unload(self) -> None:
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        if self._model is not None:
            self._model.close()
        self._batch = self._ctx = self._model = None

    def _tokenize(self, text: str) -> list[int]:
        assert self._model is not None
        tokens: list[int] = self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return tokens

    def _embed(self, inputs: list[str | list[int]]) -> Embedded:
        if self._ctx is None or self._batch is None or self._model is None:
            raise NotReadyError("the embedding model is stopping", retry_after=5)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model.model))
        many = len(inputs) > 1
        prompts = []
        for i, item in enumerate(inputs):
            tokens = self._tokenize(item) if isinstance(item, str) else list(item)
            field = f"input.{i}" if many else "input"
            if not tokens:
                raise InvalidRequestError(f"{field}: nothing to embed", field=field)
            if len(tokens) > self.n_ctx:
                raise InputTooLongError(
                    f"{field}: {len(tokens)} tokens; at most {self.n_ctx} per input",
                    field=field,
                )
            if max(tokens) >= n_vocab:
                raise InvalidRequestError(
                    f"{field}: holds a token id outside the vocabulary (0 to {n_vocab - 1})",
                    field=field,
                )
            prompts.append(tokens)
        vectors: list[np.ndarray] = []
        group: list[list[int]] = []
        for tokens in prompts:
            if group and (
                sum(map(len, group)) + len(tokens) > self.n_ctx or len(group) == self.max_sequences
            ):
                vectors += self._decode(group)
                group = []
            group.append(tokens)
        vectors += self._decode(group)
        return Embedded(vectors, [len(t) for t in prompts])

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        """One batch: each input a sequence; their pooled states, normalized."""
        assert self._ctx is not None and self._batch is not None
        llama_cpp.llama_memory_clear(self._ctx.memory, True)
        self._batch.reset()
        for seq, tokens in enumerate(group):
            self._batch.add_sequence(tokens, seq, True)
        self._ctx.decode(self._batch)
        out = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self._ctx.ctx, seq)
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            out.append((vector / norm if norm > 0 else vector).astype(np.float32))
        return out
