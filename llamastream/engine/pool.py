"""WorkerPool: builds the workers, maps slots onto them, and tokenizes prompts."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import threading
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import jinja2
import llama_cpp

from llamastream.chat.templates import ChatTemplate
from llamastream.config import Settings
from llamastream.engine.gpu import (
    MIB,
    DeviceMemory,
    LayerFit,
    ModelShape,
    Offload,
    Placement,
    check_fits,
    check_kv_types,
    fit_gpu_layers,
    gpu_devices,
    plan_placement,
    resolve_workers,
)
from llamastream.engine.slots import packing_rank
from llamastream.engine.states import StateStore, model_fingerprint
from llamastream.engine.worker import (
    Job,
    SavedState,
    Speculation,
    StepTimes,
    Worker,
    load_llama,
)

logger = logging.getLogger(__name__)


class WorkerPool:
    """``settings.num_of_concurrent_executions`` slots, split over ``settings.workers`` workers
    (``auto``: one per visible GPU)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_path = Path(settings.model_path or "")
        self.n_slots = settings.num_of_concurrent_executions
        # n_gpu_layers auto: planned at start, once the GPUs and the model's shape are known
        self.auto_layers = settings.n_gpu_layers == "auto"
        self.offload = Offload(
            n_gpu_layers=0 if settings.n_gpu_layers == "auto" else settings.n_gpu_layers,
            main_gpu=settings.main_gpu,
            tensor_split=tuple(settings.tensor_split) if settings.tensor_split else None,
            flash_attn=settings.flash_attn,
            offload_kqv=settings.offload_kqv,
            type_k=settings.type_k,
            type_v=settings.type_v,
        )
        # Built by start(), once the GPUs and the model's shape are known.
        self.states: StateStore | None = None
        self.workers: list[Worker] = []
        self.placements: list[Placement] = []
        self.layer_fit: LayerFit | None = None  # n_gpu_layers auto's choice, once planned
        # slot index → (worker, sequence within the worker)
        self._slot_place: list[tuple[Worker, int]] = []
        self._vocab: llama_cpp.Llama | None = None
        self._vocab_lock = threading.Lock()
        self.template = ChatTemplate()
        self.model_name = self.model_path.name
        self._control: re.Pattern[str] | None = None
        self.n_vocab = 0
        self.metadata: dict[str, str] = {}  # the GGUF's metadata, once started
        self.fingerprint = ""  # the model file and the llama.cpp build, once started

    async def start(self) -> None:
        """Load the tokenizer and every worker (off the event loop).

        Raises `GpuMemoryError` before loading any weights when the placement cannot fit; on
        any failure, what was loaded is freed again.
        """
        await self.plan()
        await self.launch()

    async def plan(self, reserved: dict[int, int] | None = None) -> None:
        """Read the model's tokenizer, template and shape, and plan the workers' placement,
        loading no weights: `memory` then says what loading them will take. Freed again on a
        failure (`GpuMemoryError` when the placement cannot fit).

        ``reserved``: GPU bytes per device that other loaded models were planned to take,
        counted against ``device_memory_mib`` (a card's own free memory already counts them).
        """
        if self.settings.model_path is None:
            raise ValueError("model_path is not set")
        try:
            await self._plan(reserved or {})
        except BaseException:
            await self.stop()
            raise

    async def launch(self) -> None:
        """Load the planned workers' weights and contexts; on a failure everything is freed."""
        started: list[Worker] = []
        try:
            for worker in self.workers:  # one at a time: loads are serialized anyway
                started.append(worker)
                await asyncio.wrap_future(worker.start())
        except BaseException:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in started))
            self.workers, self._slot_place = [], []
            self._close_vocab()
            self._close_states()
            raise
        logger.info("%d worker(s) ready on %s", len(self.workers), self.model_name)

    def memory(self) -> tuple[int, int]:
        """What the planned workers take once loaded: (host bytes, GPU bytes), estimated
        (the model file's size and the slots' KV cache when the GGUF has no shape)."""
        if not self.placements:
            return self.model_path.stat().st_size * max(len(self.workers), 1), 0
        host = sum(p.host_bytes for p in self.placements)
        return host, sum(p.gpu_bytes for p in self.placements)

    async def _plan(self, reserved: dict[int, int]) -> None:
        self._vocab = await asyncio.to_thread(load_llama, str(self.model_path), vocab_only=True)
        meta = self._vocab.metadata
        self.metadata = dict(meta)
        bos = self._token_text(self._vocab.token_bos())
        eos = self._token_text(self._vocab.token_eos())
        own = self.settings.chat_template_file
        if own is not None:
            try:
                source = await asyncio.to_thread(own.read_text, encoding="utf-8")
                self.template = ChatTemplate(source, bos_token=bos, eos_token=eos)
            except (OSError, UnicodeError, jinja2.TemplateError) as exc:
                raise ValueError(f"chat_template_file {own}: {exc}") from None
        else:
            self.template = ChatTemplate.from_metadata(meta, bos=bos, eos=eos)
        if self.template.is_fallback:
            logger.warning("%s has no chat template; using ChatML", self.model_name)
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self._control = self._control_token_pattern()
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab._model.vocab)
        self.fingerprint = await asyncio.to_thread(model_fingerprint, self.model_path)
        devices = self._budgeted(await asyncio.to_thread(gpu_devices), reserved)
        if self.auto_layers:  # offload what fits (planned per worker in _place)
            self.offload = replace(self.offload, n_gpu_layers=-1 if devices else 0)
        if self.settings.kv_state_bytes > 0:
            fingerprint = model_fingerprint(
                self.model_path, self.offload.type_k, self.offload.type_v
            )
            self.states = StateStore(
                self.settings.session_dir / "kv-states",
                fingerprint,
                max_bytes=self.settings.kv_state_bytes,
                ram_bytes=self.settings.kv_state_ram_bytes,
            )
        self._build_workers(meta, devices)

    def _build_workers(self, meta: dict[str, str], devices: list[DeviceMemory]) -> None:
        """Split the slots over the workers, place each worker, log it, and refuse what cannot
        fit. Several workers on several GPUs are pinned one per GPU, round robin."""
        settings = self.settings
        offloads, pinned = self._offloads(devices)
        n_workers = len(offloads)
        shares = [
            self.n_slots // n_workers + (i < self.n_slots % n_workers) for i in range(n_workers)
        ]
        shape = ModelShape.from_metadata(meta, self.model_path.stat().st_size)
        if self.auto_layers and devices:
            offloads = self._fit_layers(shape, devices, offloads, shares, pinned)
        self.placements = self._place(shape, devices, offloads, shares, pinned)
        self.workers = [
            Worker(
                i,
                str(self.model_path),
                n_slots=share,
                n_ctx=settings.n_ctx,
                n_batch=settings.n_batch,
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads_batch,
                cpu_share=n_workers,
                offload=o,
                state_sink=self.states.put if self.states is not None else None,
                speculation=Speculation(
                    settings.draft_max,
                    settings.draft_min,
                    draft_model=str(settings.draft_model_path)
                    if settings.draft_model_path
                    else None,
                    draft_p_min=settings.draft_p_min,
                )
                if settings.prompt_lookup or settings.draft_model_path
                else None,
            )
            for i, (o, share) in enumerate(zip(offloads, shares, strict=True))
        ]
        self._slot_place = [(w, seq) for w in self.workers for seq in range(w.n_slots)]

    def _budgeted(
        self, devices: list[DeviceMemory], reserved: dict[int, int]
    ) -> list[DeviceMemory]:
        """The GPUs with their free memory capped at ``device_memory_mib`` less what other
        models were planned to take there; without a GPU, that budget stands in for one, for
        n_gpu_layers auto's plan only."""
        mib = self.settings.device_memory_mib
        if mib is None:
            return devices
        budget = mib * MIB
        if not devices:
            if not self.auto_layers:
                return []
            free = max(budget - reserved.get(0, 0), 0)
            return [DeviceMemory(0, "device_memory_mib (no GPU: planned only)", free, budget)]
        return [
            replace(
                d,
                free=min(d.free, max(budget - reserved.get(d.index, 0), 0)),
                total=min(d.total, budget),
            )
            for d in devices
        ]

    def step_times(self) -> StepTimes:
        """What the workers' decode steps took and drafted so far, summed."""
        return sum((w.times for w in self.workers), StepTimes())

    def gpu_bytes(self) -> dict[int, int]:
        """GPU bytes per device the planned workers take."""
        per: dict[int, int] = {}
        for placement in self.placements:
            for share in placement.shares:
                per[share.device] = per.get(share.device, 0) + share.total
        return per

    def _fit_layers(
        self,
        shape: ModelShape | None,
        devices: list[DeviceMemory],
        offloads: list[Offload],
        shares: list[int],
        pinned: bool,
    ) -> list[Offload]:
        """n_gpu_layers auto: each worker offloads the most layers that fit beside its slots'
        KV cache (logged with what would fit more)."""
        if shape is None:
            logger.warning(
                "%s: no layer shape in its metadata; all layers offloaded", self.model_name
            )
            return offloads
        fitted = []
        for i, (o, share) in enumerate(zip(offloads, shares, strict=True)):
            on = [d for d in devices if d.index == o.main_gpu] if pinned else devices
            # Workers sharing a device share its free memory.
            sharing = (
                sum(1 for x in offloads if x.main_gpu == o.main_gpu) if pinned else len(offloads)
            )
            on = [replace(d, free=d.free // sharing) for d in on]
            fit = fit_gpu_layers(
                i,
                shape,
                on,
                n_slots=share,
                n_ctx=self.settings.n_ctx,
                type_k=o.type_k,
                type_v=o.type_v,
                offload_kqv=o.offload_kqv,
                headroom_bytes=self.settings.gpu_headroom_mib * MIB,
                split=None if pinned else o.tensor_split,
            )
            logger.info("%s: %s", self.model_name, fit.describe())
            if i == 0:
                self.layer_fit = fit
            fitted.append(replace(o, n_gpu_layers=fit.layers))
        return fitted

    def _offloads(self, devices: list[DeviceMemory]) -> tuple[list[Offload], bool]:
        """Each worker's offload parameters, and whether they are pinned one per GPU."""
        offload = self.offload
        if not devices and offload.n_gpu_layers != 0:
            logger.warning(
                "n_gpu_layers=%d but %s: everything runs on the CPU",
                offload.n_gpu_layers,
                "no GPU is visible"
                if llama_cpp.llama_supports_gpu_offload()
                else "this llama.cpp build has no GPU support "
                '(reinstall with CMAKE_ARGS="-DGGML_CUDA=on")',
            )
        n_workers = min(
            resolve_workers(self.settings.workers, len(devices), offload.n_gpu_layers),
            self.n_slots,
        )
        gpus = [d.index for d in devices]
        pin = n_workers > 1 and len(gpus) > 1 and offload.n_gpu_layers != 0
        if pin and offload.tensor_split is not None:
            logger.warning("tensor_split is ignored: each worker holds the whole model on one GPU")
        offloads = [
            offload.pinned(gpus[i % len(gpus)]) if pin else offload for i in range(n_workers)
        ]
        return offloads, pin

    def _place(
        self,
        shape: ModelShape | None,
        devices: list[DeviceMemory],
        offloads: list[Offload],
        shares: list[int],
        pinned: bool,
    ) -> list[Placement]:
        """Each worker's placement, logged; `GpuMemoryError` when they do not fit."""
        if shape is None:
            logger.warning(
                "%s: no layer shape in its metadata; GPU memory is not checked", self.model_name
            )
            return []
        check_kv_types(shape, self.offload.type_k, self.offload.type_v, self.offload.flash_attn)
        gpus = [d.index for d in devices]
        free = {d.index: float(d.free) for d in devices}
        placements = [
            plan_placement(
                i,
                shape,
                n_slots=share,
                n_ctx=self.settings.n_ctx,
                n_gpu_layers=o.n_gpu_layers,
                type_k=o.type_k,
                type_v=o.type_v,
                offload_kqv=o.offload_kqv,
                devices=[o.main_gpu] if pinned else gpus,
                split=None if pinned else (o.tensor_split or [free[g] for g in gpus]),
            )
            for i, (o, share) in enumerate(zip(offloads, shares, strict=True))
        ]
        names = {d.index: d.name for d in devices}
        for placement in placements:
            logger.info("%s", placement.describe(names))
        check_fits(placements, devices, self.settings.gpu_headroom_mib * MIB)
        return placements

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers))
        self.workers, self._slot_place, self.placements = [], [], []
        self._close_vocab()
        self._close_states()

    def _close_states(self) -> None:
        if self.states is not None:
            self.states.close()
            self.states = None

    async def forget(self, key: str) -> None:
        """Drop the conversation's saved cache, and never save its slot's cache again."""
        for worker in self.workers:
            worker.forget(key)
        if self.states is not None:
            await asyncio.to_thread(self.states.discard, key)

    async def saved_state(self, slot: int, tokens: list[int], key: str) -> SavedState | None:
        """The conversation's saved cache, when it holds more of ``tokens`` than ``slot`` does.

        Read from disk only when the slot lost the conversation's history (a hint read from
        the event loop; the worker checks the real prefix before restoring).
        """
        if self.states is None:
            return None
        worker, seq = self._slot_place[slot]
        held, _ = worker.prefix_match(seq, tokens)
        if held >= len(tokens) // 2:
            return None
        state = self.states.recall(key) or await asyncio.to_thread(self.states.get, key)
        if state is None or len(state.tokens) <= held or len(state.tokens) >= len(tokens):
            return None
        if tuple(tokens[: len(state.tokens)]) != state.tokens:
            return None  # the conversation changed (regenerated, cleared): not its history
        return state

    async def peek(self) -> None:
        """Read the GGUF's metadata and chat template without loading the model (they are
        kept from the last load, or from an earlier peek)."""
        if self.metadata:
            return

        def read() -> None:
            vocab = load_llama(str(self.model_path), vocab_only=True)
            try:
                meta = dict(vocab.metadata)
                bos = vocab.detokenize([vocab.token_bos()], special=True).decode(errors="replace")
                eos = vocab.detokenize([vocab.token_eos()], special=True).decode(errors="replace")
                own = self.settings.chat_template_file
                if own is not None:
                    source = own.read_text(encoding="utf-8")
                    self.template = ChatTemplate(source, bos_token=bos, eos_token=eos)
                else:
                    self.template = ChatTemplate.from_metadata(meta, bos=bos, eos=eos)
                self.metadata = meta
            finally:
                vocab.close()

        await asyncio.to_thread(read)

    def _close_vocab(self) -> None:
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    def tokenize(self, text: str, *, bos: bool = True) -> list[int]:
        """Prompt text → tokens (blocking but short; call it from a thread); ``bos=False``
        for a piece of text that does not begin a prompt."""
        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError("the pool is not started")
            tokens = self._vocab.tokenize(
                text.encode("utf-8"), add_bos=self.add_bos and bos, special=True
            )
            bos_id = self._vocab.token_bos()
        if len(tokens) > 1 and tokens[0] == bos_id and tokens[1] == bos_id:
            tokens = tokens[1:]  # the template already wrote the BOS text
        return tokens

    def detokenize(self, tokens: list[int]) -> list[bytes]:
        """Each token's bytes, control tokens written out (blocking; call it from a thread)."""
        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError("the pool is not started")
            return [self._vocab.detokenize([t], special=True) for t in tokens]

    def tokenize_piece(self, text: str) -> list[int]:
        """The tokens of ``text`` written in the middle of a reply: without the space some
        tokenizers put before a text's first word."""
        head = self.tokenize("a", bos=False)
        tokens = self.tokenize("a" + text, bos=False)
        if tokens[: len(head)] == head:
            return tokens[len(head) :]
        return self.tokenize(text, bos=False)

    def defuse(self, text: str) -> str:
        """``text`` with every control-token spelling broken (a word joiner after its first
        character), so that conversation text can never tokenize into a control token such as
        ``<|im_end|>``: only the template's own markup does."""
        if self._control is None:
            return text
        return self._control.sub(lambda m: m[0][0] + "\u2060" + m[0][1:], text)

    def is_control(self, text: str) -> bool:
        """Whether ``text`` is the spelling of one of the model's control tokens."""
        return self._control is not None and self._control.fullmatch(text) is not None

    def _control_token_pattern(self) -> re.Pattern[str] | None:
        assert self._vocab is not None
        vocab = self._vocab._model.vocab
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = set()
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            if llama_cpp.llama_vocab_get_attr(vocab, token) & special:
                text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
                if len(text) > 1:
                    texts.add(text)
        if not texts:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def best_slot(
        self, tokens: list[int], candidates: list[int], recent: Collection[int] = ()
    ) -> int | None:
        """The candidate slot whose KV cache holds the longest prefix of ``tokens``, if any;
        else, with several workers, the least loaded worker's best candidate (`least_loaded`).

        A slot qualifies only if at least half of what it holds is reused: a new conversation
        that merely shares a system prompt must not evict another conversation's cache (the
        caller then takes `SlotController`'s choice). ``candidates`` are the free slots, free
        the longest first; ``recent`` those freed recently (kept for their conversations' next
        turns while others are free). Reads the workers' bookkeeping from the event loop: a
        hint, never a guarantee (the worker checks the real prefix at start).
        """
        best, best_len = None, 0
        for slot in candidates:
            worker, seq = self._slot_place[slot]
            n, held = worker.prefix_match(seq, tokens)
            if n > best_len and 2 * n >= held:
                best, best_len = slot, n
        if best is None and len(self.workers) > 1:
            return self.least_loaded(candidates, recent)
        return best

    def least_loaded(self, candidates: list[int], recent: Collection[int] = ()) -> int | None:
        """A free slot of ``candidates`` on the worker with the fewest busy slots: of its free
        slots, as `SlotController._pick` chooses: one next to a busy slot of that worker (a
        step computes each run of consecutive busy slots apart), of those one not in
        ``recent``, then the one next to the most busy ones, then the first."""
        free = collections.Counter(self._slot_place[slot][0].index for slot in candidates)
        idle = {self._slot_place[slot] for slot in candidates}
        best, best_key = None, (0, (False, False, 0))
        for slot in candidates:
            worker, seq = self._slot_place[slot]
            neighbours = [(worker, s) for s in (seq - 1, seq + 1) if 0 <= s < worker.n_slots]
            busy_next = sum(place not in idle for place in neighbours)
            # The least loaded worker, then the best rank (the first of equals).
            key = (free[worker.index] - worker.n_slots, packing_rank(busy_next, slot in recent))
            if best is None or key > best_key:
                best, best_key = slot, key
        return best

    def submit(self, slot: int, job: Job) -> None:
        worker, seq = self._slot_place[slot]
        worker.submit(job, seq)

    def _token_text(self, token: int) -> str:
        assert self._vocab is not None
        if token < 0:
            return ""
        return self._vocab.detokenize([token], special=True).decode("utf-8", errors="replace")
