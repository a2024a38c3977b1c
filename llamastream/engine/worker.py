"""Worker: one llama.cpp model and context, owned by one thread, serving its slots.

Only the worker's own thread ever touches its `Llama`. A job reports back through
``job.on_event``, called on that thread; `llamastream.streaming` carries the events to the
event loop. A worker owns ``n_slots`` slots; this version runs one slot per worker, and the
job API is shaped so a later version can batch several slots into one decode step.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import llama_cpp

from llamastream.engine.sampling import SamplingParams
from llamastream.engine.stops import StopScanner

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text: always whole UTF-8 characters."""

    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = TextChunk | Finished | Failed


@dataclass
class Job:
    """One generation request placed on a worker slot."""

    prompt_tokens: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Cancelled(Exception):
    """Raised inside the worker thread when a job's client has gone."""


# llama-cpp-python silences a quiet load by pointing the process's fds 1 and 2 at /dev/null
# and back; two loads at once in different threads can leave them pointing there for good.
_LOAD_LOCK = threading.Lock()


def load_llama(model_path: str, **kwargs: Any) -> llama_cpp.Llama:
    """Load a model quietly (llama.cpp's own logging stays off), one load at a time."""
    with _LOAD_LOCK:
        return llama_cpp.Llama(model_path=model_path, verbose=False, **kwargs)


class Worker:
    """A `Llama` and the single thread that drives it."""

    def __init__(self, index: int, model_path: str, *, n_slots: int = 1, **llama_kwargs: Any):
        self.index = index
        self.n_slots = n_slots
        self._model_path = model_path
        self._llama_kwargs = llama_kwargs
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"llamastream-worker-{index}")
        self._llama: llama_cpp.Llama | None = None
        self._pieces: dict[int, bytes] = {}

    def start(self) -> Future[None]:
        """Load the model on the worker's thread; the future resolves when it is ready."""
        return self._executor.submit(self._load)

    def submit(self, job: Job) -> Future[None]:
        """Run ``job`` on this worker's thread. Events go to ``job.on_event``; never raises."""
        return self._executor.submit(self._run, job)

    def stop(self) -> None:
        """Wait for running jobs to end, then free the model."""
        self._executor.submit(self._unload)
        self._executor.shutdown(wait=True)

    def _load(self) -> None:
        self._llama = load_llama(self._model_path, **self._llama_kwargs)
        logger.info("worker %d loaded %s", self.index, self._model_path)

    def _unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def _run(self, job: Job) -> None:
        try:
            job.on_event(self._generate(job))
        except Cancelled:
            job.on_event(Finished("cancelled", len(job.prompt_tokens), 0))
        except Exception as exc:
            logger.exception("worker %d: generation failed", self.index)
            job.on_event(Failed(exc))

    def _generate(self, job: Job) -> Finished:
        llama = self._llama
        if llama is None:
            raise RuntimeError("worker is not loaded")
        params = job.params
        tokens = job.prompt_tokens
        self._prefill(llama, tokens, job.cancel)
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        grammar = (
            llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False)
            if params.grammar
            else None
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llama._model.vocab
        n_generated = 0
        reason: FinishReason = "length"
        generator = llama.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            grammar=grammar,
        )
        stops = StopScanner(params.stop)
        try:
            for token in generator:
                if job.cancel.is_set():
                    return self._finish(job, decoder, "cancelled", n_generated, stops)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                n_generated += 1
                text, stopped = stops.feed(decoder.decode(self._piece(token)))
                if text:
                    job.on_event(TextChunk(text))
                if stopped:
                    return Finished("stop", len(tokens), n_generated)
                if n_generated >= params.max_new_tokens:
                    break
        finally:
            generator.close()
        return self._finish(job, decoder, reason, n_generated, stops)

    def _finish(
        self,
        job: Job,
        decoder: codecs.IncrementalDecoder,
        reason: FinishReason,
        n: int,
        stops: StopScanner | None = None,
    ) -> Finished:
        """Flush the decoder (and text held for stop strings) and report the end."""
        tail = decoder.decode(b"", final=True)
        if stops is not None:
            tail, stopped = stops.feed(tail)
            if stopped:
                reason = "stop"
            else:
                tail += stops.flush()
        if tail:
            job.on_event(TextChunk(tail))
        return Finished(reason, len(job.prompt_tokens), n)

    def _prefill(self, llama: llama_cpp.Llama, tokens: list[int], cancel: threading.Event) -> None:
        """Decode the prompt in chunks, reusing the cached common prefix; cancellable per chunk.

        Leaves the context holding exactly ``tokens``, so `Llama.generate` samples at once.
        """
        cached = llama.input_ids[: llama.n_tokens].tolist()
        common = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        if common == 0 or not llama._ctx.kv_cache_seq_rm(-1, common, -1):
            llama.reset()
            common = 0
        llama.n_tokens = common
        step = llama.n_batch
        for start in range(common, len(tokens), step):
            if cancel.is_set():
                raise Cancelled
            llama.eval(tokens[start : start + step])

    def _piece(self, token: int) -> bytes:
        """The raw bytes of one token (byte tokens give their single byte)."""
        piece = self._pieces.get(token)
        if piece is None:
            assert self._llama is not None
            vocab = self._llama._model.vocab
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece
