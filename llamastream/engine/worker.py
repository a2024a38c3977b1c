"""Worker: one llama.cpp model and context, owned by one thread, serving several slots.

Each slot is a KV-cache sequence of the context. The worker's loop decodes every active slot in
one ``llama_decode`` per step (continuous batching): a generating slot adds its last token, a
slot reading its prompt adds a chunk of it (so a long prompt does not stall the others), new
jobs join between steps and finished ones leave. Each slot samples with its own sampler chain
(its own parameters and seed). A job reports back through ``job.on_event``, called on the
worker's thread; `llamastream.streaming` carries the events to the event loop.

Only the worker's own thread touches its model and context.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from llamastream.chat.reasoning import BudgetWatch
from llamastream.engine.gpu import Offload
from llamastream.engine.sampling import SamplingParams
from llamastream.engine.stops import StopScanner
from llamastream.engine.threads import CpuSet, ThreadPlan, plan_threads

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

MIN_LOGPROB = -9999.0  # the log probability given to a token that cannot be sampled
PENALTY_LAST_N = 64  # generated tokens the repetition penalties look back on
# Borrowing another sequence's cache for a shared prompt prefix copies the donor's whole
# sequence out and in: worth it from this many shared tokens, and while the donor holds at
# most this many tokens per token gained (reading a token costs far more than copying its
# cache on a CPU; on a GPU reading is cheap and the copy crosses the bus twice).
MIN_BORROWED_TOKENS = 16
BORROW_RATIO_CPU = 64
BORROW_RATIO_GPU = 4


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely tokens in its place
    (``(token, bytes, logprob)``, most likely first)."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text: always whole UTF-8 characters; with ``logprobs``, those of the
    tokens it completes (a chunk may carry tokens and no text: a character still open, text
    held back for a stop string)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens not read again: the sequence held them already
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did


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
    done: threading.Event = field(default_factory=threading.Event)
    # The conversation this prompt belongs to (a session id): the slot's cache is saved under
    # it when another conversation takes the slot.
    cache_key: str | None = None
    # A cache saved earlier for this conversation, restored if it is a prefix of the prompt.
    restore: SavedState | None = None


@dataclass(frozen=True)
class SavedState:
    """A KV-cache sequence and the tokens it holds (``llama_state_seq_get_data``)."""

    tokens: tuple[int, ...]
    data: bytes


StateSink = Callable[[str, SavedState], None]


@dataclass
class StepTimes:
    """What a worker's decode steps took and drafted, summed since it started.

    Written by the worker's thread only; other threads read the numbers as they stand (a
    scrape between two additions sees a step half counted, never a wrong total).
    """

    steps: int = 0  # llama_decode calls of the target model
    tokens: int = 0  # batch rows they decoded: prompt chunks, generated and drafted tokens
    slots: int = 0  # active slots, summed over the steps
    runs: int = 0  # runs of consecutive sequences in the batches: llama.cpp computes each apart
    build: float = 0.0  # seconds starting jobs, dropping cancelled ones and filling the batch
    draft: float = 0.0  # in the draft model's own decodes
    decode: float = 0.0  # in llama_decode, waiting to take the GIL back after it included
    sample: float = 0.0  # penalties, logit bias, the sampler chain, logprobs, drafts verified
    emit: float = 0.0  # detokenizing, stop strings, grammars' budgets, handing text over
    drafted: int = 0  # speculative tokens drafted and verified (past a reply's end: not counted)
    accepted: int = 0  # of those, the ones taken: generated without a step of their own

    PHASES = ("build", "draft", "decode", "sample", "emit")

    def __add__(self, other: StepTimes) -> StepTimes:
        return StepTimes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Speculation:
    """Drafts verified in the batched step, ``draft_min`` to ``draft_max`` tokens: from a
    draft model (``draft_model``: a small GGUF with the same vocabulary, greedy, stopping where
    its top token is less likely than ``draft_p_min``), else by prompt lookup (a continuation
    of the last n-gram found earlier in the prompt or the reply)."""

    draft_max: int = 8
    draft_min: int = 1
    ngram_max: int = 3
    ngram_min: int = 2
    draft_model: str | None = None
    draft_p_min: float = 0.0


def lookup_draft(history: Sequence[int], spec: Speculation, limit: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the history's last n-gram
    (the longest n first), at most ``limit``; none when there is no such occurrence.

    >>> lookup_draft([5, 6, 7, 8, 9, 5, 6, 7], Speculation(), 3)
    [8, 9, 5]
    >>> lookup_draft([1, 2, 3], Speculation(), 4)
    []
    """
    if limit < spec.draft_min or len(history) < spec.ngram_min + 1:
        return []
    arr = np.asarray(history, dtype=np.int64)
    for n in range(min(spec.ngram_max, len(arr) - 1), spec.ngram_min - 1, -1):
        tail = arr[-n:]
        # Start positions of earlier copies of the tail (not the tail itself).
        starts = np.flatnonzero(arr[: len(arr) - n] == tail[0])
        for start in starts[::-1]:
            if np.array_equal(arr[start : start + n], tail):
                draft: list[int] = arr[start + n : start + n + limit].tolist()
                if len(draft) >= spec.draft_min:
                    return draft
    return []


