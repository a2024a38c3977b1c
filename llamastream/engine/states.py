"""Saved KV-cache sequences of conversations that lost their slot: in memory, and in diskcache.

When a conversation's slot goes to another conversation, the worker hands its cache to
`StateStore.put`: it is kept in memory (the most recent, up to ``ram_bytes``) and written to
disk by a thread of its own when it leaves memory or the server stops (so decoding never waits
for the disk, and caches outlive memory and restarts); when
the conversation comes back to a slot that does not hold its history, `get` returns the cache
for the worker to restore. Keys carry a fingerprint of the model file and KV-cache types, so a
cache is never restored under another model; the worker restores a cache only when its tokens
are a prefix of the new prompt.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diskcache
import llama_cpp

from llamastream.engine.worker import SavedState

logger = logging.getLogger(__name__)


def model_fingerprint(model_path: Path, *parts: str) -> str:
    """Identifies a model file (path, size, modification time), the cache's format and the
    llama.cpp build that wrote it."""
    stat = model_path.stat()
    build = str(getattr(llama_cpp, "__version__", ""))
    text = "|".join(
        [str(model_path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), build, *parts]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StateStore:
    """Conversation key → `SavedState`, least recently stored evicted past ``max_bytes``.

    >>> import tempfile
    >>> store = StateStore(tempfile.mkdtemp(), "model-a", max_bytes=1 << 20)
    >>> store.put("session-1", SavedState((1, 2, 3), b"kv"))
    >>> store.flush()
    >>> store.get("session-1")
    SavedState(tokens=(1, 2, 3), data=b'kv')
    >>> StateStore(store.directory, "model-b").get("session-1") is None
    True
    >>> store.close()
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: str,
        *,
        max_bytes: int = 2 << 30,
        ram_bytes: int = 512 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.ram_bytes = ram_bytes
        self._ram: collections.OrderedDict[str, SavedState] = collections.OrderedDict()
        self._ram_used = 0
        self._pending = 0  # bytes handed to the writer and not yet written
        self._ram_lock = threading.Lock()
        self._cache = diskcache.Cache(
            str(self.directory), size_limit=max_bytes, eviction_policy="least-recently-stored"
        )
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llamastream-kv-writer")

    def put(self, key: str, state: SavedState) -> None:
        """Keep ``state`` (any thread): in memory while it is among the most recent
        ``ram_bytes``, on disk once it leaves memory or the store closes.

        Most conversations that lose their slot come back soon or never; neither needs a disk
        write. Writes waiting for the disk are bounded: past that, a state is dropped.
        """
        for spilled_key, spilled in self._remember(key, state):
            self._queue_write(spilled_key, spilled)

    def _queue_write(self, key: str, state: SavedState) -> None:
        with self._ram_lock:
            if self._pending + len(state.data) > max(self.ram_bytes, 64 << 20):
                logger.warning("the disk is behind on saved KV caches: one was dropped")
                return
            self._pending += len(state.data)
        self._writer.submit(self._write, key, state)

    def recall(self, key: str) -> SavedState | None:
        """The state under ``key`` if it is in memory (never blocks on the disk)."""
        with self._ram_lock:
            state = self._ram.get(key)
            if state is not None:
                self._ram.move_to_end(key)
            return state

    def get(self, key: str) -> SavedState | None:
        """The state saved under ``key`` for this model, if any (may read the disk)."""
        state = self.recall(key)
        if state is not None:
            return state
        try:
            value = self._cache.get(self._key(key))
        except Exception:
            logger.exception("reading a saved KV cache failed")
            return None
        if not isinstance(value, tuple) or len(value) != 2:
            return None
        tokens = array("i")
        tokens.frombytes(value[0])
        return SavedState(tuple(tokens), value[1])

    def discard(self, key: str) -> None:
        """Forget ``key``'s state, also one still waiting to be written (any thread)."""
        with self._ram_lock:
            state = self._ram.pop(key, None)
            if state is not None:
                self._ram_used -= len(state.data)
        # Through the writer, so that a write queued before runs first and is deleted too.
        self._writer.submit(self._cache.delete, self._key(key)).result()

    def _remember(self, key: str, state: SavedState) -> list[tuple[str, SavedState]]:
        """Keep ``state`` in memory; returns what memory cannot hold (this state, or older)."""
        with self._ram_lock:
            old = self._ram.pop(key, None)
            if old is not None:
                self._ram_used -= len(old.data)
            if len(state.data) > self.ram_bytes:
                return [(key, state)]
            self._ram[key] = state
            self._ram_used += len(state.data)
            spilled = []
            while self._ram_used > self.ram_bytes:
                evicted_key, evicted = self._ram.popitem(last=False)
                self._ram_used -= len(evicted.data)
                spilled.append((evicted_key, evicted))
            return spilled

    def flush(self) -> None:
        """Wait until the disk writes queued so far are done."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Write what is only in memory to disk (it outlives a restart), then close."""
        with self._ram_lock:
            kept = list(self._ram.items())
            self._ram.clear()
            self._ram_used = 0
        for key, state in kept:
            self._writer.submit(self._write, key, state, queued=False)
        self._writer.shutdown(wait=True)
        self._cache.close()

    def _write(self, key: str, state: SavedState, *, queued: bool = True) -> None:
        try:
            if queued:
                with self._ram_lock:
                    self._pending -= len(state.data)
            tokens = array("i", state.tokens).tobytes()
            self._cache.set(self._key(key), (tokens, state.data))
            logger.debug(
                "saved a KV cache of %d tokens (%d bytes)", len(state.tokens), len(state.data)
            )
        except Exception:
            logger.exception("saving a KV cache failed")

    def _key(self, key: str) -> str:
        return f"{self.fingerprint}:{key}"
