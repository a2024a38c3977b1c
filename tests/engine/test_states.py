"""StateStore: saved KV caches in memory and on disk, per model fingerprint."""

from __future__ import annotations

from pathlib import Path

from llamastream.engine.states import StateStore, model_fingerprint
from llamastream.engine.worker import SavedState


def test_memory_first_then_disk_and_restarts(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "m1", ram_bytes=250)
    a, b = SavedState((1, 2, 3), b"a" * 200), SavedState((4, 5), b"b" * 200)
    store.put("a", a)
    assert store.recall("a") == a
    store.put("b", b)  # over the memory budget: a leaves memory, stays on disk
    store.flush()
    assert store.recall("a") is None
    assert store.recall("b") == b
    assert store.get("a") == a
    store.close()
    reopened = StateStore(tmp_path, "m1")
    assert reopened.get("b") == b  # written to disk: survives a restart
    other_model = StateStore(tmp_path, "m2")
    assert other_model.get("b") is None  # another model never sees it
    other_model.close()
    reopened.discard("b")
    assert reopened.get("b") is None
    reopened.close()


def test_the_fingerprint_follows_the_model_file(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"one")
    first = model_fingerprint(model, "f16", "f16")
    assert model_fingerprint(model, "q8_0", "f16") != first
    model.write_bytes(b"other")
    assert model_fingerprint(model, "f16", "f16") != first