# llama-cpp-python silences a quiet load by pointing the process's fds 1 and 2 at /dev/null
# and back; two loads at once in different threads can leave them pointing there for good.
_LOAD_LOCK = threading.Lock()


def load_llama(model_path: str, **kwargs: Any) -> llama_cpp.Llama:
    """Load a model quietly (llama.cpp's own logging stays off), one load at a time."""
    with _LOAD_LOCK:
        return llama_cpp.Llama(model_path=model_path, verbose=False, **kwargs)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Slot:
    """A job running on one sequence of the context."""

    def __init__(self, seq: int, job: Job, sampler: internals.LlamaSampler, pending: list[int]):
        self.seq = seq
        self.job = job
        self.sampler = sampler
        self.pending = pending  # prompt tokens still to decode; then the last sampled token
        self.generated = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopScanner(job.params.stop)
        # Tokens written for the model instead of sampled: a reasoning budget's closing tag.
        self.forced: list[int] = []
        p = job.params
        budget = p.reasoning
        # A grammar holding the whole reply would refuse the closing tag: no budget then.
        if p.grammar and not p.grammar_triggers:
            budget = None
        self.budget = BudgetWatch(budget) if budget is not None else None
        # With a lazy grammar, the reply so far: once it has triggered, nothing is forced.
        self.triggers = [re.compile(t) for t in p.grammar_triggers] if budget else []
        self.text = ""
        if self.budget is not None and self.budget.at_start():
            self.forced = list(self.budget.budget.close_tokens)
        self.logits_at = -1  # index in the current batch whose logits this slot samples
        self.draft: list[int] = []  # tokens drafted this step, verified after the decode
        self.draft_len = 2  # how many to draft next: grows while drafts are taken whole
        self.drafted: list[int] = []  # the draft model's drafts for this step
        self.cached = 0  # prompt tokens the sequence already held
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text is not sent yet
        self.logprob_chars: list[int] = []  # the characters each of those tokens decoded to
        p = job.params
        penalized = p.repeat_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0
        # The last generated tokens, for the repetition penalties (None: no penalties).
        self.recent: collections.deque[int] | None = (
            collections.deque(maxlen=PENALTY_LAST_N) if penalized else None
        )


