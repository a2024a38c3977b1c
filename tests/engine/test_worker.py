"""One real worker on the tiny GGUF: UTF-8-safe pieces, seeds, limits, cancellation."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamastream.engine.sampling import SamplingParams
from llamastream.engine.worker import (
    Event,
    Failed,
    Finished,
    Job,
    SavedState,
    TextChunk,
    Worker,
    load_llama,
)


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> Iterator[Worker]:
    w = Worker(0, str(tiny_model), n_slots=4, n_ctx=4096, n_batch=64, n_threads=1)
    w.start().result(30)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def prompt(tiny_model: Path) -> list[int]:
    vocab = load_llama(str(tiny_model), vocab_only=True)
    tokens = vocab.tokenize(
        b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", special=True
    )
    vocab.close()
    return tokens


def run(worker: Worker, job_tokens: list[int], params: SamplingParams, seq: int = 0) -> list[Event]:
    events: queue.Queue[Event] = queue.Queue()
    job = Job(job_tokens, params, events.put)
    worker.submit(job, seq)
    assert job.done.wait(60)
    return list(events.queue)


def test_byte_tokens_never_split_a_character(worker: Worker, prompt: list[int]) -> None:
    target = "日本語のテキスト、こんにちは世界🌸"
    # The grammar forces the reply byte by byte through the byte tokens (the model's Japanese
    # word tokens are not spelled this way), so every character spans 3-4 tokens.
    grammar = 'root ::= "' + target + '"'
    events = run(worker, prompt, SamplingParams(max_new_tokens=200, grammar=grammar, seed=1))
    chunks = [e.text for e in events if isinstance(e, TextChunk)]
    assert "".join(chunks) == target
    assert len(chunks) >= 5
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.completion_tokens > len(target)  # more tokens than characters


def test_same_seed_same_reply(worker: Worker, prompt: list[int]) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=42)
    first = run(worker, prompt, params)
    other = run(worker, prompt, params.updated(seed=7))
    second = run(worker, prompt, params)
    assert first == second
    assert first != other


def test_max_new_tokens_ends_with_length(worker: Worker, prompt: list[int]) -> None:
    events = run(worker, prompt, SamplingParams(max_new_tokens=5, seed=3))
    finished = events[-1]
    assert finished == Finished("length", len(prompt), 5)


def test_cancel_stops_within_one_token(worker: Worker, prompt: list[int]) -> None:
    seen: list[Event] = []
    job: Job

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, TextChunk) and len(seen) == 3:
            job.cancel.set()

    job = Job(prompt, SamplingParams(max_new_tokens=1000, seed=5), on_event)
    worker.submit(job)
    assert job.done.wait(30)
    assert seen[-1] == Finished("cancelled", len(prompt), 3)
    assert len([e for e in seen if isinstance(e, TextChunk)]) == 3


def test_a_failure_is_reported_and_the_worker_goes_on(worker: Worker, prompt: list[int]) -> None:
    events = run(worker, [10**7], SamplingParams(max_new_tokens=3))
    assert isinstance(events[-1], Failed)
    assert isinstance(run(worker, prompt, SamplingParams(max_new_tokens=3))[-1], Finished)


def test_stop_string_split_across_tokens_is_not_emitted(worker: Worker, prompt: list[int]) -> None:
    grammar = 'root ::= "日本語のテキスト、こんにちは世界"'
    params = SamplingParams(max_new_tokens=200, grammar=grammar, seed=1, stop=("こんにちは",))
    events = run(worker, prompt, params)
    text = "".join(e.text for e in events if isinstance(e, TextChunk))
    assert text == "日本語のテキスト、"
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "stop"


def test_batched_slots_give_the_same_replies_as_alone(worker: Worker, tiny_model: Path) -> None:
    vocab = load_llama(str(tiny_model), vocab_only=True)
    prompts = [
        vocab.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n".encode(), special=True)
        for q in ("first", "a second, longer question", "三番目", "4")
    ]
    vocab.close()
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=40),
        SamplingParams(temperature=0.9, max_new_tokens=30, seed=11),
        SamplingParams(temperature=1.3, top_k=5, max_new_tokens=50, seed=12),
        SamplingParams(temperature=0.0, max_new_tokens=20, stop=("日本",)),
    ]
    alone = [run(worker, p, q, seq=0) for p, q in zip(prompts, params, strict=True)]

    queues: list[queue.Queue[Event]] = [queue.Queue() for _ in prompts]
    jobs = [Job(p, q, e.put) for p, q, e in zip(prompts, params, queues, strict=True)]
    gate = threading.Event()
    worker.call(gate.wait)  # all four join before the first step
    for seq, job in enumerate(jobs):
        worker.submit(job, seq)
    gate.set()
    for job in jobs:
        assert job.done.wait(60)
    batched = [list(e.queue) for e in queues]

    def text(events: list[Event]) -> str:
        return "".join(e.text for e in events if isinstance(e, TextChunk))

    assert [text(e) for e in batched] == [text(e) for e in alone]
    assert [e[-1] for e in batched] == [e[-1] for e in alone]


def test_a_long_prompt_does_not_stall_a_running_stream(worker: Worker, prompt: list[int]) -> None:
    long_prompt = prompt * 40  # read in chunks of n_batch (64) over many steps
    order: list[str] = []
    short = Job(prompt, SamplingParams(max_new_tokens=30, seed=1), lambda e: order.append("s"))
    long = Job(long_prompt, SamplingParams(max_new_tokens=1, seed=1), lambda e: order.append("L"))
    gate = threading.Event()
    worker.call(gate.wait)
    worker.submit(short, 0)
    worker.submit(long, 1)
    gate.set()
    assert short.done.wait(30) and long.done.wait(30)
    # The short reply kept streaming while the long prompt was being read.
    assert order.index("L") > 10


def _text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_a_saved_cache_restores_into_another_slot_exactly(tiny_model: Path) -> None:
    """A conversation's cache, saved when another takes its slot, restores elsewhere and
    continues exactly as a cache that never left; it is never restored into another prompt."""
    saved: dict[str, SavedState] = {}
    w = Worker(
        0,
        str(tiny_model),
        n_slots=2,
        n_ctx=2048,
        n_batch=64,
        n_threads=1,
        state_sink=lambda key, state: saved.__setitem__(key, state),
        min_saved_tokens=8,
    )
    fresh = Worker(1, str(tiny_model), n_slots=1, n_ctx=2048, n_batch=64, n_threads=1)
    w.start().result(30)
    fresh.start().result(30)
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=24, seed=1)
        first = [1, *range(10, 130)]  # conversation a: 121 byte tokens
        events: queue.Queue[Event] = queue.Queue()

        def job(tokens: list[int], key: str, restore: SavedState | None = None) -> list[Event]:
            done = Job(tokens, greedy, events.put, cache_key=key, restore=restore)
            w.submit(done, 0)
            assert done.done.wait(60)
            out = []
            while not events.empty():
                out.append(events.get())
            return out

        job(first, "a")
        assert saved == {}
        job([1, *range(140, 200)], "b")  # b takes the slot: a's cache is saved
        state = saved["a"]
        assert list(state.tokens[: len(first)]) == first
        assert len(state.tokens) >= len(first) + 20  # the reply's tokens too
        follow_up = [*state.tokens, *range(200, 240)]
        before = w.restored_tokens
        resumed = job(follow_up, "a", restore=state)
        assert w.restored_tokens - before == len(state.tokens)
        # The same follow-up on a worker that never saw conversation a: the same reply.
        expected = run(fresh, follow_up, greedy)
        assert _text(resumed) == _text(expected)
        assert _text(resumed)
        # A state whose tokens are not a prefix of the prompt is never restored.
        before = w.restored_tokens
        other = job([1, *range(60, 120)], "c", restore=state)
        assert w.restored_tokens == before
        assert _text(other) == _text(run(fresh, [1, *range(60, 120)], greedy))
    finally:
        w.stop()
        fresh.stop()
