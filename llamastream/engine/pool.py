"""WorkerPool: builds the workers, maps slots onto them, and tokenizes prompts."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path

import llama_cpp

from llamastream.chat.templates import ChatTemplate
from llamastream.config import Settings
from llamastream.engine.worker import Job, Worker, load_llama

logger = logging.getLogger(__name__)


class WorkerPool:
    """``settings.num_of_concurrent_executions`` slots, split over ``settings.workers`` workers."""

    def __init__(self, settings: Settings) -> None:
        if settings.model_path is None:
            raise ValueError("model_path is not set")
        self.settings = settings
        self.model_path = Path(settings.model_path)
        self.n_slots = settings.num_of_concurrent_executions
        n_workers = min(settings.workers if isinstance(settings.workers, int) else 1, self.n_slots)
        shares = [
            self.n_slots // n_workers + (i < self.n_slots % n_workers) for i in range(n_workers)
        ]
        self.workers = [
            Worker(
                i,
                str(self.model_path),
                n_slots=share,
                n_ctx=settings.n_ctx,
                n_batch=settings.n_batch,
                n_gpu_layers=settings.n_gpu_layers,
                n_threads=settings.n_threads,
            )
            for i, share in enumerate(shares)
        ]
        # slot index → (worker, sequence within the worker)
        self._slot_place = [(w, seq) for w in self.workers for seq in range(w.n_slots)]
        self._vocab: llama_cpp.Llama | None = None
        self._vocab_lock = threading.Lock()
        self.template = ChatTemplate()
        self.model_name = self.model_path.name
        self._control: re.Pattern[str] | None = None

    async def start(self) -> None:
        """Load the tokenizer and every worker (off the event loop)."""
        self._vocab = await asyncio.to_thread(load_llama, str(self.model_path), vocab_only=True)
        meta = self._vocab.metadata
        bos = self._token_text(self._vocab.token_bos())
        eos = self._token_text(self._vocab.token_eos())
        self.template = ChatTemplate.from_metadata(meta, bos=bos, eos=eos)
        if self.template.is_fallback:
            logger.warning("%s has no chat template; using ChatML", self.model_name)
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self._control = self._control_token_pattern()
        for worker in self.workers:  # one at a time: loads are serialized anyway
            await asyncio.wrap_future(worker.start())
        logger.info("%d worker(s) ready on %s", len(self.workers), self.model_name)

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers))
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    def tokenize(self, text: str) -> list[int]:
        """Prompt text → tokens (blocking but short; call it from a thread)."""
        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError("the pool is not started")
            tokens = self._vocab.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)
            bos = self._vocab.token_bos()
        if len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template already wrote the BOS text
        return tokens

    def defuse(self, text: str) -> str:
        """``text`` with every control-token spelling broken (a word joiner after its first
        character), so that conversation text can never tokenize into a control token such as
        ``<|im_end|>``: only the template's own markup does."""
        if self._control is None:
            return text
        return self._control.sub(lambda m: m[0][0] + "\u2060" + m[0][1:], text)

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

    def best_slot(self, tokens: list[int], candidates: list[int]) -> int | None:
        """The candidate slot whose KV cache holds the longest prefix of ``tokens``, if any.

        A slot qualifies only if at least half of what it holds is reused: a new conversation
        that merely shares a system prompt must not evict another conversation's cache (the
        caller then takes the slot free the longest). Reads the workers' bookkeeping from the
        event loop: a hint, never a guarantee (the worker checks the real prefix at start).
        """
        best, best_len = None, 0
        for slot in candidates:
            worker, seq = self._slot_place[slot]
            n, held = worker.prefix_match(seq, tokens)
            if n > best_len and 2 * n >= held:
                best, best_len = slot, n
        return best

    def submit(self, slot: int, job: Job) -> None:
        worker, seq = self._slot_place[slot]
        worker.submit(job, seq)

    def _token_text(self, token: int) -> str:
        assert self._vocab is not None
        if token < 0:
            return ""
        return self._vocab.detokenize([token], special=True).decode("utf-8", errors="replace")