class Worker:
    """A model, a context of ``n_slots`` sequences of ``n_ctx`` tokens each, and its thread."""

    def __init__(
        self,
        index: int,
        model_path: str,
        *,
        n_slots: int = 1,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        cpu_share: int = 1,
        offload: Offload | None = None,
        state_sink: StateSink | None = None,
        min_saved_tokens: int = 64,
        speculation: Speculation | None = None,
    ) -> None:
        self.index = index
        self.speculation = speculation
        self.times = StepTimes()
        self._step_began = 0.0  # when the work towards the next step began
        self._state_sink = state_sink
        self._min_saved_tokens = min_saved_tokens
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self.n_batch = max(n_batch, n_slots)
        self._model_path = model_path
        self.offload = offload or Offload()
        self._n_threads = n_threads
        self._n_threads_batch = n_threads_batch
        self._cpu_share = cpu_share  # workers sharing this machine's CPUs
        self.threads: ThreadPlan | None = None  # chosen at load
        self._inbox: queue.SimpleQueue[tuple[int, Job] | Callable[[], None] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name=f"llamastream-worker-{index}")
        self._ready: Future[None] = Future()
        self._stopping = threading.Event()
        self._model: internals.LlamaModel | None = None
        self._ctx: internals.LlamaContext | None = None
        self._batch: internals.LlamaBatch | None = None
        # The draft model's, with one sequence per slot, and the tokens each holds.
        self._dmodel: internals.LlamaModel | None = None
        self._dctx: internals.LlamaContext | None = None
        self._dbatch: internals.LlamaBatch | None = None
        self._dcached: list[list[int]] = [[] for _ in range(n_slots)]
        self._pieces: dict[int, bytes] = {}
        self._vocab: Any = None
        self._n_vocab = 0
        self._cached: list[list[int]] = [[] for _ in range(n_slots)]
        self._owner: list[str | None] = [None] * n_slots  # whose conversation each cache holds
        self.restored_tokens = 0  # prompt tokens taken from restored caches
        self.borrowed_tokens = 0  # prompt tokens copied from another sequence's cache
        self._active: dict[int, _Slot] = {}
        self.prompt_tokens = 0  # prompt tokens received, and how many of them were already cached
        self.reused_tokens = 0
        on_gpu = self.offload.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        self._borrow_ratio = BORROW_RATIO_GPU if on_gpu else BORROW_RATIO_CPU
        # On a GPU, sampling over a large vocabulary is the step's CPU cost: the slots sample
        # in parallel threads (llama.cpp releases the GIL). On a CPU the decode threads
        # already use the cores, and handing the slots to threads only adds switches.
        self._samplers = (
            ThreadPoolExecutor(min(n_slots, 8), thread_name_prefix=f"llamastream-sample-{index}")
            if on_gpu and n_slots > 1
            else None
        )

    # control, from any thread

    def start(self) -> Future[None]:
        """Load the model on the worker's thread; the future resolves when it is ready."""
        self._thread.start()
        return self._ready

    def submit(self, job: Job, seq: int = 0) -> None:
        """Run ``job`` on sequence ``seq`` (a slot of this worker). Never raises."""
        if self._stopping.is_set():
            self._finish_job(job, Failed(RuntimeError("the worker is stopping")))
            return
        self._inbox.put((seq, job))

    def prefix_match(self, seq: int, tokens: list[int]) -> tuple[int, int]:
        """(tokens of ``tokens`` that sequence ``seq`` holds as a prefix, tokens it holds).

        Read from another thread while the worker may be appending: a hint, not a promise.
        """
        cached = self._cached[seq]
        return common_prefix(cached, tokens), len(cached)

    def forget(self, cache_key: str) -> None:
        """Never save the caches of ``cache_key`` again (its conversation was cleared)."""

        def forget() -> None:
            self._owner = [None if o == cache_key else o for o in self._owner]

        self.call(forget)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker's thread between two steps."""
        self._inbox.put(fn)

    def stop(self) -> None:
        """Finish the running jobs' current step, cancel them, and free the model."""
        self._stopping.set()
        if self._thread.ident is None:  # planned, never started: nothing is loaded
            return
        self._inbox.put(None)
        self._thread.join()
        if self._samplers is not None:
            self._samplers.shutdown(wait=True)

    # the worker's thread

    def _load(self) -> None:
        offload = self.offload
        model_params = llama_cpp.llama_model_default_params()
        keep_alive = offload.apply_model(model_params)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx * self.n_slots
        ctx_params.n_batch = self.n_batch
        ctx_params.n_ubatch = self.n_batch
        ctx_params.n_seq_max = self.n_slots
        ctx_params.kv_unified = False
        offload.apply_context(ctx_params)
        with _LOAD_LOCK:
            self._model = internals.LlamaModel(
                path_model=self._model_path, params=model_params, verbose=False
            )
            del keep_alive
            self.threads = self._plan_threads()
            ctx_params.n_threads = self.threads.n_threads
            ctx_params.n_threads_batch = self.threads.n_threads_batch
            try:
                self._ctx = internals.LlamaContext(
                    model=self._model, params=ctx_params, verbose=False
                )
            except ValueError as exc:
                self._model.close()
                self._model = None
                raise RuntimeError(
                    f"worker {self.index}: llama.cpp could not create a context of "
                    f"{self.n_slots} x {self.n_ctx} tokens with type_k={offload.type_k}, "
                    f"type_v={offload.type_v}, flash_attn={offload.flash_attn} (does the KV "
                    "cache fit? a quantized KV cache with flash attention needs a head size "
                    "that is a multiple of 32; a quantized type_v needs flash attention)"
                ) from exc
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        model = self._model.model
        if self.speculation is not None and (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        ):
            # Their state cannot drop the drafted tokens not taken.
            logger.warning("worker %d: a recurrent model: no speculative decoding", self.index)
            self.speculation = None
        if self.speculation is not None and self.speculation.draft_model is not None:
            self._load_draft(ctx_params)
        logger.info(
            "worker %d loaded %s: %d slot(s) of %d tokens, model tensors %.1f MiB",
            self.index,
            self._model_path,
            self.n_slots,
            self.n_ctx,
            llama_cpp.llama_model_size(self._model.model) / 2**20,
        )

    def _load_draft(self, ctx_params: llama_cpp.llama_context_params) -> None:
        """The draft model and its context (the target's placement and threads)."""
        assert self.speculation is not None and self.speculation.draft_model is not None
        model_params = llama_cpp.llama_model_default_params()
        keep_alive = self.offload.apply_model(model_params)
        path = self.speculation.draft_model
        with _LOAD_LOCK:
            self._dmodel = internals.LlamaModel(path_model=path, params=model_params, verbose=False)
            del keep_alive
            self._dctx = internals.LlamaContext(
                model=self._dmodel, params=ctx_params, verbose=False
            )
        vocab = llama_cpp.llama_model_get_vocab(self._dmodel.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if n_vocab != self._n_vocab:
            raise RuntimeError(
                f"the draft model {path} has another vocabulary ({n_vocab} tokens; the model "
                f"{self._n_vocab})"
            )
        self._dbatch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1)
        logger.info("worker %d: drafts from %s", self.index, path)

    def _plan_threads(self) -> ThreadPlan:
        assert self._model is not None
        n_layer = llama_cpp.llama_model_n_layer(self._model.model)
        layers = self.offload.n_gpu_layers
        # n_layer repeating layers and the output layer: all of them on the GPU?
        all_on_gpu = llama_cpp.llama_supports_gpu_offload() and (layers < 0 or layers > n_layer)
        plan = plan_threads(
            CpuSet.current(),
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads_batch,
            workers_on_cpu=self._cpu_share,
            all_on_gpu=all_on_gpu,
        )
        logger.info(
            "worker %d: %d thread(s) for generation, %d for prompts (%s)",
            self.index,
            plan.n_threads,
            plan.n_threads_batch,
            plan.reason,
        )
        return plan

    def _unload(self) -> None:
        self._refuse_waiting()
        for slot in list(self._active.values()):
            self._end(slot, self._finished(slot, "cancelled"))
        if self._ctx is not None:
            # The conversations under way keep their caches past a restart or an unload: the
            # state store writes them to disk when it closes.
            for seq in range(self.n_slots):
                self._save_state(seq)
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        if self._model is not None:
            self._model.close()
        if self._dbatch is not None:
            self._dbatch.close()
        if self._dctx is not None:
            self._dctx.close()
        if self._dmodel is not None:
            self._dmodel.close()
        self._batch = self._ctx = self._model = None
        self._dbatch = self._dctx = self._dmodel = None

    def _loop(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            try:
                self._unload()  # whatever was loaded before the failure (a draft model's, say)
            except Exception:
                logger.exception("worker %d: freeing a failed load failed", self.index)
            finally:
                self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            while True:
                if not self._take_inbox(block=not self._active):
                    return
                self._drop_cancelled()
                if self._active:
                    try:
                        self._step()
                    except Exception as exc:
                        logger.exception("worker %d: a decode step failed", self.index)
                        self._fail_all(exc)
        finally:
            self._unload()

    def _take_inbox(self, *, block: bool) -> bool:
        """Start newly submitted jobs; False once asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if block:  # idle until now: the time waiting for a job is no step's
                self._step_began = time.perf_counter()
            block = False
            if item is None:
                self._refuse_waiting()
                return False
            if callable(item):
                try:
                    item()
                except Exception:
                    logger.exception("worker %d: a call failed", self.index)
                continue
            seq, job = item
            try:
                self._begin(seq, job)
            except Exception as exc:
                logger.exception("worker %d: could not start a job", self.index)
                self._finish_job(job, Failed(exc))

    def _refuse_waiting(self) -> None:
        """On stop: end every job still waiting in the inbox, so no caller waits forever."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                self._finish_job(item[1], Finished("cancelled", len(item[1].prompt_tokens), 0))

    def _begin(self, seq: int, job: Job) -> None:
        assert self._ctx is not None and self._model is not None
        if seq in self._active:
            raise RuntimeError(f"slot {seq} of worker {self.index} is busy")
        tokens = job.prompt_tokens
        if not tokens or len(tokens) >= self.n_ctx:
            raise ValueError(f"the prompt must have 1 to {self.n_ctx - 1} tokens")
        if max(tokens) >= self._n_vocab or min(tokens) < 0:
            raise ValueError("the prompt holds a token outside the vocabulary")
        # Reuse what this sequence already holds of the prompt (a session's earlier turns).
        cached = self._cached[seq]
        held = common_prefix(cached, tokens)
        if job.cache_key != self._owner[seq] and 2 * held < len(cached):
            self._save_state(seq)  # another conversation's cache is about to be overwritten
        if job.restore is not None and len(job.restore.tokens) > held:
            restored = self._restore_state(seq, job.restore, tokens)
            held = held if restored < 0 else restored
        if held < len(tokens) - 1:
            held = self._borrow_prefix(seq, tokens, held)
        self._owner[seq] = job.cache_key
        common = min(held, len(tokens) - 1)  # the last prompt token is decoded for its logits
        if not llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, common, -1):
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, 0, -1)
            common = 0
        del cached[common:]
        self.prompt_tokens += len(tokens)
        self.reused_tokens += common
        logger.debug(
            "worker %d slot %d: %d of %d prompt tokens cached", self.index, seq, common, len(tokens)
        )
        sampler = self._sampler(job.params)
        slot = self._active[seq] = _Slot(seq, job, sampler, tokens[common:])
        slot.cached = common

    def _save_state(self, seq: int) -> None:
        """Hand the sequence's cache to the state sink, under the conversation it belongs to."""
        owner, cached = self._owner[seq], self._cached[seq]
        if self._state_sink is None or owner is None or len(cached) < self._min_saved_tokens:
            return
        data = self._copy_out(seq)
        if data is None:
            logger.warning("worker %d slot %d: llama.cpp could not save its cache", self.index, seq)
            return
        try:
            self._state_sink(owner, SavedState(tuple(cached), data))
        except Exception:
            logger.exception("worker %d: the state sink failed", self.index)

    def _copy_out(self, seq: int) -> bytes | None:
        """The sequence's cache as llama.cpp serializes it (None if it could not)."""
        assert self._ctx is not None
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, buffer, size, seq)
        return ctypes.string_at(buffer, written) if written else None

    def _copy_in(self, seq: int, data: bytes, tokens: Sequence[int]) -> bool:
        """Replace the sequence's cache with ``data``, which holds ``tokens``; False, the
        sequence emptied, when llama.cpp refused it."""
        assert self._ctx is not None
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)
        self._cached[seq].clear()
        # llama.cpp only reads the buffer: point it at the bytes object, no copy.
        buffer = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buffer, len(data), seq) == 0:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)
            return False
        self._cached[seq].extend(tokens)
        return True

    def _restore_state(self, seq: int, state: SavedState, tokens: list[int]) -> int:
        """Load a saved cache into the sequence if it holds a prefix of ``tokens``.

        Returns the tokens restored; -1, the sequence untouched, when the state is not a prefix
        of this prompt (never restored into another conversation); 0, the sequence emptied,
        when llama.cpp refused it.
        """
        n = len(state.tokens)
        if n >= self.n_ctx or common_prefix(list(state.tokens), tokens) != n:
            return -1
        if not self._copy_in(seq, state.data, state.tokens):
            logger.warning("worker %d slot %d: a saved cache was refused", self.index, seq)
            return 0
        self.restored_tokens += n
        logger.debug("worker %d slot %d: restored %d cached tokens", self.index, seq, n)
        return n

    def _borrow_prefix(self, seq: int, tokens: list[int], held: int) -> int:
        """Copy the cache of the longest prefix of ``tokens`` another sequence holds (a system
        prompt that new conversations share) into ``seq``; returns the tokens ``seq`` now holds.
        """
        # The donor sharing the most; of those, the one holding least (the cheapest copy).
        limit = len(tokens) - 1  # the last prompt token is decoded for its logits
        shared, minus_len, donor = max(
            (
                (min(common_prefix(cached, tokens), limit), -len(cached), other)
                for other, cached in enumerate(self._cached)
                if other != seq
            ),
            default=(0, 0, -1),
        )
        gain = shared - held
        if gain < MIN_BORROWED_TOKENS or -minus_len > self._borrow_ratio * gain:
            return held
        data = self._copy_out(donor)
        if data is None:
            return held
        if not self._copy_in(seq, data, self._cached[donor]):
            logger.warning("worker %d slot %d: could not copy a shared prefix", self.index, seq)
            return 0
        assert self._ctx is not None
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, seq, shared, -1)
        del self._cached[seq][shared:]
        self.borrowed_tokens += gain
        logger.debug(
            "worker %d slot %d: %d tokens copied from slot %d", self.index, seq, shared, donor
        )
        return shared

    def _sampler(self, params: SamplingParams) -> internals.LlamaSampler:
        """The slot's sampler chain (the repetition penalties come before it: `_penalize`)."""
        assert self._model is not None
        sampler = internals.LlamaSampler()
        if params.grammar:
            grammar = llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False)
            if params.grammar_triggers:
                sampler.add_grammar_lazy_patterns(
                    self._model, grammar, list(params.grammar_triggers), []
                )
            else:
                sampler.add_grammar(self._model, grammar)
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            if params.top_k > 0:
                sampler.add_top_k(params.top_k)
            sampler.add_top_p(params.top_p, 1)
            if params.min_p > 0:
                sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(seed)
        return sampler

    def _drop_cancelled(self) -> None:
        for slot in list(self._active.values()):
            if slot.job.cancel.is_set():
                self._end(slot, self._flush(slot, "cancelled"))

    def _step(self) -> None:
        """One ``llama_decode`` over every active slot, then sample those that need it."""
        assert self._ctx is not None and self._batch is not None
        times = self.times
        batch = self._batch.batch
        n = 0
        fed: list[tuple[_Slot, int]] = []
        # Generating slots first (one token each), then prompt chunks in the room left.
        order = sorted(self._active.values(), key=lambda s: len(s.pending) > 1)
        draft_s = 0.0  # the draft model's share of the time before the decode
        if self._dctx is not None:
            drafting = [s for s in order if len(s.pending) == 1 and not s.forced]
            began = time.perf_counter()
            try:
                self._model_drafts(drafting)
            except Exception:  # drafts are an optimisation: the step goes on without them
                logger.exception("worker %d: the draft model failed; no drafts", self.index)
                self._forget_drafts()
                for slot in drafting:
                    slot.drafted = []
            draft_s = time.perf_counter() - began
            times.draft += draft_s
        generating = sum(1 for s in order if len(s.pending) == 1)
        # While prompts wait to be read, drafts take at most half of the batch.
        kept_for_prompts = self.n_batch // 2 if len(order) > generating else 0
        takes: list[tuple[_Slot, list[int]]] = []
        runs = 0
        for slot in order:
            room = self.n_batch - n
            if room <= 0:
                break
            take = slot.pending[:room]
            if len(slot.pending) == 1:
                generating -= 1
            # Drafts leave a row for each generating slot still to be placed.
            draft_room = room - 1 - generating - kept_for_prompts
            slot.draft = []
            if len(slot.pending) == 1 and self.speculation is not None and not slot.forced:
                if self._dctx is not None:
                    slot.draft, slot.drafted = slot.drafted[: max(draft_room, 0)], []
                    if len(slot.draft) < self.speculation.draft_min:
                        slot.draft = []
                else:
                    slot.draft = self._draft(slot, draft_room)
                take = take + slot.draft
            takes.append((slot, take))
            n += len(take)
        # The rows go in by sequence: llama.cpp splits a batch over sequences kept apart
        # (non-unified KV cache) into one compute per run of consecutive increasing sequence
        # ids, so slots in any other order would cost a pass over the weights each.
        takes.sort(key=lambda taken: taken[0].seq)
        n, last = 0, -2
        for slot, take in takes:
            runs += slot.seq != last + 1
            last = slot.seq
            cached = self._cached[slot.seq]
            for i, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = len(cached) + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = False
                n += 1
            if slot.draft:  # the last token's logits and each drafted token's
                slot.logits_at = n - len(take)
                for i in range(slot.logits_at, n):
                    batch.logits[i] = True
                fed.append((slot, 1))
                continue
            done_reading = len(take) == len(slot.pending)
            slot.logits_at = n - 1 if done_reading else -1
            if done_reading:
                batch.logits[n - 1] = True
            fed.append((slot, len(take)))
        batch.n_tokens = n
        built = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        decoded = time.perf_counter()
        times.steps += 1
        times.tokens += n
        times.slots += len(order)
        times.runs += runs
        times.build += built - self._step_began - draft_s  # (a counter: never decreases)
        times.decode += decoded - built
        if status != 0:
            self._step_began = decoded
            raise RuntimeError(f"llama_decode failed ({status})")
        for slot, count in fed:
            self._cached[slot.seq].extend(slot.pending[:count])
            del slot.pending[:count]
        drafting = [slot for slot, _ in fed if slot.draft]
        sampling = [slot for slot, _ in fed if slot.logits_at >= 0 and not slot.draft]
        for slot in drafting:
            try:
                self._verify(slot)
            except Exception as exc:
                logger.exception("worker %d: a job failed", self.index)
                self._end(slot, Failed(exc))
        tokens: list[int | BaseException]
        if len(sampling) > 1 and self._samplers is not None:
            tokens = list(self._samplers.map(self._sample, sampling))
        else:
            tokens = [self._sample(slot) for slot in sampling]
        sampled_at = time.perf_counter()
        times.sample += sampled_at - decoded
        for slot, sampled in zip(sampling, tokens, strict=True):
            try:
                self._after_sample(slot, sampled)
            except Exception as exc:  # this slot's job ends; the others go on
                logger.exception("worker %d: a job failed", self.index)
                self._end(slot, Failed(exc))
        self._step_began = time.perf_counter()
        times.emit += self._step_began - sampled_at

    def _draft(self, slot: _Slot, room: int) -> list[int]:
        """Tokens to verify with this slot's next one: what followed the reply's last n-gram
        earlier in the prompt or the reply (none when it would not fit)."""
        spec = self.speculation
        assert spec is not None
        limit = self._draft_limit(slot, room)
        if limit < spec.draft_min:
            return []
        return lookup_draft([*self._cached[slot.seq], slot.pending[0]], spec, limit)

    def _draft_limit(self, slot: _Slot, room: int) -> int:
        spec = self.speculation
        assert spec is not None
        left = slot.job.params.max_new_tokens - slot.generated - 1
        room_in_context = self.n_ctx - len(self._cached[slot.seq]) - 3
        return min(slot.draft_len, spec.draft_max, room, left, room_in_context)

    def _model_drafts(self, slots: list[_Slot]) -> None:
        """Draft for ``slots`` with the draft model (``slot.drafted``): its sequence catches
        up with the slot's tokens, then each step decodes every drafting slot's last draft
        in one batch and takes the most likely token."""
        assert self._dctx is not None and self._dbatch is not None and self.speculation
        spec = self.speculation
        dctx, batch = self._dctx, self._dbatch.batch
        want: dict[int, int] = {}
        feed: dict[int, list[int]] = {}
        # In sequence order, as the target's rows (one compute per run of consecutive ids).
        for slot in sorted(slots, key=lambda s: s.seq):
            slot.drafted = []
            limit = self._draft_limit(slot, self.n_batch)
            if limit < spec.draft_min:
                continue
            history = [*self._cached[slot.seq], slot.pending[0]]
            held = self._dcached[slot.seq]
            common = min(common_prefix(held, history), len(history) - 1)
            llama_cpp.llama_memory_seq_rm(dctx.memory, slot.seq, common, -1)
            del held[common:]
            want[slot.seq], feed[slot.seq] = limit, history[common:]
        by_seq = {slot.seq: slot for slot in slots}
        while feed:
            n, rows = 0, {}
            fed: list[tuple[int, list[int]]] = []
            for seq, tokens in list(feed.items()):
                take = tokens[: self.n_batch - n]
                if not take:
                    break
                held = self._dcached[seq]
                for i, token in enumerate(take):
                    batch.token[n] = token
                    batch.pos[n] = len(held) + i
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = seq
                    batch.logits[n] = False
                    n += 1
                fed.append((seq, take))
                del tokens[: len(take)]
                if not tokens:
                    batch.logits[n - 1] = True
                    rows[seq] = n - 1
            batch.n_tokens = n
            if llama_cpp.llama_decode(dctx.ctx, batch) != 0:
                raise RuntimeError("the draft model's decode failed")
            for seq, take in fed:
                self._dcached[seq].extend(take)
            for seq, row in rows.items():
                slot = by_seq[seq]
                drafted = self._draft_token(row, spec.draft_p_min)
                del feed[seq]
                if drafted is None:
                    continue
                slot.drafted.append(drafted)
                if len(slot.drafted) < want[seq]:
                    feed[seq] = [drafted]

    def _forget_drafts(self) -> None:
        """Empty the draft model's sequences (after a failure: they may not be what
        ``_dcached`` says)."""
        if self._dctx is not None:
            llama_cpp.llama_memory_clear(self._dctx.memory, True)
        for held in self._dcached:
            held.clear()

    def _draft_token(self, row: int, p_min: float) -> int | None:
        """The draft model's most likely token at ``row`` (None: less likely than
        ``p_min``)."""
        assert self._dctx is not None
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._dctx.ctx, row), shape=(self._n_vocab,)
        )
        token = int(np.argmax(logits))
        if p_min > 0:
            shifted = np.exp(logits - logits[token], dtype=np.float64)
            if 1.0 / shifted.sum() < p_min:
                return None
        return token

    def _verify(self, slot: _Slot) -> None:
        """Sample the slot at its last token and then at each drafted token in turn, for as
        long as the samples are the drafted tokens: each is sampled exactly as without a draft
        (the same sampler chain, penalties, bias and grammar, at the same position), so the
        reply is the same; the cache of the drafted tokens not taken is removed."""
        assert self._ctx is not None
        assert self._ctx is not None and self.speculation is not None
        cached = self._cached[slot.seq]  # holds the last token now (not the drafted ones)
        draft = slot.draft
        slot.draft = []
        start = slot.logits_at
        taken = 0
        try:
            for i in range(len(draft) + 1):
                slot.logits_at = start + i
                token = self._sample(slot)
                self._after_sample(slot, token)
                if slot.seq not in self._active or i == len(draft):
                    break
                self.times.drafted += 1  # (drafts past a reply's end are not counted)
                if token != draft[i]:
                    break
                # The drafted token is the one sampled: it is in the cache already.
                slot.pending = []
                cached.append(draft[i])
                self.times.accepted += 1
                taken += 1
        finally:
            if not llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq, len(cached), -1):
                raise RuntimeError("llama.cpp could not remove the drafted tokens not taken")
        # Each drafted token costs a position of the decode: draft twice as many after a draft
        # taken whole, one more than were taken otherwise.
        grown = 2 * len(draft) if taken == len(draft) else taken + 1
        slot.draft_len = max(grown, self.speculation.draft_min)

    def _fail_all(self, exc: Exception) -> None:
        """End every active job with ``exc`` and forget what their sequences held."""
        assert self._ctx is not None
        self._forget_drafts()
        for slot in list(self._active.values()):
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq, 0, -1)
            self._cached[slot.seq].clear()
            self._end(slot, Failed(exc))

    def _sample(self, slot: _Slot) -> int | BaseException:
        assert self._ctx is not None
        params = slot.job.params
        try:
            if slot.recent:
                self._penalize(slot)
            if params.logit_bias:
                self._bias(slot)
            if slot.forced:
                token = slot.forced.pop(0)
                llama_cpp.llama_sampler_accept(slot.sampler.sampler, token)  # a grammar follows
            else:
                token = slot.sampler.sample(self._ctx, slot.logits_at)
            if params.logprobs is not None:
                slot.logprobs.append(self._logprob(slot, token, params.logprobs))
            return token
        except Exception as exc:  # a grammar with no way forward, for one
            return exc

    def _logits(self, slot: _Slot) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The slot's logits row in the context (a view: writes change what is sampled)."""
        assert self._ctx is not None
        row = llama_cpp.llama_get_logits_ith(self._ctx.ctx, slot.logits_at)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,))

    def _bias(self, slot: _Slot) -> None:
        """Add the request's logit bias (OpenAI's: -100 bans a token, 100 all but forces it)."""
        logits = self._logits(slot)
        for token, bias in slot.job.params.logit_bias:
            logits[token] = -np.inf if bias <= -100 else logits[token] + bias

    def _logprob(self, slot: _Slot, token: int, top: int) -> TokenLogprob:
        """``token``'s log probability in the distribution it was sampled from (after the
        penalties and the logit bias, before temperature and truncation), and the ``top``
        most likely tokens."""
        logits = self._logits(slot).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        # A banned token (a -100 logit bias) has no probability: OpenAI's -9999, never -inf
        # (which JSON cannot carry).
        logprobs = np.maximum(logprobs, MIN_LOGPROB)
        best: list[tuple[int, bytes, float]] = []
        if top > 0:
            ids = np.argpartition(-logprobs, top)[:top]
            ids = ids[np.argsort(-logprobs[ids], kind="stable")]
            special = slot.job.params.special_tokens
            best = [(int(i), self._piece(int(i), special), float(logprobs[i])) for i in ids]
        piece = self._piece(token, slot.job.params.special_tokens)
        return TokenLogprob(token, piece, float(logprobs[token]), tuple(best))

    def _penalize(self, slot: _Slot) -> None:
        """Apply the repetition, frequency and presence penalties to the slot's logits.

        llama.cpp's penalties sampler looks every vocabulary entry up in a hash map (about
        50,000 lookups per token for a 49K vocabulary); the same arithmetic on just the
        recently generated tokens, in place in the context's logits, gives the same logits.
        """
        assert self._ctx is not None and slot.recent is not None
        p = slot.job.params
        counts = collections.Counter(slot.recent)
        ids = np.fromiter(counts.keys(), dtype=np.intc, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        logits = self._logits(slot)
        picked = logits[ids]
        repeat = np.float32(p.repeat_penalty)
        picked = np.where(picked <= 0, picked * repeat, picked / repeat)
        frequency, presence = np.float32(p.frequency_penalty), np.float32(p.presence_penalty)
        logits[ids] = picked - (n * frequency + presence)

    def _after_sample(self, slot: _Slot, token: int | BaseException) -> None:
        assert self._model is not None
        job = slot.job
        if isinstance(token, BaseException):
            self._end(slot, Failed(token))
            return
        if slot.recent is not None:
            slot.recent.append(token)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token) and not job.params.ignore_eos:
            if slot.logprobs:
                slot.logprobs.pop()  # the end of the reply is no token of it
            self._end(slot, self._flush(slot, "stop"))
            return
        slot.generated += 1
        piece = slot.decoder.decode(self._piece(token, job.params.special_tokens))
        if slot.triggers:
            slot.text += piece
        if slot.budget is not None and slot.budget.feed(piece):
            if not any(t.search(slot.text) for t in slot.triggers):  # the grammar is not on
                slot.forced = list(slot.budget.budget.close_tokens)
        if slot.logprobs:
            slot.logprob_chars.append(len(piece))
        text, stopped = slot.stops.feed(piece)
        if stopped:  # tokens wholly inside the stop string (never sent) are no part of it
            kept, sent, before = 0, 0, len(slot.stops.sent_before_stop)
            for chars in slot.logprob_chars:
                if sent >= before:
                    break
                sent += chars
                kept += 1
            del slot.logprobs[kept:]
        if text or (stopped and slot.logprobs):
            job.on_event(TextChunk(text, self._take_logprobs(slot)))
        if stopped:
            self._end(slot, self._finished(slot, "stop"))
        elif slot.generated >= job.params.max_new_tokens:
            self._end(slot, self._flush(slot, "length"))
        elif len(self._cached[slot.seq]) + 1 >= self.n_ctx:
            self._end(slot, self._flush(slot, "length"))
        else:
            slot.pending = [token]

    def _flush(self, slot: _Slot, reason: FinishReason) -> Finished:
        """Emit the text held back (an incomplete character, a possible stop string)."""
        tail, stopped = slot.stops.feed(slot.decoder.decode(b"", final=True))
        if stopped:
            reason = "stop"
        else:
            tail += slot.stops.flush()
        if tail or slot.logprobs:
            slot.job.on_event(TextChunk(tail, self._take_logprobs(slot)))
        return self._finished(slot, reason)

    @staticmethod
    def _finished(slot: _Slot, reason: FinishReason) -> Finished:
        return Finished(
            reason, len(slot.job.prompt_tokens), slot.generated, slot.cached, slot.stops.matched
        )

    @staticmethod
    def _take_logprobs(slot: _Slot) -> tuple[TokenLogprob, ...]:
        taken = tuple(slot.logprobs)
        slot.logprobs.clear()
        slot.logprob_chars.clear()
        return taken

    def _end(self, slot: _Slot, event: Finished | Failed) -> None:
        self._active.pop(slot.seq, None)
        slot.sampler.close()
        self._finish_job(slot.job, event)

    def _finish_job(self, job: Job, event: Finished | Failed) -> None:
        try:
            job.on_event(event)
        except Exception:
            logger.exception("worker %d: the job's listener failed", self.index)
        finally:
            job.done.set()

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (byte tokens give their single byte; control tokens
        their text only when ``special``)."""
        key = -1 - token if special else token
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece
