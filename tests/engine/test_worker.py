"""One real worker on the tiny GGUF: UTF-8-safe pieces, seeds, limits, cancellation."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

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
    assert finished == Finished("length", len(prompt), 5, ANY)


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
    assert seen[-1] == Finished("cancelled", len(prompt), 3, ANY)
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
    # (run alone, a prompt may find its prefix cached from the run before: same ends otherwise)
    ends = [[dataclasses.replace(e[-1], cached_tokens=0) for e in r] for r in (batched, alone)]
    assert ends[0] == ends[1]


def test_a_step_feeds_its_slots_in_sequence_order(worker: Worker, prompt: list[int]) -> None:
    """Slots that started in any order go into each batch by sequence, so that llama.cpp
    computes consecutive slots in one pass (a gap between slots costs a pass of its own)."""

    def lockstep(seqs: list[int]) -> tuple[int, int]:
        before = dataclasses.replace(worker.times)
        params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
        jobs = [Job(prompt[:12], params, lambda e: None) for _ in seqs]  # all in one batch
        gate = threading.Event()
        worker.call(gate.wait)  # all start in one step, and end in one
        for seq, job in zip(seqs, jobs, strict=True):
            worker.submit(job, seq)
        gate.set()
        for job in jobs:
            assert job.done.wait(60)
        return worker.times.steps - before.steps, worker.times.runs - before.runs

    steps, runs = lockstep([3, 1, 0, 2])  # started out of order
    assert steps >= 12 and runs == steps
    steps, runs = lockstep([2, 0])  # a gap: two runs each step
    assert steps >= 12 and runs == 2 * steps


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


def _reference_reply(model_path: Path, tokens: list[int], params: SamplingParams) -> str:
    """The reply llama.cpp's own sampler chain gives (its penalties sampler included), one
    sequence, token by token: what the worker's own penalties must reproduce."""
    import codecs
    import ctypes

    import llama_cpp
    from llama_cpp import _internals as internals

    model = internals.LlamaModel(
        path_model=str(model_path), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx, ctx_params.n_batch, ctx_params.n_threads = 1024, 512, 1
    ctx = internals.LlamaContext(model=model, params=ctx_params, verbose=False)
    batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1)
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    sampler = internals.LlamaSampler()
    sampler.add_penalties(
        model.n_vocab(),
        64,
        params.repeat_penalty,
        params.frequency_penalty,
        params.presence_penalty,
    )
    if params.temperature <= 0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(params.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = []
    try:
        batch.set_batch(tokens, n_past=0, logits_all=False)
        ctx.decode(batch)
        for i in range(params.max_new_tokens):
            token = sampler.sample(ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            piece = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, piece, len(piece), 0, False)
            text.append(decoder.decode(piece.raw[:n]))
            batch.set_batch([token], n_past=len(tokens) + i, logits_all=False)
            ctx.decode(batch)
        text.append(decoder.decode(b"", final=True))
    finally:
        sampler.close()
        batch.close()
        ctx.close()
        model.close()
    return "".join(text)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_new_tokens=80, repeat_penalty=1.5),
        SamplingParams(
            temperature=0,
            max_new_tokens=80,
            repeat_penalty=1.2,
            frequency_penalty=0.7,
            presence_penalty=0.5,
        ),
        SamplingParams(temperature=0.8, top_k=20, max_new_tokens=80, repeat_penalty=1.3, seed=5),
    ],
    ids=["repeat", "repeat-frequency-presence", "sampled"],
)
def test_repetition_penalties_match_llama_cpp(
    worker: Worker, prompt: list[int], tiny_model: Path, params: SamplingParams
) -> None:
    """The worker applies the penalties itself (llama.cpp's sampler looks up every vocabulary
    entry); the replies must be those of llama.cpp's own penalties sampler."""
    expected = _reference_reply(tiny_model, prompt, params)
    got = _text(run(worker, prompt, params))
    assert got == expected
    # The penalties do change this reply: the comparison above is not vacuous.
    plain = params.updated(repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    assert _text(run(worker, prompt, plain)) != got


def test_a_shared_prompt_prefix_is_copied_from_another_slot(tiny_model: Path) -> None:
    """A new conversation whose prompt starts like one another slot holds (a shared system
    prompt) copies that cache instead of reading it again, and replies exactly as if it had
    read it; a short shared prefix is not worth a copy."""
    w = Worker(0, str(tiny_model), n_slots=3, n_ctx=2048, n_batch=64, n_threads=1)
    fresh = Worker(1, str(tiny_model), n_slots=1, n_ctx=2048, n_batch=64, n_threads=1)
    w.start().result(30)
    fresh.start().result(30)
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=24, seed=1)
        system = [1, *range(100, 160)]  # 61 tokens every conversation starts with
        run(w, [*system, *range(10, 40)], greedy, seq=0)
        before = w.borrowed_tokens
        second = [*system, *range(40, 70)]
        reply = run(w, second, greedy, seq=1)
        assert w.borrowed_tokens - before == len(system)
        assert _text(reply) == _text(run(fresh, second, greedy))
        assert w.prefix_match(1, second)[0] >= len(system)
        # Sharing only a few tokens: the slot reads its prompt itself.
        before = w.borrowed_tokens
        third = [*system[:8], *range(170, 230)]
        assert _text(run(w, third, greedy, seq=2)) == _text(run(fresh, third, greedy))
        assert w.borrowed_tokens == before
    finally:
        w.stop()
        fresh.stop()


def _text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_a_lazy_grammar_holds_the_reply_only_from_its_trigger_on(
    worker: Worker, prompt: list[int]
) -> None:
    """A tool call's grammar under ``auto``: free text until the trigger, then held."""
    free = SamplingParams(temperature=0.0, max_new_tokens=40, seed=1)
    reply = _text(run(worker, prompt, free))
    # A word the model writes of its own accord, somewhere after its first token.
    trigger = next(w for w in ("日本", "世界", "東京", "テスト", "です") if w in reply[1:])
    grammar = f'root ::= "{trigger}" " held!"'
    lazy = free.updated(grammar=grammar, grammar_triggers=(f"[\\s\\S]*?({trigger})[\\s\\S]*",))
    events = run(worker, prompt, lazy)
    held = _text(events)
    before = reply[: reply.index(trigger)]
    assert held == before + trigger + " held!"  # the same free text, then the grammar
    assert events[-1] == Finished("stop", len(prompt), events[-1].completion_tokens, ANY)  # type: ignore[union-attr]
    # A trigger that never appears leaves the reply free.
    never = free.updated(grammar=grammar, grammar_triggers=(r"[\s\S]*?(NEVER)[\s\S]*",))
    assert _text(run(worker, prompt, never)) == reply


def test_control_tokens_are_written_as_text_only_when_asked(
    worker: Worker, tiny_model: Path
) -> None:
    """Tool-call markers such as Mistral's [TOOL_CALLS] are control tokens: the parser sees
    them only when the job asks for special tokens as text."""
    vocab = load_llama(str(tiny_model), vocab_only=True)
    (im_start,) = vocab.tokenize(b"<|im_start|>", add_bos=False, special=True)
    vocab.close()
    assert worker._piece(im_start) == b""
    assert worker._piece(im_start, special=True) == b"<|im_start|>"
    assert worker._piece(im_start) == b""  # each rendering cached apart
